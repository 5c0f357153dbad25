"""Cross-entropy over (N, V) logits with ignore_index, HF's ``num_items_in_batch`` normalisation, Gemma2 logit
softcapping, Granite logit scaling and optional label smoothing.

The logits seen by the softmax are ``z = f(x)`` with ``f(x) = softcap * tanh((x / logits_scaling) / softcap)``
(no tanh without ``softcap``; ``logits_scaling`` divides, as in HF's Granite). One program per row streams the
vocabulary in blocks with an online max/sum (fp32), so logits are read in their own dtype and never upcast in
memory. Per row it stores the loss and the log-sum-exp; the backward recomputes ``softmax(z) - target`` from them
(one read, one write of the logits) and can write the gradient over the logits buffer (``inplace_backward``).

The same row kernel can also write the gradient during the forward pass (used by the fused linear
cross-entropy, whose logits chunks are private buffers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import check_float_dtype, next_power_of_2, use_triton

__all__ = ["cross_entropy", "cross_entropy_ref", "cross_entropy_triton"]

_REDUCTIONS = ("mean", "sum", "none")
_MAX_VOCAB_BLOCK = 8192


@triton.jit
def _transform(x, inv_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = f(x) and dz/dx for the softcap/scaling transform; fp32."""
    z = x * inv_scale
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0  # tanh(z / softcap)
        dz = inv_scale * (1.0 - t * t)
        z = softcap * t
    else:
        dz = inv_scale + 0.0 * x
    return z, dz


