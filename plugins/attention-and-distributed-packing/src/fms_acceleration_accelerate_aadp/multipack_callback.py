"""The HF Trainer callback of the multipack plugin (imported only when a trainer asks for callbacks)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from .multipack_plugin import find_multipack_sampler

if TYPE_CHECKING:  # pragma: no cover
    from .multipack_plugin import MultipackAccelerationPlugin


class MultipackEpochCallback(TrainerCallback):
    """Hands the trainer's epoch to the multipack samplers at the start of each epoch.

    The HF Trainer calls ``set_epoch`` on its training DataLoader; when it resumes in the middle of an epoch it first
    wraps that DataLoader in Accelerate's batch skipping, through which (with several processes) the call no longer
    reaches the sampler, which would then replay epoch 0's plan. The epoch is the integer part of ``state.epoch``
    when the epoch begins (``epoch + steps done / steps per epoch`` in a resumed run)."""

    def __init__(self, plugin: MultipackAccelerationPlugin) -> None:
        self._plugin = plugin

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = math.floor((state.epoch or 0.0) + 1e-9)
        sampler = find_multipack_sampler(kwargs.get("train_dataloader"))
        if sampler is not None:
            self._plugin.adopt_sampler(sampler)
        self._plugin.set_epoch(epoch)


__all__ = ["MultipackEpochCallback"]
