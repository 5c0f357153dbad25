"""lean_recompute: checkpoint recomputation skips the MLP down projection, gradients unchanged."""

from __future__ import annotations

import importlib

import pytest
import torch

from .test_fused_lora import _lora, _nf4_model, saved_tiny_llama  # noqa: F401  (fixture)
from .tiny_models import assert_grads_close, loss_and_grads, make_framework, tiny_batch, tiny_model


def _checkpointing(model, reentrant: bool = False):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def _down_gemms(monkeypatch) -> list[bool]:
    """compute_output of every call of kernels.linear / lora_mlp_* (True: the down GEMM ran)."""
    calls: list[bool] = []
    for module, names in (("linear", ("linear",)), ("lora", ("lora_mlp_swiglu", "lora_mlp_geglu"))):
        mod = importlib.import_module(f"fms_acceleration_accelerate_kernels.{module}")
        for name in names:
            original = getattr(mod, name)

            def spy(*args, _original=original, **kwargs):
                calls.append(kwargs.get("compute_output", True))
                return _original(*args, **kwargs)

            monkeypatch.setattr(mod, name, spy)
    return calls


def _run(model, section, path="training", steps=1):
    framework = make_framework(section, path=path)
    framework.augmentation(model, None, ())
    batch = tiny_batch()
    results = [loss_and_grads(model, batch) for _ in range(steps)]
    return framework, results[-1]


@pytest.mark.parametrize(
    "case",
    ["full-swiglu", "lora-fused-mlp", "lora-dense-mlp"],
)
def test_grads_unchanged_and_down_projection_skipped(case, monkeypatch):
    def build():
        model = tiny_model("llama")
        if case == "lora-fused-mlp":
            model = _lora(model, ["q_proj", "v_proj", "gate_proj", "down_proj"])
        elif case == "lora-dense-mlp":
            model = _lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
        return _checkpointing(model)

    section = {"fast_swiglu": True, "fast_rms_layernorm": True}
    if case.startswith("lora"):
        section["fused_lora"] = True
    _, (ref_out, ref_grads) = _run(build(), {**section, "lean_recompute": False})

    calls = _down_gemms(monkeypatch)
    model = build()
    framework, (out, grads) = _run(model, section)
    plugin = framework.plugin("fused_ops_and_kernels")
    layers = model.config.num_hidden_layers
    assert plugin.recompute_status == f"on for {layers} decoder layers"
    # forward: every layer's down GEMM runs; recomputation: none does
    assert calls.count(True) == layers and calls.count(False) == layers
    assert plugin.recompute.skipped == layers
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    assert_grads_close(ref_grads, grads, rtol=1e-6, atol=1e-7)
    if case == "full-swiglu":
        assert any(n.endswith("mlp.down_proj.weight") for n in grads)

    framework.revert()
    layer = model.get_base_model().model.layers[0] if hasattr(model, "get_base_model") else model.model.layers[0]
    assert "context_fn" not in layer._gradient_checkpointing_func.keywords


def test_qlora_nf4_fused_dequant_mlp(saved_tiny_llama, monkeypatch):  # noqa: F811
    section = {"base_layer": "bitsandbytes", "fused_lora": True, "fused_dequant": True}

    def build():
        model = _nf4_model(saved_tiny_llama)
        torch.manual_seed(0)  # the same random LoRA weights in both builds
        return _checkpointing(_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"]))

    _, (ref_out, ref_grads) = _run(build(), {**section, "lean_recompute": False}, path="peft.quantization")
    calls = _down_gemms(monkeypatch)
    model = build()
    _, (out, grads) = _run(model, section, path="peft.quantization")
    layers = model.config.num_hidden_layers
    assert calls == [True] * layers + [False] * layers
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    assert_grads_close(ref_grads, grads, rtol=1e-6, atol=1e-7)


def test_checkpointing_enabled_after_patching_is_picked_up_at_ready_for_train(monkeypatch):
    calls = _down_gemms(monkeypatch)
    model = tiny_model("llama")
    framework = make_framework({"fast_swiglu": True})
    framework.augmentation(model, None, ())
    plugin = framework.plugin("fused_ops_and_kernels")
    assert plugin.recompute_status.startswith("inactive: activation checkpointing is not enabled")
    _checkpointing(model)
    framework.get_callbacks_and_ready_for_train(model)
    assert plugin.recompute_status == "on for 2 decoder layers"
    framework.get_callbacks_and_ready_for_train(model)  # idempotent: no second wrapper
    assert len([p for p in framework.patches.records if p.attribute == "_gradient_checkpointing_func"]) == 2
    loss_and_grads(model, tiny_batch())
    assert calls.count(False) == 2


@pytest.mark.parametrize(
    ("model_type", "reentrant", "status"),
    [
        ("gemma2", False, "not applicable to gemma2"),
        ("phi3", False, "not applicable to phi3"),
        ("llama", True, "inactive: checkpointing is reentrant"),
    ],
)
def test_not_applied_where_unsafe(model_type, reentrant, status, monkeypatch):
    calls = _down_gemms(monkeypatch)
    model = _checkpointing(tiny_model(model_type), reentrant=reentrant)
    framework, _ = _run(model, {"fast_swiglu": True})
    plugin = framework.plugin("fused_ops_and_kernels")
    assert plugin.recompute_status.startswith(status)
    assert plugin.recompute.skipped == 0 and False not in calls


def test_linear_kernel_matches_torch_and_skips():
    from fms_acceleration_accelerate_kernels.linear import linear

    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, requires_grad=True)
    w = torch.randn(4, 7, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    y = linear(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)
    skipped = linear(x, w, b, compute_output=False)
    assert skipped.shape == ref.shape and not skipped.any()
    for a, e in zip(torch.autograd.grad(skipped, (x, w, b), g), ref_grads):  # backward is the full call's
        torch.testing.assert_close(a, e)
    with pytest.raises(ValueError, match="x has 3 features, weight expects 7"):
        linear(x[..., :3], w)


def test_ddp_wrapped_model_is_unwrapped(tmp_path, monkeypatch):
    """Accelerator.prepare returns DDP on several processes; the hooks must see the model inside it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        calls = _down_gemms(monkeypatch)
        model = tiny_model("llama")
        framework = make_framework({"fast_swiglu": True})
        framework.augmentation(model, None, ())
        ddp = DistributedDataParallel(_checkpointing(model))
        framework.get_callbacks_and_ready_for_train(ddp)
        assert framework.plugin("fused_ops_and_kernels").recompute_status == "on for 2 decoder layers"
        loss_and_grads(ddp, tiny_batch())
        assert calls.count(False) == 2
    finally:
        dist.destroy_process_group()
