"""Online data mixing for fms-acceleration-accelerate (section ``training.odm.odm``).

* :class:`OnlineMixingDataset`: an endless stream over ``{category: dataset}`` whose mixture an EXP3 bandit
  (:class:`Exp3`) learns during training; every process draws the same categories from a shared seed. One
  unlabelled dataset is split into categories first (:class:`DatasetAutoCategorizer`: sentence embeddings of a
  packaged all-MiniLM-L6-v2 + k-means).
* :class:`OnlineMixingCallback` (HF Trainer, TRL) and :class:`RewardTracker` (any loop): rewards from what each
  training step already computes (loss, LM-head logits, gradient norm, evaluation losses).
* :class:`OnlineDataMixingPlugin`: the framework plugin that returns the callback.
"""

from importlib import import_module
from typing import Any

from .autocategorize import AutoCategorizeConfig, DatasetAutoCategorizer, default_num_categories, kmeans
from .exp3 import Exp3
from .plugin import ODMConfig, OnlineDataMixingPlugin
from .rewards import REWARD_TYPES, RewardTracker

# imported on first use: the framework loads this package's plugin (its entry point) in every process that reads a
# configuration, the `accelerate launch` launcher included, where importing transformers' trainer modules (which
# pull in peft and bitsandbytes) would only cost time and print their import-time messages
_LAZY = {
    "OnlineMixingCallback": ".callback",
    "plot_mixture": ".callback",
    "read_metrics": ".callback",
    "OnlineMixingDataset": ".dataset",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REWARD_TYPES",
    "AutoCategorizeConfig",
    "DatasetAutoCategorizer",
    "Exp3",
    "ODMConfig",
    "OnlineDataMixingPlugin",
    "OnlineMixingCallback",
    "OnlineMixingDataset",
    "RewardTracker",
    "default_num_categories",
    "kmeans",
    "plot_mixture",
    "read_metrics",
]
