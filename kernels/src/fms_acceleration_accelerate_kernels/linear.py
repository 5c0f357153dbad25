"""A dense linear layer whose forward output can be skipped while its backward stays exact.

Activation checkpointing recomputes a layer's forward during backward only to regain the tensors autograd
saved; the recomputed outputs are thrown away. When a linear layer's output is consumed by nothing that saves
it (the MLP down projection of a Llama-style decoder layer feeds only the residual sum), the recomputation
can skip that GEMM: :func:`linear` with ``compute_output=False`` saves exactly what a full call saves
(``x`` when the weight needs a gradient, ``weight`` when ``x`` does) and returns zeros.

The GEMMs are cuBLAS; there is no Triton kernel here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute_output: bool):
        need_x, need_w = x.requires_grad, weight.requires_grad
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if compute_output:
            return F.linear(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if need_x:
            dx = (g2 @ weight.to(g2.dtype)).view(*grad.shape[:-1], weight.shape[1])
        if need_w:
            dw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(ctx.weight_dtype)
        if need_b:
            db = g2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, compute_output: bool = True
) -> torch.Tensor:
    """``x @ weight.T + bias`` in the compute dtype (autocast's, else ``x``'s), with an optional output.

    Args:
        x: (..., in) input.
        weight: (out, in) weight (trainable or frozen).
        bias: (out,) or None.
        compute_output: ``False`` returns zeros instead of the product (no GEMM) but saves the same tensors for
            backward, so gradients are those of the full call. Only for a forward whose output is discarded
            (activation checkpointing's recomputation).

    Returns:
        (..., out) tensor in the compute dtype. Gradients come back in the dtypes of ``weight`` / ``bias``.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {weight.shape[-1]}")
    dtype = _compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _LinearFunction.apply(x.to(dtype), weight, bias, compute_output)
