"""Loading full checkpoints (e.g. ``Accelerator.save_state``) back into 4-bit layers.

A bitsandbytes ``Linear4bit`` writes its quantization statistics next to its weight
(``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), but ``nn.Module.load_state_dict`` then reports those keys as
unexpected, so ``Accelerator.load_state`` fails on any QLoRA model. The frozen base is not trained, so
these statistics must simply equal the loaded layer's own: :func:`checked_quant_stats_loader` consumes
them and reports a mismatch (a checkpoint of a different base model) as a load error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def checked_quant_stats_loader(module: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    """A ``_load_from_state_dict`` for ``module`` (a ``Linear4bit``) that consumes and checks its 4-bit stats."""

    def _load_from_state_dict(
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        stats_prefix = prefix + "weight."
        stats = {k[len(stats_prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(stats_prefix)}
        quant_state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
        if stats and quant_state is not None:
            own = quant_state.as_dict(packed=True)
            for key, value in stats.items():
                mine = own.get(key)
                if not isinstance(value, torch.Tensor) or mine is None or not torch.equal(value.to(mine.device), mine):
                    error_msgs.append(
                        f"{stats_prefix}{key}: the checkpoint's 4-bit statistics differ from the loaded base model's "
                        "(a checkpoint of another base model?)"
                    )
        original(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    return _load_from_state_dict
