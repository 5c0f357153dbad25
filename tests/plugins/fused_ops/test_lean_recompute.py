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
    """compute_output of every call of lora_mlp_swiglu / lora_mlp_geglu (True: the down GEMM ran)."""
    calls: list[bool] = []
    mod = importlib.import_module("fms_acceleration_accelerate_kernels.lora")
    for name in ("lora_mlp_swiglu", "lora_mlp_geglu"):
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


def test_grads_unchanged_and_down_projection_skipped(monkeypatch):
    def build():
        model = tiny_model("llama")
        return _checkpointing(_lora(model, ["q_proj", "v_proj", "gate_proj", "down_proj"]))  # MLP fused whole

    section = {"fast_swiglu": True, "fast_rms_layernorm": True, "fused_lora": True}
    _, (ref_out, ref_grads) = _run(build(), {**section, "lean_recompute": False})

    calls = _down_gemms(monkeypatch)
    model = build()
    framework, (out, grads) = _run(model, section)
    plugin = framework.plugin("fused_ops_and_kernels")
    layers = model.config.num_hidden_layers
    assert plugin.recompute_status == f"on for {layers} decoder layers"
    # forward: every layer's down GEMM runs; recomputation: none does
    assert calls == [True] * layers + [False] * layers
    assert plugin.recompute.skipped == layers
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    assert_grads_close(ref_grads, grads, rtol=1e-6, atol=1e-7)

    framework.revert()
    layer = model.get_base_model().model.layers[0]
    assert "context_fn" not in layer._gradient_checkpointing_func.keywords


@pytest.mark.parametrize("case", ["full-swiglu", "lora-dense-mlp"])
def test_plain_down_projections_are_left_to_checkpoint_early_stop(case):
    """A plain nn.Linear down projection saves its inputs before its GEMM: PyTorch's early stop skips it."""
    model = tiny_model("llama")
    if case == "lora-dense-mlp":
        model = _lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    section = {"fast_swiglu": True, **({"fused_lora": True} if case.startswith("lora") else {})}
    framework, _ = _run(_checkpointing(model), section)
    assert not [r for r in framework.patches.records if r.attribute == "_gradient_checkpointing_func"]
    assert framework.plugin("fused_ops_and_kernels").recompute.skipped == 0


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
    model = _lora(tiny_model("llama"), ["gate_proj", "up_proj", "down_proj"])
    framework = make_framework({"fused_lora": True})
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
        ("llama", True, "inactive: checkpointing is reentrant"),
    ],
)
def test_not_applied_where_unsafe(model_type, reentrant, status, monkeypatch):
    calls = _down_gemms(monkeypatch)
    model = _checkpointing(_lora(tiny_model(model_type), ["gate_proj", "up_proj", "down_proj"]), reentrant=reentrant)
    framework, _ = _run(model, {"fused_lora": True})
    plugin = framework.plugin("fused_ops_and_kernels")
    assert plugin.recompute_status.startswith(status)
    assert plugin.recompute.skipped == 0 and calls and False not in calls


def test_ddp_wrapped_model_is_unwrapped(tmp_path, monkeypatch):
    """Accelerator.prepare returns DDP on several processes; the hooks must see the model inside it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        calls = _down_gemms(monkeypatch)
        model = _lora(tiny_model("llama"), ["gate_proj", "up_proj", "down_proj"])
        framework = make_framework({"fused_lora": True})
        framework.augmentation(model, None, ())
        ddp = DistributedDataParallel(_checkpointing(model))
        framework.get_callbacks_and_ready_for_train(ddp)
        assert framework.plugin("fused_ops_and_kernels").recompute_status == "on for 2 decoder layers"
        loss_and_grads(ddp, tiny_batch())
        assert calls.count(False) == 2
    finally:
        dist.destroy_process_group()
