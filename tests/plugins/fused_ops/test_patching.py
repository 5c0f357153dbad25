"""Kernel patches on every architecture: same outputs and gradients as the unpatched model, kernels really run,
revert restores the model, loss options (num_items_in_batch, softcapping, scaling, MoE aux loss)."""

from __future__ import annotations

import importlib

import pytest
import torch

from fms_acceleration_accelerate.model_specs import ARCHITECTURE_SPECS, architecture_spec

from .tiny_models import (
    assert_grads_close,
    loss_and_grads,
    make_framework,
    supported_kernel_options,
    tiny_batch,
    tiny_model,
)

ALL = sorted(ARCHITECTURE_SPECS)


def _spy(monkeypatch, module_name: str, function: str) -> list[int]:
    """Count calls of ``fms_acceleration_accelerate_kernels.<module_name>.<function>``."""
    module = importlib.import_module(f"fms_acceleration_accelerate_kernels.{module_name}")
    original = getattr(module, function)
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, counting)
    return calls


@pytest.mark.parametrize("loss_mode", ["cross_entropy", "fused_linear"])
@pytest.mark.parametrize("model_type", ALL)
def test_patched_matches_unpatched(model_type, loss_mode):
    model = tiny_model(model_type)
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)

    framework = make_framework({**supported_kernel_options(model_type), "fast_loss": loss_mode})
    model, _ = framework.augmentation(model)
    counts = framework.plugin("fused_ops_and_kernels").patch_counts
    assert all(n > 0 for n in counts.values()) and "fast_loss" in counts
    actual, actual_grads = loss_and_grads(model, batch)

    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(expected_grads, actual_grads)
    if loss_mode == "fused_linear":
        assert actual.logits is None  # never materialised in training
    else:
        torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-6)
    framework.revert()


def test_kernels_really_run(monkeypatch):
    calls = {
        name: _spy(monkeypatch, module, name)
        for module, name in [
            ("rms_norm", "rms_norm_ref"),
            ("rope", "rope_ref"),
            ("glu", "swiglu_ref"),
            ("cross_entropy", "cross_entropy_ref"),
        ]
    }
    model = tiny_model("llama")
    framework = make_framework({**supported_kernel_options("llama"), "fast_loss": True})
    framework.augmentation(model)
    model(**tiny_batch()).loss.backward()
    layers = model.config.num_hidden_layers
    assert len(calls["rms_norm_ref"]) == 2 * layers + 1
    assert len(calls["rope_ref"]) == layers
    assert len(calls["swiglu_ref"]) == layers
    assert len(calls["cross_entropy_ref"]) == 1
    framework.revert()


@pytest.mark.parametrize(("model_type", "kernel"), [("gemma", "geglu_ref"), ("phi3", "swiglu_ref")])
def test_gated_variants_run(monkeypatch, model_type, kernel):
    calls = _spy(monkeypatch, "glu", kernel)
    model = tiny_model(model_type)
    framework = make_framework({"fast_swiglu": True})
    framework.augmentation(model)
    model(**tiny_batch())
    assert len(calls) == model.config.num_hidden_layers
    framework.revert()


def test_fused_linear_loss_runs_without_logits(monkeypatch):
    calls = _spy(monkeypatch, "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref")
    head_calls = []
    model = tiny_model("gemma2")
    model.lm_head.register_forward_hook(lambda module, args, output: head_calls.append(output.dim()))
    framework = make_framework({"fast_loss": "fused_linear"})
    framework.augmentation(model)
    out = model(**tiny_batch())
    # lm_head is called once (so FSDP hooks run) and returns the scalar loss: no (tokens, vocab) logits
    assert len(calls) == 1 and head_calls == [0] and out.logits is None
    # eval / no labels: the original forward (logits returned, no fused loss)
    with torch.no_grad():
        out = model(**tiny_batch())
    assert out.logits is not None and len(calls) == 1 and head_calls == [0, 3]
    framework.revert()


