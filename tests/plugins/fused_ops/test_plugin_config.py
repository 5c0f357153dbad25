"""Plugin configuration, discovery, templates and bad inputs (no model training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fms_acceleration_accelerate_foak import FusedOpsAndKernelsConfig, FusedOpsAndKernelsPlugin

from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import AccelerationFramework

from .tiny_models import make_framework, tiny_model

CONFIGS = Path(__file__).resolve().parents[3] / "plugins" / "fused-ops-and-kernels" / "configs"


def test_discovered_through_the_entry_point():
    framework = AccelerationFramework({"training": {"fused_ops_and_kernels": {"fast_loss": True}}})
    assert framework.active_plugin_names == ("fused_ops_and_kernels",)
    assert isinstance(framework.plugin("fused_ops_and_kernels"), FusedOpsAndKernelsPlugin)


@pytest.mark.parametrize("template", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_templates_are_valid(template):
    framework = AccelerationFramework(CONFIGS / template, check_packages=False)
    assert "fused_ops_and_kernels" in framework.active_plugin_names
    lines = "\n".join(framework.describe())
    assert "fast_rms_layernorm: forward of every RMSNorm module" in lines
    assert "kernels.cross_entropy" in lines or "kernels.fused_linear_cross_entropy" in lines


def test_upstream_options_and_paths():
    framework = make_framework(
        {
            "base_layer": "bitsandbytes",
            "fused_lora": True,
            "fast_loss": True,
            "fast_rms_layernorm": True,
            "fast_rope_embeddings": True,
        },
        path="peft.quantization",
    )
    config = framework.plugin("fused_ops_and_kernels").config
    assert config.loss_mode == "cross_entropy" and config.base_layer == "bitsandbytes"
    assert config.requested_kernels() == ("fast_rms_layernorm", "fast_rope_embeddings", "fast_loss", "fused_lora")
    assert make_framework({"fast_loss": "fused_linear"}).plugin("fused_ops_and_kernels").config.loss_mode == (
        "fused_linear"
    )


def test_both_paths_at_once_are_merged_and_the_training_section_wins_a_conflict(caplog):
    # fms-hf-tuning writes --fast_kernels to training.* and --fused_lora to peft.quantization.*
    body = {
        "training": {"fused_ops_and_kernels": {"fast_loss": True, "fast_rms_layernorm": True}},
        "peft": {"quantization": {"fused_ops_and_kernels": {"fast_loss": False, "fast_rope_embeddings": True}}},
    }
    with caplog.at_level("WARNING", logger="fms_acceleration_accelerate"):
        plugin = AccelerationFramework(body).plugin("fused_ops_and_kernels")
    assert plugin.matched_paths == ("training.fused_ops_and_kernels", "peft.quantization.fused_ops_and_kernels")
    assert (plugin.config.fast_loss, plugin.config.fast_rms_layernorm, plugin.config.fast_rope_embeddings) == (
        True,
        True,
        True,
    )
    assert "'fast_loss'" in caplog.text and "using True" in caplog.text


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({}, "no kernel is enabled"),
        ({"fast_loss": "fused"}, "invalid value 'fused'"),
        ({"fast_los": True}, "unknown key 'fast_los'.*Did you mean 'fast_loss'"),
        ({"fast_rms_layernorm": "yes"}, "expected true or false"),
        ({"fused_dequant": True}, "fused_dequant: true needs a quantized base layer"),
        ({"fused_lora": True, "base_layer": "gptq"}, "invalid value 'gptq'"),
    ],
)
def test_bad_options(section, message):
    with pytest.raises(AccelerationConfigError, match=message):
        make_framework(section)


def test_auto_gptq_is_accepted_by_the_schema_but_refused():
    assert FusedOpsAndKernelsConfig(base_layer="auto_gptq", fused_lora=True).base_layer == "auto_gptq"
    with pytest.raises(AccelerationConfigError, match="base_layer: auto_gptq needs a GPTQ dequant backend") as info:
        make_framework({"base_layer": "auto_gptq", "fused_lora": True}, path="peft.quantization")
    assert "peft.quantization.fused_ops_and_kernels.base_layer" in str(info.value)


@pytest.mark.parametrize(
    ("model_type", "section", "message"),
    [
        ("opt", {"fast_loss": True}, "does not support model type 'opt'"),
        ("gpt_bigcode", {"fast_rope_embeddings": True}, "fast_rope_embeddings cannot be used with gpt_bigcode"),
        ("gpt_bigcode", {"fast_rms_layernorm": True}, "its norms are layernorm, not RMSNorm"),
        ("mixtral", {"fast_swiglu": True}, "fast_swiglu cannot be used with mixtral: its MoE experts"),
        ("granitemoe", {"fast_swiglu": True}, "fast_swiglu cannot be used with granitemoe"),
    ],
)
def test_architecture_checks_before_loading(model_type, section, message):
    framework = make_framework(section)
    with pytest.raises(AccelerationConfigError, match=message):
        framework.check_model_type(model_type)


def test_supported_architecture_passes_the_check():
    framework = make_framework(
        {"fast_loss": True, "fast_rms_layernorm": True, "fast_rope_embeddings": True, "fast_swiglu": True}
    )
    for model_type in ("llama", "mistral", "granite", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        framework.check_model_type(model_type)


def test_unsupported_model_at_augmentation():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(AccelerationConfigError, match="does not support model type 'gpt2'"):
        make_framework({"fast_loss": True}).augmentation(model)


def test_model_not_matching_its_spec_names_the_module():
    model = tiny_model("llama")
    del model.model.layers[0].mlp.up_proj
    with pytest.raises(AccelerationConfigError, match=r"model\.layers\.0\.mlp \(LlamaMLP\) has no MLP projection"):
        make_framework({"fast_swiglu": True}).augmentation(model)


def test_augmentation_twice_is_refused():
    framework = make_framework({"fast_rms_layernorm": True})
    framework.augmentation(tiny_model("llama"))
    with pytest.raises(RuntimeError, match="augmentation already ran"):
        framework.augmentation(tiny_model("llama"))
    framework.revert()


def test_requested_kernel_that_patches_nothing_is_an_error(monkeypatch):
    from fms_acceleration_accelerate_foak import plugin as plugin_module

    monkeypatch.setattr(plugin_module, "patch_rms_norms", lambda match, patches: 0)
    with pytest.raises(AccelerationConfigError, match="fast_rms_layernorm patched nothing in this llama model"):
        make_framework({"fast_rms_layernorm": True}).augmentation(tiny_model("llama"))


def test_fused_linear_loss_refuses_a_peft_lm_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(AccelerationConfigError, match=r"lm_head is .* not a plain torch\.nn\.Linear"):
        make_framework({"fast_loss": "fused_linear"}).augmentation(model, None, ())
