"""The fused-ops plugin over GPTQ bases: ``fused_ops_and_kernels: {base_layer: auto_gptq, fused_lora: true}``
(upstream's keys) runs the fused LoRA kernels through the GPTQ plugin's ``gptq`` dequant backend and trains like
the unfused run; mismatched ``base_layer`` values are refused when the framework is created."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework

from .gptq_helpers import GPTQCase, learnable_batches, make_gptq_checkpoint

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path, _ = make_gptq_checkpoint(tmp_path_factory.mktemp("gptq") / "ckpt", GPTQCase(desc_act=True))
    return path


def run(path: Path, foak: dict | None, targets: list[str], steps: int = 6):
    """Load + LoRA through the framework (with the fused-ops section when given), train ``steps`` AdamW steps in
    bfloat16; returns the losses and the framework."""
    from peft import LoraConfig

    sections: dict = {"auto_gptq": {"kernel": "triton_v2", "from_quantized": True}}
    if foak is not None:
        sections["fused_ops_and_kernels"] = foak
    fw = AccelerationFramework({"peft": {"quantization": sections}})
    model = fw.model_loader(str(path), torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model, _ = fw.augmentation(model, None, (lora,))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in learnable_batches(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, fw


def test_fused_lora_over_gptq_matches_the_unfused_run(ckpt):
    expected, plain = run(ckpt, None, ALL_LINEAR)
    actual, fw = run(ckpt, {"base_layer": "auto_gptq", "fused_lora": True}, ALL_LINEAR)
    table = [r.replacement for r in fw.patches.records]
    assert table.count("kernels.lora_qkv [gptq] (lora)") == 2 * 3  # q, k, v of both layers
    assert "kernels.lora_linear [gptq]" in table
    assert any(r.startswith("kernels.lora_mlp_swiglu [gptq]") for r in table)
    assert fw.dequant_registry.names[0] == "gptq"
    assert fw.dequant_registry.contributor("gptq") == "auto_gptq"
    # bfloat16 on both sides: the fused kernels round at other points than PEFT's module-by-module forward
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=0, atol=0.03)
    assert actual[-1] < actual[0]
    fw.revert()
    plain.revert()


def test_fused_dequant_computes_the_adapter_less_gptq_mlps(ckpt):
    expected, plain = run(ckpt, None, ATTENTION, steps=3)
    actual, fw = run(ckpt, {"base_layer": "auto_gptq", "fused_lora": True, "fused_dequant": True}, ATTENTION, steps=3)
    foak = fw.plugin("fused_ops_and_kernels")
    assert foak.patch_counts["fused_dequant"] == 2 * 3  # gate, up, down of both layers
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=0, atol=0.03)
    fw.revert()
    plain.revert()


@pytest.mark.parametrize(
    ("sections", "expected", "fix"),
    [
        (
            {"auto_gptq": {}, "fused_ops_and_kernels": {"fused_lora": True}},
            "fused_lora over the GPTQ layers that plugin 'auto_gptq' loads needs base_layer: auto_gptq",
            "set base_layer: auto_gptq",
        ),
        (
            {"auto_gptq": {}, "fused_ops_and_kernels": {"fused_lora": True, "base_layer": "bitsandbytes"}},
            "base_layer: bitsandbytes, but the model is loaded by plugin 'auto_gptq', which loads no bitsandbytes "
            "4-bit layers",
            "(base_layer: auto_gptq)",
        ),
        (
            {"fused_ops_and_kernels": {"fused_lora": True, "base_layer": "auto_gptq"}},
            "base_layer: auto_gptq needs a GPTQ dequant backend",
            "add the peft.quantization.auto_gptq section",
        ),
    ],
    ids=["no-base-layer", "bnb-base-layer", "no-gptq-section"],
)
def test_mismatched_base_layer_is_refused_before_loading(sections, expected, fix):
    with pytest.raises(AccelerationConfigError) as info:
        AccelerationFramework({"peft": {"quantization": sections}})
    assert expected in str(info.value) and fix in info.value.fix
    assert info.value.path == "peft.quantization.fused_ops_and_kernels.base_layer"


def test_two_loaders_are_refused():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(AccelerationConfigError, match="more than one active plugin loads the model"):
        AccelerationFramework({"peft": {"quantization": {"bitsandbytes": {}, "auto_gptq": {}}}})
