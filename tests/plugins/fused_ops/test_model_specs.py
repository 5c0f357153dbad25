"""Architecture specs: every entry matches the installed transformers and a tiny model built from a config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fms_acceleration_accelerate.model_specs import (
    ARCHITECTURE_SPECS,
    AttentionSpec,
    ModelStructureError,
    activation_of,
    architecture_spec,
    check_spec_classes,
    experts_activation,
    match_model,
)

from .tiny_models import TINY_CONFIGS, tiny_model

ALL = sorted(ARCHITECTURE_SPECS)


def test_every_spec_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(ARCHITECTURE_SPECS)
    assert set(ALL) >= {
        "llama",
        "mistral",
        "mixtral",
        "granite",
        "granitemoe",
        "gpt_bigcode",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi3",
    }


@pytest.mark.parametrize("model_type", ALL)
def test_spec_matches_installed_transformers_and_tiny_model(model_type):
    spec = architecture_spec(model_type)
    check_spec_classes(spec)
    model = tiny_model(model_type)
    match = match_model(model, spec)
    n_layers = model.config.num_hidden_layers
    assert match.causal_lm.module is model and match.causal_lm.path == ""
    assert len(match.decoder_layers) == n_layers
    assert len(match.attentions) == n_layers
    assert len(match.mlps) == (0 if spec.mlp is None else n_layers)
    # 2 norms per layer (+2 more for Gemma2's sandwich norms, +2 for Qwen3's q/k norms) + the final norm
    assert len(match.norms) >= 2 * n_layers + 1
    for norm in match.norms:
        assert norm.module.weight.shape == (model.config.hidden_size,) or norm.module.weight.shape[0] < 32
    for attention in match.attentions:
        for name in spec.attention.projections:
            assert isinstance(getattr(attention.module, name), nn.Linear)
    expected_activation = {"gemma": "gelu", "gemma2": "gelu", "gpt_bigcode": "gelu"}.get(model_type, "silu")
    for mlp in match.mlps:
        assert activation_of(mlp.module, spec.mlp)[0] == expected_activation
    # MoE architectures: one block, experts and router per layer (the tiny configs make every layer sparse)
    assert len(match.moe_blocks) == len(match.experts) == len(match.routers) == (n_layers if spec.moe else 0)
    for experts in match.experts:  # GPT-OSS: its clamped SwiGLU, fixed by the spec
        assert experts_activation(experts.module, spec.moe) == ("gpt_oss" if model_type == "gpt_oss" else "silu")


def test_spec_kinds():
    assert architecture_spec("gemma").norm.weight_offset == 1.0
    assert architecture_spec("llama").norm.weight_offset == 0.0
    assert architecture_spec("gpt_bigcode").rotary is None
    assert architecture_spec("gpt_bigcode").norm.kind == "layernorm"
    assert architecture_spec("phi3").rotary.partial
    gpt_oss = architecture_spec("gpt_oss")
    assert gpt_oss.rotary.half_width and not gpt_oss.rotary.partial and gpt_oss.attention.sinks == "sinks"
    assert gpt_oss.moe.interleaved and gpt_oss.moe.transposed and gpt_oss.moe.router_bias
    assert all(s.attention.sinks is None for t, s in ARCHITECTURE_SPECS.items() if t != "gpt_oss")
    assert architecture_spec("gemma2").logits.softcap_config == "final_logit_softcapping"
    assert architecture_spec("granite").logits.scaling_config == "logits_scaling"
    assert architecture_spec("mixtral").mlp is None and architecture_spec("mixtral").logits.router_aux_loss
    moe_types = {t for t, s in ARCHITECTURE_SPECS.items() if s.moe is not None}
    assert moe_types >= {"mixtral", "granitemoe", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}
    assert all(ARCHITECTURE_SPECS[t].mlp is None for t in moe_types)


def test_match_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    match = match_model(model, architecture_spec("llama"))
    assert match.causal_lm.path == "base_model.model"
    assert match.attentions[0].path == "base_model.model.model.layers.0.self_attn"


def test_unsupported_architecture():
    with pytest.raises(ModelStructureError, match=r"(?s)'opt' has no model spec.*supported model types: llama"):
        architecture_spec("opt")


def test_missing_projection_names_the_module():
    model = tiny_model("llama")
    del model.model.layers[1].self_attn.k_proj
    with pytest.raises(ModelStructureError, match=r"model\.layers\.1\.self_attn \(LlamaAttention\) has no .*'k_proj'"):
        match_model(model, architecture_spec("llama"))


def test_wrong_activation_names_the_module():
    model = tiny_model("llama", hidden_act="relu")
    with pytest.raises(ModelStructureError, match=r"model\.layers\.0\.mlp\.act_fn is ReLU"):
        match_model(model, architecture_spec("llama"))


def test_model_of_another_architecture():
    with pytest.raises(ModelStructureError, match=r"expected exactly one LlamaForCausalLM.*found none"):
        match_model(tiny_model("qwen2"), architecture_spec("llama"))


def test_spec_naming_a_class_transformers_lacks():
    spec = dataclasses.replace(
        architecture_spec("llama"), attention=AttentionSpec(class_names=("LlamaFlashAttention3000",))
    )
    with pytest.raises(ModelStructureError, match="defines no class 'LlamaFlashAttention3000'"):
        check_spec_classes(spec)


def test_layer_count_mismatch():
    model = tiny_model("llama")
    model.model.layers[0].mlp = nn.Identity()
    with pytest.raises(ModelStructureError, match="found 2 decoder layers but 1 MLP modules"):
        match_model(model, architecture_spec("llama"))


def test_not_a_module():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        match_model(torch.zeros(1), architecture_spec("llama"))
