"""Memory held by the MoE experts op's backward under non-reentrant activation checkpointing (how transformers'
gradient checkpointing runs): the recomputed gate/up pre-activations ``h`` (S, 2I) must be gone before the weight
gradients are allocated, so that the backward's peak is the weight gradients plus ``dh`` (S, 2I) and one (S, I)
buffer at most, not ``h`` on top. Live bytes are counted per storage (allocated by an op inside the backward,
released when the storage is freed)."""

from __future__ import annotations

import weakref

import pytest
import torch
from fms_acceleration_accelerate_kernels._utils import use_triton
from fms_acceleration_accelerate_kernels.moe import moe_experts
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

E, K, T, H, I = 4, 2, 48, 64, 224  # noqa: E741  (Mixtral's I/H ratio, T = H as in its benchmark row)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops inside the block allocated and that are still alive; ``peak`` its maximum."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.held = self.peak = 0
        self.seen = {t.untyped_storage().data_ptr() for t in existing}

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.held -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.seen:
                continue
            self.seen.add(key)
            self.held += nbytes
            self.peak = max(self.peak, self.held)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def test_checkpointed_backward_frees_h_before_the_weight_gradients():
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * 0.02).to(dtype).requires_grad_(True)
    down = (torch.randn(E, H, I, generator=g) * 0.02).to(dtype).requires_grad_(True)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_(True)
    weights, index = torch.topk(torch.randn(T, E, generator=g).softmax(-1), K, dim=-1)
    weights = weights.to(dtype).requires_grad_(True)
    if not use_triton(hidden):
        pytest.skip("the Triton path (CUDA or TRITON_INTERPRET=1) holds h; the torch reference is autograd's")

    def layer(x, w):
        return moe_experts(x, index, w, gate_up, down, act="silu")

    out = checkpoint(layer, hidden, weights, use_reentrant=False)
    dout = torch.randn_like(out)
    live = _LiveBytes([gate_up, down, hidden, weights, index, out, dout])
    with live:
        out.backward(dout)
    assert gate_up.grad is not None and down.grad is not None and hidden.grad is not None
    slots, elt = T * K, 2  # bf16
    weight_grads = (gate_up.numel() + down.numel()) * elt
    h_bytes = slots * 2 * I * elt
    transient = live.peak - weight_grads
    # with h kept: h + dh + an (S, I) buffer; without: dh + an (S, I) buffer (+ small routing/combine buffers)
    assert transient < 1.5 * h_bytes + slots * I * elt, (transient, h_bytes)
    assert transient >= h_bytes  # dh (S, 2I) itself is live with the weight gradients: the count sees it
