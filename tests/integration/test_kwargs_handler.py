"""``Accelerator(kwargs_handlers=[AccelerationKwargs(...)])`` with the stock Accelerator, in one process."""

from __future__ import annotations

import types

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from fms_acceleration_accelerate import AccelerationConfigError, PluginRegistry
from fms_acceleration_accelerate import accelerate_integration as ai
from fms_acceleration_accelerate.distributed import PrepareContribution, merge_contributions

from .toy_plugins import ToyLoraPlugin, ToyMarkerPlugin

REGISTRY = PluginRegistry([ToyLoraPlugin, ToyMarkerPlugin])


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def test_stock_accelerator_rejects_unknown_handler_without_install(fresh_install):
    handler = ai.AccelerationKwargs.__new__(ai.AccelerationKwargs)  # skip __post_init__ (which installs)
    handler.config, handler.registry, handler.check_packages = {}, None, True
    with pytest.raises(KeyError):
        Accelerator(cpu=True, kwargs_handlers=[handler])


def test_install_is_idempotent_and_revertible(fresh_install):
    original_init, original_prepare = Accelerator.__init__, Accelerator.prepare
    assert ai.install() is True
    assert ai.install() is False
    assert Accelerator.__init__ is not original_init
    assert ai.uninstall() == 2
    assert Accelerator.__init__ is original_init and Accelerator.prepare is original_prepare
    assert ai.uninstall() == 0


def test_handler_activates_plugins_and_hooks_run_in_order(fresh_install):
    handler = ai.AccelerationKwargs(config={"testing": {"toy_lora": {"r": 2}}}, registry=REGISTRY)
    assert ai.is_installed()  # creating the handler installs the wrapper
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    framework = ai.get_framework(accelerator)
    assert framework is not None and framework.active_plugin_names == ("toy_lora",)
    model, _ = framework.augmentation(tiny_llama(), None, ())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model, optimizer = accelerator.prepare(model, optimizer)
    plugin = framework.plugin("toy_lora")
    assert plugin.events == ["augmentation", "prepare_contribution", "after_prepare"]
    context = plugin.contexts[0]
    assert context.accelerator is accelerator and context.framework is framework
    assert context.distributed_type == "NO" and context.fsdp_version is None and context.world_size == 1
    batch = torch.randint(0, 64, (2, 8))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


def test_handler_with_other_handlers_and_positional_style(fresh_install):
    from accelerate.utils import GradScalerKwargs

    handler = ai.AccelerationKwargs(config={"testing": {"toy_lora": {}}}, registry=REGISTRY)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[GradScalerKwargs(), handler])
    assert ai.get_framework(accelerator).active_plugin_names == ("toy_lora",)
    assert accelerator.scaler_handler is not None  # Accelerate still saw its own handler
    with pytest.raises(ValueError, match="at most one AccelerationKwargs"):
        Accelerator(cpu=True, kwargs_handlers=[handler, handler])


def test_stock_accelerator_untouched_when_absent(fresh_install):
    ai.install()
    accelerator = Accelerator(cpu=True)
    assert ai.get_framework(accelerator) is None
    assert not hasattr(accelerator, "_fms_acceleration_framework")
    model = tiny_llama()
    calls = []
    original = Accelerator.prepare.__fms_acceleration_wrapped__

    def spy(self, *args, device_placement=None):
        calls.append(args)
        return original(self, *args, device_placement=device_placement)

    ai.uninstall()
    Accelerator.prepare = spy
    try:
        ai.install()  # wraps the spy: without a framework the wrapper must call straight through
        prepared = accelerator.prepare(model)
    finally:
        ai.uninstall()
        Accelerator.prepare = original
    assert calls == [(model,)]
    assert prepared is model


def test_environment_section_is_picked_up(fresh_install, monkeypatch, toy_site):
    """What a launched worker sees: the section in $FMS_ACCELERATION_SECTION, plugins from entry points."""
    monkeypatch.syspath_prepend(str(toy_site))
    monkeypatch.setenv(ai.ENV_SECTION, '{"testing": {"toy_lora": {"r": 3}}}')
    ai.install()
    framework = ai.get_framework(Accelerator(cpu=True))
    assert framework is not None and framework.active_plugin_names == ("toy_lora",)
    assert framework.plugin("toy_lora").config.r == 3
    assert framework.config.path("testing") == "acceleration.testing"  # messages name the config file's keys


def test_bad_section_in_handler_raises_config_error(fresh_install):
    with pytest.raises(AccelerationConfigError, match=r"\[testing.toy_lora.r\]"):
        Accelerator(
            cpu=True, kwargs_handlers=[ai.AccelerationKwargs({"testing": {"toy_lora": {"r": "x"}}}, registry=REGISTRY)]
        )


# ----------------------------------------------------------------------------- prepare paths with a seam


