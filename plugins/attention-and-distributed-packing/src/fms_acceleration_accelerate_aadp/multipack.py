"""Multipack: a batch sampler that packs examples into per-rank token budgets, balanced across ranks.

Padding-free training (every batch flattened into one row) makes a batch's cost its number of tokens, not its
number of examples times the longest example. A fixed number of examples per batch then gives the ranks of a
data-parallel job very different amounts of work at every step, and the fastest ranks wait for the slowest.
:class:`MultipackBatchSampler` instead gives every rank, at every step, a set of examples whose total length stays
within a token budget (``max_tokens``), with the ranks of one step as close to each other as packing allows.

How an epoch is planned (every rank computes the same plan from the lengths, the seed and the epoch; no
communication):

1. The examples are shuffled (``torch.randperm`` seeded with ``seed + epoch``).
2. They are cut, in that order, into windows of about ``window_steps`` global steps' worth of tokens. Each window
   is packed into bins of ``max_tokens`` by best-fit decreasing: longest example first, each into the fullest bin
   that still has room. Bins left less than 90% full are packed again with the next window (the last window keeps
   what it has), so the shuffle decides which examples meet and the packing stays tight.
3. The number of bins is made a multiple of the number of ranks by splitting the bins holding the most examples
   (tokens dealt alternately, longest first): every rank gets the same number of batches, so no rank waits at the
   end of an epoch for a batch that never comes.
4. The bins are sorted by tokens and taken ``num_replicas`` at a time: each global step holds bins of nearly the
   same size, which minimises the sum over steps of the slowest rank's tokens (a step whose bins still differ, at
   the tail of the epoch, has its examples dealt again longest first to the lightest bin). Within a step the
   biggest bin goes to the rank with the fewest tokens so far (longest-processing-time first), so the ranks' epoch
   totals stay level too. The order of the steps is then shuffled.

The sampler is deterministic by ``(seed, epoch)``, counts what it has handed out (:meth:`state_dict` /
:meth:`load_state_dict`: resuming yields exactly the remaining batches of the epoch) and works on its own::

    sampler = MultipackBatchSampler(dataset, max_tokens=16384, num_replicas=world_size, rank=rank)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=DataCollatorWithFlattening())

With ``rank=None`` it yields every rank's batch of a step in turn (rank 0, 1, ...), which is the order Accelerate's
``BatchSamplerShard`` (what ``Accelerator.prepare`` wraps a DataLoader's batch sampler in) deals out: give
``Accelerator.prepare`` a DataLoader over a ``rank=None`` sampler and each process gets its own batches, sharded
once. A sampler built for one rank (``rank=0``...) must not be given to ``Accelerator.prepare`` (each process would
take 1/``num_replicas`` of its own batches); the multipack plugin converts it.

Example lengths are computed once: taken from a lengths list or a dataset column, or measured (``len`` of each
example's ``input_ids``) in parallel with a progress bar: ``datasets.Dataset.map`` over ``num_proc`` processes
for a Hugging Face dataset, a thread pool over the examples otherwise (:func:`example_lengths`).
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

REFILL_BELOW = 0.9
"""Bins of a window filled less than this fraction of the budget are packed again with the next window."""

_LENGTHS_FIX = "tokenize the dataset first, or give the lengths (lengths=[...] or a lengths column)"

_EXAMPLES_PER_PROCESS = 20_000
"""``datasets.Dataset.map`` starts at most one process per this many examples (starting one costs more than
measuring a few thousand lengths)."""

Plan = tuple[tuple[tuple[int, ...], ...], ...]
"""An epoch's plan: ``plan[step][rank]`` is the tuple of dataset indices of that rank's batch at that step."""


# ---------------------------------------------------------------------------------------------------- lengths
class LengthsUnavailableError(ValueError):
    """The examples' token lengths cannot be measured (no ``input_ids``, not a map-style dataset, ...).

    Attributes:
        problem: what is missing.
        fix: how to give the lengths.
    """

    def __init__(self, problem: str, fix: str = _LENGTHS_FIX) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"multipack: {problem}; {fix}")


def example_lengths(
    source: Any,
    *,
    column: str = "input_ids",
    lengths_column: str | None = None,
    num_proc: int | None = None,
    progress: bool = True,
) -> list[int]:
    """The token length of every example of ``source``, computed once.

    Args:
        source: a sequence of lengths (list, tuple, 1-D tensor or array of ints), a Hugging Face
            ``datasets.Dataset``, or any map-style dataset (``len`` and ``__getitem__``) whose examples are mappings.
        column: the field whose ``len`` is the example's length.
        lengths_column: a field that already holds each example's length (e.g. ``"length"``); used when the
            dataset has it.
        num_proc: processes (Hugging Face datasets) or threads (other datasets) that measure the lengths; ``None``:
            the machine's CPU count. Capped by the CPU count and, for processes, by one per 20,000 examples.
        progress: show a progress bar while measuring.

    Returns:
        One positive int per example, in dataset order.

    Raises:
        LengthsUnavailableError: an example has no ``column`` (and no ``lengths_column``), or ``source`` is not
            indexable.
        ValueError: a length is not a positive int.
    """
    lengths = _given_lengths(source)
    if lengths is None:
        workers = max(1, min(num_proc or os.cpu_count() or 1, os.cpu_count() or 1))
        if is_hugging_face_dataset(source):
            lengths = _hf_dataset_lengths(source, column, lengths_column, workers, progress)
        else:
            lengths = _map_style_lengths(source, column, lengths_column, workers, progress)
    for index, value in enumerate(lengths):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"multipack: example {index} has length {value!r}; every example needs at least one token "
                "(drop empty examples from the dataset before training)"
            )
    return lengths


def _given_lengths(source: Any) -> list[int] | None:
    """``source`` as a list of ints when it is already a list of lengths, else ``None``."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 1 or source.dtype.is_floating_point or source.dtype == torch.bool:
            raise ValueError(
                f"multipack: a lengths tensor must be 1-D of integers, got {source.dtype} {tuple(source.shape)}"
            )
        return [int(v) for v in source.tolist()]
    if type(source).__module__ == "numpy" and hasattr(source, "tolist"):  # numpy array, without importing numpy
        values = source.tolist()
        if not isinstance(values, list) or any(isinstance(v, list) for v in values[:1]):
            raise ValueError(f"multipack: a lengths array must be 1-D, got shape {getattr(source, 'shape', '?')}")
        return [v if isinstance(v, int) else _as_int(v, i) for i, v in enumerate(values)]
    if isinstance(source, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in source):
        return list(source)
    return None


