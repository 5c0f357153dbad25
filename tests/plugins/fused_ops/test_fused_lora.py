"""Fused LoRA / fused dequant through PEFT on every architecture, over bf16-style dense and bnb nf4 bases."""

from __future__ import annotations

import importlib

import pytest
import torch

from fms_acceleration_accelerate.distributed import PrepareContext
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.model_specs import ARCHITECTURE_SPECS, ModelStructureError, architecture_spec

from .tiny_models import assert_grads_close, loss_and_grads, make_framework, tiny_batch, tiny_model

ALL = sorted(ARCHITECTURE_SPECS)


def _targets(model_type: str, mlp: bool = True) -> list[str]:
    spec = architecture_spec(model_type)
    names = list(spec.attention.projections)
    if mlp and spec.mlp is not None:
        names += list(spec.mlp.projections)
    return sorted(set(names))


def _lora(model, targets, **kwargs):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False, **kwargs)
    return get_peft_model(model, config)


def _spy(monkeypatch, function: str) -> list[int]:
    lora = importlib.import_module("fms_acceleration_accelerate_kernels.lora")
    original = getattr(lora, function)
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(lora, function, counting)
    return calls


@pytest.mark.parametrize("model_type", ALL)
def test_fused_lora_matches_peft(model_type, monkeypatch):
    spies = {f: _spy(monkeypatch, f) for f in ("lora_qkv", "lora_linear", "lora_mlp_swiglu", "lora_mlp_geglu")}
    model = _lora(tiny_model(model_type), _targets(model_type))
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)
    assert expected_grads and all("lora_" in n for n in expected_grads)

    framework = make_framework({"fused_lora": True})
    model, _ = framework.augmentation(model, None, ())
    spec = architecture_spec(model_type)
    n_layers = model.config.num_hidden_layers
    n_projections = len(spec.attention.projections) + (len(spec.mlp.projections) if spec.mlp else 0)
    assert framework.plugin("fused_ops_and_kernels").patch_counts["fused_lora"] == n_layers * n_projections
    actual, actual_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(expected_grads, actual_grads)

    separate_qkv = spec.attention.qkv_proj is None
    assert len(spies["lora_qkv"]) == (n_layers if separate_qkv else 0)
    gemma = model_type in ("gemma", "gemma2")  # GELU-gated MLPs: the fused GeGLU MLP kernel
    fused_mlp = spec.has_glu_mlp and spec.mlp.gate_up_proj is None
    assert len(spies["lora_mlp_swiglu"]) == (n_layers if fused_mlp and not gemma else 0)
    assert len(spies["lora_mlp_geglu"]) == (n_layers if fused_mlp and gemma else 0)
    assert spies["lora_linear"]  # o_proj at least
    framework.revert()
    assert all("forward" not in vars(m) for m in model.modules())


def test_qkv_group_hands_k_and_v_over():
    """k_proj / v_proj return what q_proj's fused call computed; their own forwards never run."""
    model = _lora(tiny_model("llama"), ["q_proj", "k_proj", "v_proj"])
    framework = make_framework({"fused_lora": True})
    framework.augmentation(model, None, ())
    attention = model.base_model.model.model.layers[0].self_attn
    group = attention.q_proj.forward.__self__
    assert attention.k_proj.forward.__self__ is group

    def must_not_run(*args, **kwargs):
        raise AssertionError("the projection's own forward ran")

    group.previous = (group.previous[0], must_not_run, must_not_run)
    model(**tiny_batch()).loss.backward()
    assert group._kept == [None, None]  # nothing kept alive after the forward
    # a call with another input computes on its own (here: the guard fires)
    with pytest.raises(AssertionError, match="own forward ran"):
        attention.k_proj(torch.zeros(1, 3, model.config.hidden_size))
    framework.revert()


def test_disabled_adapter_falls_back_to_peft():
    model = _lora(tiny_model("qwen2"), _targets("qwen2"))
    batch = tiny_batch()
    with model.disable_adapter(), torch.no_grad():
        expected = model(**batch).logits
    framework = make_framework({"fused_lora": True})
    framework.augmentation(model, None, ())
    with model.disable_adapter(), torch.no_grad():
        actual = model(**batch).logits
    torch.testing.assert_close(actual, expected)
    framework.revert()


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_lora_with_gradient_checkpointing(reentrant):
    model = tiny_model("llama")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model = _lora(model, _targets("llama"))
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)
    framework = make_framework({"fused_lora": True, "fast_loss": "fused_linear", "fast_rms_layernorm": True})
    framework.augmentation(model, None, ())
    actual, actual_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(actual.loss, expected.loss)
    assert_grads_close(expected_grads, actual_grads)
    framework.revert()


def test_lora_dropout_is_refused_naming_the_layer():
    model = _lora(tiny_model("llama"), ["q_proj", "v_proj"])
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    framework = make_framework({"fused_lora": True})
    with pytest.raises(
        ModelStructureError,
        match=r"LoRA layer base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
        r" cannot be fused: lora_dropout=0\.1",
    ):
        framework.augmentation(model, None, ())


def test_dora_is_refused():
    model = _lora(tiny_model("llama"), ["q_proj"], use_dora=True)
    with pytest.raises(ModelStructureError, match="DoRA"):
        make_framework({"fused_lora": True}).augmentation(model, None, ())


def test_no_lora_layers_is_an_error_not_a_no_op():
    framework = make_framework({"fused_lora": True})
    with pytest.raises(
        AccelerationConfigError, match="fused_lora needs PEFT LoRA layers to fuse, but the model has none"
    ):
        framework.augmentation(tiny_model("llama"), None, ())


