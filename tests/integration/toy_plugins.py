"""Test-only plugins used by the integration tests (never installed; registered through a temporary
dist-info entry point or a registry passed explicitly)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationPlugin, option
from fms_acceleration_accelerate.distributed import PrepareContribution


@dataclasses.dataclass(frozen=True)
class ToyLoraConfig:
    r: int = option(4, help="LoRA rank")
    target_modules: tuple[str, ...] = option(("q_proj", "v_proj"), help="modules that get adapters")
    fused_attention: bool = option(False, help="declare the attention modules as fused-kernel scopes")
    reduce_fp32: bool = option(False, help="ask for fp32 gradient reductions")
    refuse_deepspeed: bool = option(False, help="refuse to run under DeepSpeed")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise AccelerationConfigError("r must be positive", fix="set r to 1 or more")


class ToyLoraPlugin(AccelerationPlugin):
    """Adds LoRA with peft in ``augmentation`` and contributes FSDP wrap settings."""

    name = "toy_lora"
    configuration_and_paths = ("testing.toy_lora",)
    config_class = ToyLoraConfig
    order = 200

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[str] = []
        self.contexts: list[Any] = []

    def augmentation(self, model, train_args, modifiable_args):
        from peft import LoraConfig, get_peft_model

        self.events.append("augmentation")
        config = LoraConfig(
            r=self.config.r, lora_alpha=2 * self.config.r, target_modules=list(self.config.target_modules)
        )
        return get_peft_model(model, config), modifiable_args

    def prepare_contribution(self, model, context):
        self.events.append("prepare_contribution")
        self.contexts.append(context)
        return PrepareContribution(
            fused_scopes=("LlamaAttention",) if self.config.fused_attention else (),
            reduce_dtype=torch.float32 if self.config.reduce_fp32 else None,
            refuse_deepspeed_reason="toy plugin refuses DeepSpeed" if self.config.refuse_deepspeed else None,
            after_unit_sharded=self._unit_sharded,
            notes=("toy contribution",),
        )

    def _unit_sharded(self, name, module):
        from torch.distributed.fsdp import FSDPModule

        self.events.append(f"unit_sharded:{name or '<root>'}:{isinstance(module, FSDPModule)}")

    def after_prepare(self, model, context):
        self.events.append("after_prepare")

    def get_callbacks_and_ready_for_train(self, model=None, accelerator=None):
        self.events.append("callbacks")
        return []


@dataclasses.dataclass(frozen=True)
class ToyMarkerConfig:
    report_dir: str = option("", help="write one JSON file per rank here when the framework is built")


class ToyMarkerPlugin(AccelerationPlugin):
    """Reports, per process, that it was activated (proves a worker picked the section up)."""

    name = "toy_marker"
    configuration_and_paths = ("testing.marker",)
    config_class = ToyMarkerConfig
    order = 300

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.report_dir:
            rank = os.environ.get("RANK")  # None in the launcher, which builds the framework to validate
            path = os.path.join(self.config.report_dir, f"marker_rank{rank}_pid{os.getpid()}.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump({"rank": rank, "pid": os.getpid()}, handle)
