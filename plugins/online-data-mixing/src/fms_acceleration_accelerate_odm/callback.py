"""The HF Trainer / TRL callback of online data mixing: rewards, metrics, the mixture's state in checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .dataset import METRICS_FILE, OnlineMixingDataset
from .rewards import RewardTracker

logger = logging.getLogger("fms_acceleration_accelerate_odm")

STATE_FILE = "odm_state.json"
PLOT_FILE = "odm_mixture.png"


def find_mixing_dataset(obj: Any) -> OnlineMixingDataset | None:
    """The :class:`OnlineMixingDataset` behind ``obj`` (a dataset, a DataLoader, Accelerate's wrappers)."""
    for _ in range(6):
        if isinstance(obj, OnlineMixingDataset):
            return obj
        inner = getattr(obj, "dataset", None)
        if inner is None or inner is obj:
            inner = getattr(obj, "base_dataloader", None)
        if inner is None:
            return None
        obj = inner
    return None


class OnlineMixingCallback(TrainerCallback):
    """Feeds the mixture its rewards during HF Trainer / TRL training.

    Args:
        dataset: the training :class:`OnlineMixingDataset` (default: found in the trainer's training DataLoader
            when training begins).
        reward_type: overrides the dataset's reward type.
        update_interval: the mixture is updated every this many optimizer steps (``validation_loss``: at every
            evaluation).
        dataset_settings: ``sampling_interval``, ``gamma``, ``eta`` applied to the dataset when training begins
            (the plugin passes its section's values).
        plot: write ``odm_mixture.png`` (the mixture over the steps) in the output directory at the end of
            training, when matplotlib is installed.
    """

    def __init__(
        self,
        dataset: OnlineMixingDataset | None = None,
        *,
        reward_type: str | None = None,
        update_interval: int = 1,
        plot: bool = True,
        dataset_settings: dict[str, Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.reward_type = reward_type
        self.update_interval = update_interval
        self.plot = plot
        self.dataset_settings = dict(dataset_settings or {})
        self.tracker: RewardTracker | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        dataset = self.dataset or find_mixing_dataset(kwargs.get("train_dataloader"))
        if dataset is None:
            raise ValueError(
                "online data mixing is on, but the training data is not an OnlineMixingDataset: build the training "
                "dataset as OnlineMixingDataset({category: dataset, ...}) (fms_acceleration_accelerate_odm), or "
                "remove the training.odm section"
            )
        self.dataset = dataset
        if self.dataset_settings:
            dataset.configure(**self.dataset_settings)
        if dataset.output_dir is None and args.output_dir:
            dataset.output_dir = Path(args.output_dir)
        tracker = RewardTracker(dataset, reward_type=self.reward_type, update_interval=self.update_interval)
        if tracker.reward_type == "validation_loss" and str(getattr(args, "eval_strategy", "no")) in (
            "no",
            "IntervalStrategy.NO",
        ):
            raise ValueError(
                "reward_type 'validation_loss' learns from evaluations, and the trainer never evaluates "
                "(eval_strategy='no'): set eval_strategy='steps' with eval_steps and give eval_dataset={category: "
                "dataset}, or choose another reward_type"
            )
        tracker.attach(kwargs["model"])
        self.tracker = tracker

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.tracker is not None and logs and "grad_norm" in logs:
            self.tracker.note_grad_norm(logs["grad_norm"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.step(state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        if self.tracker is not None and metrics:
            self.tracker.evaluated(metrics, state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.dataset is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(self.dataset.state_dict(), handle)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.detach()
        if self.plot and self.dataset is not None and state.is_world_process_zero and args.output_dir:
            plot_mixture(self.dataset.history, Path(args.output_dir) / PLOT_FILE)


def plot_mixture(history: list[dict[str, Any]], path: Path) -> Path | None:
    """The sampling probability of each category over the steps, as a PNG; ``None`` (and a log line) when
    matplotlib is not installed or there is nothing to plot."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("fms-acceleration odm: matplotlib is not installed; the mixture plot is skipped (%s)", path)
        return None
    categories = list(history[0]["sampling_ratio"])
    steps = [record["step"] if record["step"] is not None else record["update"] for record in history]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.stackplot(steps, *[[record["sampling_ratio"][c] for record in history] for c in categories], labels=categories)
    axes.set_xlabel("step")
    axes.set_ylabel("sampling probability")
    axes.set_ylim(0, 1)
    axes.legend(loc="upper left", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``odm.jsonl`` in ``output_dir``."""
    with open(Path(output_dir) / METRICS_FILE, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


__all__ = ["PLOT_FILE", "STATE_FILE", "OnlineMixingCallback", "find_mixing_dataset", "plot_mixture", "read_metrics"]
