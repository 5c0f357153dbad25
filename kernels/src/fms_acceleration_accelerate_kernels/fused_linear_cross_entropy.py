"""Fused linear + cross-entropy: ``loss = CE(hidden @ weight.T + bias, target)`` without the full (N, V) logits.

The rows are processed in chunks. Per chunk the logits are computed into one reused buffer (cuBLAS, fp32
accumulation), the cross-entropy row kernel computes the loss and writes ``dloss/dlogits`` over that buffer in
the same pass, and the buffer is immediately contracted into ``grad_hidden`` (chunk rows) and accumulated into
``grad_weight`` / ``grad_bias``. The backward only scales these precomputed gradients by the incoming gradient.
Gradients are skipped for inputs that do not require them (a frozen ``lm_head`` under LoRA costs no weight-grad
GEMM). Peak extra memory is one logits chunk (about ``chunk_bytes``) plus the gradients themselves.

Because the gradient is produced in the forward pass, the loss must be reduced to a scalar (``"mean"`` or
``"sum"``); ``reduction="none"`` is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import check_float_dtype, use_triton
from .cross_entropy import (
    ce_forward_rows,
    check_target,
    cross_entropy_ref,
    loss_divisor,
    loss_options,
    validate_loss_options,
)

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_per_token",
    "fused_linear_cross_entropy_per_token_ref",
    "fused_linear_cross_entropy_per_token_triton",
    "fused_linear_cross_entropy_ref",
    "fused_linear_cross_entropy_triton",
]

# Upper bound of one logits chunk; on CUDA also at most 1/16 of the device's memory.
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024


def choose_chunk_rows(n_rows: int, vocab: int, element_size: int, device: torch.device, chunk_bytes: int) -> int:
    """Rows per logits chunk: as many as fit ``chunk_bytes`` (and 1/16 of the CUDA device's memory), a multiple of
    64. The device's size comes from its cached properties: no driver query on every step (``mem_get_info`` asks the
    driver each time it is called)."""
    budget = chunk_bytes
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory // 16)
    rows = max(1, budget // (vocab * element_size))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


def _flce_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: float | torch.Tensor | None,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
    chunk_rows: int | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss (fp32 scalar) and the gradients of the loss (for an incoming gradient of 1) that are asked for."""
    device = hidden.device
    if reduction == "mean":
        divisor = loss_divisor(target, ignore_index, num_items_in_batch)
        grad_scale = (1.0 / divisor).reshape(1)
    else:
        divisor = None
        grad_scale = torch.ones(1, dtype=torch.float32, device=device)
    loss_rows, _lse, grad_hidden, grad_weight, grad_bias = _chunked_pass(
        hidden, weight, target, bias, ignore_index, softcap, logits_scaling, label_smoothing, chunk_rows, grad_scale,
        need_grad_hidden, need_grad_weight, need_grad_bias,
    )  # fmt: skip
    loss = loss_rows.sum()
    if divisor is not None:
        loss = loss / divisor
    return loss, grad_hidden, grad_weight, grad_bias


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
    chunk_rows: int | None,
    grad_scale: torch.Tensor,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    stats_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-row losses and log-sum-exp, and the gradients of ``grad_scale * sum(loss_rows)`` that are asked for
    (``grad_bias`` in the bias dtype); with ``stats_out`` also each row's entropy and top-1 flag."""
    n_rows, _hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias

    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_grad_bias else None

    if chunk_rows is None:
        chunk_rows = choose_chunk_rows(n_rows, vocab, hidden.element_size(), device, DEFAULT_CHUNK_BYTES)
    chunk_rows = max(1, min(chunk_rows, n_rows))
    logits_buffer = torch.empty((chunk_rows, vocab), dtype=hidden.dtype, device=device) if n_rows else None
    weight_t = weight.t()
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        hidden_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias is not None:
            torch.addmm(bias, hidden_chunk, weight_t, out=logits)
        else:
            torch.mm(hidden_chunk, weight_t, out=logits)
        chunk_loss, chunk_lse = ce_forward_rows(
            logits,
            target[start:end],
            ignore_index,
            softcap,
            logits_scaling,
            label_smoothing,
            grad_out=logits if need_grad else None,
            grad_scale=grad_scale,
            stats_out=None if stats_out is None else (stats_out[0][start:end], stats_out[1][start:end]),
        )
        loss_rows[start:end] = chunk_loss
        lse_rows[start:end] = chunk_lse
        # ``logits`` now holds dloss/dlogits for this chunk.
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_grad_weight:
            grad_weight.addmm_(logits.t(), hidden_chunk)
        if need_grad_bias:
            grad_bias += logits.sum(dim=0, dtype=torch.float32)

    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss_rows, lse_rows, grad_hidden, grad_weight, grad_bias


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd path; ``torch.compile`` uses the custom op below."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, options):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        loss, grad_hidden, grad_weight, grad_bias = _flce_forward(
            hidden, weight, target, bias, *options, need_h, need_w, need_b
        )
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy computes its gradients once, in the forward pass; a second backward "
                "through the same graph (retain_graph=True) is not supported. Recompute the loss instead."
            )
        grads = ctx.grads
        ctx.grads = None
        scaled = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads]
        return scaled[0], scaled[1], None, scaled[2], None


