"""The online data mixing plugin (section ``training.odm.odm``): the mixture of the training categories is learnt
during training by an EXP3 bandit.

Upstream fms-acceleration / fms-hf-tuning keys are accepted: ``update_interval``, ``sampling_interval``,
``reward_type``, ``gamma``, ``eta``, ``resume_from_checkpoint`` (when the trainer resumes from a checkpoint, the
mixture continues from that checkpoint's ``odm_state.json``: true (default) looks in
``<output_dir>/checkpoint-<step>``, a folder names the checkpoint, false starts the mixture again from its seed),
and fms-hf-tuning's ``auto_categorize_input_column``, ``auto_categorize_num_categories``,
``auto_categorize_model_name``, ``auto_categorize_batch_size`` (how one unlabelled dataset is split into
categories; :attr:`OnlineDataMixingPlugin.auto_categorize_config` hands them to the script that builds the
dataset).

The training data must be an :class:`~fms_acceleration_accelerate_odm.OnlineMixingDataset` (a dict of category
datasets). ``get_callbacks_and_ready_for_train`` returns the
:class:`~fms_acceleration_accelerate_odm.callback.OnlineMixingCallback`, which finds that dataset in the trainer's
training DataLoader, applies this section's ``sampling_interval``, ``gamma`` and ``eta`` to it before the first
example is drawn, and feeds it the rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.plugin import AccelerationPlugin

from .autocategorize import PACKAGED_MODEL, AutoCategorizeConfig
from .rewards import REWARD_TYPES, check_reward_type

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from torch import nn
    from transformers import TrainerCallback

SECTION = "training.odm.odm"


@dataclass(frozen=True)
class ODMConfig:
    """Options of ``training.odm.odm`` (upstream's keys)."""

    update_interval: int = option(1, help="optimizer steps between two updates of the mixture")
    sampling_interval: int = option(1, help="examples of the global stream between two category draws")
    reward_type: str = option(
        "train_loss", help=f"what the mixture learns from: {', '.join(REWARD_TYPES)} (higher reward: drawn more)"
    )
    gamma: float = option(0.1, help="EXP3 exploration share in [0, 1] (each category keeps at least gamma/K)")
    eta: float = option(0.1, help="EXP3 learning rate (> 0)")
    auto_categorize_input_column: str | None = option(
        None,
        help="auto-categorisation of one unlabelled dataset: the column with the text to embed (default 'text')",
    )
    auto_categorize_num_categories: int | None = option(
        None, help="auto-categorisation: number of categories (default: floor(sqrt(examples)) between 2 and 15)"
    )
    auto_categorize_model_name: str = option(
        PACKAGED_MODEL,
        help="auto-categorisation: the sentence-embedding model, read from local files only (the packaged "
        "all-MiniLM-L6-v2, a local folder, or a model in the Hugging Face cache)",
    )
    auto_categorize_batch_size: int = option(64, help="auto-categorisation: examples per embedding forward")
    resume_from_checkpoint: bool | str | None = option(
        True,
        help="when the trainer resumes: true continues the mixture from <output_dir>/checkpoint-<step>/odm_state.json, "
        "a folder from that checkpoint's odm_state.json, false restarts the mixture from its seed",
    )

    def __post_init__(self) -> None:
        for name in ("update_interval", "sampling_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AccelerationConfigError(
                    f"{name} must be a positive int, got {value!r}", fix=f"set {name} to 1 or more"
                )
        try:
            object.__setattr__(self, "reward_type", check_reward_type(self.reward_type))
        except ValueError as exc:
            raise AccelerationConfigError(
                str(exc), fix=f"set reward_type to one of: {', '.join(REWARD_TYPES)}"
            ) from None
        if not 0.0 <= self.gamma <= 1.0:
            raise AccelerationConfigError(
                f"gamma must be in [0, 1], got {self.gamma!r}", fix="set gamma between 0 and 1 (0.1)"
            )
        if not self.eta > 0.0:
            raise AccelerationConfigError(f"eta must be positive, got {self.eta!r}", fix="set eta > 0 (0.1)")
        try:
            AutoCategorizeConfig.build(self.auto_categorize_config())
        except ValueError as exc:
            raise AccelerationConfigError(
                str(exc).replace("auto_categorize_config: ", ""),
                fix="set auto_categorize_num_categories to 2 or more (or leave it out), auto_categorize_batch_size "
                "to 1 or more",
            ) from None
        resume = self.resume_from_checkpoint
        if resume is None:
            object.__setattr__(self, "resume_from_checkpoint", True)
        elif resume == "":
            object.__setattr__(self, "resume_from_checkpoint", False)
        elif not isinstance(resume, (bool, str)):
            raise AccelerationConfigError(
                f"resume_from_checkpoint must be true, false or a checkpoint folder, got {resume!r}",
                fix="set resume_from_checkpoint: true (continue the mixture with the trainer), a checkpoint folder, "
                "or false",
            )

    def auto_categorize_config(self) -> dict[str, Any]:
        """The section's ``auto_categorize_*`` keys as ``OnlineMixingDataset(auto_categorize_config=...)``."""
        config: dict[str, Any] = {
            "model_name": self.auto_categorize_model_name,
            "batch_size": self.auto_categorize_batch_size,
        }
        if self.auto_categorize_input_column is not None:
            config["input_column"] = self.auto_categorize_input_column
        if self.auto_categorize_num_categories is not None:
            config["num_categories"] = self.auto_categorize_num_categories
        return config


class OnlineDataMixingPlugin(AccelerationPlugin):
    """Learns the training mixture of an :class:`OnlineMixingDataset` (see the module docstring)."""

    name = "odm"
    configuration_or_paths = (SECTION,)
    config_class = ODMConfig
    order = 420

    def get_callbacks_and_ready_for_train(
        self, model: nn.Module | None = None, accelerator: Accelerator | None = None
    ) -> list[TrainerCallback]:
        from .callback import OnlineMixingCallback

        config = self.config
        return [
            OnlineMixingCallback(
                reward_type=config.reward_type,
                update_interval=config.update_interval,
                resume_from_checkpoint=config.resume_from_checkpoint,
                dataset_settings={
                    "sampling_interval": config.sampling_interval,
                    "gamma": config.gamma,
                    "eta": config.eta,
                },
            )
        ]

    @property
    def auto_categorize_config(self) -> dict[str, Any]:
        """The section's ``auto_categorize_*`` keys, for the script that builds the dataset from one unlabelled
        dataset: ``OnlineMixingDataset({"train": data}, auto_categorize_config=plugin.auto_categorize_config)``."""
        return self.config.auto_categorize_config()

    def describe(self) -> list[str]:
        config = self.config
        return [
            *super().describe(),
            f"the OnlineMixingDataset's mixture is updated every {config.update_interval} steps from the "
            f"{config.reward_type} reward (EXP3, gamma={config.gamma}, eta={config.eta}); a category is drawn every "
            f"{config.sampling_interval} examples",
        ]


__all__ = ["SECTION", "ODMConfig", "OnlineDataMixingPlugin"]