def test_lora_added_later_by_the_trainer_is_patched_when_ready():
    from peft import LoraConfig

    model = tiny_model("llama")
    framework = make_framework({"fused_lora": True})
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    model, (config,) = framework.augmentation(model, None, (config,))
    plugin = framework.plugin("fused_ops_and_kernels")
    assert "fused_lora" not in plugin.patch_counts  # pending: no LoRA on the model yet
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    assert framework.get_callbacks_and_ready_for_train(peft_model) == []
    assert plugin.patch_counts["fused_lora"] == 3 * model.config.num_hidden_layers
    framework.revert()


def test_under_fsdp_fused_lora_waits_for_after_prepare(monkeypatch):
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # a launched process: no Accelerator created yet
    model = _lora(tiny_model("llama"), _targets("llama"))
    framework = make_framework({"fused_lora": True, "fast_rms_layernorm": True})
    framework.augmentation(model, None, ())
    plugin = framework.plugin("fused_ops_and_kernels")
    assert "fused_lora" not in plugin.patch_counts and plugin.patch_counts["fast_rms_layernorm"] > 0
    contribution = plugin.prepare_contribution(model, PrepareContext(distributed_type="FSDP", fsdp_version=2))
    assert set(contribution.fused_scopes) == {"LlamaAttention", "LlamaMLP"}
    framework.get_callbacks_and_ready_for_train(model)  # still pending: FSDP has not wrapped yet
    assert "fused_lora" not in plugin.patch_counts
    plugin.after_prepare(model, PrepareContext(distributed_type="FSDP", fsdp_version=2))
    assert plugin.patch_counts["fused_lora"] == 7 * model.config.num_hidden_layers
    framework.revert()


def test_fsdp_unit_inside_a_patched_module_is_refused(monkeypatch):
    from fms_acceleration_accelerate_foak import plugin as plugin_module

    model = _lora(tiny_model("llama"), ["q_proj", "k_proj", "v_proj"])
    framework = make_framework({"fused_lora": True})
    framework.augmentation(model, None, ())
    # pretend FSDP made the LoRA adapters units of their own inside the attention modules
    monkeypatch.setattr(plugin_module, "fsdp_units_inside", lambda module: ["q_proj.lora_A.default"])
    with pytest.raises(
        AccelerationConfigError,
        match=r"FSDP units q_proj\.lora_A\.default were created inside "
        r"base_model\.model\.model\.layers\.0\.self_attn",
    ):
        framework.plugin("fused_ops_and_kernels").after_prepare(model, PrepareContext("FSDP", fsdp_version=1))
    framework.revert()


def test_base_layer_must_match_the_model():
    model = _lora(tiny_model("llama"), ["q_proj"])
    framework = make_framework({"fused_lora": True, "base_layer": "bitsandbytes"}, path="peft.quantization")
    with pytest.raises(
        AccelerationConfigError, match="base_layer: bitsandbytes, but no fused projection has a bitsandbytes 4-bit base"
    ):
        framework.augmentation(model, None, ())


# ----------------------------------------------------------------------------------------------- bnb nf4


@pytest.fixture(scope="module")
def saved_tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def _nf4_model(path, dtype=torch.float32):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype).train()


def _qlora_case(saved_tiny_llama, monkeypatch, rtol):
    import bitsandbytes as bnb

    nf4 = importlib.import_module("fms_acceleration_accelerate_kernels.nf4")
    dequant_calls = _spy_module(monkeypatch, nf4, "dequantize_4bit")
    model = _nf4_model(saved_tiny_llama)
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    model = _lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"])  # MLP stays adapter-less 4-bit
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)
    framework = make_framework(
        {"base_layer": "bitsandbytes", "fused_lora": True, "fused_dequant": True, "fast_loss": True},
        path="peft.quantization",
    )
    framework.augmentation(model, None, ())
    counts = framework.plugin("fused_ops_and_kernels").patch_counts
    assert counts["fused_lora"] == 8 and counts["fused_dequant"] == 6
    actual, actual_grads = loss_and_grads(model, batch)
    assert len(dequant_calls) >= 14  # every 4-bit projection dequantised by our kernels
    torch.testing.assert_close(actual.loss, expected.loss, rtol=rtol, atol=1e-5)
    assert_grads_close(expected_grads, actual_grads, rtol=rtol, atol=1e-5)
    framework.revert()
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, expected.loss.detach())


def _spy_module(monkeypatch, module, function):
    original = getattr(module, function)
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    # the dequant backends call nf4.dequantize_4bit through dequant.py's import of it
    dequant = importlib.import_module("fms_acceleration_accelerate_kernels.dequant")
    monkeypatch.setattr(dequant, function, counting)
    return calls


def test_qlora_nf4_fused_lora_and_dequant(saved_tiny_llama, monkeypatch):
    _qlora_case(saved_tiny_llama, monkeypatch, rtol=1e-4)


def test_qlora_nf4_triton_interpreter(saved_tiny_llama, monkeypatch, triton_interpreter):
    _qlora_case(saved_tiny_llama, monkeypatch, rtol=1e-3)


def test_quantized_base_needs_base_layer(saved_tiny_llama):
    model = _lora(_nf4_model(saved_tiny_llama), ["q_proj"])
    with pytest.raises(AccelerationConfigError, match=r"quantized bases .*bnb_4bit.* but base_layer is not set"):
        make_framework({"fused_lora": True}).augmentation(model, None, ())