@torch.library.custom_op("fms_accel_kernels::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: torch.Tensor | None,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
    chunk_rows: int | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, gh, gw, gb = _flce_forward(
        hidden, weight, target, bias, ignore_index, reduction, num_items_in_batch, softcap, logits_scaling,
        label_smoothing, chunk_rows, need_grad_hidden, need_grad_weight, need_grad_bias,
    )  # fmt: skip
    empty = hidden.new_empty(0)
    return loss, (gh if gh is not None else empty), (gw if gw is not None else empty), (gb if gb is not None else empty)


@_flce_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, num_items_in_batch, softcap, logits_scaling,
      label_smoothing, chunk_rows, need_grad_hidden, need_grad_weight, need_grad_bias):  # fmt: skip
    loss = hidden.new_empty((), dtype=torch.float32)
    gh = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_grad_weight else hidden.new_empty(0)
    gb = torch.empty_like(bias) if (need_grad_bias and bias is not None) else hidden.new_empty(0)
    return loss, gh, gw, gb


def _flce_setup_context(ctx, inputs, output):
    _loss, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    ctx.has_bias = inputs[3] is not None
    ctx.needs = (inputs[11], inputs[12], inputs[13])


def _flce_autograd_backward(ctx, grad_loss, *_unused):
    gh, gw, gb = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs
    dh = gh * grad_loss.to(gh.dtype) if need_h else None
    dw = gw * grad_loss.to(gw.dtype) if need_w else None
    db = gb * grad_loss.to(gb.dtype) if (need_b and ctx.has_bias) else None
    return dh, dw, None, db, None, None, None, None, None, None, None, None, None, None