class _FakeAccelerator:
    """Just what ``_prepare_with_framework`` reads; FSDP itself needs a GPU (Accelerate refuses it on CPU)."""

    def __init__(self, distributed_type: str, fsdp_version: int | None = None, use_orig_params: bool = False):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType(distributed_type)
        self.is_fsdp2 = fsdp_version == 2
        self.device = torch.device("cpu")
        self.mixed_precision = "no"
        self.num_processes = 1
        self.state = types.SimpleNamespace(
            fsdp_plugin=types.SimpleNamespace(
                auto_wrap_policy="transformer",
                use_orig_params=use_orig_params,
                ignored_modules=None,
                mixed_precision_policy=None,
            )
        )


def _framework(section):
    return ai.AccelerationFramework(section, registry=REGISTRY)


def test_deepspeed_refusal_happens_before_prepare():
    framework = _framework({"testing": {"toy_lora": {"refuse_deepspeed": True}}})
    called = []
    with pytest.raises(AccelerationConfigError, match="cannot run under DeepSpeed: toy_lora"):
        ai._prepare_with_framework(
            _FakeAccelerator("DEEPSPEED"), framework, lambda *a, **k: called.append(a), (tiny_llama(),), None
        )
    assert called == []


def test_fsdp1_policy_is_scoped_to_the_prepare_call():
    framework = _framework({"testing": {"toy_lora": {"reduce_fp32": True}}})
    model, _ = framework.augmentation(tiny_llama(), None, ())
    accelerator = _FakeAccelerator("FSDP", fsdp_version=1)
    seen = {}

    def original_prepare(acc, *args, device_placement=None):
        plugin = acc.state.fsdp_plugin
        seen["policy"] = plugin.auto_wrap_policy
        seen["mp"] = plugin.mixed_precision_policy
        return args[0]

    ai._prepare_with_framework(accelerator, framework, original_prepare, (model,), None)
    policy = seen["policy"]
    units = policy.fms_acceleration_units
    assert all(".lora_A." in u or ".lora_B." in u or u.endswith(("layers.0", "layers.1")) for u in units)
    lora_linear = model.get_submodule(next(u for u in units if ".lora_A." in u))
    assert policy(lora_linear, recurse=False) and policy(model, recurse=True)
    assert not policy(model.get_submodule("base_model.model.model.embed_tokens"), recurse=False)
    assert seen["mp"].reduce_dtype == torch.float32
    # restored after the call
    assert accelerator.state.fsdp_plugin.auto_wrap_policy == "transformer"
    assert accelerator.state.fsdp_plugin.mixed_precision_policy is None
    assert framework.plugin("toy_lora").events[-1] == "after_prepare"


def test_fsdp1_fused_scope_needs_use_orig_params():
    framework = _framework({"testing": {"toy_lora": {"fused_attention": True}}})
    model, _ = framework.augmentation(tiny_llama(), None, ())
    with pytest.raises(AccelerationConfigError, match="fsdp_use_orig_params: true"):
        ai._prepare_with_framework(_FakeAccelerator("FSDP", 1), framework, lambda *a, **k: a[1], (model,), None)
    result = ai._prepare_with_framework(
        _FakeAccelerator("FSDP", 1, use_orig_params=True), framework, lambda *a, **k: a[1], (model,), None
    )
    assert result is model


def test_merge_conflicts_are_errors():
    a = PrepareContribution(reduce_dtype=torch.float32)
    b = PrepareContribution(reduce_dtype=torch.bfloat16)
    with pytest.raises(AccelerationConfigError, match="'a' and 'b' need different FSDP reduce_dtype"):
        merge_contributions([("a", a), ("b", b)])
    merged = merge_contributions([("a", a), ("c", PrepareContribution(reduce_dtype=torch.float32)), ("d", None)])
    assert merged.reduce_dtype == torch.float32 and merged.contributors == ("a", "c")
    with pytest.raises(TypeError, match="must return a PrepareContribution"):
        merge_contributions([("x", {"reduce_dtype": torch.float32})])
    with pytest.raises(TypeError, match="must be a tuple"):
        PrepareContribution(wrap_units=["LlamaDecoderLayer"])


def test_fused_scope_keeps_adapters_in_the_layer_unit():
    """FSDP1: attention LoRA stays inside the (mixed) layer unit; the MLP's adapters are still split out."""
    from fms_acceleration_accelerate.distributed import PrepareContext, collect_contributions, plan_fsdp_units

    framework = _framework(
        {"testing": {"toy_lora": {"fused_attention": True, "target_modules": ["q_proj", "down_proj"]}}}
    )
    model, _ = framework.augmentation(tiny_llama(), None, ())
    merged = collect_contributions(framework.plugins, model, PrepareContext(fsdp_version=1))
    plan = plan_fsdp_units(model, merged, 1)
    layers = [f"base_model.model.model.layers.{i}" for i in (0, 1)]
    assert all(plan.unit(n).kind == "mixed" for n in layers)
    split = [u.name for u in plan.units if u.reason == "trainable split"]
    assert len(split) == 4 and all(".mlp.down_proj.lora_" in n for n in split)
    assert not any(".self_attn." in n for n in plan.unit_names)