def _as_int(value: Any, index: int) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"multipack: length {index} is {value!r}, not an int")


def is_hugging_face_dataset(source: Any) -> bool:
    """Whether ``source`` is a ``datasets.Dataset`` (without importing datasets when it is not installed)."""
    try:
        import datasets
    except ImportError:  # datasets is optional: plain map-style datasets need no package
        return False
    return isinstance(source, datasets.Dataset)


def _hf_dataset_lengths(
    dataset: Any, column: str, lengths_column: str | None, workers: int, progress: bool
) -> list[int]:
    names = dataset.column_names
    if lengths_column is not None and lengths_column in names:
        return [int(v) for v in dataset[lengths_column]]
    if column not in names:
        raise LengthsUnavailableError(
            f"the dataset has no {column!r} column to measure example lengths (columns: {', '.join(names)})"
        )
    from datasets.utils import logging as datasets_logging

    processes = max(1, min(workers, len(dataset) // _EXAMPLES_PER_PROCESS))
    hide = not progress and datasets_logging.is_progress_bar_enabled()
    if hide:  # datasets' bars are switched on and off process-wide only: off for this call, then back on
        datasets_logging.disable_progress_bar()
    try:
        measured = dataset.map(
            _measure_batch,
            batched=True,
            input_columns=[column],
            remove_columns=names,
            num_proc=processes if processes > 1 else None,
            desc="multipack: example lengths",
        )
    finally:
        if hide:
            datasets_logging.enable_progress_bar()
    return [int(v) for v in measured["multipack_length"]]


def _measure_batch(values: list[Any]) -> dict[str, list[int]]:
    return {"multipack_length": [len(v) for v in values]}


def _map_style_lengths(
    dataset: Any, column: str, lengths_column: str | None, workers: int, progress: bool
) -> list[int]:
    try:
        size = len(dataset)
    except TypeError as exc:
        raise LengthsUnavailableError(
            f"a map-style dataset (len and indexing) or a list of lengths is needed, got {type(dataset).__name__}",
            fix="give a map-style dataset, or the lengths (lengths=[...])",
        ) from exc

    def measure(index: int) -> int:
        return _length_of(dataset[index], index, column, lengths_column)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(measure, range(size), chunksize=max(1, size // (workers * 8) or 1))
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=size, desc="multipack: example lengths", unit="ex")
        return list(results)


def _length_of(example: Any, index: int, column: str, lengths_column: str | None) -> int:
    if not isinstance(example, Mapping):
        raise LengthsUnavailableError(
            f"example {index} is a {type(example).__name__}, not a mapping with {column!r}",
            fix="give the lengths (lengths=[...])",
        )
    if lengths_column is not None and lengths_column in example:
        return int(example[lengths_column])
    if column not in example:
        raise LengthsUnavailableError(
            f"example {index} has no {column!r} field (fields: {', '.join(map(str, example))})"
        )
    value = example[column]
    if isinstance(value, torch.Tensor):
        return int(value.shape[-1]) if value.dim() else 1
    return len(value)


# ---------------------------------------------------------------------------------------------------- packing
def _pack_best_fit(items: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Pack the examples ``items`` into bins of ``budget`` tokens by best-fit decreasing.

    Longest first (ties keep the order of ``items``), each example goes into the bin with the least room that still
    holds it, or a new bin. Returns the bins, each a list of indices.
    """
    ordered = sorted(items, key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin number), ascending
    for index in ordered:
        need = lengths[index]
        slot = bisect.bisect_left(room, (need, -1))
        if slot == len(room):
            bins.append([index])
            left, number = budget - need, len(bins) - 1
        else:
            left, number = room.pop(slot)
            bins[number].append(index)
            left -= need
        if left > 0:
            bisect.insort(room, (left, number))
    return bins


def _split(bin_: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Two halves of ``bin_`` with nearly equal tokens: longest first, each example to the lighter half."""
    halves: tuple[list[int], list[int]] = ([], [])
    tokens = [0, 0]
    for index in sorted(bin_, key=lambda i: -lengths[i]):
        side = 0 if tokens[0] <= tokens[1] else 1
        halves[side].append(index)
        tokens[side] += lengths[index]
    return halves


def _level(group: list[list[int]], lengths: Sequence[int], budget: int) -> list[tuple[int, list[int]]]:
    """The bins of one step as ``(tokens, bin)``, biggest first; their examples are dealt again (longest first, to
    the bin with the fewest tokens) when that lowers the biggest bin without passing ``budget``."""
    sized = sorted(((sum(lengths[i] for i in b), b) for b in group), key=lambda t: (-t[0], min(t[1])))
    if len(group) < 2 or sized[0][0] == sized[-1][0]:
        return sized
    dealt: list[list[int]] = [[] for _ in group]
    loads = [0] * len(group)
    for index in sorted((i for b in group for i in b), key=lambda i: (-lengths[i], i)):
        target = min(range(len(group)), key=lambda k: (loads[k], k))
        dealt[target].append(index)
        loads[target] += lengths[index]
    if max(loads) > budget or max(loads) >= sized[0][0] or min(loads) == 0:
        return sized
    return sorted(zip(loads, dealt), key=lambda t: (-t[0], min(t[1])))


@dataclass(frozen=True)
class PackingStats:
    """How well an epoch's plan packs and balances.

    Attributes:
        steps: global steps in the epoch (batches per rank).
        examples: examples in the epoch (each once; more only when the dataset is smaller than the ranks need).
        tokens: tokens in the epoch.
        efficiency: ``tokens / (steps * num_replicas * max_tokens)``: how full the average rank batch is.
        step_efficiency: ``tokens / (num_replicas * sum over steps of the slowest rank's tokens)``: the share of
            the ranks' time spent on real tokens if a step's time follows its biggest batch.
        rank_tokens: each rank's tokens over the epoch.
        rank_balance: ``max(rank_tokens) / min(rank_tokens)`` (1.0: perfectly level).
        worst_step_balance: the largest ``max / min`` of the ranks' tokens within one step.
    """

    steps: int
    examples: int
    tokens: int
    efficiency: float
    step_efficiency: float
    rank_tokens: tuple[int, ...]
    rank_balance: float
    worst_step_balance: float


def plan_stats(plan: Plan, lengths: Sequence[int], max_tokens: int) -> PackingStats:
    """Packing efficiency and rank balance of ``plan`` (see :class:`PackingStats`)."""
    replicas = len(plan[0]) if plan else 1
    rank_tokens = [0] * replicas
    slowest = 0
    worst = 1.0
    examples = 0
    for step in plan:
        sizes = [sum(lengths[i] for i in batch) for batch in step]
        for rank, size in enumerate(sizes):
            rank_tokens[rank] += size
        slowest += max(sizes)
        worst = max(worst, max(sizes) / max(1, min(sizes)))
        examples += sum(len(batch) for batch in step)
    tokens = sum(rank_tokens)
    return PackingStats(
        steps=len(plan),
        examples=examples,
        tokens=tokens,
        efficiency=tokens / (len(plan) * replicas * max_tokens) if plan else 0.0,
        step_efficiency=tokens / (replicas * slowest) if slowest else 0.0,
        rank_tokens=tuple(rank_tokens),
        rank_balance=max(rank_tokens) / max(1, min(rank_tokens)),
        worst_step_balance=worst,
    )


# ---------------------------------------------------------------------------------------------------- sampler
class _EpochHandle:
    """What ``sampler.sampler`` is: lets Accelerate's ``DataLoaderShard.set_epoch`` (which looks for
    ``batch_sampler.batch_sampler.sampler.set_epoch``) reach the multipack sampler inside its ``BatchSamplerShard``."""

    def __init__(self, owner: MultipackBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._owner.epoch


class MultipackBatchSampler(Sampler[list[int]]):
    """Batches of examples packed into a per-rank token budget, balanced across ranks (see the module docstring).

    Args:
        lengths: the examples' token lengths (a list / 1-D tensor / array of ints), or the dataset itself, whose
            lengths are then measured once by :func:`example_lengths` (``column``, ``lengths_column``,
            ``num_proc``, ``progress`` are passed to it).
        max_tokens: the token budget of one rank's batch; every example must fit in it.
        num_replicas: number of data-parallel ranks.
        rank: this process's rank (the sampler yields only its batches), or ``None``: yield every rank's batch of
            each step in turn, for ``Accelerator.prepare`` (whose ``BatchSamplerShard`` deals them out) or to
            inspect the whole plan.
        seed: shuffling seed; the plan of an epoch depends only on ``(lengths, max_tokens, num_replicas, seed,
            epoch, shuffle, window_steps)``.
        shuffle: shuffle the examples each epoch (``False``: pack in dataset order; still deterministic).
        window_steps: how many global steps' worth of tokens are packed together (larger: tighter packing, less
            mixing of the dataset order); at least 1.

    Raises:
        ValueError: bad arguments, an example longer than ``max_tokens``, an empty dataset.
    """

    def __init__(
        self,
        lengths: Any,
        max_tokens: int,
        *,
        num_replicas: int = 1,
        rank: int | None = None,
        seed: int = 42,
        shuffle: bool = True,
        window_steps: int = 32,
        column: str = "input_ids",
        lengths_column: str | None = None,
        num_proc: int | None = None,
        progress: bool = True,
    ) -> None:
        for name, value in (("max_tokens", max_tokens), ("num_replicas", num_replicas), ("window_steps", window_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MultipackBatchSampler: {name} must be a positive int, got {value!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas):
            raise ValueError(f"MultipackBatchSampler: rank must be None or an int in [0, {num_replicas}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"MultipackBatchSampler: seed must be an int, got {seed!r}")
        self.lengths: list[int] = example_lengths(
            lengths, column=column, lengths_column=lengths_column, num_proc=num_proc, progress=progress
        )
        if not self.lengths:
            raise ValueError("MultipackBatchSampler: the dataset is empty")
        longest = max(self.lengths)
        if longest > max_tokens:
            too_long = sum(1 for n in self.lengths if n > max_tokens)
            raise ValueError(
                f"multipack: {too_long} example(s) are longer than the token budget max_tokens={max_tokens} (the "
                f"longest has {longest} tokens); raise the budget to at least {longest}, or truncate / filter the "
                "examples (e.g. a max_seq_length below the budget)"
            )
        self.max_tokens = max_tokens
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.window_steps = window_steps
        self.drop_last = False  # read by Accelerate's BatchSamplerShard: every step is complete
        self.sampler = _EpochHandle(self)
        self._epoch = 0
        self._position = 0  # global steps of the current epoch already handed out
        self._cached: tuple[int, Plan] | None = None

    # ------------------------------------------------------------------------------------------------ planning
    def plan(self, epoch: int | None = None) -> Plan:
        """The plan of ``epoch`` (default: the current one): ``plan[step][rank]`` = indices of that batch."""
        epoch = self._epoch if epoch is None else epoch
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        plan = self._make_plan(epoch)
        self._cached = (epoch, plan)
        return plan

    def stats(self, epoch: int | None = None) -> PackingStats:
        """Packing efficiency and rank balance of an epoch's plan (see :class:`PackingStats`)."""
        return plan_stats(self.plan(epoch), self.lengths, self.max_tokens)

    def _make_plan(self, epoch: int) -> Plan:
        lengths, budget, replicas = self.lengths, self.max_tokens, self.num_replicas
        generator = torch.Generator().manual_seed(self.seed + epoch)
        count = len(lengths)
        order = torch.randperm(count, generator=generator).tolist() if self.shuffle else list(range(count))

        # 1-2. windows of about window_steps global steps of tokens, packed by best-fit decreasing; under-filled
        # bins go round again with the next window
        window_tokens = self.window_steps * replicas * budget
        bins: list[list[int]] = []
        pending: list[int] = []
        pending_tokens = 0
        for position, index in enumerate(order):
            pending.append(index)
            pending_tokens += lengths[index]
            last = position == count - 1
            if pending_tokens < window_tokens and not last:
                continue
            packed = _pack_best_fit(pending, lengths, budget)
            pending, pending_tokens = [], 0
            for bin_ in packed:
                tokens = sum(lengths[i] for i in bin_)
                if last or tokens >= REFILL_BELOW * budget:
                    bins.append(bin_)
                else:
                    pending.extend(bin_)
                    pending_tokens += tokens

        # 3. a multiple of num_replicas bins: split the bins with the most examples; a dataset too small for that
        # repeats its shortest examples (each rank must get a batch at every step)
        while len(bins) % replicas:
            bins.sort(key=lambda b: (-len(b), min(b)))
            if len(bins[0]) < 2:
                break
            first, second = _split(bins.pop(0), lengths)
            bins.extend((first, second))
        if len(bins) % replicas:
            shortest = sorted(range(count), key=lambda i: (lengths[i], i))
            for extra in range(replicas - len(bins) % replicas):
                bins.append([shortest[extra % count]])

        # 4. steps of similar bins (a step whose bins still differ has its examples dealt again, longest first to
        # the lightest bin, when that lowers its biggest bin); within a step, the biggest bin to the rank with the
        # fewest tokens so far
        tokens_of = [sum(lengths[i] for i in bin_) for bin_ in bins]
        ranked = sorted(range(len(bins)), key=lambda b: (-tokens_of[b], min(bins[b])))
        rank_totals = [0] * replicas
        steps: list[tuple[tuple[int, ...], ...]] = []
        for start in range(0, len(ranked), replicas):
            group = _level([bins[b] for b in ranked[start : start + replicas]], lengths, budget)
            ranks = sorted(range(replicas), key=lambda r: (rank_totals[r], r))
            step: list[tuple[int, ...]] = [()] * replicas
            for (size, bin_), rank in zip(group, ranks):
                step[rank] = tuple(sorted(bin_))
                rank_totals[rank] += size
            steps.append(tuple(step))
        if self.shuffle:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        return tuple(steps)

    # ------------------------------------------------------------------------------------------------ iteration
    @property
    def epoch(self) -> int:
        """The epoch the next iteration plans (advanced by one after each complete pass)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Global steps of the current epoch already handed out."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` next. A different epoch starts from its first step; the current epoch keeps its position
        (so a restored :meth:`state_dict` survives a trainer's ``set_epoch`` of the same epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"MultipackBatchSampler.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._position = 0

    def __len__(self) -> int:
        """Batches in one epoch: steps for one rank, steps x num_replicas with ``rank=None``."""
        steps = len(self.plan())
        return steps if self.rank is not None else steps * self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        last_rank = self.num_replicas - 1
        for step in range(self._position, len(plan)):
            if self.rank is not None:
                self._position = step + 1
                yield list(plan[step][self.rank])
                continue
            for rank, batch in enumerate(plan[step]):
                if rank == last_rank:  # the step is handed out once its last batch is
                    self._position = step + 1
                yield list(batch)
        self._epoch += 1
        self._position = 0

    # ------------------------------------------------------------------------------------------------ state
    def _fingerprint(self) -> dict[str, int]:
        return {
            "num_examples": len(self.lengths),
            "total_tokens": sum(self.lengths),
            "max_tokens": self.max_tokens,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "window_steps": self.window_steps,
            "shuffle": int(self.shuffle),
        }

    def state_dict(self) -> dict[str, int]:
        """Where the sampler is: ``epoch`` and ``position`` (global steps of that epoch already handed out), with
        what the plan depends on, so a checkpoint is not restored into a different plan.

        ``position`` counts what the sampler handed to its DataLoader; a DataLoader with workers fetches a few
        batches ahead of the training loop, so with ``num_workers > 0`` restore the steps the loop finished
        (``load_state_dict({**state, "position": steps_done})``)."""
        return {"epoch": self._epoch, "position": self._position, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`): the next iteration yields exactly the batches of that
        epoch after ``position``.

        Raises:
            ValueError: ``state`` was saved by a sampler with a different plan (other lengths, budget, number of
                ranks, seed, ...), or its position is past the end of the epoch.
        """
        missing = [key for key in ("epoch", "position") if key not in state]
        if missing:
            raise ValueError(f"MultipackBatchSampler.load_state_dict: the state has no {', '.join(missing)}")
        mine = self._fingerprint()
        differ = [
            f"{key}: saved {state[key]}, now {mine[key]}" for key in mine if key in state and state[key] != mine[key]
        ]
        if differ:
            raise ValueError(
                "MultipackBatchSampler.load_state_dict: the state was saved with a different plan ("
                + "; ".join(differ)
                + "); resume with the same dataset, max_tokens, number of processes and seed"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        steps = len(self.plan(epoch))
        if not 0 <= position <= steps:
            raise ValueError(
                f"MultipackBatchSampler.load_state_dict: position {position} is outside epoch {epoch}'s {steps} steps"
            )
        self._epoch, self._position = epoch, position

    def __repr__(self) -> str:
        where = "all ranks" if self.rank is None else f"rank {self.rank}"
        return (
            f"MultipackBatchSampler({len(self.lengths)} examples, max_tokens={self.max_tokens}, "
            f"num_replicas={self.num_replicas}, {where}, seed={self.seed}, epoch={self._epoch})"
        )


def budget_for_batch_size(lengths: Sequence[int], examples_per_batch: float) -> int:
    """A token budget holding ``examples_per_batch`` examples of average length, and at least the longest."""
    if examples_per_batch <= 0:
        raise ValueError(f"examples_per_batch must be positive, got {examples_per_batch!r}")
    mean = sum(lengths) / len(lengths)
    return max(max(lengths), math.ceil(examples_per_batch * mean))


__all__ = [
    "REFILL_BELOW",
    "LengthsUnavailableError",
    "MultipackBatchSampler",
    "PackingStats",
    "Plan",
    "budget_for_batch_size",
    "example_lengths",
    "is_hugging_face_dataset",
    "plan_stats",
]