_flce_op.register_autograd(_flce_autograd_backward, setup_context=_flce_setup_context)


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float_dtype("hidden", hidden)
    check_float_dtype("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}. "
            "Flatten the batch first, e.g. hidden.view(-1, H)."
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    check_target(target, hidden.shape[0])
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")


def _validate(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing) -> None:
    validate_loss_options(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    if reduction == "none":
        raise ValueError(
            "fused_linear_cross_entropy reduces the loss to a scalar (it computes gradients in the forward pass); "
            "use reduction='mean' or 'sum', or cross_entropy(...) for per-token losses"
        )


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Pure-torch reference: full logits ``F.linear(hidden, weight, bias)`` then :func:`cross_entropy_ref`.

    Args:
        hidden: (N, H) final hidden states.
        weight: (V, H) output projection (``lm_head.weight``).
        target: (N,) class ids; ``ignore_index`` entries contribute nothing.
        bias: optional (V,) output bias.
        ignore_index, reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing: as in
            ``cross_entropy_ref``; ``reduction`` is ``"mean"`` or ``"sum"``.

    Returns:
        fp32 scalar loss.
    """
    _check_inputs(hidden, weight, target, bias)
    _validate(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    logits = F.linear(hidden, weight, bias)
    return cross_entropy_ref(
        logits, target, ignore_index, reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing
    )


def fused_linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Chunked fused linear cross-entropy with autograd; contract of :func:`fused_linear_cross_entropy_ref`.

    Args:
        chunk_rows: rows per logits chunk; None picks the largest multiple of 64 whose (rows, V) logits fit in
            512 MiB (and 1/8 of the free CUDA memory).
        (others): as in :func:`fused_linear_cross_entropy_ref`.
    """
    _check_inputs(hidden, weight, target, bias)
    _validate(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    softcap = float(softcap) if softcap is not None else None
    if torch.compiler.is_compiling():
        num_items = num_items_in_batch
        if num_items is not None and not isinstance(num_items, torch.Tensor):
            num_items = torch.tensor(float(num_items), dtype=torch.float32, device=hidden.device)
        need_b = bias is not None and bias.requires_grad
        return _flce_op(
            hidden, weight, target, bias, int(ignore_index), reduction, num_items, softcap, float(logits_scaling),
            float(label_smoothing), chunk_rows, hidden.requires_grad, weight.requires_grad, need_b,
        )[0]  # fmt: skip
    options = (int(ignore_index), reduction, num_items_in_batch, softcap, float(logits_scaling),
               float(label_smoothing), chunk_rows)  # fmt: skip
    return _FusedLinearCrossEntropyFunction.apply(hidden, weight, target, bias, options)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias``: chunked Triton path on CUDA (or ``TRITON_INTERPRET=1``),
    else the reference (which materialises the logits).

    Args:
        hidden: (N, H) final hidden states (already shifted to align with ``target``).
        weight: (V, H) ``lm_head.weight``, same dtype as ``hidden``.
        target: (N,) class ids; ``ignore_index`` entries contribute nothing.
        bias: optional (V,) output bias.
        ignore_index: target value to skip.
        reduction: ``"mean"`` (sum / valid targets, or / ``num_items_in_batch``) or ``"sum"``.
        num_items_in_batch: HF's gradient-accumulation-correct divisor of the summed loss.
        softcap: Gemma2 final logit softcapping value, or None.
        logits_scaling: Granite's logits divisor.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.

    Returns:
        fp32 scalar loss.
    """
    kwargs = loss_options(ignore_index, reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    if use_triton(hidden, weight, target, bias):
        return fused_linear_cross_entropy_triton(hidden, weight, target, bias, **kwargs)
    return fused_linear_cross_entropy_ref(hidden, weight, target, bias, **kwargs)


# ------------------------------------------------------------------------------------------ per-token outputs


def _weight_grads_by_recompute(
    hidden, weight, target, bias, lse, grad_rows, ignore_index, softcap, logits_scaling, chunk_rows, need_w, need_b
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_rows * loss_rows)`` w.r.t. weight and bias (those asked for), recomputing each
    logits chunk."""
    from .cross_entropy import ce_backward_rows

    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    grad_weight = torch.zeros_like(weight) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
    if chunk_rows is None:
        chunk_rows = choose_chunk_rows(n_rows, vocab, hidden.element_size(), hidden.device, DEFAULT_CHUNK_BYTES)
    chunk_rows = max(1, min(chunk_rows, n_rows))
    weight_t = weight.t()
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        hidden_chunk = hidden[start:end]
        logits = torch.addmm(bias, hidden_chunk, weight_t) if bias is not None else torch.mm(hidden_chunk, weight_t)
        ce_backward_rows(grad_rows[start:end], logits, target[start:end], lse[start:end], ignore_index, softcap,
                         logits_scaling, 0.0, out=logits)  # fmt: skip
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), hidden_chunk)
        if grad_bias is not None:
            grad_bias += logits.sum(dim=0, dtype=torch.float32)
    return grad_weight, (grad_bias.to(bias.dtype) if grad_bias is not None else None)


class _FusedLinearPerTokenFunction(torch.autograd.Function):
    """Per-token losses of ``hidden @ weight.T + bias`` with entropy and top-1 flags, chunked (eager path).

    The forward writes the gradient of each row's loss for an incoming gradient of 1 (``softmax - onehot``) and
    contracts it at once, as the scalar-loss path does. A per-row incoming gradient then scales the rows of
    ``grad_hidden`` exactly. ``grad_weight`` / ``grad_bias`` sum over rows, so they are scaled as a whole when the
    incoming gradient is the same on every scored row (a token-mean loss: checked with one device-to-host read,
    only when the weight or bias needs a gradient); otherwise they are recomputed chunk by chunk from the stored
    log-sum-exp (e.g. a loss weighting each token differently).
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, softcap, logits_scaling, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        n_rows = hidden.shape[0]
        entropy = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        is_top1 = torch.empty(n_rows, dtype=torch.bool, device=hidden.device)
        ones = torch.ones(1, dtype=torch.float32, device=hidden.device)
        loss_rows, lse, grad_hidden, grad_weight, grad_bias = _chunked_pass(
            hidden, weight, target, bias, ignore_index, softcap, logits_scaling, 0.0, chunk_rows, ones,
            need_h, need_w, need_b, stats_out=(entropy, is_top1),
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(is_top1)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.options = (ignore_index, softcap, logits_scaling, chunk_rows)
        if need_w or need_b:
            ctx.save_for_backward(hidden, weight, target, bias, lse)
        else:
            ctx.save_for_backward(target)
        ctx.needs = (need_h, need_w, need_b)
        return loss_rows, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, _grad_top1):
        from .cross_entropy import ENTROPY_GRAD_MESSAGE

        if grad_entropy is not None:
            raise RuntimeError(ENTROPY_GRAD_MESSAGE)
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy_per_token computes its gradients once, in the forward pass; a second "
                "backward through the same graph (retain_graph=True) is not supported. Recompute the loss instead."
            )
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        if grad_loss is None:
            return None, None, None, None, None, None, None, None
        need_h, need_w, need_b = ctx.needs
        grad_rows = grad_loss.to(torch.float32)
        if need_h:
            # rows scaled in fp32, rounded once to the hidden dtype
            torch.mul(grad_hidden, grad_rows.unsqueeze(1), out=grad_hidden)
        if need_w or need_b:
            hidden, weight, target, bias, lse = ctx.saved_tensors
            ignore_index, softcap, logits_scaling, chunk_rows = ctx.options
            valid = target != ignore_index
            high = torch.where(valid, grad_rows, float("-inf")).amax() if valid.numel() else grad_rows.new_zeros(())
            low = torch.where(valid, grad_rows, float("inf")).amin() if valid.numel() else grad_rows.new_zeros(())
            if bool(high <= low):  # one value on every scored row (or no scored row): scale the sums
                scale = torch.where(torch.isfinite(high), high, torch.zeros_like(high)).reshape(1)
                if grad_weight is not None:
                    torch.mul(grad_weight, scale, out=grad_weight)
                if grad_bias is not None:
                    torch.mul(grad_bias, scale, out=grad_bias)
            else:
                grad_weight, grad_bias = _weight_grads_by_recompute(
                    hidden, weight, target, bias, lse, grad_rows, ignore_index, softcap, logits_scaling, chunk_rows,
                    need_w, need_b,
                )  # fmt: skip
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None


def fused_linear_cross_entropy_per_token_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference: full logits ``F.linear(hidden, weight, bias)`` then
    :func:`~fms_acceleration_accelerate_kernels.cross_entropy.cross_entropy_per_token_ref`.

    Args:
        hidden: (N, H) final hidden states (already aligned with ``target``).
        weight: (V, H) output projection; bias: optional (V,).
        target: (N,) class ids; ``ignore_index`` rows give 0 in every output.
        ignore_index, softcap, logits_scaling: as in ``cross_entropy_per_token_ref``.

    Returns:
        ``(loss, entropy, is_top1)``, each (N,): fp32 per-token negative log-likelihood with gradient, fp32
        entropy (metrics only: its backward raises), bool top-1 flag.
    """
    from .cross_entropy import check_per_token_options, cross_entropy_per_token_ref

    _check_inputs(hidden, weight, target, bias)
    check_per_token_options(softcap, logits_scaling)
    return cross_entropy_per_token_ref(F.linear(hidden, weight, bias), target, ignore_index, softcap, logits_scaling)


def fused_linear_cross_entropy_per_token_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked per-token outputs without the full logits; contract of
    :func:`fused_linear_cross_entropy_per_token_ref` (see ``_FusedLinearPerTokenFunction`` for the gradients).

    Args:
        chunk_rows: rows per logits chunk (None: as :func:`fused_linear_cross_entropy_triton`).
    """
    from .cross_entropy import check_per_token_options

    _check_inputs(hidden, weight, target, bias)
    check_per_token_options(softcap, logits_scaling)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    softcap = float(softcap) if softcap is not None else None
    return _FusedLinearPerTokenFunction.apply(
        hidden, weight, target, bias, int(ignore_index), softcap, float(logits_scaling), chunk_rows
    )


def fused_linear_cross_entropy_per_token(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood (with gradient), entropy and top-1 flag of ``hidden @ weight.T + bias``:
    chunked Triton path on CUDA (or ``TRITON_INTERPRET=1``), else the reference (full logits).

    This is the per-token form a trainer needs when it builds its own loss from token log-probabilities
    (``log_probs = -loss``) and logs entropy / token accuracy, e.g. TRL's fused LM head contract.
    """
    if use_triton(hidden, weight, target, bias):
        return fused_linear_cross_entropy_per_token_triton(hidden, weight, target, bias, ignore_index, softcap,
                                                           logits_scaling)  # fmt: skip
    return fused_linear_cross_entropy_per_token_ref(hidden, weight, target, bias, ignore_index, softcap,
                                                    logits_scaling)  # fmt: skip
