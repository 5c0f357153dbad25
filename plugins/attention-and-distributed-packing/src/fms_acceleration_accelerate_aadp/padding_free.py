"""The padding-free plugin (section ``training.attention.padding_free``).

Two halves, both recorded in the framework's patch recorder and reverted with it:

* **The model.** The causal LM's attention is switched to this plugin's attention function, registered in
  transformers' ``AttentionInterface`` (and a padding-mask function in ``AttentionMaskInterface``) under a name of
  its own, ``fms_padding_free_<backend>_<id>``: the model's ``config._attn_implementation`` names it, so every
  attention layer calls it. The decoder stack's ``forward`` (the causal LM's ``model`` / ``transformer``) is
  wrapped to read the batch's example boundaries once (``cu_seq_lens_q``, else ``position_ids`` restarting at 0,
  else the padding mask; :mod:`.segments`) and hand them to every layer; the backend (:mod:`.attention`) computes
  causal attention inside each example only. Every way into the layers goes through the decoder stack: the causal
  LM's own forward, and the forwards that replace it to run the decoder stack and a fused loss head themselves
  (the fused-ops plugin's ``fast_loss``, TRL's fused LM head), patched before or after this one. The model's
  ``use_cache`` default is switched off (a training forward needs no key/value cache). Patched in
  ``augmentation``, or in ``prepare_contribution`` when the script never calls it, or in
  ``get_callbacks_and_ready_for_train`` (a trainer's model): whichever comes first, once per model.
* **The data.** Every DataLoader given to ``Accelerator.prepare`` (the HF Trainer's and TRL's calls included)
  gets its ``collate_fn`` wrapped by :class:`~.collate.FlatteningCollator` (``prepare_dataloader``); a trainer
  whose Accelerator has no acceleration section (the framework API) gets a callback that wraps its training
  DataLoader's ``collate_fn`` at ``on_train_begin``. Padded batches become one row of real tokens.

The backend is chosen when the model is patched (:func:`~.attention.choose_backend`: the configured one, or for
``auto`` the first of flash_attn, varlen, flex, sdpa, eager that is installed and can honour the model's sliding
windows / soft-capping / attention dropout / attention sinks on the run's device and dtype) and named in the patch
table. A model with attention sinks (GPT-OSS) with a configured backend that cannot apply them is refused before it
is loaded (:meth:`PaddingFreePlugin.check_model_type`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch

from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import is_main_process
from fms_acceleration_accelerate.model_specs import (
    architecture_spec,
    match_model,
    supported_model_types,
)
from fms_acceleration_accelerate.patching import patch_mapping_entry
from fms_acceleration_accelerate.plugin import AccelerationPlugin

from .attention import (
    BACKEND_CLASSES,
    AttentionBackend,
    BackendChoice,
    ModelNeeds,
    RunNeeds,
    choose_backend,
    make_attention_function,
    make_segments_forward,
    model_needs,
    padding_mask_for,
)
from .collate import FlatteningCollator, wrap_collate_fn
from .config import PaddingFreeConfig

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader

    from fms_acceleration_accelerate.distributed import RunContext

logger = logging.getLogger("fms_acceleration_accelerate_aadp")

ATTENTION_PREFIX = "fms_padding_free"


def _register(patches: Any, interface: type, key: str, function: Any, what: str) -> None:
    """Add ``key -> function`` to a transformers ``GeneralInterface`` class's global mapping, as a recorded patch
    (see :func:`~fms_acceleration_accelerate.patching.patch_mapping_entry`)."""
    patch_mapping_entry(
        patches,
        interface,
        "_global_mapping",
        key,
        function,
        target=f"transformers {interface.__name__}[{key!r}]",
        description=what,
    )


MIN_TRANSFORMERS = "4.56"
"""The first transformers release with both the attention and the attention-mask registries this plugin uses."""


def _check_transformers(path: str) -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise AccelerationConfigError(
            f"padding-free attention needs transformers >= {MIN_TRANSFORMERS} (its AttentionInterface and "
            f"AttentionMaskInterface registries), but {transformers.__version__} is installed",
            path=path,
            fix=f"pip install -U 'transformers>={MIN_TRANSFORMERS}'",
        )


def _compute_dtype(model: Any, context: RunContext, train_args: Any) -> torch.dtype:
    if context.compute_dtype is not None:
        return context.compute_dtype
    if train_args is not None and getattr(train_args, "bf16", False):
        return torch.bfloat16
    if train_args is not None and getattr(train_args, "fp16", False):
        return torch.float16
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _unwrap_engine(model: Any) -> Any:
    """The model inside DDP / DataParallel wrappers and DeepSpeed's engine (what ``Accelerator.prepare`` returns
    with several processes or under DeepSpeed; the engine's class is recognised by name, deepspeed is not
    imported)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    def is_engine(m: Any) -> bool:
        return hasattr(m, "module") and any(
            c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed") for c in type(m).__mro__
        )

    while isinstance(model, (DataParallel, DistributedDataParallel)) or is_engine(model):
        model = model.module
    return model


