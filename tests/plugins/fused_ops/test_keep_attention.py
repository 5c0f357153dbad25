"""checkpoint_keep_attention: the recomputation reuses the attention block's GEMM / SDPA outputs, exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fms_acceleration_accelerate.errors import AccelerationConfigError

from .test_fused_lora import _lora, _nf4_model, saved_tiny_llama  # noqa: F401  (fixture)
from .tiny_models import assert_grads_close, make_framework, tiny_batch, tiny_model

_SDPA = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")  # fmt: skip


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that actually execute (an op served from a selective-checkpoint cache does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def of(self, *names: str) -> int:
        return sum(self.counts.get(n, 0) for n in names)


def _checkpointed(model, reentrant: bool = False):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def _step(model, section, path="training"):
    """Patch with ``section``; one forward/backward, counting the ops the backward (recomputation) executes."""
    framework = make_framework(section, path=path)
    framework.augmentation(model, None, ())
    framework.get_callbacks_and_ready_for_train(model)
    out = model(**tiny_batch())
    with _OpCounter() as counter:
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return framework, out.loss.detach(), grads, counter


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_recomputation_reuses_attention_outputs_and_gradients_are_identical(peft):
    def build():
        model = tiny_model("llama", attn_implementation="sdpa")
        return _checkpointed(_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"]) if peft == "lora" else model)

    section = {"fast_rms_layernorm": True, "fast_swiglu": True}
    _, ref_loss, ref_grads, ref_ops = _step(build(), section)
    model = build()
    framework, loss, grads, ops = _step(model, {**section, "checkpoint_keep_attention": True})
    plugin = framework.plugin("fused_ops_and_kernels")
    layers = model.config.num_hidden_layers

    assert plugin.keep_attention_status == f"on for {layers} decoder layers"
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert_grads_close(ref_grads, grads, rtol=0, atol=0)
    # the recomputation ran SDPA and the q/k/v/o GEMMs (for LoRA also the adapters' 2 GEMMs each) once per
    # layer without the option, never with it
    # (HF's CPU SDPA path here is the math one, bmm + softmax, which is recomputed; the fused SDPA ops are
    # checked in test_fused_sdpa_output_is_reused below)
    gemms_per_layer = 4 if peft == "full" else 12
    fused_sdpa = ref_ops.of(*_SDPA)
    assert ops.of(*_SDPA) == 0
    assert ref_ops.of("mm", "addmm") - ops.of("mm", "addmm") == gemms_per_layer * layers
    assert plugin.recompute.kept == gemms_per_layer * layers + fused_sdpa

    framework.revert()
    base = model.get_base_model() if peft == "lora" else model
    layer = base.model.layers[0]
    assert "context_fn" not in layer._gradient_checkpointing_func.keywords
    assert "forward" not in vars(layer.self_attn)


def test_with_lean_recompute_on_a_quantized_model(saved_tiny_llama):  # noqa: F811
    """QLoRA nf4 (bitsandbytes on CPU), LoRA on q/k/v/o, adapter-less MLP as one fused dequant kernel: both
    recomputation options act together and the gradients equal those with neither."""
    section = {"base_layer": "bitsandbytes", "fused_dequant": True}

    def build():
        model = _nf4_model(saved_tiny_llama)
        torch.manual_seed(0)  # the same random LoRA weights in both builds
        return _checkpointed(_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"]))

    _, ref_loss, ref_grads, _ = _step(build(), {**section, "lean_recompute": False}, path="peft.quantization")
    model = build()
    framework, loss, grads, ops = _step(model, {**section, "checkpoint_keep_attention": True}, path="peft.quantization")
    plugin = framework.plugin("fused_ops_and_kernels")
    layers = model.config.num_hidden_layers
    assert plugin.recompute_status == plugin.keep_attention_status == f"on for {layers} decoder layers"
    assert plugin.recompute.skipped == layers and ops.of(*_SDPA) == 0
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert_grads_close(ref_grads, grads, rtol=0, atol=0)


def test_fused_sdpa_output_is_reused():
    """A fused SDPA op (CPU flash here; cuDNN / flash / efficient on CUDA) inside the scope is not re-run."""
    from fms_acceleration_accelerate_foak.recompute import RecomputeState

    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 16)
    x = torch.randn(2, 6, 16, requires_grad=True)

    def block(inp, state):
        with state.attention_scope():
            q = proj(inp).view(2, 6, 2, 8).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return out.transpose(1, 2).reshape(2, 6, 16).sum()

    results = []
    for keep in (False, True):
        state = RecomputeState(keep_attention=keep)
        loss = torch.utils.checkpoint.checkpoint(block, x, state, use_reentrant=False, context_fn=state.context_fn)
        with _OpCounter() as ops:
            (gx,) = torch.autograd.grad(loss, x)
        results.append((gx, ops, state))
    (ref, ref_ops, _), (gx, ops, state) = results
    torch.testing.assert_close(gx, ref, rtol=0, atol=0)
    assert ref_ops.of(*_SDPA) == 1 and ops.of(*_SDPA) == 0
    assert ref_ops.of("mm", "addmm") - ops.of("mm", "addmm") == 1
    assert state.kept == 2


def test_refused_with_fused_lora():
    with pytest.raises(AccelerationConfigError, match="checkpoint_keep_attention cannot be combined with fused_lora"):
        make_framework({"fused_lora": True, "checkpoint_keep_attention": True})


def test_warns_once_when_checkpointing_is_off():
    model = tiny_model("llama", attn_implementation="sdpa")
    framework = make_framework({"fast_rms_layernorm": True, "checkpoint_keep_attention": True})
    framework.augmentation(model, None, ())
    plugin = framework.plugin("fused_ops_and_kernels")
    assert plugin.keep_attention_status.startswith("inactive: activation checkpointing is not enabled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(**tiny_batch()).loss.backward()
    messages = [str(w.message) for w in caught if "checkpoint_keep_attention" in str(w.message)]
    assert len(messages) == 1 and "has no effect" in messages[0]


def test_reentrant_checkpointing_is_reported_inactive():
    model = _checkpointed(tiny_model("llama", attn_implementation="sdpa"), reentrant=True)
    framework = make_framework({"fast_rms_layernorm": True, "checkpoint_keep_attention": True})
    framework.augmentation(model, None, ())
    plugin = framework.plugin("fused_ops_and_kernels")
    assert plugin.keep_attention_status == "inactive: checkpointing is reentrant or has its own context_fn"
