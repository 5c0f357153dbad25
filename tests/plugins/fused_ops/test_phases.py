"""When the fused-ops plugin patches what is decided in one place (phases.py), from the run context it is handed."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from fms_acceleration_accelerate_foak.config import FusedOpsAndKernelsConfig
from fms_acceleration_accelerate_foak.phases import PATCH_PHASES, Phase, fused_phase

from fms_acceleration_accelerate.distributed import RunContext

from .tiny_models import make_framework, tiny_model

FSDP2 = RunContext(distributed_type="FSDP", fsdp_version=2, source="launcher")


def test_every_patching_option_has_its_phases():
    options = {f.name for f in dataclasses.fields(FusedOpsAndKernelsConfig)} - {"base_layer"}
    assert set(PATCH_PHASES) == options
    assert all(phases and all(isinstance(p, Phase) for p in phases) for phases in PATCH_PHASES.values())
    assert PATCH_PHASES["fast_loss"] == (Phase.MODEL, Phase.TRAINER_READY)  # TRL's fused head comes later


@pytest.mark.parametrize(
    ("context", "has_lora", "pending", "expected"),
    [
        (FSDP2, True, False, Phase.AFTER_WRAP),
        (FSDP2, False, True, Phase.AFTER_WRAP),
        (RunContext(), False, True, Phase.LORA_ADDED),
        (RunContext(), True, True, Phase.MODEL),
        (RunContext(), True, False, Phase.MODEL),
    ],
)
def test_fused_phase(context, has_lora, pending, expected):
    assert fused_phase(context, has_lora=has_lora, lora_config_pending=pending, fused_lora=True) is expected


def test_the_plugin_reads_fsdp_from_its_run_context_not_the_environment(monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    model = get_peft_model(tiny_model("llama"), config)
    framework = make_framework({"fused_lora": True})
    framework.bind_run_context(FSDP2)  # as the integration does for an FSDP2 Accelerator
    framework.augmentation(model, None, ())
    plugin = framework.plugin("fused_ops_and_kernels")
    assert "fused_lora" not in plugin.patch_counts  # AFTER_WRAP: waits for after_prepare
    plugin.after_prepare(model, framework.run_context)
    assert plugin.patch_counts["fused_lora"] == 3 * model.config.num_hidden_layers
    framework.revert()

    plain = make_framework({"fused_lora": True})
    plain.augmentation(get_peft_model(tiny_model("llama"), config), SimpleNamespace(fsdp=[]), ())
    assert plain.plugin("fused_ops_and_kernels").patch_counts["fused_lora"] > 0  # MODEL: patched at once
    plain.revert()