class PaddingFreePlugin(AccelerationPlugin):
    """Padding-free training: flattened batches and attention that never crosses example boundaries."""

    name = "padding_free"
    configuration_and_paths = ("training.attention.padding_free",)
    config_class = PaddingFreeConfig
    supported_model_types = supported_model_types()
    order = 250  # after plugins that load the model or add adapters, before kernel plugins

    def __init__(self, config: PaddingFreeConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._backends: dict[str, AttentionBackend] = {}
        self._choices: WeakKeyDictionary[Any, tuple[str, BackendChoice]] = WeakKeyDictionary()
        """Each causal LM this plugin patched -> (its attention implementation key, the backend chosen for it)."""

    # ------------------------------------------------------------------------------------------- checks
    def check_model_type(self, model_type: str | None) -> None:
        """Before the model is loaded: an architecture with attention sinks (GPT-OSS) with an explicitly chosen
        backend that cannot apply them is refused (``auto`` passes over those backends)."""
        super().check_model_type(model_type)
        spec = architecture_spec(model_type, path=self.key_path())
        backend = self.config.attention_backend
        if spec.attention.sinks is not None and backend != "auto" and not BACKEND_CLASSES[backend].supports_sinks:
            able = [name for name, cls in BACKEND_CLASSES.items() if cls.supports_sinks]
            raise AccelerationConfigError(
                f"{model_type} attention has sinks (a learned per-head softmax column), which the {backend} backend "
                "cannot apply; without them the attention would compute another model",
                path=self.key_path("attention_backend"),
                fix=f"set attention_backend to {' or '.join(able)}, or auto (it picks one that can)",
            )

    def check_run_settings(self, context: RunContext) -> None:
        """An explicitly chosen backend that is not installed, or that cannot run on this device, is refused when
        the Accelerator is created (before any model is loaded)."""
        if self.config.attention_backend == "auto":
            return
        run = RunNeeds(device_type=context.device.type, dtype=context.compute_dtype or torch.bfloat16)
        self._choose(ModelNeeds(), run)

    def check_prepared_model(self, model: nn.Module, context: RunContext) -> None:
        self._match(model)

    # ------------------------------------------------------------------------------------------- model side
    def augmentation(
        self, model: nn.Module, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[nn.Module, tuple[Any, ...]]:
        self.patch_model(model, self.run_context, train_args)
        return model, modifiable_args

    def prepare_contribution(self, model: nn.Module, context: RunContext) -> None:
        self.patch_model(model, context)
        return None

    def contributes_under_fsdp2(self) -> bool:
        return False  # patches attention dispatch only; shards nothing itself

    def after_prepare(self, model: nn.Module, context: RunContext) -> None:
        match = self._match(model)
        causal = match.causal_lm.module
        current = causal.config._attn_implementation
        if causal in self._choices and not str(current).startswith(ATTENTION_PREFIX):
            raise AccelerationConfigError(
                f"the model's attention implementation was changed to {current!r} after the padding-free plugin set "
                "it, so examples of a flattened batch would attend to each other",
                path=self.key_path(),
                fix="do not call set_attn_implementation / change config._attn_implementation on the model after "
                "the acceleration plugins ran",
            )

    def patch_model(self, model: nn.Module, context: RunContext, train_args: Any = None) -> BackendChoice:
        """Switch ``model``'s attention to the padding-free function (once per causal LM); returns the backend."""
        match = self._match(model)
        causal = match.causal_lm.module
        done = self._choices.get(causal)
        if done is not None and causal.config._attn_implementation == done[0]:
            return done[1]
        needs = model_needs(causal, [m.module for m in match.attentions], match.spec.attention.sinks)
        run = RunNeeds(device_type=context.device.type, dtype=_compute_dtype(causal, context, train_args))
        choice = self._choose(needs, run)
        key = f"{ATTENTION_PREFIX}_{choice.name}_{id(self):x}"
        _check_transformers(self.key_path())
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        if key not in vars(AttentionInterface)["_global_mapping"]:
            _register(
                self.patches,
                AttentionInterface,
                key,
                make_attention_function(choice.backend),
                f"padding-free attention [{choice.name}]",
            )
            _register(
                self.patches,
                AttentionMaskInterface,
                key,
                padding_mask_for,
                "padding mask only (boundaries from position_ids / cu_seq_lens)",
            )
        where = match.causal_lm.path or type(causal).__name__
        self.patches.patch(
            causal.config,
            "_attn_implementation_internal",
            key,
            target=f"{where}.config._attn_implementation",
            description=f"padding-free attention [{choice.name}{' (auto)' if self.config.attention_backend == 'auto' else ''}]",
        )
        if getattr(causal.config, "use_cache", False):
            self.patches.patch(
                causal.config,
                "use_cache",
                False,
                target=f"{where}.config.use_cache",
                description="False (training needs no key/value cache)",
            )
        # the decoder stack's forward, not the causal LM's: a forward that replaces the causal LM's to run the
        # decoder stack and the loss head itself (fast_loss: fused_linear, TRL's fused LM head, the loss kernels
        # serving it) calls the decoder stack directly, and a wrapper of the causal LM's forward would be skipped
        backbone_attribute = match.spec.base_model_attribute
        backbone = getattr(causal, backbone_attribute)
        self.patches.patch_forward(
            backbone,
            make_segments_forward(backbone.forward),
            target=f"{where}.{backbone_attribute}",
            description="example boundaries read once per forward",
        )
        self._choices[causal] = (key, choice)
        if is_main_process():
            logger.info(
                "padding-free attention for %s: %s; model needs %s; run: %s",
                type(causal).__name__,
                choice.describe(),
                needs.describe(),
                run.describe(),
            )
        return choice

    # ------------------------------------------------------------------------------------------- data side
    def prepare_dataloader(self, dataloader: DataLoader, context: RunContext) -> DataLoader:
        if self.config.flatten_batches:
            self.wrap_dataloader(dataloader)
        return dataloader

    def wrap_dataloader(self, dataloader: Any) -> bool:
        """Wrap the ``collate_fn`` of ``dataloader`` in a :class:`~.collate.FlatteningCollator` (recorded); ``False``
        when it already flattens. A DataLoader that Accelerate prepared holds the DataLoader it iterates in
        ``base_dataloader`` (the one whose ``collate_fn`` builds the batches): that one is wrapped."""
        holder = dataloader
        while isinstance(vars(holder).get("base_dataloader"), torch.utils.data.DataLoader):
            holder = vars(holder)["base_dataloader"]
        wrapped, changed = wrap_collate_fn(holder.collate_fn, self.config.bucket)
        if changed:
            self.patches.patch(
                holder,
                "collate_fn",
                wrapped,
                target=f"{type(holder).__name__}.collate_fn",
                description=f"flatten batches ({wrapped!r})",
            )
        return changed

    def get_callbacks_and_ready_for_train(
        self, model: nn.Module | None = None, accelerator: Accelerator | None = None
    ) -> list[Any]:
        if model is not None:
            self.patch_model(model, self.run_context)
        if not self.config.flatten_batches:
            return []
        from transformers import TrainerCallback

        plugin = self

        class FlattenTrainingBatches(TrainerCallback):
            """Wraps the trainer's training DataLoader's ``collate_fn`` before the first batch is drawn (for an
            Accelerator without an acceleration section, whose ``prepare`` runs no plugin hook)."""

            def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kw: Any):
                if train_dataloader is not None and hasattr(train_dataloader, "collate_fn"):
                    plugin.wrap_dataloader(train_dataloader)

        return [FlattenTrainingBatches()]

    # ------------------------------------------------------------------------------------------- helpers
    def backend_of(self, model: Any) -> BackendChoice | None:
        """The backend chosen for ``model`` (a causal LM or a wrapper of one), ``None`` when not patched here."""
        done = self._choices.get(self._match(model).causal_lm.module)
        return None if done is None else done[1]

    def _match(self, model: Any) -> Any:
        model = _unwrap_engine(model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = architecture_spec(model_type, path=self.key_path())
        return match_model(model, spec)

    def _choose(self, needs: ModelNeeds, run: RunNeeds) -> BackendChoice:
        for name in self.config.backend_preference:
            self._backends.setdefault(name, BACKEND_CLASSES[name]())
        return choose_backend(
            self.config.backend_preference,
            needs,
            run,
            backends=self._backends,
            path=self.key_path("attention_backend"),
        )

    def describe(self) -> list[str]:
        lines = super().describe()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        availability = []
        for name in self.config.backend_preference:
            backend = BACKEND_CLASSES[name]()
            why = backend.unavailable() or backend.cannot_run(ModelNeeds(), RunNeeds(device_type=device,
                                                                                     dtype=torch.bfloat16))  # fmt: skip
            availability.append(f"{name}: {why or 'can run'}")
        lines.append(
            f"attention: {self.config.attention_backend} (chosen per model when it is patched; on this machine, for "
            f"a bf16 model on {device}: {'; '.join(availability)})"
        )
        if self.config.flatten_batches:
            lines.append(
                "data: the collate_fn of every DataLoader given to Accelerator.prepare (and of a trainer's training "
                "DataLoader) flattens padded batches into one row: position_ids restart per example, each example's "
                "first label is ignored"
                + (
                    f"; the row is rounded up to a multiple of {self.config.bucket} tokens by one filler example "
                    "(pad_to_multiple_of: never attended to, never scored)"
                    if self.config.bucket > 1
                    else " (pad_to_multiple_of: off, the row keeps its length)"
                )
            )
        else:
            lines.append("data: batches are left as the collator builds them (flatten_batches: false)")
        return lines

    def describe_run(self, context: RunContext) -> list[str]:
        """Under DeepSpeed: the plugin has no parameters; offload changes nothing for it."""
        from fms_acceleration_accelerate.deepspeed_offload import describe_offload

        return describe_offload(
            context,
            "the attention dispatch and the collator own no parameters: nothing changes for them (the model's "
            "weights are fetched back whenever ZeRO-3 gathers them)",
        )


__all__ = ["FlatteningCollator", "PaddingFreePlugin"]
