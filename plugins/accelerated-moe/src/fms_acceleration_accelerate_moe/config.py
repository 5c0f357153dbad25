"""Options of the mixture-of-experts plugin (section ``training.moe.scattermoe``; upstream fms-acceleration's key
``ep_degree`` and fms-hf-tuning's ``disable_distributed`` are kept).

Spellings written by upstream and by fms-hf-tuning are accepted, each with a one-line note in the log (see
:meth:`ScatterMoEConfig.normalize_section`):

* ``ep_degree: 0`` (upstream's "experts not sharded") is ``ep_degree: 1, disable_distributed: true``;
* ``ep_degree: true`` / ``false`` (fms-hf-tuning's ``--fast_moe`` flag without a degree) is ``ep_degree: 1`` with
  ``disable_distributed`` set to that value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import is_main_process

logger = logging.getLogger("fms_acceleration_accelerate_moe")


@dataclass(frozen=True)
class ScatterMoEConfig:
    """How the experts of a mixture-of-experts model are computed and distributed."""

    ep_degree: int = option(
        1,
        help="expert-parallel degree: the processes of one expert-parallel group, each holding E / ep_degree of "
        "every layer's experts; must divide the world size and the number of experts. 1 (default): no expert "
        "parallelism, every process computes all experts (FSDP, when used, shards them with the rest of the model)",
    )
    disable_distributed: bool = option(
        False,
        help="fms-hf-tuning's key: true runs the expert kernels without any expert parallelism (as ep_degree: 1); "
        "contradicts ep_degree > 1",
    )
    quantize_experts: bool | Literal["auto"] = option(
        "auto",
        help="4-bit expert weights: each MoE layer's 3-D expert stacks in bitsandbytes' 4-bit storage (the settings "
        "of the model's 4-bit linear layers), dequantized per layer in the forward and again in the backward; frozen "
        "(LoRA on them through PEFT target_parameters). auto (default): when peft.quantization.bitsandbytes is "
        "active, except with expert parallelism, FSDP or DeepSpeed ZeRO-3; true: the same, refused without that "
        "plugin or with those; false: keep the experts in the training dtype",
    )
    routing_stats: bool = option(
        True,
        help="count the tokens routed to each expert of each MoE layer in training, on the device (no host sync "
        "per step); the plugin's routing_stats object holds them for callbacks, and the HF Trainer / TRL log "
        "gets the load balance (max and min tokens per expert over the mean, worst layer) at logging steps",
    )

    def __post_init__(self) -> None:
        if isinstance(self.ep_degree, bool) or not isinstance(self.ep_degree, int) or self.ep_degree < 1:
            raise AccelerationConfigError(
                f"ep_degree must be a positive integer, got {self.ep_degree!r}",
                fix="set ep_degree: 1 (no expert parallelism) or the number of processes that share one set of "
                "experts (a divisor of the world size and of the number of experts)",
            )
        if self.disable_distributed and self.ep_degree > 1:
            raise AccelerationConfigError(
                f"disable_distributed: true contradicts ep_degree: {self.ep_degree} (expert parallelism)",
                fix="remove disable_distributed, or set ep_degree: 1",
            )

    @property
    def expert_parallel(self) -> bool:
        """Whether experts are sharded across processes (``ep_degree > 1``)."""
        return self.ep_degree > 1

    @classmethod
    def normalize_section(cls, data: Any, path: str) -> Any:
        """Rewrite upstream / fms-hf-tuning spellings of ``ep_degree`` (see the module docstring).

        Args:
            data: the section as written (anything but a mapping is returned unchanged and refused by the parser).
            path: its full dotted key path, for notes and errors.

        Returns:
            A new mapping (``data`` is not changed) with the spellings replaced.

        Raises:
            AccelerationConfigError: the spelling of ``ep_degree`` contradicts ``disable_distributed`` in the same
                section.
        """
        if not isinstance(data, Mapping) or "ep_degree" not in data:
            return data
        options = dict(data)
        value = options["ep_degree"]
        if isinstance(value, bool):
            disabled, note = value, f"ep_degree: {value!r} (fms-hf-tuning's flag form) is read as ep_degree: 1"
        elif isinstance(value, int) and value == 0:
            disabled, note = True, "ep_degree: 0 (upstream's 'experts not sharded') is read as ep_degree: 1"
        else:
            return data
        if "disable_distributed" in options and options["disable_distributed"] != disabled:
            raise AccelerationConfigError(
                f"ep_degree: {value!r} means disable_distributed: {disabled!r}, but disable_distributed is "
                f"{options['disable_distributed']!r}",
                path=f"{path}.ep_degree",
                fix="write ep_degree: 1 and the disable_distributed value you want",
            )
        options["ep_degree"] = 1
        options["disable_distributed"] = disabled
        if is_main_process():
            logger.info("%s: %s with disable_distributed: %r", path, note, disabled)
        return options


__all__ = ["ScatterMoEConfig"]
