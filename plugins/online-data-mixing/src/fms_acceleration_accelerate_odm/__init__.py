"""Online data mixing for fms-acceleration-accelerate (section ``training.odm.odm``).

* :class:`OnlineMixingDataset`: an endless stream over ``{category: dataset}`` whose mixture an EXP3 bandit
  (:class:`Exp3`) learns during training; every process draws the same categories from a shared seed.
* :class:`OnlineMixingCallback` (HF Trainer, TRL) and :class:`RewardTracker` (any loop): rewards from what each
  training step already computes (loss, LM-head logits, gradient norm, evaluation losses).
* :class:`OnlineDataMixingPlugin`: the framework plugin that returns the callback.
"""

from .callback import OnlineMixingCallback, plot_mixture, read_metrics
from .dataset import OnlineMixingDataset
from .exp3 import Exp3
from .plugin import ODMConfig, OnlineDataMixingPlugin
from .rewards import REWARD_TYPES, RewardTracker

__all__ = [
    "REWARD_TYPES",
    "Exp3",
    "ODMConfig",
    "OnlineDataMixingPlugin",
    "OnlineMixingCallback",
    "OnlineMixingDataset",
    "RewardTracker",
    "plot_mixture",
    "read_metrics",
]
