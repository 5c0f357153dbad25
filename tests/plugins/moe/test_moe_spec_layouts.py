"""The MoE spec's layout fields carry GPT-OSS's experts (gate/up interleaved, transposed weights, biases, clamped
SwiGLU with the module's alpha and limit) and its router (bias, top-k then softmax): the table's GPT-OSS spec against
transformers' own GPT-OSS modules, and against the layout that transformers' ``use_experts_implementation`` declares
for the class. Also: MoESpec refuses inconsistent declarations, and match_model a spec whose layout contradicts the
declaration."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fms_acceleration_accelerate_moe import route
from fms_acceleration_accelerate_moe.experts import ExpertsPlans, make_experts_forward
from fms_acceleration_accelerate_moe.routing import RoutingStats

from fms_acceleration_accelerate.model_specs import ModelStructureError, architecture_spec, match_model

GPT_OSS = architecture_spec("gpt_oss").moe


def _gpt_oss(limit: float = 7.0):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    config = GptOssConfig(
        hidden_size=24, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2, swiglu_limit=limit
    )
    torch.manual_seed(0)
    experts, router = GptOssExperts(config), GptOssTopKRouter(config)
    with torch.no_grad():
        for p in (*experts.parameters(), *router.parameters()):
            p.normal_(0.0, 0.3)
    return config, experts, router


@pytest.mark.parametrize("limit", [7.0, 0.5])  # 0.5: the clamps bind on many elements
def test_gpt_oss_experts_through_the_spec(limit, kernel_path):
    config, experts, router = _gpt_oss(limit)
    hidden = torch.randn(29, config.hidden_size, requires_grad=True)
    with torch.no_grad():
        _, weights, index = router(hidden)
        _, my_weights, my_index = route(hidden, router, GPT_OSS, config)
    assert torch.equal(my_index, index)
    torch.testing.assert_close(my_weights, weights)
    weights.requires_grad_(True)
    leaves = (hidden, weights, *experts.parameters())

    want = experts(hidden, index, weights)  # transformers' eager loop
    want.square().sum().backward()
    want_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    plans = ExpertsPlans(lambda module: GPT_OSS)
    plans.add(experts, GPT_OSS, "layers.0.mlp.experts")
    stats = RoutingStats()
    forward = make_experts_forward(plans, stats)
    got = forward(experts, hidden, router_indices=index, routing_weights=weights)  # GPT-OSS's argument names
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    for g, w in zip([t.grad for t in leaves], want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert int(stats.totals()["layers.0.mlp.experts"].sum()) == index.numel()
    assert dict(plans.get(experts).act_parameters) == {"alpha": config.swiglu_alpha, "limit": limit}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(routing="softmax"), "routing must be"),
        (dict(gate_up_layout="blocked"), "gate_up_layout must be"),
        (dict(shared_expert_gate="gate"), "shared_expert_gate needs shared_expert"),
    ],
)
def test_inconsistent_specs_are_refused(changes, message):
    with pytest.raises(TypeError, match=message):
        dataclasses.replace(GPT_OSS, **changes)


def test_the_spec_layout_is_the_one_transformers_declares_for_the_class():
    """``use_experts_implementation(is_concatenated=False, is_transposed=True, has_bias=True)`` on GptOssExperts."""
    _, experts, _ = _gpt_oss()
    assert (experts.is_concatenated, experts.is_transposed, experts.has_bias) == (False, True, True)
    assert (GPT_OSS.interleaved, GPT_OSS.transposed, GPT_OSS.gate_up_bias is not None) == (True, True, True)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        (dict(gate_up_layout="concatenated"), r"\(GptOssExperts\) declare is_concatenated=False"),
        (dict(gate_up_bias=None, down_bias=None), r"\(GptOssExperts\) declare has_bias=True"),
        (dict(transposed=False), r"hold gate_up_proj \(4, 32, 96\) and down_proj \(4, 48, 32\), expected \(E, 2I, H\)"),
    ],
)
def test_a_spec_contradicting_the_declared_layout_is_refused(changes, words, saved_models):
    from .moe_helpers import load

    model = load(saved_models("gpt_oss"))
    spec = architecture_spec("gpt_oss")
    match_model(model, spec)
    wrong = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, **changes))
    with pytest.raises(ModelStructureError, match=r"experts model\.layers\.0\.mlp\.experts .*" + words):
        match_model(model, wrong)


def test_attention_without_its_sinks_is_refused(saved_models):
    from .moe_helpers import load

    model = load(saved_models("gpt_oss"))
    del model.model.layers[1].self_attn.sinks
    words = r"model\.layers\.1\.self_attn \(GptOssAttention\) has no 1-D tensor 'sinks'"
    with pytest.raises(ModelStructureError, match=words):
        match_model(model, architecture_spec("gpt_oss"))
