"""Every hook that needs the run's shape is handed the one RunContext, built once per source: from the launcher's
environment for a model loaded before the Accelerator exists, then from the Accelerator (stock Accelerate, CPU)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fms_acceleration_accelerate import AccelerationFramework, AccelerationPlugin, PluginRegistry
from fms_acceleration_accelerate import accelerate_integration as ai
from fms_acceleration_accelerate.distributed import PrepareContribution, RunContext


@dataclasses.dataclass(frozen=True)
class RecorderConfig:
    pass


class RecorderPlugin(AccelerationPlugin):
    """Loads the model and records, per hook, the run context it was handed."""

    name = "run_context_recorder"
    configuration_and_paths = ("testing.run_context_recorder",)
    config_class = RecorderConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, RunContext]] = []

    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> torch.nn.Module:
        self.seen.append(("model_loader", self.run_context))
        return LlamaForCausalLM.from_pretrained(model_name_or_path, **kwargs)

    def augmentation(self, model, train_args, modifiable_args):
        self.seen.append(("augmentation", self.run_context))
        return model, modifiable_args

    def check_run_settings(self, context: RunContext) -> None:
        self.seen.append(("check_run_settings", context))

    def check_prepared_model(self, model: torch.nn.Module, context: RunContext) -> None:
        self.seen.append(("check_prepared_model", context))

    def prepare_contribution(self, model: torch.nn.Module, context: RunContext) -> PrepareContribution | None:
        self.seen.append(("prepare_contribution", context))
        return None

    def after_prepare(self, model: torch.nn.Module, context: RunContext) -> None:
        self.seen.append(("after_prepare", context))

    def get_callbacks_and_ready_for_train(self, model=None, accelerator=None):
        self.seen.append(("get_callbacks_and_ready_for_train", self.run_context))
        return []


REGISTRY = PluginRegistry([RecorderPlugin])
SECTION = {"testing": {"run_context_recorder": {}}}


@pytest.fixture
def tiny_llama_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


@pytest.fixture
def fresh_install(monkeypatch):
    """An un-wrapped Accelerator before and after; no launcher variables; no Accelerator in the process yet."""
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.delenv(ai.ENV_SECTION, raising=False)
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})
    monkeypatch.setattr(PartialState, "_shared_state", {})
    was = ai.is_installed()
    ai.uninstall()
    yield
    ai.uninstall()
    if was:
        ai.install()


def test_one_context_per_source_reaches_every_hook(fresh_install, tiny_llama_dir):
    handler = ai.AccelerationKwargs(config=SECTION, registry=REGISTRY)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # routed to the plugin: no Accelerator yet
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", kwargs_handlers=[handler])
    framework = ai.get_framework(accelerator)
    plugin = framework.plugin("run_context_recorder")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ai.get_callbacks_and_ready_for_train(model, accelerator)

    hooks = [hook for hook, _ in plugin.seen]
    assert hooks == [
        "model_loader",
        "check_run_settings",
        "check_prepared_model",
        "prepare_contribution",
        "after_prepare",
        "get_callbacks_and_ready_for_train",
    ]
    loading = plugin.seen[0][1]
    assert loading.source == "default" and loading.accelerator is None and loading.framework is framework
    accelerated = [context for _, context in plugin.seen[1:]]
    assert all(context is accelerated[0] for context in accelerated)  # built once, when the Accelerator was
    context = accelerated[0]
    assert context is framework.run_context and context is plugin.run_context
    assert (context.source, context.client, context.mixed_precision) == ("accelerator", "accelerate", "bf16")
    assert context.accelerator is accelerator and context.framework is framework
    assert (context.distributed_type, context.fsdp_version, context.world_size) == ("NO", None, 1)


def test_framework_api_context_follows_the_training_arguments_then_the_trainers_accelerator(fresh_install):
    from types import SimpleNamespace

    framework = AccelerationFramework(SECTION, registry=REGISTRY)
    plugin = framework.plugin("run_context_recorder")
    assert framework.run_context.client == "framework-api" and not framework.run_context.is_fsdp
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    framework.augmentation(model, SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 2}), ())
    _, augmenting = plugin.seen[-1]
    assert (augmenting.fsdp_version, augmenting.source) == (2, "training_arguments")
    accelerator = Accelerator(cpu=True)  # e.g. trainer.accelerator (no acceleration config of its own)
    framework.get_callbacks_and_ready_for_train(model, accelerator)
    _, ready = plugin.seen[-1]
    assert ready.accelerator is accelerator and ready.source == "accelerator" and ready.client == "framework-api"
    framework.get_callbacks_and_ready_for_train(model, accelerator)
    assert plugin.seen[-1][1] is ready  # built once per Accelerator


def test_the_accelerators_context_is_rebuilt_only_when_its_settings_change(fresh_install):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    fsdp_plugin = SimpleNamespace(use_orig_params=False, cpu_ram_efficient_loading=False)
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        is_fsdp2=True,
        state=SimpleNamespace(fsdp_plugin=fsdp_plugin),
        mixed_precision="bf16",
        device=torch.device("cpu"),
        num_processes=2,
    )
    framework = AccelerationFramework(SECTION, registry=REGISTRY)
    ai.check_accelerate_settings(accelerator, framework)  # what creating the Accelerator does
    created = framework.run_context
    assert created.fsdp_version == 2 and created.fsdp.use_orig_params is False
    assert ai.context_for_accelerator(framework, accelerator) is created  # nothing changed: the same object
    fsdp_plugin.use_orig_params = True  # e.g. a trainer adjusting the FSDP plugin after creating the Accelerator
    changed = ai.context_for_accelerator(framework, accelerator)
    assert changed is not created and changed.fsdp.use_orig_params is True
    assert framework.plugin("run_context_recorder").run_context is changed
