"""The multipack plugin (section ``training.dataloader.multipack``): training batches packed into per-rank token
budgets by :class:`~fms_acceleration_accelerate_aadp.multipack.MultipackBatchSampler`.

Upstream fms-acceleration's keys are accepted: ``num_processes`` (fms-hf-tuning) or ``num_workers`` (the original
plugin) -- how many processes measure the example lengths --, ``max_number_tokens`` (the per-rank token budget),
``effective_batch_size`` and ``pad_token_id`` (must stay null: batches are padding-free).

Multipack needs padding-free batches (a packed batch is one flattened row; padded to its longest example it would
cost its number of examples times that length, which is what packing by tokens avoids): the padding-free section
``training.attention.padding_free`` must be active too, checked when the framework is created.

Which hook does what
--------------------
* ``check_compatibility``: refuse the section without the padding-free plugin.
* ``check_run_settings`` (the ``Accelerator`` is created): refuse ``split_batches`` and ``dispatch_batches``,
  which cut or concatenate the packed batches.
* :meth:`MultipackAccelerationPlugin.prepare_dataloader` (``Accelerator.prepare`` of a DataLoader, through the
  framework, before Accelerate wraps it): a DataLoader that shuffles (a ``RandomSampler``: the HF Trainer's
  training loader, a script's ``shuffle=True`` loader; or the Trainer's ``LengthGroupedSampler``) is rebuilt around
  a ``rank=None`` multipack sampler, every other setting (``collate_fn``, workers, pinning...) kept. ``rank=None`` yields each step's batches rank after
  rank, the order in which Accelerate's ``BatchSamplerShard`` deals batches out: each process gets its own batches,
  sharded once. A DataLoader already built on a ``rank=None`` multipack sampler is left as it is; one built on a
  single rank's sampler is rebuilt on the same plan for all ranks (else each process would keep 1/N of its own
  batches). Loaders that do not shuffle (evaluation, prediction: their order matters) are left unchanged; so are
  loaders with a sampler or batch sampler of their own (weighted sampling, ...), with a warning.
* ``get_callbacks_and_ready_for_train`` (HF Trainer / TRL): the same rebuilding is installed on the trainer's
  ``Accelerator``'s ``prepare_data_loader`` (an instance patch, recorded and revertible), for the framework API as
  fms-hf-tuning drives it, whose trainer ``Accelerator`` runs no framework hook (where it does, the DataLoader the
  hook rebuilt passes through unchanged); returns the
  :class:`~fms_acceleration_accelerate_aadp.multipack_callback.MultipackEpochCallback`, which hands the trainer's epoch to the sampler when a resumed run skips the
  first batches of an epoch (the trainer's own ``set_epoch`` does not reach a sampler under Accelerate's
  skipping and sharding wrappers).

The token budget of one rank's batch: ``max_number_tokens`` when set; else ``effective_batch_size`` examples of
average length per optimizer step over all ranks (``effective_batch_size / (ranks x gradient accumulation steps)``
examples per batch); else the DataLoader's ``batch_size`` examples of average length (upstream's rule); never less
than the longest example. With both ``max_number_tokens`` and ``effective_batch_size``, the first caps the second.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import is_main_process
from fms_acceleration_accelerate.plugin import AccelerationPlugin

from .multipack import LengthsUnavailableError, MultipackBatchSampler, example_lengths, is_hugging_face_dataset

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback

    from fms_acceleration_accelerate.distributed import RunContext

logger = logging.getLogger("fms_acceleration_accelerate_aadp")

SECTION = "training.dataloader.multipack"
PADDING_FREE_SECTION = "training.attention.padding_free"
DEFAULT_SEED = 42
_DEFAULT_LENGTH_PROCESSES = 16

# DataLoader settings carried over to the rebuilt loader (the sampling ones are the multipack sampler's)
_KEPT_SETTINGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


@dataclass(frozen=True)
class MultipackConfig:
    """Options of ``training.dataloader.multipack`` (upstream's keys kept)."""

    num_processes: int = option(
        _DEFAULT_LENGTH_PROCESSES,
        help="processes that measure the examples' token lengths once, before the first epoch (threads for "
        "datasets that are not Hugging Face datasets); capped by the CPU count and, for Hugging Face datasets, "
        "by one process per 20,000 examples (fms-hf-tuning's key)",
    )
    num_workers: int | None = option(
        None, help="the original fms-acceleration plugin's name for num_processes; set one of the two"
    )
    max_number_tokens: int | None = option(
        None,
        help="token budget of one rank's batch (the examples of a batch never add up to more); null: "
        "effective_batch_size (when set) or the DataLoader's batch_size examples of average length, at least the "
        "longest example",
    )
    effective_batch_size: int | None = option(
        None,
        help="examples per optimizer step over all ranks, on average: the budget holds effective_batch_size / "
        "(ranks x gradient accumulation steps) examples of average length (capped by max_number_tokens when set)",
    )
    pad_token_id: int | None = option(
        None,
        help="upstream's key for a padded multipack mode it never shipped; must stay null (batches are padding-free)",
    )
    seed: int | None = option(
        None,
        help="shuffling seed (the plan of an epoch depends on the seed and the epoch); null: the training "
        "arguments' data_seed or seed when the framework's augmentation received them, else 42",
    )
    lengths_column: str | None = option(
        None,
        help="a dataset column that already holds each example's token count (e.g. 'length'); null: the "
        "length of each example's input_ids",
    )
    window_steps: int = option(
        32,
        help="global steps' worth of tokens packed together (larger: tighter packing, less mixing of the "
        "shuffled order)",
    )

    def __post_init__(self) -> None:
        for name in ("num_processes", "num_workers", "max_number_tokens", "effective_batch_size", "window_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AccelerationConfigError(
                    f"{name} must be a positive int, got {value!r}",
                    fix=f"set {name} to 1 or more (or remove it)",
                )
        if self.pad_token_id is not None:
            raise AccelerationConfigError(
                f"pad_token_id is {self.pad_token_id!r}, but multipack batches here are padding-free (one flattened "
                "row, no pad tokens)",
                fix="remove pad_token_id (or set it to null)",
            )
        explicit_processes = self.num_processes != _DEFAULT_LENGTH_PROCESSES
        if self.num_workers is not None and explicit_processes and self.num_workers != self.num_processes:
            raise AccelerationConfigError(
                f"num_workers ({self.num_workers}) and num_processes ({self.num_processes}) are two names of one "
                "setting",
                fix="keep one of them",
            )

    @property
    def length_processes(self) -> int:
        """Processes (or threads) that measure the lengths."""
        return self.num_workers if self.num_workers is not None else self.num_processes


def _dataloader_types() -> tuple[type, ...]:
    from torch.utils.data import DataLoader

    return (DataLoader,)


def _is_accelerate_loader(loader: Any) -> bool:
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    return isinstance(loader, (DataLoaderShard, DataLoaderDispatcher))


def _sampler_kind(loader: Any) -> str:
    """How ``loader`` picks its examples: ``"shuffled"`` (a ``RandomSampler`` or the HF Trainer's
    ``LengthGroupedSampler``, batched by torch's ``BatchSampler``: what multipack replaces), ``"sequential"``
    (evaluation / prediction order), ``"batch sampler"`` (a custom batch sampler) or ``"other"`` (a custom sampler)."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    if loader.batch_sampler is None:  # batch_size=None: the DataLoader yields single examples
        return "other"
    if type(loader.batch_sampler) is not BatchSampler:
        return "batch sampler"
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        return "sequential"
    if isinstance(sampler, RandomSampler) or type(sampler).__name__ == "LengthGroupedSampler":
        return "shuffled"
    return "other"


def find_multipack_sampler(loader: Any) -> MultipackBatchSampler | None:
    """The :class:`MultipackBatchSampler` inside ``loader`` (a DataLoader, possibly wrapped by Accelerate's
    sharding and skipping batch samplers), or ``None``."""
    node = getattr(loader, "batch_sampler", None)
    for _ in range(8):  # DataLoaderShard -> SkipBatchSampler -> BatchSamplerShard -> ours
        if isinstance(node, MultipackBatchSampler):
            return node
        node = getattr(node, "batch_sampler", None)
        if node is None:
            return None
    return None


class MultipackAccelerationPlugin(AccelerationPlugin):
    """Packs the training DataLoader's batches into per-rank token budgets (see the module docstring)."""

    name = "multipack"
    configuration_or_paths = (SECTION,)
    config_class = MultipackConfig
    order = 410

    def __init__(self, config: MultipackConfig, *, matched_paths: tuple[str, ...], patches: Any) -> None:
        super().__init__(config, matched_paths=matched_paths, patches=patches)
        self._seed_from_arguments: int | None = None
        self._samplers: weakref.WeakSet[MultipackBatchSampler] = weakref.WeakSet()
        self._patched_accelerators: weakref.WeakSet[Any] = weakref.WeakSet()

    # ------------------------------------------------------------------------------------------------ checks
    def check_compatibility(self, active: Sequence[AccelerationPlugin]) -> None:
        if not any(PADDING_FREE_SECTION in plugin.matched_paths for plugin in active):
            raise AccelerationConfigError(
                "multipack packs examples into one flattened row per batch, which needs the padding-free plugin, "
                "and it is not active",
                path=SECTION,
                fix=f"add the section {PADDING_FREE_SECTION} (e.g. 'padding_free: {{method: huggingface}}' under "
                "training.attention) next to this one, or remove this section",
            )

    def check_run_settings(self, context: RunContext) -> None:
        accelerator = context.accelerator
        if accelerator is not None:
            self._check_accelerator(accelerator)

    def _check_accelerator(self, accelerator: Any) -> None:
        if getattr(accelerator, "split_batches", False):
            raise AccelerationConfigError(
                "the Accelerator splits each batch across the processes (split_batches=True), which would cut the "
                "packed batches, each planned for one process",
                path=SECTION,
                fix="use DataLoaderConfiguration(split_batches=False) (the default), or remove this section",
            )
        if getattr(accelerator, "dispatch_batches", None):
            raise AccelerationConfigError(
                "the Accelerator dispatches batches from the main process (dispatch_batches=True), which "
                "concatenates the packed batches of all processes",
                path=SECTION,
                fix="use DataLoaderConfiguration(dispatch_batches=False), or remove this section",
            )

    # ------------------------------------------------------------------------------------------------ seed
    def augmentation(self, model: nn.Module, train_args: Any, modifiable_args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Changes nothing on the model; notes the training arguments' seed for the shuffling."""
        seed = getattr(train_args, "data_seed", None)
        if seed is None:
            seed = getattr(train_args, "seed", None)
        if isinstance(seed, int) and not isinstance(seed, bool):
            self._seed_from_arguments = seed
        return model, modifiable_args

    @property
    def seed(self) -> int:
        """The shuffling seed in use (see the ``seed`` option)."""
        if self.config.seed is not None:
            return self.config.seed
        return self._seed_from_arguments if self._seed_from_arguments is not None else DEFAULT_SEED

    # ------------------------------------------------------------------------------------------------ loaders
    def prepare_dataloader(self, dataloader: DataLoader, context: RunContext) -> DataLoader:
        """``Accelerator.prepare`` of ``dataloader``, before Accelerate shards it: the DataLoader rebuilt around a
        multipack sampler for all ranks, or ``dataloader`` itself when it is left unchanged (see the module
        docstring)."""
        accelerator = context.accelerator
        if accelerator is not None:
            self._check_accelerator(accelerator)
        replaced = self._multipack_loader(
            dataloader,
            world_size=context.world_size,
            accumulation=getattr(accelerator, "gradient_accumulation_steps", 1) or 1,
            accelerator=accelerator,
        )
        return dataloader if replaced is None else replaced

    def _multipack_loader(
        self, loader: Any, *, world_size: int, accumulation: int, accelerator: Any = None
    ) -> DataLoader | None:
        from torch.utils.data import IterableDataset

        if not isinstance(loader, _dataloader_types()) or _is_accelerate_loader(loader):
            return None
        current = loader.batch_sampler
        if isinstance(current, MultipackBatchSampler):
            self._samplers.add(current)
            if current.num_replicas != world_size:
                raise AccelerationConfigError(
                    f"the DataLoader's MultipackBatchSampler plans for {current.num_replicas} processes, but the "
                    f"run has {world_size}",
                    path=SECTION,
                    fix=f"build it with num_replicas={world_size} (and rank=None), or let the plugin build it: "
                    "give Accelerator.prepare a DataLoader with shuffle=True",
                )
            if current.rank is None:
                return None
            sampler = _all_ranks(current)
            self._samplers.add(sampler)
            logger.info(
                "fms-acceleration multipack: the DataLoader's rank-%d sampler now plans all ranks", current.rank
            )
            return _rebuild(loader, sampler)
        if isinstance(loader.dataset, IterableDataset):
            if is_main_process():
                logger.warning(
                    "fms-acceleration multipack: DataLoader over the iterable dataset %s left unchanged (packing needs "
                    "every example's length before the epoch: give a map-style dataset, e.g. datasets.Dataset)",
                    type(loader.dataset).__name__,
                )
            return None
        sampler_kind = _sampler_kind(loader)
        if sampler_kind != "shuffled":
            if is_main_process() and sampler_kind == "sequential":
                logger.info(
                    "fms-acceleration multipack: DataLoader over %s left unchanged (it does not shuffle: evaluation "
                    "and prediction keep their order)",
                    type(loader.dataset).__name__,
                )
            elif is_main_process():
                logger.warning(
                    "fms-acceleration multipack: DataLoader with the %s %s left unchanged (it chooses its examples "
                    "its own way); for packed batches give a DataLoader with shuffle=True",
                    "batch sampler" if sampler_kind == "batch sampler" else "sampler",
                    type(loader.batch_sampler if sampler_kind == "batch sampler" else loader.sampler).__name__,
                )
            return None
        # a Hugging Face dataset is measured by the main process first (datasets caches the result on disk when the
        # dataset has cache files); the other processes then read it
        first = (
            accelerator.main_process_first()
            if accelerator is not None and world_size > 1 and is_hugging_face_dataset(loader.dataset)
            else contextlib.nullcontext()
        )
        try:
            with first:
                lengths = example_lengths(
                    loader.dataset,
                    lengths_column=self.config.lengths_column,
                    num_proc=self.config.length_processes,
                    progress=is_main_process(),
                )
        except LengthsUnavailableError as exc:
            raise AccelerationConfigError(
                f"cannot measure the training examples' token counts: {exc.problem}",
                path=SECTION,
                fix="tokenize the dataset first (an input_ids field), or set lengths_column to a field holding each "
                "example's token count",
            ) from None
        budget = self._budget(lengths, loader.batch_size, world_size, accumulation)
        sampler = MultipackBatchSampler(
            lengths,
            budget,
            num_replicas=world_size,
            rank=None,
            seed=self.seed,
            window_steps=self.config.window_steps,
        )
        self._samplers.add(sampler)
        if is_main_process():
            stats = sampler.stats()
            logger.info(
                "fms-acceleration multipack: %d examples, %d tokens per process batch, %d processes: %d steps per "
                "epoch, batches %.1f%% full, slowest process busy %.1f%% of each step on real tokens",
                len(lengths),
                budget,
                world_size,
                stats.steps,
                100 * stats.efficiency,
                100 * stats.step_efficiency,
            )
        return _rebuild(loader, sampler)

    def _budget(self, lengths: list[int], batch_size: int | None, world_size: int, accumulation: int) -> int:
        longest = max(lengths)
        cap = self.config.max_number_tokens
        if cap is not None and cap < longest:
            raise AccelerationConfigError(
                f"max_number_tokens is {cap}, but the longest training example has {longest} tokens "
                f"({sum(1 for n in lengths if n > cap)} examples are longer than the budget)",
                path=f"{SECTION}.max_number_tokens",
                fix=f"set max_number_tokens to at least {longest}, or truncate / filter the long examples",
            )
        mean = sum(lengths) / len(lengths)
        if self.config.effective_batch_size is not None:
            per_batch = self.config.effective_batch_size / (world_size * accumulation)
        elif cap is not None:
            return cap
        else:
            per_batch = batch_size or 1
        budget = max(longest, math.ceil(per_batch * mean))
        return min(budget, cap) if cap is not None else budget

    # ------------------------------------------------------------------------------------------------ trainer
    def get_callbacks_and_ready_for_train(
        self, model: nn.Module | None = None, accelerator: Accelerator | None = None
    ) -> list[TrainerCallback]:
        if accelerator is not None:  # a DataLoader the framework's hook already rebuilt passes through unchanged
            self._patch_prepare_data_loader(accelerator)
        from .multipack_callback import MultipackEpochCallback

        return [MultipackEpochCallback(self)]

    def _patch_prepare_data_loader(self, accelerator: Any) -> None:
        """Route ``accelerator``'s DataLoaders through :meth:`_multipack_loader` (an instance patch)."""
        if accelerator in self._patched_accelerators:
            return
        self._check_accelerator(accelerator)
        original = accelerator.prepare_data_loader
        plugin = self

        def prepare_data_loader(data_loader: Any, *args: Any, **kwargs: Any) -> Any:
            replaced = plugin._multipack_loader(
                data_loader,
                world_size=accelerator.num_processes,
                accumulation=getattr(accelerator, "gradient_accumulation_steps", 1) or 1,
                accelerator=accelerator,
            )
            return original(replaced if replaced is not None else data_loader, *args, **kwargs)

        self.patches.patch(
            accelerator,
            "prepare_data_loader",
            prepare_data_loader,
            target="Accelerator.prepare_data_loader (the trainer's)",
            description="multipack: shuffled DataLoaders rebuilt on MultipackBatchSampler",
        )
        self._patched_accelerators.add(accelerator)

    def adopt_sampler(self, sampler: MultipackBatchSampler) -> None:
        """Let :meth:`set_epoch` reach ``sampler`` too."""
        self._samplers.add(sampler)

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` next in every multipack sampler this plugin built or adopted."""
        for sampler in list(self._samplers):
            sampler.set_epoch(epoch)

    def describe(self) -> list[str]:
        budget = (
            f"{self.config.max_number_tokens} tokens per process batch"
            if self.config.max_number_tokens is not None and self.config.effective_batch_size is None
            else (
                f"{self.config.effective_batch_size} examples per optimizer step on average"
                if self.config.effective_batch_size is not None
                else "the DataLoader's batch_size examples of average length per process batch"
            )
        )
        return [
            *super().describe(),
            f"shuffled DataLoaders given to Accelerator.prepare are packed by token budget ({budget}), balanced "
            "across processes; evaluation loaders are left unchanged",
        ]


def _all_ranks(sampler: MultipackBatchSampler) -> MultipackBatchSampler:
    """``sampler``'s plan for all ranks (``rank=None``), at the same epoch and position."""
    twin = MultipackBatchSampler(
        sampler.lengths,
        sampler.max_tokens,
        num_replicas=sampler.num_replicas,
        rank=None,
        seed=sampler.seed,
        shuffle=sampler.shuffle,
        window_steps=sampler.window_steps,
        progress=False,
    )
    twin.load_state_dict(sampler.state_dict())
    return twin


def _rebuild(loader: DataLoader, batch_sampler: MultipackBatchSampler) -> DataLoader:
    """A DataLoader over ``loader``'s dataset with ``batch_sampler`` and every other setting of ``loader``."""
    from torch.utils.data import DataLoader

    kept = {name: getattr(loader, name) for name in _KEPT_SETTINGS if hasattr(loader, name)}
    if not kept.get("num_workers"):
        kept.pop("prefetch_factor", None)
        kept.pop("persistent_workers", None)
    return DataLoader(loader.dataset, batch_sampler=batch_sampler, **kept)


__all__ = [
    "MultipackAccelerationPlugin",
    "MultipackConfig",
    "find_multipack_sampler",
]
