"""``OnlineMixingDataset``: an endless stream of examples whose category mixture an EXP3 bandit learns.

The stream is *global*: example ``n`` of the stream is the same on every process. Its category is drawn every
``sampling_interval`` examples from the bandit's distribution with a seeded generator, and each category's examples
are read in order (wrapping around at the end). Nothing is exchanged between processes to agree on the sequence:
they share the seed, and the bandit is updated on every process with the same reduced reward, so every process
draws the same categories.

How each process gets its own examples:

* Under Accelerate (``Accelerator.prepare``, the HF Trainer, TRL), give the DataLoader the global stream
  (the default): Accelerate either reads it on the main process and sends each process its slice
  (``dispatch_batches``, Accelerate's default for iterable datasets), or wraps it in ``IterableDatasetShard``,
  where every process reads the stream and keeps its own slice of each global batch. Either way every example
  goes to exactly one process.
* In a loop without Accelerate (plain ``torch.distributed``), pass ``rank`` and ``world_size``: the dataset then
  yields only every ``world_size``-th example of the stream, starting at ``rank``.

The dataset must be read in the process that trains (``num_workers=0``): the bandit changes during training, and a
DataLoader worker would read a copy that never sees the updates.

Rewards come from :class:`~fms_acceleration_accelerate_odm.rewards.OnlineMixingCallback` (HF Trainer, TRL) or
from :meth:`OnlineMixingDataset.reward` in a custom loop: the reward of the examples trained since the previous
update is given to the categories drawn for them.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from .autocategorize import AutoCategorizeConfig, DatasetAutoCategorizer
from .exp3 import Exp3
from .rewards import REWARD_TYPES, check_reward_type

logger = logging.getLogger("fms_acceleration_accelerate_odm")

METRICS_FILE = "odm.jsonl"


def _python_values(example: Any) -> Any:
    if isinstance(example, Mapping):
        return {key: value.tolist() if hasattr(value, "tolist") else value for key, value in example.items()}
    return example


def _stack_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The default evaluation collator: each field of numbers (or tensors) stacked into one tensor."""
    import torch

    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif not any(isinstance(v, (str, bytes)) or v is None for v in values):
            try:
                batch[key] = torch.tensor(values)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"evaluate(): the field {key!r} cannot be stacked into a tensor ({exc}); give "
                    "eval_collators_dict a collator (padding examples of different lengths)"
                ) from None
    return batch


def _stream_examples(mixing_dataset: OnlineMixingDataset) -> Iterator[Any]:
    """The generator behind :meth:`OnlineMixingDataset.to_iterable_dataset`."""
    for example in mixing_dataset:
        yield _python_values(example)


def loss_velocity(previous: float | None, loss: float) -> float:
    """The ``velocity`` reward of a loss going from ``previous`` to ``loss``: ``(previous - loss) / max(previous,
    loss)`` (0 without a previous loss)."""
    if previous is None:
        return 0.0
    larger = max(previous, loss)
    return (previous - loss) / larger if larger > 0 else 0.0


def _process_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0  # no process group: one process (the metrics file is written by rank 0)