def test_revert_restores_the_model():
    model = tiny_model("llama")
    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch)
    modeling = importlib.import_module(architecture_spec("llama").rotary.module)
    original_rope = modeling.apply_rotary_pos_emb
    framework = make_framework({**supported_kernel_options("llama"), "fast_loss": True})
    framework.augmentation(model)
    assert modeling.apply_rotary_pos_emb is not original_rope
    assert "forward" in vars(model.model.norm) and "_loss_function" in vars(model)
    assert framework.revert() == len(model.model.layers) * 3 + 1 + 1 + 1  # norms, mlps, final norm, rope, loss
    assert modeling.apply_rotary_pos_emb is original_rope
    assert "forward" not in vars(model.model.norm) and "_loss_function" not in vars(model)
    assert all("forward" not in vars(m) for m in model.modules())
    with torch.no_grad():
        after = model(**batch)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)

    fused = make_framework({"fast_loss": "fused_linear"})
    fused.augmentation(model)
    fused.revert()
    assert "forward" not in vars(model)


@pytest.mark.parametrize("loss_mode", ["cross_entropy", "fused_linear"])
def test_num_items_in_batch(loss_mode):
    """Gradient accumulation: the summed loss is divided by num_items_in_batch, as HF's loss does."""
    model = tiny_model("granite")  # logits_scaling != 1
    batch = tiny_batch()
    n_items = torch.tensor(37)
    expected, expected_grads = loss_and_grads(model, batch, num_items_in_batch=n_items)
    framework = make_framework({"fast_loss": loss_mode})
    framework.augmentation(model)
    actual, actual_grads = loss_and_grads(model, batch, num_items_in_batch=n_items)
    torch.testing.assert_close(actual.loss, expected.loss)
    assert_grads_close(expected_grads, actual_grads)
    plain, _ = loss_and_grads(model, batch)
    assert not torch.allclose(plain.loss, actual.loss)  # the divisor really changed the loss
    framework.revert()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_fused_linear_loss_with_moe_router_aux_loss(model_type):
    model = tiny_model(model_type, output_router_logits=True, router_aux_loss_coef=0.5)
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)
    assert expected.aux_loss is not None
    framework = make_framework({"fast_loss": "fused_linear"})
    framework.augmentation(model)
    actual, actual_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(actual.aux_loss, expected.aux_loss)
    torch.testing.assert_close(actual.loss, expected.loss)
    assert_grads_close(expected_grads, actual_grads)
    framework.revert()


def test_fused_linear_loss_return_dict_false():
    model = tiny_model("llama")
    framework = make_framework({"fast_loss": "fused_linear"})
    framework.augmentation(model)
    out = model(**tiny_batch(), return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0
    framework.revert()


def test_fused_linear_loss_return_dict_none_means_config_default():
    """PEFT's forward passes ``return_dict=None`` explicitly: that must give the config's (dict) output."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = tiny_batch()
    expected = model(**batch).loss
    framework = make_framework({"fast_loss": "fused_linear"})
    framework.augmentation(model)
    out = model(**batch, return_dict=None)
    torch.testing.assert_close(out.loss, expected)
    framework.revert()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_gradient_checkpointing(model_type):
    model = tiny_model(model_type)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)
    framework = make_framework({**supported_kernel_options(model_type), "fast_loss": "fused_linear"})
    framework.augmentation(model)
    actual, actual_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(actual.loss, expected.loss)
    assert_grads_close(expected_grads, actual_grads)
    framework.revert()


def test_triton_path_in_interpreter(triton_interpreter, monkeypatch):
    """All kernels through Triton (interpreter on CPU) on a tiny Llama: same loss and gradients."""
    spies = {
        name: _spy(monkeypatch, module, name)
        for module, name in [
            ("rms_norm", "rms_norm_triton"),
            ("rope", "rope_triton"),
            ("glu", "swiglu_triton"),
            ("fused_linear_cross_entropy", "fused_linear_cross_entropy_triton"),
        ]
    }
    model = tiny_model("llama")
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)
    framework = make_framework({**supported_kernel_options("llama"), "fast_loss": "fused_linear"})
    framework.augmentation(model)
    actual, actual_grads = loss_and_grads(model, batch)
    assert all(spies.values()), {k: len(v) for k, v in spies.items()}
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert_grads_close(expected_grads, actual_grads, rtol=1e-3, atol=1e-5)
    framework.revert()
