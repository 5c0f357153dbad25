"""LoRA on the experts (PEFT ``target_parameters``) computed in the expert kernels from the adapters' factors.

Against PEFT's own route (the adapter merged into the expert weights on every forward) on transformers' eager
experts: the same loss and gradients (adapters on the experts and on attention) on tiny models of four
architectures, Triton kernels in the interpreter and the torch reference; PEFT's merge never runs; training lowers
the loss and the saved adapter reloads in plain transformers + PEFT with identical logits; ``disable_adapter`` gives
the base model, merged adapters and trainable expert weights take PEFT's route with the same results; several
active adapters; activation checkpointing; the patch is in the table and reverts; peak memory of a forward and
backward on CPU below PEFT's route where the merged weight dominates."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from .moe_helpers import assert_grads_close, batch, load, loss_and_grads, make_framework

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _config(**overrides):
    from peft import LoraConfig

    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _randomise_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: make the adapters' effect visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _peft_model(directory, experts_implementation=None, **overrides):
    from peft import get_peft_model

    model = load(directory, experts_implementation=experts_implementation)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, _config(**overrides))
    _randomise_b(peft_model)
    return peft_model


def _augmented(model):
    framework = make_framework()
    model, _ = framework.augmentation(model)
    return model, framework, framework.plugins[0]


@contextmanager
def peft_merge_refused():
    """PEFT's merged-weight route must not run inside the block: its parametrizations raise."""
    from peft.tuners.lora import layer

    def refuse(self, weight):
        raise AssertionError("PEFT merged the adapter into the expert weights")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layer._LoraFactorsProxy, "forward", refuse)
        patch.setattr(layer._LoraParameterProxy, "forward", refuse)
        yield


def _layers(model) -> int:
    return model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "granitemoe", "gpt_oss"])
def test_same_loss_and_gradients_as_peft_route(model_type, kernel_path, saved_models):
    directory = saved_models(model_type)
    want_loss, want_grads = loss_and_grads(_peft_model(directory, experts_implementation="eager"), batch())
    assert any("experts" in n and "lora_A" in n for n in want_grads)
    assert any("q_proj" in n and "lora_B" in n for n in want_grads)

    model, framework, plugin = _augmented(_peft_model(directory))
    with peft_merge_refused():
        loss, grads = loss_and_grads(model, batch())
    assert plugin.expert_adapters.factored_calls == _layers(model)  # one call per MoE layer, from the factors
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(want_grads, grads, rtol=1e-4, atol=1e-7)  # experts' A and B, attention's, nothing else
    framework.revert()


