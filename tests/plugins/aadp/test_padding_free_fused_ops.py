"""Padding-free together with the fused kernels and quantized bases.

The kernels see the flattened row: RoPE reads cos/sin gathered from ``position_ids`` that restart per example, the
loss kernels (cross-entropy, fused linear cross-entropy) see each example's first label ignored, fused LoRA and the
4-bit dequant are per token. Each stack trained on the flattened batch must match the same stack on the padded batch
(the loss and every LoRA gradient). The 4-bit stack (bitsandbytes nf4 loaded by its plugin, fused LoRA over it) runs
the kernels' pure-torch references; the 16-bit stack runs the Triton kernels in Triton's interpreter where there is
no GPU.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from fms_acceleration_accelerate_aadp import PaddingFreePlugin
from fms_acceleration_accelerate_aadp.collate import flatten_batch
from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin

from fms_acceleration_accelerate import AccelerationFramework
from fms_acceleration_accelerate.registry import PluginRegistry

from .padding_free_helpers import padded_batch, save_tiny

# Import the kernel modules now, while TRITON_INTERPRET still has the root conftest's value: @triton.jit decides
# between the interpreter and the GPU launcher when a kernel is defined, not when it runs.
for _name in ("rms_norm", "rope", "glu", "cross_entropy", "fused_linear_cross_entropy", "nf4", "dequant", "lora"):
    importlib.import_module(f"fms_acceleration_accelerate_kernels.{_name}")

KERNELS = {"fused_lora": True, "fast_rms_layernorm": True, "fast_rope_embeddings": True}
LENGTHS = (9, 4, 7)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _framework(body: dict[str, Any], padding_free: bool) -> AccelerationFramework:
    plugins = [FusedOpsAndKernelsPlugin, PaddingFreePlugin]
    if "peft" in body and "bitsandbytes" in body["peft"]["quantization"]:
        from fms_acceleration_accelerate_peft.plugin import BitsAndBytesAccelerationPlugin

        plugins.append(BitsAndBytesAccelerationPlugin)
    if padding_free:
        body = {**body, "training": {**body.get("training", {}), "attention": {"padding_free": {}}}}
    return AccelerationFramework({"plugins": body}, registry=PluginRegistry(plugins))


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _run(folder, body: dict[str, Any], padding_free: bool) -> tuple[float, dict[str, torch.Tensor], list[str]]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    framework = _framework(body, padding_free)
    with framework:
        torch.manual_seed(7)  # LoRA A initialisation
        if framework.requires_custom_loading:
            model = framework.model_loader(str(folder), dtype=torch.float32)
            model, _ = framework.augmentation(model, None, (_lora(),))
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            model = get_peft_model(model, _lora())
            model, _ = framework.augmentation(model, None, ())
        model.train()
        batch = padded_batch(LENGTHS)
        if padding_free:
            batch, _ = flatten_batch(batch)
        loss = model(**batch).loss
        loss.backward()
        replacements = sorted({r.replacement for r in framework.patches.records})
        return loss.item(), _lora_grads(model), replacements


def _compare(folder, body):
    padded_loss, padded_grads, _ = _run(folder, body, padding_free=False)
    loss, grads, replacements = _run(folder, body, padding_free=True)
    assert any(r.startswith("padding-free attention") for r in replacements)
    assert loss == pytest.approx(padded_loss, rel=1e-4, abs=1e-5)
    assert grads.keys() == padded_grads.keys() and len(grads) >= 8
    for name, grad in padded_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=2e-3, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    return replacements


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    # 4-bit blocks of 64 must divide every input size
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama64", hidden_size=64, intermediate_size=128)


@pytest.mark.parametrize("fast_loss", [True, "fused_linear"])
def test_qlora_fused_stack_on_flattened_batches(llama64, fast_loss, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' references (the Triton path is covered below)
    body = {
        "peft": {
            "quantization": {
                "bitsandbytes": {"quant_type": "nf4"},
                "fused_ops_and_kernels": {"base_layer": "bitsandbytes", "fast_loss": fast_loss, **KERNELS},
            }
        }
    }
    replacements = _compare(llama64, body)
    assert any("lora_qkv [bnb_4bit]" in r for r in replacements), replacements


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU stand-in for the GPU kernels")
def test_lora_fused_stack_in_the_triton_interpreter(llama64, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    body = {"training": {"fused_ops_and_kernels": {"fast_loss": "fused_linear", **KERNELS}}}
    replacements = _compare(llama64, body)
    assert any("apply_rotary_pos_emb" in r for r in replacements), replacements
    assert any("lora_qkv" in r for r in replacements), replacements
