"""The MoE plugin on a tiny model of every MoE architecture of the spec table, saved and loaded locally: the same
loss and gradients as transformers' eager experts (Triton kernels in the interpreter and the torch reference),
patches recorded and reverted, routing statistics, checkpoints in the model's own format."""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_moe import route

from fms_acceleration_accelerate.model_specs import architecture_spec, match_model

from .moe_helpers import MOE_TYPES, assert_grads_close, batch, load, loss_and_grads, make_framework


def test_every_moe_architecture_of_the_table_is_covered():
    assert set(MOE_TYPES) >= {"mixtral", "granitemoe", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_same_loss_and_gradients_as_eager_experts(model_type, kernel_path, saved_models):
    directory = saved_models(model_type)
    reference = load(directory, experts_implementation="eager")
    want_loss, want_grads = loss_and_grads(reference, batch())

    model = load(directory)
    framework = make_framework()
    model, _ = framework.augmentation(model)
    plugin = framework.plugins[0]
    assert model.config._experts_implementation == plugin.experts_key
    calls = []
    hook = model.get_submodule(match_model(model, architecture_spec(model_type)).experts[0].path)
    handle = hook.register_forward_hook(lambda *a: calls.append(1))
    loss, grads = loss_and_grads(model, batch())
    handle.remove()
    assert calls  # the experts module ran (its forward dispatches to the registered function)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    # every parameter's gradient, routers and expert stacks included (the routing weights' gradient reaches
    # the router through the kernels' routing-weight gradient)
    assert any("experts.gate_up_proj" in n for n in grads) and any(
        n.endswith(("gate.weight", "router.weight")) for n in grads
    )
    assert_grads_close(want_grads, grads, rtol=1e-4, atol=1e-6)

    framework.revert()
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default, as loaded
    from transformers.integrations.moe import ExpertsInterface

    assert plugin.experts_key not in vars(ExpertsInterface)["_global_mapping"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_the_kernels_run_not_the_eager_loop(model_type, triton_interpreter, saved_models, monkeypatch):
    """The registered function calls the grouped op (not transformers' own forward): count its calls."""
    from fms_acceleration_accelerate_kernels import moe as kernels

    seen = []
    original = kernels.moe_experts_triton

    def spy(*args, **kwargs):
        seen.append(kwargs.get("routing"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "moe_experts_triton", spy)
    model = load(saved_models(model_type))
    framework = make_framework()
    framework.augmentation(model)
    model(**batch())
    layers = model.config.num_hidden_layers
    assert len(seen) == layers and all(r is not None for r in seen)  # routing computed once, shared with the stats
    framework.revert()
    model(**batch())
    assert len(seen) == layers


def test_patch_table_names_the_registry_entry_and_the_config(saved_models):
    model = load(saved_models("mixtral"))
    framework = make_framework()
    framework.augmentation(model)
    rows = framework.patches.summary_rows()
    key = framework.plugins[0].experts_key
    assert [(r[0], r[1]) for r in rows] == [
        ("scattermoe", f"transformers ExpertsInterface[{key!r}]"),
        ("scattermoe", "MixtralForCausalLM.config._experts_implementation"),
    ]
    framework.revert()


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_route_from_the_spec_matches_each_router(model_type, saved_models):
    """The spec's routing data (kind, bias, top-k normalisation) reproduces the model's own router."""
    model = load(saved_models(model_type))
    spec = architecture_spec(model_type)
    match = match_model(model, spec)
    hidden = torch.randn(23, model.config.hidden_size)
    for router in match.routers:
        logits, weights, index = router.module(hidden)
        my_logits, my_weights, my_index = route(hidden, router.module, spec.moe, model.config)
        torch.testing.assert_close(my_logits, logits)
        assert torch.equal(my_index, index)
        torch.testing.assert_close(my_weights, weights.float())


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_route_follows_the_normalisation_flag(norm_topk_prob, saved_models):
    model = load(saved_models("olmoe", norm_topk_prob=norm_topk_prob))
    router = match_model(model, architecture_spec("olmoe")).routers[0].module
    _, weights, _ = route(
        torch.randn(9, model.config.hidden_size), router, architecture_spec("olmoe").moe, model.config
    )
    sums = weights.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums)) is norm_topk_prob


def test_dense_layers_between_moe_layers(reference_kernels, saved_models):
    """Qwen3-MoE with dense layers (mlp_only_layers): only the sparse layers are patched; parity holds."""
    directory = saved_models("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    reference = load(directory, experts_implementation="eager")
    want_loss, want_grads = loss_and_grads(reference, batch())
    model = load(directory)
    framework = make_framework()
    framework.augmentation(model)
    assert len(match_model(model, architecture_spec("qwen3_moe")).experts) == 2
    loss, grads = loss_and_grads(model, batch())
    torch.testing.assert_close(loss, want_loss)
    assert_grads_close(want_grads, grads)
    assert set(framework.plugins[0].routing_stats.totals()) == {
        "model.layers.0.mlp.experts",
        "model.layers.2.mlp.experts",
    }


def _router_counts(model, model_type, inputs) -> dict[str, torch.Tensor]:
    """Tokens per expert per layer as the model's own routers decide them (forward hooks on the routers)."""
    match = match_model(model, architecture_spec(model_type))
    counts, handles = {}, []
    n_experts = architecture_spec(model_type).moe.num_experts(model.config)
    for router, experts in zip(match.routers, match.experts):

        def hook(module, args, output, name=experts.path):
            counts[name] = torch.bincount(output[2].flatten(), minlength=n_experts)

        handles.append(router.module.register_forward_hook(hook))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return counts


@pytest.mark.parametrize("model_type", ["granitemoe", "qwen2_moe"])
def test_routing_statistics_count_the_routers_decisions(model_type, reference_kernels, saved_models):
    directory = saved_models(model_type)
    first, second = batch(seed=1), batch(seed=2, rows=3)
    reference = load(directory, experts_implementation="eager")
    want = _router_counts(reference, model_type, first)
    for name, c in _router_counts(reference, model_type, second).items():
        want[name] = want[name] + c

    model = load(directory)
    framework = make_framework()
    framework.augmentation(model)
    stats = framework.plugins[0].routing_stats
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for inputs in (first, second):
        model(**inputs).loss.backward()  # the forward checkpointing recomputes in backward is not counted again
    totals = stats.totals()
    assert totals.keys() == want.keys()
    for name in want:
        assert torch.equal(totals[name], want[name]), name
    model.eval()
    with torch.no_grad():
        model(**first)  # evaluation forwards are not counted
    assert all(torch.equal(stats.totals()[n], want[n]) for n in want)

    window = stats.take_window()
    assert all(torch.equal(window[n], want[n]) for n in want)
    assert all(int(c.sum()) == 0 for c in stats.take_window().values())  # nothing since
    summary = stats.summarize(window)
    k = architecture_spec(model_type).moe.top_k(model.config)
    assert summary.tokens == k * (first["input_ids"].numel() + second["input_ids"].numel()) * len(want)
    assert summary.max_over_mean >= 1.0 >= summary.min_over_mean


def test_routing_statistics_can_be_switched_off(reference_kernels, saved_models):
    model = load(saved_models("mixtral"))
    framework = make_framework({"routing_stats": False})
    framework.augmentation(model)
    model(**batch()).loss.backward()
    assert framework.plugins[0].routing_stats.totals() == {}
    assert framework.get_callbacks_and_ready_for_train(model) == []


def test_checkpoint_keeps_the_models_format_and_loads_in_plain_transformers(reference_kernels, saved_models, tmp_path):
    from safetensors.torch import load_file

    directory = saved_models("granitemoe")
    model = load(directory)
    framework = make_framework()
    framework.augmentation(model)
    with torch.no_grad():
        model.model.layers[0].block_sparse_moe.experts.down_proj.mul_(1.5)  # a trained-looking change
    model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(directory / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(saved[k].shape == original[k].shape for k in saved)
    config_text = (tmp_path / "out" / "config.json").read_text()
    assert "fms_scattermoe" not in config_text and "experts_implementation" not in config_text

    framework.revert()
    reloaded = load(tmp_path / "out", experts_implementation="eager")  # plain transformers, no plugin
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_two_frameworks_revert_in_any_order(reference_kernels, saved_models):
    from transformers.integrations.moe import ExpertsInterface

    before = dict(vars(ExpertsInterface)["_global_mapping"])
    a_model, b_model = load(saved_models("mixtral")), load(saved_models("olmoe"))
    a, b = make_framework(), make_framework()
    a.augmentation(a_model)
    b.augmentation(b_model)
    a_key, b_key = a.plugins[0].experts_key, b.plugins[0].experts_key
    assert {a_key, b_key} <= set(vars(ExpertsInterface)["_global_mapping"])
    a.revert()  # the first one first: the second's entry stays usable
    assert a_key not in vars(ExpertsInterface)["_global_mapping"]
    assert b_model.config._experts_implementation == b_key
    b_model(**batch())
    b.revert()
    assert vars(ExpertsInterface)["_global_mapping"] == before


def test_patching_twice_is_a_no_op_and_trainer_models_are_patched(reference_kernels, saved_models):
    model = load(saved_models("mixtral"))
    framework = make_framework()
    framework.augmentation(model)
    count = len(framework.patches)
    framework.plugins[0].patch_model(model, framework.run_context)
    assert len(framework.patches) == count

    other = load(saved_models("mixtral"))
    fresh = make_framework()
    callbacks = fresh.get_callbacks_and_ready_for_train(other)  # a trainer's model that no hook patched yet
    assert other.config._experts_implementation == fresh.plugins[0].experts_key
    assert [type(c).__name__ for c in callbacks] == ["RoutingStatsCallback"]
    fresh.revert()
    framework.revert()
    assert model.config._experts_implementation == "grouped_mm"
    framework.augmentation(model)  # after a revert the same framework patches the model again
    assert model.config._experts_implementation == framework.plugins[0].experts_key
    assert len(framework.patches) == count
    model(**batch())
    framework.revert()


def test_bf16_model(kernel_path, saved_models):
    """bf16 weights: the result stays close to the eager experts (bf16 rounding differs by path)."""
    directory = saved_models("qwen2_moe")
    reference = load(directory, experts_implementation="eager", dtype=torch.bfloat16)
    model = load(directory, dtype=torch.bfloat16)
    framework = make_framework()
    framework.augmentation(model)
    inputs = batch()
    with torch.no_grad():
        want, got = reference(**inputs), model(**inputs)
    torch.testing.assert_close(got.loss.float(), want.loss.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.logits.float(), want.logits.float(), rtol=5e-2, atol=5e-2)
    framework.revert()
