"""Full fine-tuning with float32 master weights under bf16 autocast (Accelerate ``mixed_precision: bf16``, the AMP
recipe): the fused-ops kernels get mixed dtypes there (float32 norm weights and residual stream, bf16 projections,
float32 cos/sin next to bf16 q/k) and must train like the model without them, step by step.

Both runs go through a real ``Accelerator(mixed_precision="bf16")`` on CPU (torch's CPU bf16 autocast), the
accelerated one with the plugin's section in ``AccelerationKwargs``; the kernels run in Triton (the interpreter on
CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from .tiny_models import tiny_batch, tiny_model

STEPS = 5
LR = 1e-3
# per-step relative loss difference allowed between the two AMP runs: both compute the projections in bf16 under
# the same autocast; the kernels round norms / rotary outputs once where HF's modules round twice or keep float32
# (observed: under 1e-4)
TOL = 2e-3
SPIED = {  # kernels module -> function the plugin's patches call
    "rms_norm": "rms_norm",
    "rope": "apply_rotary_pos_emb",
    "glu": "swiglu",
    "cross_entropy": "cross_entropy",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
}


def _spy_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[torch.dtype, ...]]]:
    """Record the dtypes of the tensor arguments of every kernel call (the real kernels still run). Installed before
    the patches are made: they look the kernel functions up in these modules."""
    import importlib

    seen: dict[str, list[tuple[torch.dtype, ...]]] = {name: [] for name in SPIED.values()}
    for module_name, fn_name in SPIED.items():
        module = importlib.import_module(f"fms_acceleration_accelerate_kernels.{module_name}")
        real = getattr(module, fn_name)

        def spy(*args: Any, _real: Callable[..., Any] = real, _name: str = fn_name, **kwargs: Any) -> Any:
            seen[_name].append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, spy)
    return seen


def _train_amp(section: dict[str, Any] | None) -> tuple[list[float], torch.nn.Module, Any]:
    """STEPS AdamW steps of a float32 tiny Llama prepared by ``Accelerator(mixed_precision="bf16", cpu=True)``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from fms_acceleration_accelerate import accelerate_integration

    AcceleratorState._reset_state(reset_partial_state=True)
    handlers = []
    if section is not None:
        from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin

        from fms_acceleration_accelerate.registry import PluginRegistry

        handlers.append(
            accelerate_integration.AccelerationKwargs(
                config={"training": {"fused_ops_and_kernels": section}},
                registry=PluginRegistry([FusedOpsAndKernelsPlugin]),
            )
        )
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", kwargs_handlers=handlers)
    assert accelerator.native_amp  # torch's CPU bf16 autocast
    model = tiny_model("llama", seed=3)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    framework = accelerate_integration.get_framework(accelerator) if section is not None else None
    batches = [tiny_batch(batch=2, seq=16, seed=s) for s in range(3)]
    losses = []
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)]).loss
        accelerator.backward(loss)
        if step == 0:  # the optimizer updates float32 weights from float32 gradients
            grads = {n: p.grad for n, p in model.named_parameters()}
            assert all(g is not None and g.dtype == torch.float32 for g in grads.values()), {
                n: None if g is None else g.dtype for n, g in grads.items()
            }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return losses, model, framework


@pytest.mark.parametrize("fast_loss", [True, "fused_linear"], ids=["cross_entropy", "fused_linear"])
def test_fp32_master_weights_under_bf16_autocast_follow_hf(fast_loss, triton_interpreter, monkeypatch):
    initial = {n: p.detach().clone() for n, p in tiny_model("llama", seed=3).named_parameters()}
    baseline, _, _ = _train_amp(None)
    seen = _spy_kernels(monkeypatch)
    section = {"fast_loss": fast_loss, "fast_rms_layernorm": True, "fast_rope_embeddings": True, "fast_swiglu": True}
    accelerated, model, framework = _train_amp(section)
    try:
        counts = framework.plugin("fused_ops_and_kernels").patch_counts
        assert counts["fast_rms_layernorm"] == 5 and counts["fast_swiglu"] == 2 and counts["fast_loss"] == 1
        # every kernel ran in every step, with the dtypes autocast hands it
        loss_kernel = "fused_linear_cross_entropy" if fast_loss == "fused_linear" else "cross_entropy"
        assert len(seen["rms_norm"]) == 5 * STEPS and len(seen["swiglu"]) == 2 * STEPS
        assert len(seen["apply_rotary_pos_emb"]) == 2 * STEPS and len(seen[loss_kernel]) == STEPS
        assert set(seen["rms_norm"]) == {(torch.float32, torch.float32)}  # float32 residual stream and weight
        assert set(seen["apply_rotary_pos_emb"]) == {(torch.bfloat16,) * 2 + (torch.float32,) * 2}  # q, k | cos, sin
        assert set(seen["swiglu"]) == {(torch.bfloat16, torch.bfloat16)}
        if fast_loss == "fused_linear":  # hidden states and lm_head weight cast to the autocast dtype
            assert {d[:2] for d in seen[loss_kernel]} == {(torch.bfloat16, torch.bfloat16)}
        else:  # the logits of the autocast lm_head
            assert {d[0] for d in seen[loss_kernel]} == {torch.bfloat16}
    finally:
        framework.revert()
    for step, (a, b) in enumerate(zip(baseline, accelerated)):
        assert abs(a - b) <= TOL * abs(a), f"step {step}: HF {a:.6f} vs fused ops {b:.6f}"
    assert len(set(accelerated)) == STEPS  # the loss moves (different batches, training weights)
    # the float32 weights took the updates (a bf16 weight would drop most of them at small learning rates)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), initial[n])}
    assert moved == set(initial)
