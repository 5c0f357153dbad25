"""The HF Trainer / TRL callback of online data mixing: rewards, metrics, the mixture's state in checkpoints."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .dataset import METRICS_FILE, OnlineMixingDataset
from .rewards import RewardTracker

logger = logging.getLogger("fms_acceleration_accelerate_odm")

STATE_FILE = "odm_state.json"
PLOT_FILE = "odm_mixture.png"


_LEAVES = (str, bytes, int, float, complex, bool, type(None), type)


def find_mixing_dataset(obj: Any, *, max_depth: int = 12, max_objects: int = 5000) -> OnlineMixingDataset | None:
    """The :class:`OnlineMixingDataset` behind ``obj``: a dataset, a DataLoader, Accelerate's wrappers, or the
    ``datasets.IterableDataset`` of :meth:`OnlineMixingDataset.to_iterable_dataset` (and the datasets that
    ``map`` and the like make of it).

    A breadth-first walk through the objects' attributes, container elements and bound methods' owners (nearest
    first), bounded in depth and in objects looked at; the first mixing dataset found is returned.
    """
    import types

    seen: set[int] = set()
    level = [obj]
    looked_at = 0
    for _ in range(max_depth + 1):
        following: list[Any] = []
        for item in level:
            if isinstance(item, OnlineMixingDataset):
                return item
            if isinstance(item, _LEAVES) or isinstance(item, types.ModuleType) or id(item) in seen:
                continue
            if type(item).__module__.split(".")[0] in ("torch", "numpy", "pyarrow") and not hasattr(item, "dataset"):
                continue  # tensors, arrays, tables and the like hold no dataset
            seen.add(id(item))
            looked_at += 1
            if looked_at > max_objects:
                return None
            following.extend(_references(item))
        if not following:
            return None
        level = following
    return None


def _references(item: Any) -> list[Any]:
    """What ``item`` refers to, the likeliest holders of a dataset first; at most 64 elements of a container."""
    import functools
    import types

    if isinstance(item, dict):
        return list(item.values())[:64]
    if isinstance(item, (list, tuple, set, frozenset)):
        return list(item)[:64]
    if isinstance(item, types.MethodType):
        return [item.__self__]
    if isinstance(item, functools.partial):
        return [item.func, *item.args, *item.keywords.values()]
    found = [getattr(item, name, None) for name in ("dataset", "base_dataloader")]
    attributes = getattr(item, "__dict__", None)
    if isinstance(attributes, dict):
        found += list(attributes.values())[:64]
    return [value for value in found if value is not None]


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
        resume_from_checkpoint: what happens when the trainer resumes from a checkpoint. ``True`` (default): the
            mixture (bandit, sampling generator, each category's position, the reward not yet given) continues
            from the ``odm_state.json`` of ``<output_dir>/checkpoint-<step>``; a folder: from that folder's
            ``odm_state.json`` (a checkpoint outside the output directory); ``False``: the mixture starts again from
            its seed. In every case the trainer's own data skipping is turned off (``ignore_data_skip``): it would
            re-read the stream from where the mixture already stands.

    Every checkpoint gets an ``odm_state.json``: the mixture after exactly the examples trained so far (those the
    DataLoader read ahead are given back to the stream, so the resumed run trains them).
    """

    def __init__(
        self,
        dataset: OnlineMixingDataset | None = None,
        *,
        reward_type: str | None = None,
        update_interval: int = 1,
        plot: bool = True,
        dataset_settings: dict[str, Any] | None = None,
        resume_from_checkpoint: bool | str | os.PathLike = True,
    ) -> None:
        self.dataset = dataset
        self.resume_from_checkpoint = resume_from_checkpoint
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
        if state.global_step == 0 and dataset.produced > dataset.rewarded_until:
            # read before training (TRL looks at the first example of a datasets.IterableDataset): back to the stream,
            # so training starts with the stream's first example
            given_back = dataset.rewind(dataset.rewarded_until)
            logger.info(
                "fms-acceleration odm: %d example(s) read from the OnlineMixingDataset before training began were "
                "given back to the stream",
                given_back,
            )
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
                "(eval_strategy='no'): set eval_strategy='steps' with eval_steps and give the trainer "
                "eval_dataset={category: dataset} (or the OnlineMixingDataset eval_dataset_dict={category: dataset}), "
                "or choose another reward_type"
            )
        tracker.attach(kwargs["model"])
        self.tracker = tracker
        if state.global_step > 0:  # the trainer resumed from a checkpoint
            self._resume(args, state, dataset, tracker)

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Passed to the Trainer's constructor: turn the data skip off before train() computes it, so that the
        # trainer still restores its own RNG state from the checkpoint.
        _stop_trainer_data_skip(args)

    def _resume(self, args: Any, state: Any, dataset: OnlineMixingDataset, tracker: RewardTracker) -> None:
        trainer_skips = _stop_trainer_data_skip(args)
        if self.resume_from_checkpoint is False or self.resume_from_checkpoint == "":
            logger.info(
                "fms-acceleration odm: resuming at step %d with resume_from_checkpoint=false: the data mixture starts "
                "again from its seed",
                state.global_step,
            )
            return
        folder = self._checkpoint_folder(args, state)
        with open(folder / STATE_FILE, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("global_step", state.global_step) != state.global_step:
            raise ValueError(
                f"{folder / STATE_FILE} was saved at step {saved['global_step']}, and the trainer resumes at step "
                f"{state.global_step}: give the folder of the checkpoint the trainer resumes from"
            )
        dataset.load_state_dict(saved)
        pending = saved.get("pending_reward", {})
        if state.is_world_process_zero:  # the reduction at the next update sums the processes' shares
            tracker.restore_pending(pending.get("sum", 0.0), pending.get("count", 0), pending.get("examples", 0))
        dataset.history = self._kept_metrics(dataset, state)
        if trainer_skips:
            _restore_trainer_rng(folder, args)
        logger.info(
            "fms-acceleration odm: the data mixture resumes from %s at step %d (%d examples trained); the trainer "
            "does not skip batches (ignore_data_skip=True): the mixture continues where it stood",
            folder,
            state.global_step,
            dataset.produced,
        )

    def _checkpoint_folder(self, args: Any, state: Any) -> Path:
        given = self.resume_from_checkpoint
        if given is True or given is None:
            given = getattr(args, "resume_from_checkpoint", None)
            if not isinstance(given, (str, os.PathLike)) or not (Path(given) / STATE_FILE).is_file():
                given = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder = Path(given)
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"the trainer resumes at step {state.global_step}, and {folder} has no {STATE_FILE} (the data "
                "mixture's state, written into every checkpoint while online data mixing is on): give the checkpoint "
                "folder as training.odm.odm.resume_from_checkpoint (OnlineMixingCallback(resume_from_checkpoint=...)), "
                "or set it to false to start the mixture again from its seed"
            )
        return folder

    def _kept_metrics(self, dataset: OnlineMixingDataset, state: Any) -> list[dict[str, Any]]:
        """The metrics of the updates before the checkpoint; ``odm.jsonl`` loses the lines written after it."""
        if not state.is_world_process_zero or dataset.output_dir is None:
            return []  # only process 0 writes the metrics
        if not (dataset.output_dir / METRICS_FILE).is_file():
            return []
        kept = [r for r in read_metrics(dataset.output_dir) if r["update"] <= dataset.bandit.updates]
        with open(dataset.output_dir / METRICS_FILE, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)
        return kept

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.tracker is not None and logs and "grad_norm" in logs:
            self.tracker.note_grad_norm(logs["grad_norm"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.step(state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        if self.tracker is None or not metrics or self.tracker.reward_type != "validation_loss":
            return
        dataset = self.tracker.dataset
        if not self.tracker.category_losses(metrics) and dataset.eval_dataset_dict and kwargs.get("model") is not None:
            # the trainer's evaluation has no loss per category: the dataset's own evaluation data gives them
            dataset.evaluate(kwargs["model"], step=state.global_step)
            return
        self.tracker.evaluated(metrics, state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.dataset is None:
            return
        pending = {"sum": 0.0, "count": 0, "examples": 0}
        if self.tracker is not None:  # every process: the reward not yet given, summed over the processes
            pending = dict(zip(pending, self.tracker.pending()))
        if not state.is_world_process_zero:
            return
        saved = self.dataset.state_dict(consumed=self.dataset.rewarded_until + round(pending["examples"]))
        saved["global_step"] = state.global_step
        saved["pending_reward"] = pending
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(saved, handle)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.detach()
        if self.plot and self.dataset is not None and state.is_world_process_zero and args.output_dir:
            plot_mixture(self.dataset.history, Path(args.output_dir) / PLOT_FILE)


def _stop_trainer_data_skip(args: Any) -> bool:
    """Set ``ignore_data_skip``; ``True`` when it was off (the trainer then skips neither data nor RNG restore)."""
    if getattr(args, "ignore_data_skip", True):
        return False
    args.ignore_data_skip = True
    logger.info(
        "fms-acceleration odm: ignore_data_skip=True: on resume the OnlineMixingDataset continues from the "
        "checkpoint's %s instead of the trainer re-reading the stream to skip the trained batches",
        STATE_FILE,
    )
    return True


def _restore_trainer_rng(folder: Path, args: Any) -> None:
    """The trainer's RNG states from ``folder`` (it restores them itself only when ``ignore_data_skip`` was set
    before ``train()``)."""
    import random

    import numpy as np
    import torch
    from transformers.trainer_pt_utils import safe_globals, set_rng_state_for_device

    name = f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"
    if not (folder / name).is_file():
        logger.info("fms-acceleration odm: %s has no %s; the random state is not restored", folder, name)
        return
    with safe_globals():
        saved = torch.load(folder / name, weights_only=True)
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.random.set_rng_state(saved["cpu"])
    if torch.cuda.is_available() and "cuda" in saved:
        set_rng_state_for_device("CUDA", torch.cuda, saved, args.world_size > 1)


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
