"""Loading, LoRA augmentation and training of a tiny Llama through the bitsandbytes plugin (CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from .helpers import batches, lora_config, plugin_model, reference_model, tiny_llama, train


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


def test_loader_quantizes_linears_keeps_lm_head_and_dtype(llama_dir):
    import bitsandbytes as bnb
    from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
    from fms_acceleration_accelerate_peft.loader import load_quantized_causal_lm

    model = load_quantized_causal_lm(str(llama_dir), BnbQuantizationConfig(quant_type="fp4"), dtype=torch.float32)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.quant_type == "fp4"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # storage = training dtype


def test_tied_weights_are_retied(tmp_path):
    path = tiny_llama(tmp_path / "tied", tie=True)
    _, model = plugin_model(path)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight


def test_trains_and_matches_hf_peft_bnb_reference(llama_dir):
    data = batches(20)
    torch.manual_seed(123)  # LoRA A is randomly initialised: same seed for both paths
    _, model = plugin_model(llama_dir)
    # frozen base is not upcast (unlike prepare_model_for_kbit_training) and LoRA is float32 (peft default)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.float32}
    embed = model.get_base_model().model.embed_tokens.weight
    assert not embed.requires_grad
    ours = train(model, data)
    torch.manual_seed(123)
    ref = train(reference_model(llama_dir), data)
    assert ours[-1] < ours[0] - 0.3, ours
    assert ours == pytest.approx(ref, abs=2e-3), (ours, ref)


def test_bf16_storage_keeps_bf16_frozen_params(tmp_path):
    path = tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    _, model = plugin_model(path, dtype=torch.bfloat16)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    losses = train(model, batches(2))
    assert all(torch.isfinite(torch.tensor(losses)))


def test_lora_in_training_dtype_and_all_linear(llama_dir):
    _, model = plugin_model(
        llama_dir, {"quant_type": "nf4", "fp32_lora_params": False}, dtype=torch.float32, lora=lora_config("all-linear")
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for proj in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in names), proj
    assert not any("lm_head" in n for n in names)


def test_gradient_checkpointing_gets_input_grads(llama_dir):
    from types import SimpleNamespace

    from .helpers import framework

    fw = framework()
    model = fw.model_loader(str(llama_dir), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model, _ = fw.augmentation(model, SimpleNamespace(gradient_checkpointing=True), (lora_config(),))
    model.train()
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n]
    assert grads and grads[0] is not None and grads[0].abs().sum() > 0


def test_fp32_norm_compute_patches_and_reverts(llama_dir):
    fw, model = plugin_model(llama_dir, {"quant_type": "nf4", "fp32_norm_compute": True})
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all("forward" in vars(m) for m in norms)
    assert fw.patches.summary_rows()
    fw.revert()
    assert all("forward" not in vars(m) for m in norms)


def test_no_peft_model_leaves_adapters_to_caller(llama_dir):
    from .helpers import framework

    fw = framework({"quant_type": "nf4", "no_peft_model": True})
    assert not fw.requires_augmentation
    model = fw.model_loader(str(llama_dir), dtype=torch.float32)
    assert not any(p.requires_grad for p in model.parameters() if type(p).__name__ == "Params4bit")


def test_adapter_round_trip_through_plain_peft(llama_dir, tmp_path):
    from fms_acceleration_accelerate_peft.save import save_lora_adapters
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .helpers import quantized_base

    _, model = plugin_model(llama_dir)
    train(model, batches(3))
    model.train()  # bnb's CPU eval path repacks weights; compare in train mode with no dropout
    ids = batches(1, seed=7)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_lora_adapters(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # quantized base via plain transformers + peft (no plugin code)
    base = quantized_base(llama_dir)
    quant = PeftModel.from_pretrained(base, tmp_path / "adapter")
    quant.train()
    with torch.no_grad():
        got = quant(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    # unquantized base: the same adapter tensors are applied
    dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_dir)), tmp_path / "adapter")
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in dense.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name].float(), ours[name].float(), rtol=0, atol=0)
    with torch.no_grad():
        dense_logits = dense(input_ids=ids).logits
        with dense.disable_adapter():
            no_adapter = dense(input_ids=ids).logits
    assert (dense_logits - no_adapter).abs().max() > 1e-3  # the adapters act on the dense base
