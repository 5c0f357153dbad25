"""The plugin through a stock ``accelerate.Accelerator`` (the script never calls ``augmentation``)."""

from __future__ import annotations

import pytest
import torch

from .tiny_models import assert_grads_close, loss_and_grads, tiny_batch, tiny_model


@pytest.fixture
def accelerate_integration(monkeypatch):
    from fms_acceleration_accelerate import accelerate_integration as ai

    monkeypatch.delenv(ai.ENV_SECTION, raising=False)
    was = ai.is_installed()
    yield ai
    ai.uninstall()
    if was:
        ai.install()


def test_prepare_patches_an_unaugmented_model(accelerate_integration):
    from accelerate import Accelerator
    from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin
    from peft import LoraConfig, get_peft_model

    from fms_acceleration_accelerate.registry import PluginRegistry

    def lora_model():
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(tiny_model("llama", seed=11), config)

    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(lora_model(), batch)

    section = {
        "training": {
            "fused_ops_and_kernels": {
                "fused_lora": True,
                "fast_loss": "fused_linear",
                "fast_rms_layernorm": True,
                "fast_rope_embeddings": True,
            }
        }
    }
    handler = accelerate_integration.AccelerationKwargs(
        config=section, registry=PluginRegistry([FusedOpsAndKernelsPlugin])
    )
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    model = lora_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    framework = accelerate_integration.get_framework(accelerator)
    counts = framework.plugin("fused_ops_and_kernels").patch_counts
    assert counts["fused_lora"] == 14 and counts["fast_loss"] == 1 and counts["fast_rms_layernorm"] == 5

    actual, actual_grads = loss_and_grads(model, batch)
    assert actual.logits is None  # the fused linear cross-entropy ran
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(expected_grads, actual_grads)
    framework.revert()