@triton.jit
def _ce_write_grad_row(
    row_ptr,
    grad_ptr,
    target,
    lse,
    weight,
    n_cols,
    inv_scale,
    softcap,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad[j] = weight * (softmax(z)[j] - (1 - smoothing) * [j == target] - smoothing / V) * dz/dx[j]."""
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z, dz = _transform(x, inv_scale, softcap, HAS_SOFTCAP)
        p = tl.exp(z - lse)
        g = p - smoothing / n_cols - tl.where(cols == target, 1.0 - smoothing, 0.0)
        g = g * dz * weight
        tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    LOGITS,
    TARGET,
    LOSS,
    LSE,
    GRAD,
    GRAD_SCALE,
    stride_logits,
    stride_grad,
    n_cols,
    ignore_index,
    inv_scale,
    softcap,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_logits
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    m = float("-inf")
    s = 0.0
    z_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z, _dz = _transform(x, inv_scale, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)
    safe_target = tl.where(valid, target, 0)
    x_t = tl.load(row_ptr + safe_target).to(tl.float32)
    z_t, _dz_t = _transform(x_t, inv_scale, softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - smoothing) * z_t - smoothing * z_sum / n_cols
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        weight = tl.where(valid, tl.load(GRAD_SCALE), 0.0)
        _ce_write_grad_row(
            row_ptr, GRAD + row * stride_grad, safe_target, lse, weight, n_cols, inv_scale, softcap, smoothing,
            HAS_SOFTCAP, BLOCK,
        )  # fmt: skip


@triton.jit
def _ce_bwd_kernel(
    LOGITS,
    TARGET,
    LSE,
    GRAD_LOSS,
    GRAD,
    stride_logits,
    stride_grad,
    stride_grad_loss,
    n_cols,
    ignore_index,
    inv_scale,
    softcap,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    weight = tl.where(valid, tl.load(GRAD_LOSS + row * stride_grad_loss).to(tl.float32), 0.0)
    lse = tl.load(LSE + row)
    _ce_write_grad_row(
        LOGITS + row * stride_logits, GRAD + row * stride_grad, tl.where(valid, target, 0), lse, weight, n_cols,
        inv_scale, softcap, smoothing, HAS_SOFTCAP, BLOCK,
    )  # fmt: skip


def _vocab_block(n_cols: int, kind: str, launch: tuple[int, int] | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) of a row kernel; ``launch`` overrides both (used by the benchmark's sweep).

    Defaults come from the launch sweep on an H100 at V=128256 (benchmarks/results/kernels/): the loss-only
    forward is fastest with small blocks and few warps, the gradient pass with one wide block per row.
    """
    if launch is not None:
        return launch
    max_block = {"fwd": 4096, "fwd_grad": 4096, "bwd": 32768}[kind]
    block = min(max_block, next_power_of_2(n_cols))
    if kind == "fwd":
        return block, 4
    if kind == "fwd_grad":
        return block, (8 if block >= 4096 else 4)
    return block, max(4, min(32, block // 1024))


def _softcap_args(softcap: float | None) -> tuple[float, bool]:
    return (float(softcap), True) if softcap is not None else (1.0, False)


def ce_forward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
    grad_out: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    launch: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp of (N, V) logits; optionally writes the gradient in the same pass.

    Args:
        logits: (N, V) with unit stride on V.
        target: (N,) integer class ids (``ignore_index`` rows give loss 0 and gradient 0).
        grad_out: optional (N, V) buffer (may be ``logits`` itself) receiving ``grad_scale * dloss_row/dlogits``.
        grad_scale: 1-element fp32 tensor (device) multiplying the written gradient; required with ``grad_out``.

    Returns:
        ``(loss_rows, lse)``: two (N,) fp32 tensors.
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss, lse
    write_grad = grad_out is not None
    block, warps = _vocab_block(n_cols, "fwd_grad" if write_grad else "fwd", launch)
    softcap_value, has_softcap = _softcap_args(softcap)
    if write_grad:
        assert grad_scale is not None and grad_out.stride(-1) == 1
    _ce_fwd_kernel[(n_rows,)](
        logits, target, loss, lse, grad_out if write_grad else logits, grad_scale if write_grad else lse,
        logits.stride(0), grad_out.stride(0) if write_grad else 0, n_cols, ignore_index,
        1.0 / logits_scaling, softcap_value, label_smoothing,
        HAS_SOFTCAP=has_softcap, WRITE_GRAD=write_grad, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return loss, lse


def ce_backward_rows(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
    out: torch.Tensor | None = None,
    launch: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_loss * loss_rows)`` w.r.t. (N, V) logits, written to ``out`` (new if None).

    ``grad_loss`` is (N,) with any stride (0 for a broadcast scalar). ``out`` may be ``logits`` itself.
    """
    n_rows, n_cols = logits.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    block, warps = _vocab_block(n_cols, "bwd", launch)
    softcap_value, has_softcap = _softcap_args(softcap)
    _ce_bwd_kernel[(n_rows,)](
        logits, target, lse, grad_loss, out,
        logits.stride(0), out.stride(0), grad_loss.stride(0), n_cols, ignore_index,
        1.0 / logits_scaling, softcap_value, label_smoothing,
        HAS_SOFTCAP=has_softcap, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out


class _CrossEntropyRowsFunction(torch.autograd.Function):
    """Per-row losses with autograd (eager path); reductions are plain torch ops on the result."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, softcap, logits_scaling, label_smoothing, inplace_backward):
        loss, lse = ce_forward_rows(logits, target, ignore_index, softcap, logits_scaling, label_smoothing)
        ctx.save_for_backward(logits, target, lse)
        ctx.options = (ignore_index, softcap, logits_scaling, label_smoothing)
        ctx.inplace_backward = inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        # a fresh alias of the logits' storage, so autograd can adopt it as a leaf's .grad without a copy
        out = logits.detach() if ctx.inplace_backward else None
        grad = ce_backward_rows(grad_loss, logits, target, lse, *ctx.options, out=out)
        return grad, None, None, None, None, None, None


@torch.library.custom_op("fms_accel_kernels::cross_entropy_rows", mutates_args=())
def _ce_rows_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ce_forward_rows(logits, target, ignore_index, softcap, logits_scaling, label_smoothing)


@_ce_rows_op.register_fake
def _(logits, target, ignore_index, softcap, logits_scaling, label_smoothing):
    n_rows = logits.shape[0]
    return logits.new_empty(n_rows, dtype=torch.float32), logits.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("fms_accel_kernels::cross_entropy_rows_bwd", mutates_args=())
def _ce_rows_bwd_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> torch.Tensor:
    return ce_backward_rows(grad_loss, logits, target, lse, ignore_index, softcap, logits_scaling, label_smoothing)


@_ce_rows_bwd_op.register_fake
def _(grad_loss, logits, target, lse, ignore_index, softcap, logits_scaling, label_smoothing):
    return logits.new_empty(logits.shape)


def _ce_rows_setup_context(ctx, inputs, output):
    logits, target, ignore_index, softcap, logits_scaling, label_smoothing = inputs
    _loss, lse = output
    ctx.save_for_backward(logits, target, lse)
    ctx.options = (ignore_index, softcap, logits_scaling, label_smoothing)


def _ce_rows_autograd_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = _ce_rows_bwd_op(grad_loss.float(), logits, target, lse, *ctx.options)
    return grad, None, None, None, None, None


_ce_rows_op.register_autograd(_ce_rows_autograd_backward, setup_context=_ce_rows_setup_context)


def validate_loss_options(
    reduction: str,
    num_items_in_batch: int | float | torch.Tensor | None,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> None:
    """Raise ``ValueError`` for option combinations the loss kernels do not define."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            "num_items_in_batch replaces the divisor of reduction='mean' (loss = sum / num_items_in_batch); "
            f"pass reduction='mean' (got {reduction!r})"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None; got {softcap!r}")
    if not logits_scaling > 0:
        raise ValueError(f"logits_scaling must be positive (logits are divided by it); got {logits_scaling!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")


def loss_divisor(
    target: torch.Tensor, ignore_index: int, num_items_in_batch: int | float | torch.Tensor | None
) -> torch.Tensor:
    """Divisor of the summed loss for reduction='mean': ``num_items_in_batch`` or the count of valid targets."""
    if num_items_in_batch is None:
        return (target != ignore_index).sum().to(torch.float32)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=target.device, dtype=torch.float32)
    return torch.tensor(float(num_items_in_batch), dtype=torch.float32, device=target.device)


def check_target(target: torch.Tensor, n_rows: int) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``target`` is an (n_rows,) int64/int32 tensor of class ids."""
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(f"target must be 1-D with {n_rows} entries; got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 or int32 tensor of class ids; got {target.dtype}")


def loss_options(
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | float | torch.Tensor | None,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> dict:
    """The loss options shared by the cross-entropy entry points, as keyword arguments."""
    return dict(
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        softcap=softcap,
        logits_scaling=logits_scaling,
        label_smoothing=label_smoothing,
    )


def _check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    check_float_dtype("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V); got shape {tuple(logits.shape)}. Flatten with .view(-1, V).")
    check_target(target, logits.shape[0])


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str, num_items_in_batch):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / loss_divisor(target, ignore_index, num_items_in_batch)


def cross_entropy_ref(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Pure-torch cross-entropy with the same options (fp32 math, as HF's loss upcasts logits).

    Args:
        logits: (N, V) unnormalised scores.
        target: (N,) class ids; entries equal to ``ignore_index`` contribute nothing.
        ignore_index: target value to skip.
        reduction: ``"mean"`` (sum / number of valid targets, or / ``num_items_in_batch``), ``"sum"`` or
            ``"none"`` ((N,) losses, 0 at ignored rows).
        num_items_in_batch: divisor of the summed loss (HF's gradient-accumulation-correct loss); needs
            ``reduction="mean"``.
        softcap: Gemma2's final logit softcapping ``softcap * tanh(z / softcap)``; None disables it.
        logits_scaling: Granite's divisor of the logits (1.0 disables it).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.

    Returns:
        fp32 scalar, or (N,) fp32 for ``reduction="none"``.
    """
    _check_inputs(logits, target)
    validate_loss_options(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    z = logits.float() / logits_scaling
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(
        z, target.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    return _reduce(rows, target, ignore_index, reduction, num_items_in_batch)


def cross_entropy_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Triton cross-entropy with autograd; contract of :func:`cross_entropy_ref`.

    Args:
        inplace_backward: write the logits gradient over ``logits`` (saves one (N, V) buffer). Only safe when
            nothing reads ``logits`` after the backward; ignored under ``torch.compile``.
        (others): as in :func:`cross_entropy_ref`.
    """
    _check_inputs(logits, target)
    validate_loss_options(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    softcap = float(softcap) if softcap is not None else None
    options = (int(ignore_index), softcap, float(logits_scaling), float(label_smoothing))
    if torch.compiler.is_compiling():
        loss_rows = _ce_rows_op(logits, target, *options)[0]
    else:
        loss_rows = _CrossEntropyRowsFunction.apply(logits, target, *options, bool(inplace_backward))
    return _reduce(loss_rows, target, ignore_index, reduction, num_items_in_batch)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy: Triton on CUDA (or ``TRITON_INTERPRET=1``), else the reference.

    Args:
        logits: (N, V) unnormalised scores, fp32/bf16/fp16 (never upcast in memory by the Triton path).
        target: (N,) class ids; ``ignore_index`` entries contribute nothing.
        ignore_index: target value to skip.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        num_items_in_batch: divisor of the summed loss (HF's gradient-accumulation-correct loss).
        softcap: Gemma2 final logit softcapping value, or None.
        logits_scaling: Granite's logits divisor.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        inplace_backward: Triton path only: write the gradient over ``logits`` (saves an (N, V) buffer; only
            safe when nothing reads the logits after the backward).

    Returns:
        fp32 scalar, or (N,) fp32 for ``reduction="none"``.
    """
    kwargs = loss_options(ignore_index, reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    if use_triton(logits, target):
        return cross_entropy_triton(logits, target, **kwargs, inplace_backward=inplace_backward)
    return cross_entropy_ref(logits, target, **kwargs)
