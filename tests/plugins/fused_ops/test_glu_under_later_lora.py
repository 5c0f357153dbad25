"""``fast_swiglu`` patched before LoRA is added (``augmentation`` first, then ``get_peft_model`` or a trainer's
``peft_config``): the patched MLP calls the LoRA layers that replaced its projections, so their adapters train and
the output equals the unpatched model with the same adapters."""

from __future__ import annotations

import pytest
import torch

from .tiny_models import make_framework, tiny_batch, tiny_model


def add_lora(model, targets: tuple[str, ...]):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():  # B starts at zero; make the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


# separate gate and up projections (llama), and a fused gate_up projection (phi3)
@pytest.mark.parametrize(
    ("model_type", "targets"),
    [("llama", ("gate_proj", "up_proj", "down_proj")), ("phi3", ("gate_up_proj", "down_proj"))],
)
def test_lora_added_after_fast_swiglu_is_called_and_trains(model_type, targets):
    batch = tiny_batch()
    expected = add_lora(tiny_model(model_type), targets)(**batch).loss

    model = tiny_model(model_type)
    framework = make_framework({"fast_swiglu": True})
    model, _ = framework.augmentation(model)
    model = add_lora(model, targets)
    loss = model(**batch).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    lora_b = [(n, p) for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == len(targets) * model.config.num_hidden_layers
    for name, p in lora_b:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    framework.revert()
