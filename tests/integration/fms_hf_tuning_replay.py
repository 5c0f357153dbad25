"""A small replay of how fms-hf-tuning (the original framework's real client) drives ``fms_acceleration``.

Written from fms-hf-tuning's behaviour, not its code: its acceleration dataclasses each name the config path
they are written to; ``AccelerationFrameworkConfig.to_dict`` merges them into one tree (two dataclasses written
to the same key update one mapping); ``get_framework`` dumps ``{"plugins": tree}`` to a temporary YAML file,
builds ``fms_acceleration.AccelerationFramework(path)`` and, when no acceleration flag was given, accepts the
``ValueError`` whose only argument starts with "No plugins could be configured" as "no framework". Feature
availability is checked, as fms-hf-tuning does, with transformers' ``_is_package_available`` on
``fms_acceleration`` and ``fms_acceleration_<plugin>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from tempfile import NamedTemporaryFile
from typing import Any

import yaml


def is_package_available(name: str) -> bool:
    """fms-hf-tuning's check: transformers' ``_is_package_available`` (a tuple since transformers 5)."""
    from transformers.utils.import_utils import _is_package_available

    result = _is_package_available(name)
    return bool(result[0]) if isinstance(result, tuple) else bool(result)


def is_fms_accelerate_available(plugins: str | list[str] | None = None) -> bool:
    names = ["fms_acceleration"]
    if plugins is not None:
        names += [f"fms_acceleration_{p}" for p in ([plugins] if isinstance(plugins, str) else plugins)]
    return all(is_package_available(n) for n in names)


# --- the flag dataclasses (``--bitsandbytes nf4 False``, ``--fused_lora bitsandbytes True``, ...)
@dataclass
class BNBQLoraConfig:
    quant_type: str = "nf4"
    no_peft_model: bool = False


@dataclass
class AutoGPTQLoraConfig:
    kernel: str = "triton_v2"
    from_quantized: bool = True


@dataclass
class FusedLoraConfig:
    base_layer: str | None = None
    fused_lora: bool = False


@dataclass
class FastKernelsConfig:
    fast_loss: bool | str = False
    fast_rms_layernorm: bool = False
    fast_rope_embeddings: bool = False


@dataclass
class PaddingFree:  # --padding_free huggingface
    method: str = "huggingface"


@dataclass
class MultiPack:  # --multipack 16
    num_processes: int = 16


@dataclass
class FastMoe:  # --fast_moe 1 (a degree) or --fast_moe True/False (the flag form)
    ep_degree: int | bool = 1
    disable_distributed: bool = False

    def __post_init__(self):
        # fms-hf-tuning: a boolean degree is the flag form, meaning "no expert parallelism" / its opposite
        if isinstance(self.ep_degree, bool):
            self.disable_distributed = self.ep_degree
            self.ep_degree = 1


# field name -> (config path prefix, key under it, plugin import names it needs), as fms-hf-tuning annotates them
ANNOTATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "auto_gptq": ("peft.quantization", "auto_gptq", ("peft",)),
    "bitsandbytes": ("peft.quantization", "bitsandbytes", ("peft",)),
    "fused_lora": ("peft.quantization", "fused_ops_and_kernels", ("foak",)),
    "fast_kernels": ("training", "fused_ops_and_kernels", ("foak",)),
    "padding_free": ("training.attention", "padding_free", ("aadp",)),
    "multipack": ("training.dataloader", "multipack", ("aadp",)),
    "fast_moe": ("training.moe", "scattermoe", ("moe",)),
}


@dataclass
class AccelerationFrameworkConfig:
    auto_gptq: AutoGPTQLoraConfig | None = None
    bitsandbytes: BNBQLoraConfig | None = None
    fused_lora: FusedLoraConfig | None = None
    fast_kernels: FastKernelsConfig | None = None
    padding_free: PaddingFree | None = None
    multipack: MultiPack | None = None
    fast_moe: FastMoe | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            prefix, key, needs = ANNOTATIONS[f.name]
            if not all(is_fms_accelerate_available(n) for n in needs):
                raise ValueError(
                    f"An acceleration feature is requested by specifying the '--{f.name}' argument, but it "
                    f"requires acceleration packages to be installed: {', '.join(needs)}"
                )
            node = tree
            for part in prefix.split("."):
                node = node.setdefault(part, {})
            node[key] = {**node.get(key, {}), **dataclasses.asdict(value)}
        return tree

    def get_framework(self):
        from fms_acceleration import AccelerationFramework
        from fms_acceleration.framework import KEY_PLUGINS

        try:
            with NamedTemporaryFile("w") as f:
                with open(f.name, "w", encoding="utf-8") as out:
                    yaml.dump({KEY_PLUGINS: self.to_dict()}, out)
                return AccelerationFramework(f.name)
        except ValueError as e:
            (msg,) = e.args
            if self.is_empty() and msg.startswith("No plugins could be configured"):
                return None
            raise


def get_data_collator(tokenizer: Any, max_seq_length: int, is_padding_free: bool) -> Any:
    """fms-hf-tuning's collator for a pretokenized dataset without response template: with ``--padding_free``
    a ``DataCollatorForSeq2Seq`` that does not pad (the original padding-free plugin replaced it with a flattening
    collator); otherwise one that pads (labels with -100)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=not is_padding_free, max_length=max_seq_length)


def moe_checkpoint_conversion_available() -> bool:
    """fms-hf-tuning's ``fast_moe`` module decides at import whether it can convert the original MoE plugin's
    distributed checkpoints: it imports ``recover_safetensors_from_dcp`` from ``fms_acceleration_moe.utils`` and
    treats an ``ImportError`` as "not available" (then its checkpoint-conversion callback is never made)."""
    try:
        from fms_acceleration_moe.utils import recover_safetensors_from_dcp  # noqa: F401
    except ImportError:
        return False
    return True


def additional_accel_framework_callbacks(active_plugins, **kwargs) -> list:
    """fms-hf-tuning's ``get_additional_accel_framework_callbacks``: the checkpoint-conversion callback for the MoE
    plugin only, found by the first element of each ``(name, plugin)`` pair, and only made when the conversion
    function could be imported."""
    callbacks: list = []
    for name, _plugin in active_plugins:
        if name == "ScatterMoEAccelerationPlugin" and moe_checkpoint_conversion_available():
            callbacks.append(("moe checkpoint conversion", kwargs))
    return callbacks
