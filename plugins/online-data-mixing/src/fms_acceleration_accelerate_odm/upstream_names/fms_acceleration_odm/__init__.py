"""``fms_acceleration_odm``: the original fms-acceleration's import name for its online-data-mixing plugin, provided
by fms-acceleration-accelerate-odm (config section ``training.odm.odm``).

Clients of the original (fms-hf-tuning's ``--odm``) check that this name can be found, import
:class:`OnlineMixingDataset` from it to build the training data, and write the section; the framework then
activates this project's ``odm`` plugin through its entry point, whose callback feeds the mixture its rewards and
saves it with the checkpoints. The name exists only while this plugin package is installed, and an installed
original ``fms_acceleration_odm`` is found first (see the ``fms_acceleration`` stand-in).

Kept from the original:

* :class:`OnlineMixingDataset` with the original's constructor (the same parameters, in the same order, with the
  same defaults: ``eta=0.3``, ``eval_batch_size=5``, ``output_dir="odm"``, ``reward_type=Reward.ENTROPY``,
  ``seed=42``), its read-only names ``category_list``, ``dataset_dict``, ``collators_dict``, ``total_categories``,
  ``sampling_weights``, ``sampling_ratio``, and the auto-categorisation of a single dataset
  (``auto_categorize_config``, :class:`AutoCategorizeConfig`, :class:`DatasetAutoCategorizer`).
* :class:`Reward`, the reward names (``Reward.TRAIN_LOSS`` or ``"train_loss"``).
* ``OnlineDataMixingAccelerationPlugin``: the plugin class, an alias of this project's.

Not kept: the original's ``update_sampling_weights(model, accelerator, state)`` (its loops update the mixture
themselves): here the callback (HF Trainer, TRL) or
:class:`~fms_acceleration_accelerate_odm.RewardTracker` (loops of one's own) does; ``compute_reward`` and
``DataloaderSavingCallback``; the ``learnability`` and ``combined`` rewards with their few-shot evaluation data
(``templated_eval_dataset_dict``, ``beta``), refused with a message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

from fms_acceleration_accelerate_odm import (
    AutoCategorizeConfig,
    DatasetAutoCategorizer,
    OnlineDataMixingPlugin,
)
from fms_acceleration_accelerate_odm import OnlineMixingDataset as _OnlineMixingDataset

from fms_acceleration_accelerate.upstream_plugin_names import warn_if_original_framework_installed

# the original framework imports every plugin name it finds, this stand-in included
warn_if_original_framework_installed("fms_acceleration_odm", "odm", "fms-acceleration-odm")


class Reward(str, Enum):
    """The original's reward names (``Reward.ENTROPY``, ``Reward["TRAIN_LOSS"]``, ``Reward("train_loss")``)."""

    ENTROPY = "entropy"
    ENTROPY3_VARENT1 = "entropy3_varent1"
    ENTROPY_LAST_TOKEN = "entropy_last_token"
    TRAIN_LOSS = "train_loss"
    VALIDATION_LOSS = "validation_loss"
    GRADNORM = "gradnorm"
    LEARNABILITY = "learnability"
    VELOCITY = "velocity"
    COMBINED = "combined"

    def __str__(self) -> str:
        return self.value


class OnlineMixingDataset(_OnlineMixingDataset):
    """:class:`fms_acceleration_accelerate_odm.OnlineMixingDataset` with the original's constructor and names.

    ``templated_eval_dataset_dict``, ``templated_eval_collators_dict`` and ``beta`` belong to the original's
    ``learnability`` / ``combined`` rewards, which are not available: passing them is refused with a message.
    """

    def __init__(
        self,
        dataset_dict: Mapping[str, Any] | Any,
        collators_dict: Mapping[str, Callable | None] | Callable | None = None,
        eval_dataset_dict: Mapping[str, Any] | Any | None = None,
        eval_collators_dict: Mapping[str, Callable | None] | Callable | None = None,
        sampling_weights: Mapping[str, float] | Sequence[float] | None = None,
        gamma: float = 0.1,
        eta: float = 0.3,
        sampling_interval: int = 1,
        eval_batch_size: int = 5,
        output_dir: str | os.PathLike | None = "odm",
        reward_type: Reward | str = Reward.ENTROPY,
        auto_categorize_config: AutoCategorizeConfig | Mapping[str, Any] | None = None,
        seed: int | None = 42,
        templated_eval_dataset_dict: Mapping[str, Any] | None = None,
        templated_eval_collators_dict: Mapping[str, Callable | None] | None = None,
        beta: float = 1.0,
    ) -> None:
        if templated_eval_dataset_dict is not None or templated_eval_collators_dict is not None or beta != 1.0:
            raise ValueError(
                "templated_eval_dataset_dict, templated_eval_collators_dict and beta belong to the learnability and "
                "combined rewards, which fms-acceleration-accelerate-odm does not provide (they need extra evaluation "
                "forwards on few-shot data); leave them out and use reward_type 'velocity' (how fast each "
                "category's training loss falls) or another reward"
            )
        super().__init__(
            dataset_dict,
            collators_dict,
            eval_dataset_dict or None,
            eval_collators_dict or None,
            sampling_weights or None,
            gamma,
            eta,
            sampling_interval,
            eval_batch_size,
            output_dir,
            str(reward_type),
            auto_categorize_config,
            42 if seed is None else seed,
        )

    @property
    def category_list(self) -> list[str]:
        """The categories in arm order (sorted names)."""
        return list(self.categories)

    @property
    def total_categories(self) -> int:
        return len(self.categories)

    @property
    def dataset_dict(self) -> dict[str, Any]:
        """``{category: dataset}`` (after auto-categorisation, the generated categories)."""
        return dict(zip(self.categories, self.datasets))

    @property
    def collators_dict(self) -> dict[str, Callable | None]:
        return dict(zip(self.categories, self.collators))

    @property
    def sampling_weights(self) -> list[float]:
        """The bandit's weights in arm order (scaled so that the largest is 1)."""
        return self.bandit.weights

    @property
    def sampling_ratio(self) -> list[float]:
        """The sampling probabilities in arm order."""
        return self.bandit.probabilities()

    def update_sampling_weights(self, model: Any = None, accelerator: Any = None, state: Any = None) -> None:
        raise NotImplementedError(
            "update_sampling_weights() of the original fms-acceleration is not provided: with the HF Trainer or TRL, "
            "the odm plugin's callback (OnlineMixingCallback) updates the mixture; in a loop of one's own, use "
            "fms_acceleration_accelerate_odm.RewardTracker (attach it to the model, call tracker.step(step) after "
            "each optimizer step) and OnlineMixingDataset.evaluate(model) for validation losses"
        )


# the original's plugin class name
OnlineDataMixingAccelerationPlugin = OnlineDataMixingPlugin

__all__ = [
    "AutoCategorizeConfig",
    "DatasetAutoCategorizer",
    "OnlineDataMixingAccelerationPlugin",
    "OnlineMixingDataset",
    "Reward",
]