@pytest.mark.parametrize("model_type", ["granitemoe", "qwen3_moe"])
def test_trains_and_the_adapter_reloads(model_type, kernel_path, saved_models, tmp_path):
    from peft import PeftModel

    directory = saved_models(model_type)
    model, framework, plugin = _augmented(_peft_model(directory))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    with peft_merge_refused():
        for _ in range(5):
            loss = model(**batch(seed=3)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.save_pretrained(tmp_path / "adapter")
        with torch.no_grad():
            trained = model(**batch(seed=4)).logits
    assert losses[-1] < losses[0] - 0.05
    assert plugin.expert_adapters.factored_calls == 6 * _layers(model)
    framework.revert()

    reloaded = PeftModel.from_pretrained(load(directory, experts_implementation="eager"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch(seed=4)).logits, trained, rtol=1e-4, atol=1e-5)


def test_disabled_merged_and_trainable_base_take_peft_route(reference_kernels, saved_models):
    directory = saved_models("mixtral")
    base = load(directory, experts_implementation="eager")
    with torch.no_grad():
        base_logits = base(**batch()).logits
    model, framework, plugin = _augmented(_peft_model(directory))
    with torch.no_grad():
        adapted = model(**batch()).logits
        assert plugin.expert_adapters.factored_calls == _layers(model)
        assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapters change the output
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch()).logits, base_logits, rtol=1e-5, atol=1e-6)
        model.merge_adapter()  # PEFT merges (once); the experts then run the plain kernels on merged weights
        torch.testing.assert_close(model(**batch()).logits, adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        assert plugin.expert_adapters.factored_calls == _layers(model)
        torch.testing.assert_close(model(**batch()).logits, adapted, rtol=1e-5, atol=1e-6)
        assert plugin.expert_adapters.factored_calls == 2 * _layers(model)

    # expert weights that train themselves: PEFT's route (the merged weight carries their gradient)
    reference = _peft_model(directory, experts_implementation="eager")
    for m in (reference, model):
        for name, p in m.named_parameters():
            if name.endswith("experts.base_layer.base_layer.gate_up_proj"):
                p.requires_grad_(True)
    want_loss, want_grads = loss_and_grads(reference, batch())
    loss, grads = loss_and_grads(model, batch())
    assert plugin.expert_adapters.factored_calls == 2 * _layers(model)
    assert any(n.endswith("gate_up_proj") for n in grads)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(want_grads, grads, rtol=1e-4, atol=1e-7)
    framework.revert()


def test_several_active_adapters(kernel_path, saved_models):
    """Two adapters active at once (different ranks and scalings): one low-rank term of the summed ranks."""
    directory = saved_models("qwen3_moe")

    def two_adapters(experts_implementation=None):
        model = _peft_model(directory, experts_implementation=experts_implementation)
        model.add_adapter("second", _config(r=2, lora_alpha=6))
        _randomise_b(model, seed=1)
        model.base_model.set_adapter(["default", "second"])
        return model

    reference = two_adapters("eager")
    with torch.no_grad():
        want = reference(**batch()).logits
    model, framework, plugin = _augmented(two_adapters())
    with torch.no_grad(), peft_merge_refused():
        torch.testing.assert_close(model(**batch()).logits, want, rtol=1e-5, atol=1e-5)
    assert plugin.expert_adapters.factored_calls == _layers(model)
    framework.revert()


def test_activation_checkpointing(reference_kernels, saved_models):
    directory = saved_models("mixtral")
    reference = _peft_model(directory, experts_implementation="eager")
    want_loss, want_grads = loss_and_grads(reference, batch())
    model, framework, plugin = _augmented(_peft_model(directory))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    with peft_merge_refused():
        loss, grads = loss_and_grads(model, batch())
    assert plugin.expert_adapters.factored_calls == 2 * _layers(model)  # the forward and its recompute
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(want_grads, grads, rtol=1e-4, atol=1e-7)
    framework.revert()


def test_patch_table_and_revert(reference_kernels, saved_models):
    """The route is patched in once the model carries expert adapters: at augmentation for a PEFT model, else at a
    later hook (here the trainer-callbacks hook, given the PEFT model wrapped after augmentation)."""
    from peft import get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    original = vars(ParamWrapper)["_activate_lora"]
    model, framework, plugin = _augmented(load(saved_models("mixtral")))
    assert vars(ParamWrapper)["_activate_lora"] is original  # no adapters: nothing to patch
    assert not any("ParamWrapper" in target for _, target, _, _ in framework.patches.summary_rows())
    model = get_peft_model(model, _config())
    framework.get_callbacks_and_ready_for_train(model)
    assert vars(ParamWrapper)["_activate_lora"] is not original
    rows = framework.patches.summary_rows()
    assert any("ParamWrapper._activate_lora" in target and "moe_experts_lora" in what for _, target, what, _ in rows)
    with torch.no_grad(), peft_merge_refused():
        model(**batch())
    assert plugin.expert_adapters.factored_calls == _layers(model)
    framework.revert()
    assert vars(ParamWrapper)["_activate_lora"] is original


def test_dropout_on_expert_adapters_is_refused_by_peft(saved_models):
    with pytest.raises(ValueError, match="lora_dropout"):
        _peft_model(saved_models("mixtral"), lora_dropout=0.1)


def test_a_peft_with_another_adapter_layout_keeps_its_route():
    from fms_acceleration_accelerate_moe.expert_lora import peft_layout_matches
    from peft.tuners.lora.layer import ParamWrapper

    class ExpertsReversed(ParamWrapper):  # a hypothetical PEFT pairing A[e] with B[E - 1 - e]
        def get_delta_weight(self, adapter_name, *args, **kwargs):
            return super().get_delta_weight(adapter_name).flip(0)

    assert peft_layout_matches(ParamWrapper)
    assert not peft_layout_matches(ExpertsReversed)


# ----------------------------------------------------------------------------------------------- memory


def _one_big_layer(tmp_path):
    """A one-layer Mixtral whose experts dominate memory: E=8, H=256, I=1024 (gate_up 8 x 2048 x 256 fp32 = 16 MiB)
    against 2 x 16 tokens."""
    from .moe_helpers import save_tiny

    return save_tiny(
        "mixtral", tmp_path / "big", hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
        num_local_experts=8, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip


def _largest_tensor_and_peak(model, inputs):
    """(bytes of the largest tensor an op allocated, peak bytes allocated and not yet freed per torch's profiler,
    from the start of the step) over one forward and backward."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # views (of the weights: per-expert slices, transposes) allocate nothing
                return out
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel() * t.element_size())
            return out

    with Largest():
        model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    events = [
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    ]
    held = peak = 0
    for _, change in sorted(events, key=lambda item: item[0]):
        held += change
        peak = max(peak, held)
    return Largest.largest, peak


def test_peak_memory_below_peft_route(reference_kernels, tmp_path):
    directory = _one_big_layer(tmp_path)
    inputs = batch(rows=2, seq=16)
    model, framework, plugin = _augmented(_peft_model(directory))
    ours = _largest_tensor_and_peak(model, inputs)
    assert plugin.expert_adapters.factored_calls == 2
    (record,) = [r for r in framework.patches.records if r.attribute == "_activate_lora"]
    framework.patches.revert_record(record)  # PEFT's own route, on the same plugin and kernels
    peft_route = _largest_tensor_and_peak(model, inputs)
    assert plugin.expert_adapters.factored_calls == 2
    framework.revert()
    stack = 8 * 2048 * 256 * 4  # one merged gate_up stack, fp32
    assert peft_route[0] >= stack > 4 * ours[0]  # PEFT's route forms the merged stack; ours nothing near it
    assert ours[1] < 0.6 * peft_route[1], (ours, peft_route)


def test_expert_parallelism_still_refuses_lora_on_experts(saved_models):
    from fms_acceleration_accelerate.distributed import RunContext
    from fms_acceleration_accelerate.errors import AccelerationConfigError

    framework = make_framework({"ep_degree": 2})
    plugin = framework.plugins[0]
    model = _peft_model(saved_models("mixtral"))
    with pytest.raises(AccelerationConfigError, match="LoRA adapters"):
        plugin.shard_experts(model, RunContext(world_size=2))
    assert not any(r.attribute == "_activate_lora" for r in framework.patches.records)  # no route under EP
    framework.revert()