class OnlineMixingDataset(IterableDataset):
    """Mixes the datasets of ``dataset_dict`` with proportions learnt online by EXP3.

    Args:
        dataset_dict: ``{category: dataset}``, at least two non-empty map-style datasets (anything with ``len`` and
            integer indexing: ``datasets.Dataset``, a list of dicts...). Categories are ordered by name; arm ``i``
            is the ``i``-th name. One dataset (alone, or the only entry of the dict) is split into categories
            automatically (sentence embeddings + k-means, see
            :mod:`~fms_acceleration_accelerate_odm.autocategorize` and ``auto_categorize_config``).
        collators_dict: a collator for all categories, ``{category: collator}``, or ``None``. A collator is applied
            to each example alone (``collator([example])``) and the batch dimension removed, so categories with
            different formats reach the DataLoader's own ``collate_fn`` in one format.
        eval_dataset_dict: ``{category: dataset}`` of evaluation data (for the ``validation_loss`` reward: give it
            to the trainer as ``eval_dataset``, which then reports one loss per category).
        eval_collators_dict: kept for the HF Trainer client that builds evaluation loaders from it.
        sampling_weights: starting weight per category (``{category: weight}`` or a list in category order);
            default: equal.
        gamma: EXP3 exploration share.
        eta: EXP3 learning rate.
        sampling_interval: a category is drawn every this many examples of the global stream.
        eval_batch_size: batch size of :meth:`evaluate` (per-category evaluation losses in loops without the HF
            Trainer).
        output_dir: where the metrics file ``odm.jsonl`` is written (by process 0); ``None``: no file.
        reward_type: the reward the bandit learns from (one of
            :data:`~fms_acceleration_accelerate_odm.rewards.REWARD_TYPES`).
        auto_categorize_config: how one unlabelled dataset is split into categories: an
            :class:`~fms_acceleration_accelerate_odm.autocategorize.AutoCategorizeConfig` or a dict of its fields
            (``input_column``, ``num_categories``, ``model_name``, ``batch_size``, ``category_prefix``...); used only
            when ``dataset_dict`` holds one dataset. Evaluation data given as one dataset is split by the same
            clusters.
        seed: seed of the category draws and of the auto-categorisation's k-means (must be the same on every
            process).
        rank: with ``world_size``, this process's share of the stream for loops without Accelerate.
        world_size: number of processes sharing the stream without Accelerate (default 1: the global stream).
    """

    def __init__(
        self,
        dataset_dict: Mapping[str, Any],
        collators_dict: Mapping[str, Callable | None] | Callable | None = None,
        eval_dataset_dict: Mapping[str, Any] | None = None,
        eval_collators_dict: Mapping[str, Callable | None] | Callable | None = None,
        sampling_weights: Mapping[str, float] | Sequence[float] | None = None,
        gamma: float = 0.1,
        eta: float = 0.1,
        sampling_interval: int = 1,
        eval_batch_size: int = 5,
        output_dir: str | os.PathLike | None = None,
        reward_type: str = "train_loss",
        auto_categorize_config: AutoCategorizeConfig | Mapping[str, Any] | None = None,
        seed: int = 42,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.categorizer: DatasetAutoCategorizer | None = None
        if not isinstance(dataset_dict, Mapping) or len(dataset_dict) == 1:
            dataset_dict, eval_dataset_dict = self._auto_categorize(
                dataset_dict, eval_dataset_dict, auto_categorize_config
            )
        if len(dataset_dict) < 2:
            raise ValueError(
                f"OnlineMixingDataset needs at least two categories to mix, got {list(dataset_dict)}: give a dict "
                "{name: dataset} with at least two categories, or one dataset to split into categories automatically"
            )
        self.categories: list[str] = sorted(str(name) for name in dataset_dict)
        if len(set(self.categories)) != len(dataset_dict):
            raise ValueError(f"category names must be distinct as strings, got {list(dataset_dict)}")
        by_name = {str(k): v for k, v in dataset_dict.items()}
        self.datasets = [by_name[name] for name in self.categories]
        for name, data in zip(self.categories, self.datasets):
            try:
                size = len(data)
            except TypeError:
                raise TypeError(
                    f"category {name!r}: {type(data).__name__} has no length; give a map-style dataset "
                    "(datasets.Dataset, a list of examples...)"
                ) from None
            if size == 0:
                raise ValueError(f"category {name!r} is empty: remove it or give it examples")
        self.collators = self._per_category(collators_dict, "collators_dict")
        self.eval_dataset_dict = dict(eval_dataset_dict or {})
        self.eval_collators = eval_collators_dict
        unknown_eval = sorted(set(map(str, self.eval_dataset_dict)) - set(self.categories))
        if unknown_eval:
            raise ValueError(
                f"eval_dataset_dict has categories that are not training categories: {unknown_eval}; "
                f"training categories: {self.categories}"
            )
        if not isinstance(sampling_interval, int) or sampling_interval < 1:
            raise ValueError(f"sampling_interval must be a positive int, got {sampling_interval!r}")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive int, got {eval_batch_size!r}")
        self.eval_batch_size = eval_batch_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.reward_type = check_reward_type(reward_type)
        self.sampling_interval = sampling_interval
        self.rank = rank
        self.world_size = world_size
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.bandit = Exp3(
            len(self.categories), gamma=gamma, eta=eta, initial_weights=self._initial_weights(sampling_weights)
        )
        self._rng = random.Random(self.seed)
        self._produced = 0  # next example index of the global stream
        self._positions = [0] * len(self.categories)  # next example of each category
        self._counts = [0] * len(self.categories)  # examples drawn per category so far
        self._draws: list[int] = []  # arms drawn, from draw number _first_draw on
        self._first_draw = 0
        self._rewarded_until = 0  # examples of the stream already rewarded
        self._last_loss: list[float | None] = [None] * len(self.categories)  # velocity reward: previous loss per arm
        self.history: list[dict[str, Any]] = []  # one record per bandit update (also written to odm.jsonl)

    # ---------------------------------------------------------------------------------------------- set-up
    def _auto_categorize(
        self, dataset: Any, eval_dataset: Any, config: AutoCategorizeConfig | Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
        """One unlabelled dataset (alone or as the only entry of a dict) split into categories; evaluation data
        given as one dataset is split by the same clusters."""
        if isinstance(dataset, Mapping):
            (dataset,) = dataset.values()
        self.categorizer = DatasetAutoCategorizer(AutoCategorizeConfig.build(config, seed=self.seed))
        categories = self.categorizer.fit(dataset)
        if eval_dataset is not None and (not isinstance(eval_dataset, Mapping) or len(eval_dataset) == 1):
            if isinstance(eval_dataset, Mapping):
                (eval_dataset,) = eval_dataset.values()
            eval_dataset = self.categorizer.assign(eval_dataset)
        return categories, eval_dataset

    def _per_category(self, value: Any, name: str) -> list[Callable | None]:
        if value is None or callable(value):
            return [value] * len(self.categories)
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a collator, a dict {{category: collator}} or None, got {value!r}")
        mapping = {str(k): v for k, v in value.items()}
        if len(mapping) == 1 and set(mapping) - set(self.categories):
            return [next(iter(mapping.values()))] * len(self.categories)  # one collator under any name
        unknown = sorted(set(mapping) - set(self.categories))
        if unknown:
            raise ValueError(f"{name} has categories that are not in dataset_dict: {unknown}")
        return [mapping.get(c) for c in self.categories]

    def _initial_weights(self, weights: Mapping[str, float] | Sequence[float] | None) -> list[float] | None:
        if weights is None:
            return None
        if isinstance(weights, Mapping):
            missing = sorted(set(self.categories) - set(map(str, weights)))
            if missing:
                raise ValueError(f"sampling_weights lacks categories {missing}")
            by_name = {str(k): float(v) for k, v in weights.items()}
            return [by_name[c] for c in self.categories]
        return [float(w) for w in weights]

    def configure(
        self, *, sampling_interval: int | None = None, gamma: float | None = None, eta: float | None = None
    ) -> None:
        """Change the sampling interval and the bandit's ``gamma`` / ``eta`` before the first example is read."""
        changes = {
            name: value
            for name, value in (("sampling_interval", sampling_interval), ("gamma", gamma), ("eta", eta))
            if value is not None
        }
        current = {"sampling_interval": self.sampling_interval, "gamma": self.bandit.gamma, "eta": self.bandit.eta}
        if all(current[name] == value for name, value in changes.items()):
            return
        if self._produced or self.bandit.updates:
            raise RuntimeError(
                f"cannot change {sorted(changes)} of an OnlineMixingDataset that is already being read; set them "
                "when building it"
            )
        if changes.get("sampling_interval") is not None:
            if changes["sampling_interval"] < 1:
                raise ValueError(f"sampling_interval must be a positive int, got {changes['sampling_interval']!r}")
            self.sampling_interval = int(changes["sampling_interval"])
        self.bandit = Exp3(
            self.bandit.num_arms,
            gamma=changes.get("gamma", self.bandit.gamma),
            eta=changes.get("eta", self.bandit.eta),
            initial_weights=self.bandit.weights,
        )

    # ---------------------------------------------------------------------------------------------- stream
    def _arm_of(self, index: int) -> int:
        """The category of example ``index`` of the global stream, drawing new categories as needed."""
        draw = index // self.sampling_interval
        while self._first_draw + len(self._draws) <= draw:
            self._draws.append(self.bandit.draw(self._rng.random()))
        return self._draws[draw - self._first_draw]

    def _example(self, arm: int, position: int) -> Any:
        data = self.datasets[arm]
        example = data[position % len(data)]
        collator = self.collators[arm]
        if collator is None:
            return example
        batch = collator([example])
        return {
            key: value[0] if hasattr(value, "shape") and len(value.shape) > 0 else value for key, value in batch.items()
        }

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            raise RuntimeError(
                "OnlineMixingDataset is read in a DataLoader worker process, which would never see the mixture's "
                "updates: build the DataLoader with num_workers=0 (HF Trainer: dataloader_num_workers=0)"
            )
        while True:
            index = self._produced
            arm = self._arm_of(index)
            position = self._positions[arm]
            self._positions[arm] += 1
            self._counts[arm] += 1
            self._produced += 1
            if index % self.world_size == self.rank:
                yield self._example(arm, position)

    def to_iterable_dataset(self) -> Any:
        """This stream as a ``datasets.IterableDataset``, for clients that accept only Hugging Face datasets (TRL's
        ``SFTTrainer``). It reads this dataset, so the mixture, the callback and the checkpoints are this dataset's;
        the callback finds it behind the wrapper. Examples are given as Python values (tensors become lists); the
        features are those of the first example of the first category, read without drawing from the stream.

        TRL reads one example ahead of training to look at the data; the callback gives examples read before
        training begins back to the stream, so training still starts with the stream's first example. Give TRL
        pre-tokenized examples (``input_ids``) and ``dataset_kwargs={"skip_prepare_dataset": True}`` (or
        ``max_length=None``): a batched ``map`` in its preparation would read far ahead of training, and the
        mixture would follow the rewards that much later.
        """
        import datasets

        sample = _python_values(self._example(0, 0))
        features = datasets.Dataset.from_list([sample]).features
        return datasets.IterableDataset.from_generator(
            _stream_examples, features=features, gen_kwargs={"mixing_dataset": self}
        )

    def rewind(self, to: int) -> int:
        """Give the examples of the global stream read after example ``to`` back (they come again, with the same
        categories); returns how many. ``to`` must not be before the examples already rewarded."""
        given_back = self._produced - to
        if given_back and to == 0 and self.bandit.updates == 0:  # nothing trained yet: as new, draws included
            self._rng = random.Random(self.seed)
            self._produced, self._first_draw, self._draws = 0, 0, []
            self._positions = [0] * len(self.categories)
            self._counts = [0] * len(self.categories)
        elif given_back:
            self.load_state_dict(self.state_dict(consumed=to))
        return given_back

    # ---------------------------------------------------------------------------------------------- rewards
    @property
    def produced(self) -> int:
        """Examples of the global stream read so far (all processes' shares, prefetched ones included)."""
        return self._produced

    @property
    def rewarded_until(self) -> int:
        """Examples of the global stream covered by rewards so far."""
        return self._rewarded_until

    def probabilities(self) -> dict[str, float]:
        """The current mixture ``{category: probability}``."""
        return dict(zip(self.categories, self.bandit.probabilities()))

    def arms_between(self, start: int, stop: int) -> dict[int, int]:
        """``{arm: examples}`` for examples ``start`` to ``stop - 1`` of the global stream."""
        counts: dict[int, int] = {}
        for index in range(start, stop):
            arm = self._arm_of(index)
            counts[arm] = counts.get(arm, 0) + 1
        return counts

    def reward(self, value: float, *, examples: int, step: int | None = None) -> dict[str, float]:
        """Give the reward ``value`` of the next ``examples`` examples of the global stream (those trained since the
        previous reward, over all processes) to the categories they were drawn from; update the mixture.

        ``value`` must already be reduced across processes (every process passes the same number). Returns the new
        mixture.
        """
        return self._reward_window(lambda window: dict.fromkeys(window, float(value)), examples, step)

    def reward_velocity(self, loss: float, *, examples: int, step: int | None = None) -> dict[str, float]:
        """The ``velocity`` reward: how fast the training loss of a category falls.

        ``loss`` is the mean training loss of the next ``examples`` examples of the global stream (reduced across
        processes). Each category drawn for them compares it with ``previous``, the loss of the last update that
        covered that category, and remembers it: a fall is rewarded ``1 - loss / previous`` (upstream's velocity),
        a rise ``previous / loss - 1`` (its mirror image), the first update 0. So the reward lies in (-1, 1), and a
        spike followed by its recovery cancels out, even near a loss of 0 where upstream's ratio would punish a
        learnt category without bound. A category the model is learning gains; one whose loss stays put (noise,
        or learnt already) gains nothing, and one whose loss rises loses. Returns the new mixture.
        """
        loss = float(loss)

        def rewards(window: Mapping[int, int]) -> dict[int, float]:
            given = {}
            for arm in window:
                given[arm] = loss_velocity(self._last_loss[arm], loss)
                self._last_loss[arm] = loss
            return given

        return self._reward_window(rewards, examples, step)

    def _reward_window(
        self, rewards_of: Callable[[Mapping[int, int]], dict[int, float]], examples: int, step: int | None
    ) -> dict[str, float]:
        if examples < 1:
            raise ValueError(f"examples must be positive, got {examples}")
        start, stop = self._rewarded_until, self._rewarded_until + examples
        window = self.arms_between(start, stop)
        rewards = rewards_of(window)
        self.bandit.update(rewards)
        self._rewarded_until = stop
        self._forget_draws_before(stop)
        self._record(step, {self.categories[a]: float(rewards[a]) for a in sorted(window)}, window)
        return self.probabilities()

    def reward_categories(self, rewards: Mapping[str, float], *, step: int | None = None) -> dict[str, float]:
        """Full-information update: a reward per category observed for all of them (e.g. validation losses)."""
        unknown = sorted(set(rewards) - set(self.categories))
        if unknown:
            raise ValueError(f"rewards for unknown categories {unknown}; categories: {self.categories}")
        self.bandit.update({self.categories.index(c): float(r) for c, r in rewards.items()}, full_information=True)
        self._record(step, {c: float(rewards[c]) for c in sorted(rewards)}, {})
        return self.probabilities()

    def evaluate(self, model: Any, *, step: int | None = None, apply: bool = True) -> dict[str, float]:
        """The mean loss of ``model`` on each category's evaluation data; with ``apply``, the mixture is rewarded
        with them (the ``validation_loss`` reward, every category observed).

        For loops without the HF Trainer (whose own evaluation feeds the callback). Reads ``eval_dataset_dict`` in
        batches of ``eval_batch_size`` through the category's evaluation collator (``eval_collators_dict``; default:
        each numeric field stacked into a tensor, other fields dropped: examples of equal length with ``labels``);
        the model must return a ``loss``. Under a started
        process group each process evaluates every ``world_size``-th example and the sums are reduced, so every
        process gets the same losses (call it on every process).
        """
        import torch

        from .rewards import _all_reduce_sum

        if not self.eval_dataset_dict:
            raise ValueError(
                "evaluate() needs evaluation data per category: give OnlineMixingDataset(eval_dataset_dict={category: "
                f"dataset}}) with categories from {self.categories}"
            )
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        collators = self._per_category(self.eval_collators, "eval_collators_dict")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        names = sorted(str(c) for c in self.eval_dataset_dict)
        sums: list[float] = []
        try:
            with torch.no_grad():
                for name in names:
                    data = self.eval_dataset_dict[name]
                    collate = collators[self.categories.index(name)] or _stack_examples
                    mine = [data[i] for i in range(rank, len(data), world)]
                    total, count = 0.0, 0
                    for start in range(0, len(mine), self.eval_batch_size):
                        examples = mine[start : start + self.eval_batch_size]
                        batch = collate(examples)
                        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                        loss = getattr(model(**batch), "loss", None)
                        if loss is None:
                            raise ValueError(
                                f"evaluate(): the model returned no loss for category {name!r}: the evaluation "
                                "batches need labels (give an evaluation collator that adds them)"
                            )
                        total += float(loss.float()) * len(examples)
                        count += len(examples)
                    sums += [total, float(count)]
        finally:
            model.train(was_training)
        reduced = _all_reduce_sum(sums)
        losses = {}
        for index, name in enumerate(names):
            total, count = reduced[2 * index], reduced[2 * index + 1]
            if count < 1:
                raise ValueError(f"evaluate(): the evaluation data of category {name!r} is empty")
            losses[name] = total / count
        if apply:
            self.reward_categories(losses, step=step)
        return losses

    def _forget_draws_before(self, index: int) -> None:
        keep_from = index // self.sampling_interval
        drop = min(keep_from - self._first_draw, len(self._draws))
        if drop > 0:
            del self._draws[:drop]
            self._first_draw += drop

    def _record(self, step: int | None, rewards: dict[str, float], window: Mapping[int, int]) -> None:
        record = {
            "update": self.bandit.updates,
            "step": step,
            "examples": self._rewarded_until,
            "reward_type": self.reward_type,
            "rewards": rewards,
            "chosen": {self.categories[a]: n for a, n in sorted(window.items())},
            "sampling_weights": dict(zip(self.categories, self.bandit.weights)),
            "sampling_ratio": self.probabilities(),
            "category_counts": dict(zip(self.categories, self._counts)),
        }
        self.history.append(record)
        if self.output_dir is not None and _process_rank() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self, *, consumed: int | None = None) -> dict[str, Any]:
        """Everything that decides the rest of the stream: bandit, generator, positions, pending draws.

        Args:
            consumed: examples of the global stream actually trained (a DataLoader reads ahead of training). The
                examples read after them are given back, so a run resumed from this state trains them. Default:
                everything read so far.
        """
        positions, counts, produced = list(self._positions), list(self._counts), self._produced
        if consumed is not None:
            if not self._rewarded_until <= consumed <= self._produced:
                raise ValueError(
                    f"consumed={consumed} must lie between the rewarded examples ({self._rewarded_until}) and the "
                    f"examples read ({self._produced})"
                )
            for arm, n in self.arms_between(consumed, self._produced).items():
                positions[arm] -= n
                counts[arm] -= n
            produced = consumed
        return {
            "categories": list(self.categories),
            "sampling_interval": self.sampling_interval,
            "seed": self.seed,
            "reward_type": self.reward_type,
            "bandit": self.bandit.state_dict(),
            "rng": self._rng.getstate(),
            "produced": produced,
            "positions": positions,
            "counts": counts,
            "draws": list(self._draws),
            "first_draw": self._first_draw,
            "rewarded_until": self._rewarded_until,
            "last_loss": list(self._last_loss),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the run that saved ``state`` was."""
        if list(state["categories"]) != self.categories:
            raise ValueError(
                f"the checkpoint mixes categories {list(state['categories'])}, this dataset {self.categories}: "
                "resume with the same categories"
            )
        if state["sampling_interval"] != self.sampling_interval:
            raise ValueError(
                f"the checkpoint draws every {state['sampling_interval']} examples, this dataset every "
                f"{self.sampling_interval}: resume with the same sampling_interval"
            )
        self.seed = int(state["seed"])
        self.bandit.load_state_dict(state["bandit"])
        rng_state = state["rng"]
        self._rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self._produced = int(state["produced"])
        self._positions = [int(v) for v in state["positions"]]
        self._counts = [int(v) for v in state["counts"]]
        self._draws = [int(v) for v in state["draws"]]
        self._first_draw = int(state["first_draw"])
        self._rewarded_until = int(state["rewarded_until"])
        last_loss = state.get("last_loss") or [None] * len(self.categories)
        self._last_loss = [None if v is None else float(v) for v in last_loss]


__all__ = ["METRICS_FILE", "REWARD_TYPES", "OnlineMixingDataset"]
