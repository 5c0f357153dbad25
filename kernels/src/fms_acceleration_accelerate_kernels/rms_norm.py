"""RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * (offset + weight)``, statistics in fp32.

``offset=0`` is the Llama/Mistral/Qwen norm, ``offset=1`` Gemma's ``(1 + weight)`` variant. The Triton forward
stores one fp32 ``rstd`` per row; the backward recomputes ``x_hat`` from it and produces ``dx`` (one program per
row group) and ``dweight`` (per-program fp32 partial sums, reduced once at the end). Nothing is computed for an
input that does not require grad (a frozen norm weight under LoRA costs no weight-gradient work).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    check_float_dtype,
    flatten_rows,
    multiprocessor_count,
    next_power_of_2,
    num_warps_for,
    row_block,
    use_triton,
)

__all__ = ["rms_norm", "rms_norm_ref", "rms_norm_triton"]


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    offset,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.math.rsqrt(mean_sq + eps)
    tl.store(RSTD + row, rstd)
    y = x * rstd * (w + offset)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    offset,
    rows_per_program,
    BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr,
    HAS_DX: tl.constexpr,
    HAS_DW: tl.constexpr,
):
    """dx and per-program dweight partial sums for rows [pid * rows_per_program, ...).

    PREFETCH: the next row's dy/x/rstd are loaded (in their own dtype) before the current row is processed,
    so two rows of loads are in flight per program instead of one.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    if PREFETCH:
        next_mask = cols < tl.where(first < last, n_cols, 0)  # nothing loaded past the program's rows
        dy_next = tl.load(DY + first * stride_dy + cols, mask=next_mask, other=0.0)
        x_next = tl.load(X + first * stride_x + cols, mask=next_mask, other=0.0)
        rstd_next = tl.load(RSTD + tl.minimum(first, n_rows - 1))  # clamped: always in bounds
    for row in range(first, last):
        if PREFETCH:
            dy = dy_next.to(tl.float32)
            x = x_next.to(tl.float32)
            rstd = rstd_next
            nxt = row + 1
            next_mask = cols < tl.where(nxt < last, n_cols, 0)
            dy_next = tl.load(DY + nxt * stride_dy + cols, mask=next_mask, other=0.0)
            x_next = tl.load(X + nxt * stride_x + cols, mask=next_mask, other=0.0)
            rstd_next = tl.load(RSTD + tl.minimum(nxt, n_rows - 1))
        else:
            dy = tl.load(DY + row * stride_dy + cols, mask=col_mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=col_mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        if HAS_DX:
            w_dy = w * dy
            proj = tl.sum(w_dy * x_hat, axis=0) / n_cols
            dx = rstd * (w_dy - x_hat * proj)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        if HAS_DW:
            dw_acc += dy * x_hat
    if HAS_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


@triton.jit
def _sum_partials_kernel(PARTIAL, OUT, n_partials, n_cols, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """OUT[cols] = sum over partial rows (fp32), rounded once to OUT's dtype: one launch for sum and cast.

    Each program reads (ROWS, BLOCK) tiles, so the loop runs n_partials / ROWS times instead of n_partials
    (one dependent load per partial row made this reduction a third of the backward's time on an H100).
    """
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, n_partials, ROWS):
        r = start + rows
        mask = (r[:, None] < n_partials) & col_mask[None, :]
        acc += tl.load(PARTIAL + r[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


def _sum_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, H) fp32 partial sums -> (H,) in ``dtype``."""
    n_partials, n_cols = partial.shape
    out = torch.empty(n_cols, dtype=dtype, device=partial.device)
    block = min(64, next_power_of_2(n_cols))
    rows = min(32, next_power_of_2(n_partials))
    _sum_partials_kernel[(triton.cdiv(n_cols, block),)](
        partial, out, n_partials, n_cols, BLOCK=block, ROWS=rows, num_warps=4
    )  # fmt: skip
    return out


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns ``y`` (shape of ``x``) and fp32 ``rstd`` (``x.shape[:-1]``)."""
    x2 = flatten_rows(x)
    n_rows, n_cols = x2.shape
    y2 = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block = row_block(n_cols)
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, weight, y2, rstd, x2.stride(0), y2.stride(0), n_cols, eps, offset,
            BLOCK=block, num_warps=num_warps_for(block),
        )  # fmt: skip
    return y2.view(x.shape), rstd.view(x.shape[:-1])


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    need_dx: bool,
    need_dw: bool,
    programs_per_sm: int = 2,
    num_warps: int | None = None,
    prefetch: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel. Returns ``dx`` (or None) and ``dweight`` (or None).

    ``programs_per_sm`` (programs accumulating weight-gradient partials), ``num_warps`` and ``prefetch`` (load
    the next row while processing the current one) are launch knobs for the benchmark's sweep. Defaults: the
    fastest of the H100 sweep at the 8B shape (with the tiled partial reduction: 2 programs
    per SM, default warps, prefetch: 0.077 ms
    vs 0.104 ms for the earlier 2 per SM, default warps, no prefetch; ``benchmarks/results/2026-11-25-h100-x1-kernels-sweep``).
    """
    x2 = flatten_rows(x)
    dy2 = flatten_rows(dy)
    n_rows, n_cols = x2.shape
    dx2 = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device) if need_dx else None
    if not (need_dx or need_dw):
        return None, None
    if need_dw:
        n_programs = max(1, min(n_rows, programs_per_sm * multiprocessor_count(x.device)))
    else:
        n_programs = max(1, n_rows)
    rows_per_program = triton.cdiv(n_rows, n_programs) if n_rows else 0
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if need_dw else None
    if n_rows > 0:
        block = row_block(n_cols)
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2, x2, weight, rstd.reshape(-1), dx2 if need_dx else x2, dw_partial if need_dw else rstd,
            dy2.stride(0), x2.stride(0), dx2.stride(0) if need_dx else 0,
            n_rows, n_cols, offset, rows_per_program,
            BLOCK=block, PREFETCH=bool(prefetch), HAS_DX=need_dx, HAS_DW=need_dw,
            num_warps=num_warps or num_warps_for(block),
        )  # fmt: skip
    dx = dx2.view(x.shape) if need_dx else None
    if need_dw:
        dw = _sum_partials(dw_partial, weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
    else:
        dw = None
    return dx, dw


class _RMSNormFunction(torch.autograd.Function):
    """Eager autograd path (lower dispatch overhead than the custom op; the custom op serves torch.compile)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        y, rstd = _forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, x, weight, rstd, ctx.offset, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None


@torch.library.custom_op("fms_accel_kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, eps, offset)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fms_accel_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _backward(dy, x, weight, rstd, offset, need_dx, need_dw)
    return (dx if dx is not None else x.new_empty(0)), (dw if dw is not None else weight.new_empty(0))


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, offset, need_dx, need_dw):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    return dx, dw


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _eps, offset = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset


def _rms_norm_autograd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = _rms_norm_bwd_op(dy.contiguous(), x, weight, rstd, ctx.offset, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None


_rms_norm_fwd_op.register_autograd(_rms_norm_autograd_backward, setup_context=_rms_norm_setup_context)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Pure-torch RMSNorm (fp32 math, result in ``x.dtype``).

    Args:
        x: (..., H) activations.
        weight: (H,) scale.
        eps: added to the mean square.
        offset: added to the weight (1.0 for Gemma's ``(1 + weight)`` norm).

    Returns:
        (..., H) tensor in ``x.dtype``.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * (weight.float() + offset)
    return y.to(x.dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Triton RMSNorm with autograd; same contract as :func:`rms_norm_ref`.

    Eager mode uses an ``autograd.Function``; under ``torch.compile`` the registered custom op
    ``fms_accel_kernels::rms_norm_fwd`` (with its backward op) is used so the graph stays whole.
    """
    check_float_dtype("x", x)
    check_float_dtype("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")
    if torch.compiler.is_compiling():
        return _rms_norm_fwd_op(x, weight, float(eps), float(offset))[0]
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm: Triton on CUDA tensors (or with ``TRITON_INTERPRET=1``), else the pure-torch reference.

    Args:
        x: (..., H) activations, fp32/bf16/fp16.
        weight: (H,) scale.
        eps: added to the mean square.
        offset: added to the weight (1.0 for Gemma's ``(1 + weight)`` norm).

    Returns:
        (..., H) tensor in ``x.dtype``.
    """
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps, offset)
    return rms_norm_ref(x, weight, eps, offset)
