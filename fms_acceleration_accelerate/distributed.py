"""The prepare-time contract between plugins and the framework: FSDP units, ignored modules, mixed precision.

This module knows nothing about Accelerate's internals (that is ``accelerate_integration``); it works on plain
``torch.nn.Module`` trees and torch's FSDP APIs, so it can be tested with ``torchrun`` and gloo on CPU.

Flow inside ``Accelerator.prepare`` (driven by ``accelerate_integration``)::

    context = framework.run_context                        # RunContext: FSDP1/2, dtype, world size (built once)
    parts = [plugin.prepare_contribution(model, context)]  # each active plugin, in run order; None = nothing
    merged = merge_contributions(parts)                    # conflicts -> AccelerationConfigError
    plan = plan_fsdp_units(model, merged, fsdp_version)    # which modules become FSDP units
    FSDP1: fsdp1_auto_wrap_policy(plan) -> fsdp_plugin.auto_wrap_policy (+ ignored modules, mixed precision)
    FSDP2: apply_fsdp2_plan(model, plan, merged, kwargs)   # our own fully_shard on the units, bottom-up;
           Accelerate then shards embeddings / tail / root and leaves our units alone
    Accelerate's own prepare
    plugin.after_prepare(wrapped_model, context)           # each active plugin, in run order

How the unit plan is chosen
---------------------------
* **Decoder layers** (classes named in ``model._no_split_modules``) and every module a plugin lists in
  ``wrap_units`` are units.
* **Fused scopes.** A plugin whose kernel replaces the forward of a module and reads its sub-modules' weights
  directly (a fused LoRA kernel reads ``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight`` ...
  without calling those modules) lists that module in ``fused_scopes``. No unit is ever created strictly
  *inside* a fused scope, so every weight the kernel reads belongs to the unit that encloses the scope (the
  decoder layer), and that unit's pre-forward all-gather (FSDP1 flat-parameter unshard, FSDP2 group unshard)
  has gathered it before the fused forward runs; its post-backward reduce-scatters the LoRA gradients the
  kernel produced. No hand-made all-reduce of adapters is involved.
* **FSDP1 only: frozen and trainable parameters are never mixed in one flat parameter** (a mixed flat
  parameter needs ``use_orig_params=True`` and allocates gradient storage for its frozen part). After the
  units above are chosen, every unit whose own parameters are mixed is split: the largest callable
  sub-modules whose parameters are all trainable (LoRA ``lora_A``/``lora_B`` linears, ``modules_to_save``
  copies) become units of their own, so the decoder-layer unit keeps only frozen weights. Inside a fused scope
  this split is impossible; the plan then records the mixed unit, and FSDP1 needs ``use_orig_params: true``
  (checked, with the fix in the error).
* **FSDP2** shards each parameter separately, so frozen and trainable parameters in one group cost nothing;
  LoRA adapters stay inside their decoder layer's group (one all-gather per layer instead of one per
  adapter), which is also what fused kernels need.

Optimizers
----------
``Accelerator.prepare(model, optimizer, ...)`` prepares the model before the optimizer and re-points the
optimizer's parameters at the wrapped/sharded ones (FSDP2: by name, including the units we shard ourselves:
``apply_fsdp2_plan`` returns the old->new parameter map and the integration swaps the optimizer's entries
before Accelerate sees them). Pass the model and its optimizer to the *same* ``prepare`` call. An optimizer
created from the model but prepared in a *later* call is not re-pointed (Accelerate's own rule for FSDP; under
FSDP2 Accelerate refuses a model without its optimizer). Parameters added by ``augmentation`` (LoRA) must exist
before the optimizer is created.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .errors import AccelerationConfigError

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from .framework import AccelerationFramework

ModuleSelector = type | str | Callable[[str, nn.Module], bool]
"""Selects modules: a class (``isinstance``), a class *name* (``type(m).__name__``, as in
``transformer_cls_names_to_wrap``), or a predicate ``(qualified_name, module) -> bool``."""

ParamSelector = Callable[[str, nn.Parameter], bool]
"""Selects parameters: a predicate ``(qualified_name, parameter) -> bool``."""

FullyShardCustomizer = Callable[[str, nn.Module, dict], dict | None]
"""FSDP2 hook: ``(unit_name, module, default_fully_shard_kwargs) -> kwargs | None``. Return the keyword
arguments to use for ``fully_shard(module, **kwargs)`` of a unit this plugin cares about (e.g. a different
``mp_policy`` or ``shard_placement_fn`` for quantized weights), or ``None`` to leave the unit alone."""

_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


# --------------------------------------------------------------------------------------------------------
# Context and contribution


RunSource = Literal["accelerator", "launcher", "training_arguments", "default"]
"""Where a :class:`RunContext` was read from: the ``Accelerator`` (or, before this framework's exists, one already
created in the process), the variables ``accelerate launch`` exports, a trainer's training arguments, or nothing
(one process, no FSDP: the defaults)."""

_MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")


@dataclass(frozen=True)
class FsdpSettings:
    """The FSDP settings of the run that plugins may need (``None``: not known where the context was built).

    Attributes:
        use_orig_params: FSDP1 ``use_orig_params`` (frozen and trainable parameters may share a flat parameter).
        cpu_ram_efficient_loading: Accelerate's ``fsdp_cpu_ram_efficient_loading`` (rank 0 loads, meta elsewhere).
        activation_checkpointing: Accelerate's ``fsdp_activation_checkpointing``.
        offload_params: parameters offloaded to the CPU.
    """

    use_orig_params: bool | None = None
    cpu_ram_efficient_loading: bool | None = None
    activation_checkpointing: bool | None = None
    offload_params: bool | None = None


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The DeepSpeed settings of the run that plugins may need (``None``: not known where the context was built).

    Attributes:
        offload_param: ZeRO-3 parameter offload device: ``"none"``, ``"cpu"`` or ``"nvme"``.
        offload_optimizer: optimizer-state offload device: ``"none"``, ``"cpu"`` or ``"nvme"``.
        zero3_init: whether models are created under ``deepspeed.zero.Init`` (partitioned while loading).
        config_file: the DeepSpeed JSON config file, when the settings came from one.
        force_cpu_optimizer: the DeepSpeed config's ``zero_force_ds_cpu_optimizer`` (``None``: not set, which
            DeepSpeed and Accelerate take as true): with ``offload_optimizer``, Accelerate then replaces a torch
            optimizer by ``DeepSpeedCPUAdam``; false keeps the script's optimizer.
    """

    offload_param: str | None = None
    offload_optimizer: str | None = None
    zero3_init: bool | None = None
    config_file: str | None = None
    force_cpu_optimizer: bool | None = None

    def describe(self) -> str:
        """E.g. ``offload: params cpu, optimizer cpu`` (empty when nothing is offloaded or nothing is known)."""
        parts = [
            f"{what} {device}"
            for what, device in (("params", self.offload_param), ("optimizer", self.offload_optimizer))
            if device not in (None, "none")
        ]
        return f"offload: {', '.join(parts)}" if parts else ""


@dataclass(frozen=True)
class RunContext:
    """How the run is wrapped: the one description of the run's shape every hook that needs it is handed.

    Built by the framework's Accelerate side, never by a plugin: from the ``Accelerator``
    (:func:`~fms_acceleration_accelerate.accelerate_integration.build_context`; once, when it is created, and
    again only if its settings change before ``prepare``, as when a trainer adjusts its FSDP plugin) or, before one
    exists (a model loaded under ``accelerate launch``, the framework API), from the launcher's environment and the
    training arguments (:mod:`~fms_acceleration_accelerate.launch_environment`). The prepare-time hooks
    (``check_run_settings``, ``check_prepared_model``, ``prepare_contribution``, ``after_prepare``) get it as
    their ``context`` argument; the hooks whose signature the original framework fixed (``model_loader``,
    ``augmentation``, ``get_callbacks_and_ready_for_train``) read it from ``plugin.run_context``, which the
    framework sets before they run. Plugins never read Accelerate's state or the environment themselves.

    Attributes:
        distributed_type: Accelerate's ``DistributedType`` value as a string (``"NO"``, ``"MULTI_GPU"``,
            ``"MULTI_CPU"``, ``"FSDP"``, ``"DEEPSPEED"``, ...).
        fsdp_version: 1 or 2 under FSDP, else ``None``.
        device: the process's device.
        mixed_precision: ``"no"``, ``"fp16"``, ``"bf16"`` or ``"fp8"``.
        world_size: number of processes.
        framework: the :class:`~fms_acceleration_accelerate.framework.AccelerationFramework` running the hooks.
        accelerator: the ``accelerate.Accelerator`` (``None`` when none exists yet or the hooks are driven without
            one, e.g. in tests or a hand-written ``fully_shard`` loop).
        fsdp: the FSDP settings plugins may need (all ``None`` when not FSDP or not known).
        ep_size: expert-parallel degree (processes that share one set of experts' shards); 1: none.
        zero_stage: the DeepSpeed ZeRO stage under DeepSpeed when known, else ``None``.
        deepspeed: the DeepSpeed settings plugins may need (all ``None`` when not DeepSpeed or not known). Under
            DeepSpeed, ``mixed_precision`` is DeepSpeed's (``"bf16"`` when its ``bf16.enabled`` is on, ...).
        client: what drives the run, when known: ``"trl.SFTTrainer"`` (any trainer class, as
            ``<package>.<class>``), ``"transformers.Trainer"``, ``"accelerate"`` (a script's own ``Accelerator``),
            ``"framework-api"`` (a script calling the framework's hooks itself); ``None``: not known.
        source: where the context was read from (see :data:`RunSource`).
    """

    distributed_type: str = "NO"
    fsdp_version: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mixed_precision: str = "no"
    world_size: int = 1
    framework: AccelerationFramework | None = field(default=None, compare=False, repr=False)
    accelerator: Accelerator | None = field(default=None, compare=False, repr=False)
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)
    ep_size: int = 1
    zero_stage: int | None = None
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    client: str | None = None
    source: RunSource = "default"

    def __post_init__(self) -> None:
        if isinstance(self.device, str):
            object.__setattr__(self, "device", torch.device(self.device))
        if not isinstance(self.device, torch.device):
            raise TypeError(f"RunContext.device must be a torch.device, got {self.device!r}")
        if self.fsdp_version not in (None, 1, 2):
            raise ValueError(f"RunContext.fsdp_version must be 1, 2 or None, got {self.fsdp_version!r}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(
                f"RunContext.mixed_precision must be one of {', '.join(_MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        for name in ("world_size", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RunContext.{name} must be a positive int, got {value!r}")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"RunContext.zero_stage must be 0 to 3 or None, got {self.zero_stage!r}")
        if not isinstance(self.fsdp, FsdpSettings):
            raise TypeError(f"RunContext.fsdp must be an FsdpSettings, got {type(self.fsdp).__name__}")
        if not isinstance(self.deepspeed, DeepSpeedSettings):
            raise TypeError(f"RunContext.deepspeed must be a DeepSpeedSettings, got {type(self.deepspeed).__name__}")

    @property
    def is_fsdp(self) -> bool:
        return self.fsdp_version is not None

    @property
    def is_deepspeed(self) -> bool:
        return self.distributed_type == "DEEPSPEED"

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast / FSDP compute dtype implied by ``mixed_precision`` (``None`` for ``"no"``)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}.get(self.mixed_precision)

    def describe(self) -> str:
        """One line for logs, e.g. ``FSDP2, bf16, 4 processes on cuda:0 (from the Accelerator; client accelerate)``."""
        if self.is_fsdp:
            wrap = f"FSDP{self.fsdp_version}"
        elif self.is_deepspeed:
            wrap = "DeepSpeed" + (f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else "")
            if self.deepspeed.describe():
                wrap += f" ({self.deepspeed.describe()})"
        else:
            wrap = self.distributed_type
        parts = [wrap, self.mixed_precision, f"{self.world_size} process{'es' if self.world_size != 1 else ''}"]
        if self.ep_size > 1:
            parts.append(f"EP {self.ep_size}")
        origin = {
            "accelerator": "the Accelerator",
            "launcher": "the launcher's environment",
            "training_arguments": "the training arguments",
        }.get(self.source, "defaults: nothing told")
        client = f"; client {self.client}" if self.client else ""
        return f"{', '.join(parts)} on {self.device} (from {origin}{client})"


PrepareContext = RunContext
"""The former name of :class:`RunContext` (plugins and tests written against it keep working)."""


@dataclass(frozen=True)
class PrepareContribution:
    """What one plugin needs from the wrapping step. Every field is optional; empty means "no opinion".

    Attributes:
        wrap_units: modules that must be FSDP units of their own (e.g. quantized base layers whose storage is
            sharded in a special way).
        fused_scopes: modules whose forward a fused kernel replaces and which read their sub-modules' weights
            directly; no unit is created strictly inside them (see the module docstring).
        ignored_modules: modules FSDP must not manage at all (their parameters stay whole and local on
            every rank; the plugin is then responsible for them).
        keep_dtype_params: parameters whose storage dtype must never be cast (packed quantized weights held
            in a float dtype). FSDP1: their dtype must equal the mixed-precision ``param_dtype`` (checked).
            FSDP2: units holding them are sharded with ``param_dtype=None`` (no cast on all-gather).
        trainable_dtype: dtype of trainable parameters before wrapping (e.g. LoRA in fp32 as master weights
            while the base runs in bf16). ``None``: FSDP2 upcasts trainable parameters to fp32 under mixed
            precision, as Accelerate does; FSDP1 leaves them.
        param_dtype: dtype parameters are gathered / computed in (FSDP mixed-precision ``param_dtype``).
        reduce_dtype: dtype of gradient reductions (e.g. ``torch.float32`` for stable LoRA updates).
        customize_fully_shard: FSDP2 per-unit ``fully_shard`` keyword customisation, see
            :data:`FullyShardCustomizer`.
        after_unit_sharded: FSDP2: called as ``(unit_name, module)`` right after each unit of the framework's
            plan is sharded (``""`` is the root), e.g. to free what the unit's shards made redundant before
            the next unit is sharded (the peak memory of preparing is then one unit's worth, not the model's).
            Not called for units sharded by anyone else (Accelerate's root); use ``after_prepare`` for those.
        refuse_deepspeed_reason: why this plugin cannot run under DeepSpeed (``None``: it can; its
            ``prepare_contribution`` has done its work before DeepSpeed wraps the model).
        notes: human-readable lines for logs (what the plugin asked for and why).

    Under DeepSpeed (which never calls Accelerate's ``prepare_model``: the framework acts just before Accelerate
    builds the engine, see :func:`plan_deepspeed`) the fields mean:

    * ``fused_scopes``: under ZeRO-3 every parameter inside a selected module becomes one of its DeepSpeed
      *external parameters*: DeepSpeed gathers them when the module's forward starts and again for its backward,
      so a fused forward that reads its sub-modules' weights directly sees whole tensors. ZeRO-0/1/2 keep
      parameters whole on every rank: nothing to do.
    * ``keep_dtype_params``: DeepSpeed casts every floating parameter to its compute dtype when its bf16 / fp16
      mode is on; such parameters must already be in that dtype (checked before the engine exists).
    * ``ignored_modules``: refused under ZeRO-3 (DeepSpeed partitions every parameter); nothing to do below.
    * ``trainable_dtype``: float32 is what DeepSpeed's optimizer keeps anyway (fp32 master weights); other
      requests, and ``param_dtype`` / ``reduce_dtype`` other than DeepSpeed's compute dtype, are refused.
    * ``wrap_units``, ``customize_fully_shard``, ``after_unit_sharded``: FSDP only, not used.
    """

    wrap_units: tuple[ModuleSelector, ...] = ()
    fused_scopes: tuple[ModuleSelector, ...] = ()
    ignored_modules: tuple[ModuleSelector, ...] = ()
    keep_dtype_params: tuple[ParamSelector, ...] = ()
    trainable_dtype: torch.dtype | None = None
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    customize_fully_shard: FullyShardCustomizer | None = None
    after_unit_sharded: Callable[[str, nn.Module], None] | None = None
    refuse_deepspeed_reason: str | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("wrap_units", "fused_scopes", "ignored_modules", "keep_dtype_params", "notes"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise TypeError(f"PrepareContribution.{name} must be a tuple, got {type(value).__name__}")
        for name in ("wrap_units", "fused_scopes", "ignored_modules"):
            for selector in getattr(self, name):
                if not (isinstance(selector, (type, str)) or callable(selector)):
                    raise TypeError(f"PrepareContribution.{name}: {selector!r} is not a class, class name or predicate")
        for name in ("trainable_dtype", "param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.dtype):
                raise TypeError(f"PrepareContribution.{name} must be a torch.dtype or None, got {value!r}")


@dataclass(frozen=True)
class MergedContribution:
    """The contributions of all active plugins, combined by :func:`merge_contributions`.

    Selector fields hold ``(plugin_name, selector)`` pairs so messages can name who asked for what.
    """

    wrap_units: tuple[tuple[str, ModuleSelector], ...] = ()
    fused_scopes: tuple[tuple[str, ModuleSelector], ...] = ()
    ignored_modules: tuple[tuple[str, ModuleSelector], ...] = ()
    keep_dtype_params: tuple[tuple[str, ParamSelector], ...] = ()
    trainable_dtype: torch.dtype | None = None
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    customizers: tuple[tuple[str, FullyShardCustomizer], ...] = ()
    unit_sharded_callbacks: tuple[tuple[str, Callable[[str, nn.Module], None]], ...] = ()
    refuse_deepspeed: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    contributors: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when no plugin asked for anything that changes the wrapping."""
        return not (
            self.wrap_units
            or self.fused_scopes
            or self.ignored_modules
            or self.keep_dtype_params
            or self.trainable_dtype
            or self.param_dtype
            or self.reduce_dtype
            or self.customizers
            or self.unit_sharded_callbacks
        )

    def select_ignored(self, model: nn.Module) -> list[nn.Module]:
        """The modules of ``model`` selected by any ``ignored_modules`` selector (outermost only)."""
        return _outermost(_select(model, [s for _, s in self.ignored_modules]), model)

    def keeps_dtype(self, name: str, param: nn.Parameter) -> bool:
        return any(sel(name, param) for _, sel in self.keep_dtype_params)


def merge_contributions(contributions: Sequence[tuple[str, PrepareContribution | None]]) -> MergedContribution:
    """Combine ``(plugin_name, contribution)`` pairs (in run order) into one :class:`MergedContribution`.

    Selectors are unioned. Dtype requests must agree: two plugins asking for different ``param_dtype``,
    ``reduce_dtype`` or ``trainable_dtype`` is a conflict.

    Raises:
        AccelerationConfigError: conflicting dtype requests (names both plugins and the fix).
        TypeError: a plugin returned something other than a ``PrepareContribution`` or ``None``.
    """
    fields: dict[str, list[Any]] = {
        k: []
        for k in (
            "wrap_units",
            "fused_scopes",
            "ignored_modules",
            "keep_dtype_params",
            "customizers",
            "unit_sharded_callbacks",
            "refuse_deepspeed",
            "notes",
            "contributors",
        )
    }
    dtypes: dict[str, tuple[str, torch.dtype] | None] = {
        "trainable_dtype": None,
        "param_dtype": None,
        "reduce_dtype": None,
    }
    for name, part in contributions:
        if part is None:
            continue
        if not isinstance(part, PrepareContribution):
            raise TypeError(
                f"plugin {name!r}: prepare_contribution must return a PrepareContribution or None, "
                f"got {type(part).__name__}"
            )
        fields["contributors"].append(name)
        for key in ("wrap_units", "fused_scopes", "ignored_modules", "keep_dtype_params"):
            fields[key].extend((name, s) for s in getattr(part, key))
        if part.customize_fully_shard is not None:
            fields["customizers"].append((name, part.customize_fully_shard))
        if part.after_unit_sharded is not None:
            fields["unit_sharded_callbacks"].append((name, part.after_unit_sharded))
        if part.refuse_deepspeed_reason:
            fields["refuse_deepspeed"].append((name, part.refuse_deepspeed_reason))
        fields["notes"].extend(f"{name}: {note}" for note in part.notes)
        for key in dtypes:
            wanted = getattr(part, key)
            if wanted is None:
                continue
            previous = dtypes[key]
            if previous is not None and previous[1] != wanted:
                raise AccelerationConfigError(
                    f"plugins {previous[0]!r} and {name!r} need different FSDP {key}: {previous[1]} vs {wanted}",
                    fix="configure the two plugins for the same dtype (see their sections' dtype options) "
                    "or deactivate one of them",
                )
            dtypes[key] = (name, wanted)
    return MergedContribution(
        **{k: tuple(v) for k, v in fields.items()},
        **{k: (v[1] if v is not None else None) for k, v in dtypes.items()},
    )


def collect_contributions(plugins: Iterable[Any], model: nn.Module, context: RunContext) -> MergedContribution:
    """Call ``prepare_contribution(model, context)`` on each plugin (in the given order) and merge."""
    return merge_contributions([(p.plugin_name(), p.prepare_contribution(model, context)) for p in plugins])


def check_deepspeed(merged: MergedContribution) -> None:
    """Raise :class:`AccelerationConfigError` if any contributing plugin refuses DeepSpeed."""
    if merged.refuse_deepspeed:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in merged.refuse_deepspeed)
        raise AccelerationConfigError(
            f"these acceleration plugins cannot run under DeepSpeed: {reasons}",
            path="acceleration",
            fix="use FSDP (distributed_type: FSDP) in the Accelerate config, or remove these plugins' sections",
        )


# --------------------------------------------------------------------------------------------------------
# DeepSpeed

_EXTERNAL_MARK = "_fms_acceleration_zero3_external"
"""Attribute of a fused scope listing the parameters registered as its ZeRO-3 external parameters."""


@dataclass(frozen=True)
class GatheredScope:
    """A module whose forward reads parameters of its sub-modules directly (a fused scope), under ZeRO-3.

    Attributes:
        name: qualified name in the model.
        module: the module.
        plugin: the plugin that declared it.
        parameters: the parameters inside it that are not its own (``module.parameters(recurse=False)``), which
            become its ZeRO-3 external parameters.
    """

    name: str
    module: nn.Module
    plugin: str
    parameters: tuple[nn.Parameter, ...]


@dataclass(frozen=True)
class DeepSpeedPlan:
    """What the framework does to a model before DeepSpeed builds its engine (see :func:`plan_deepspeed`).

    Attributes:
        zero_stage: the ZeRO stage (``None`` when not known).
        gathered_scopes: under ZeRO-3, the fused scopes (outermost only, in model order) whose inner parameters
            DeepSpeed must gather at the scope's own forward and backward.
        notes: lines for logs.
    """

    zero_stage: int | None
    gathered_scopes: tuple[GatheredScope, ...] = ()
    notes: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        stage = f"ZeRO-{self.zero_stage}" if self.zero_stage is not None else "DeepSpeed"
        if not self.gathered_scopes:
            return [f"{stage}: nothing to gather for fused kernels", *self.notes]
        classes = sorted({type(s.module).__name__ for s in self.gathered_scopes})
        count = sum(len(s.parameters) for s in self.gathered_scopes)
        return [
            f"{stage}: {len(self.gathered_scopes)} fused scopes ({', '.join(classes)}) gather their {count} inner "
            "parameters at their own forward and backward (ZeRO-3 external parameters)",
            *self.notes,
        ]


def plan_deepspeed(model: nn.Module, merged: MergedContribution, context: RunContext) -> DeepSpeedPlan:
    """Check the plugins' contributions against DeepSpeed and plan what ZeRO-3 must gather for fused kernels.

    Refusals, in this order: a plugin that refuses DeepSpeed (:func:`check_deepspeed`); ``ignored_modules`` under
    ZeRO-3; keep-dtype parameters DeepSpeed's bf16 / fp16 mode would cast; dtype requests DeepSpeed does not
    follow. See :class:`PrepareContribution` for what each field means under DeepSpeed.

    Why external parameters rather than DeepSpeed's leaf modules: a leaf module reduces its gradients in a full
    backward hook, which PyTorch fires as soon as the gradient of the module's *output* is known when none of its
    inputs requires grad (the first decoder layer's attention under LoRA, fed by frozen embeddings); the adapters'
    gradients computed afterwards then meet partitioned parameters. External parameters keep DeepSpeed's
    per-parameter gradient hooks.

    Raises:
        AccelerationConfigError: one of the refusals above (names the plugin, the parameter and the fix).
    """
    check_deepspeed(merged)
    stage = context.zero_stage
    cast = context.compute_dtype  # what DeepSpeed's bf16 / fp16 mode casts every floating parameter to
    compute = cast or torch.float32
    if stage == 3 and merged.ignored_modules:
        who = sorted({name for name, _ in merged.ignored_modules})
        raise AccelerationConfigError(
            f"plugins {', '.join(who)} ask for modules to be left whole on every rank, which DeepSpeed ZeRO-3 "
            "cannot do (it partitions every parameter)",
            path="acceleration",
            fix="use ZeRO-2 (zero_stage: 2) or FSDP, or remove these plugins' sections",
        )
    if cast is not None and merged.keep_dtype_params:
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != cast and merged.keeps_dtype(name, param):
                who = next(p for p, sel in merged.keep_dtype_params if sel(name, param))
                raise AccelerationConfigError(
                    f"DeepSpeed's {context.mixed_precision} mode casts every floating parameter to {_dtype_name(cast)} "
                    f"when it builds its engine, but {name} holds packed data in {_dtype_name(param.dtype)} (plugin "
                    f"{who}), which the cast would corrupt",
                    path="acceleration",
                    fix=f"load the model in {_dtype_name(cast)} (torch_dtype / dtype), so the packed storage is "
                    f"{_dtype_name(cast)} too, or turn DeepSpeed's {context.mixed_precision} mode off",
                )
    requests = (
        ("trainable_dtype", merged.trainable_dtype, {torch.float32, compute}),
        ("param_dtype", merged.param_dtype, {compute}),
        ("reduce_dtype", merged.reduce_dtype, {compute}),
    )
    for key, wanted, allowed in requests:
        if wanted is not None and wanted not in allowed:
            raise AccelerationConfigError(
                f"plugins {', '.join(merged.contributors)} ask for {key} {_dtype_name(wanted)}, but under DeepSpeed "
                f"the dtypes are DeepSpeed's: compute in {_dtype_name(compute)} (its bf16 / fp16 setting), fp32 "
                "master weights in its optimizer",
                path="acceleration",
                fix="set DeepSpeed's mixed precision to match (mixed_precision, or bf16 / fp16 in the DeepSpeed "
                "config), or use FSDP for this plugin configuration",
            )
    notes: list[str] = []
    scopes: list[GatheredScope] = []
    if merged.fused_scopes and stage == 3:
        owners: dict[int, str] = {}
        for plugin, selector in merged.fused_scopes:
            for _, module in _select(model, [selector]):
                owners.setdefault(id(module), plugin)
        selected = [(n, m) for n, m in model.named_modules() if id(m) in owners]
        for module in _outermost(selected, model):
            name = next(n for n, m in selected if m is module)
            own = {id(p) for p in module.parameters(recurse=False)}
            inner = tuple(p for p in module.parameters() if id(p) not in own)
            if inner:
                scopes.append(GatheredScope(name, module, owners[id(module)], inner))
    elif merged.fused_scopes:
        notes.append(
            f"ZeRO-{stage if stage is not None else '?'}: parameters stay whole on every rank, so the fused scopes "
            "of plugins " + ", ".join(sorted({p for p, _ in merged.fused_scopes})) + " need nothing"
        )
    return DeepSpeedPlan(zero_stage=stage, gathered_scopes=tuple(scopes), notes=tuple(notes))


def register_zero3_external_parameters(plan: DeepSpeedPlan, recorder: Any) -> int:
    """Register the inner parameters of each of the plan's fused scopes as DeepSpeed ZeRO-3 *external parameters*
    of the scope (``deepspeed.zero.register_external_parameter``): DeepSpeed then gathers them when the scope's
    forward starts, keeps them for its backward and partitions them again afterwards, as it does for the scope's own
    parameters. Recorded in ``recorder`` (a :class:`~fms_acceleration_accelerate.patching.PatchRecorder`; ``revert``
    unregisters them). Must run before DeepSpeed builds its engine. Returns how many parameters were registered.
    """
    if not plan.gathered_scopes:
        return 0
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter, unregister_external_parameter

    count = 0
    for scope in plan.gathered_scopes:
        module, params = scope.module, scope.parameters

        def undo(module: nn.Module = module, params: tuple[nn.Parameter, ...] = params) -> None:
            for param in params:
                unregister_external_parameter(module, param)
            delattr(module, _EXTERNAL_MARK)

        recorder.patch(
            module,
            _EXTERNAL_MARK,
            params,
            plugin=scope.plugin,
            target=f"{scope.name or '<root>'} (ZeRO-3 external parameters)",
            description="its inner parameters gathered at its forward/backward (DeepSpeed ZeRO-3)",
            undo=undo,
            create=True,
        )
        for param in params:
            register_external_parameter(module, param)
        count += len(params)
    return count


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------------------
# Module selection helpers


def _matches(selector: ModuleSelector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    if isinstance(selector, str):
        return type(module).__name__ == selector
    return bool(selector(name, module))


def _select(model: nn.Module, selectors: Sequence[ModuleSelector]) -> list[tuple[str, nn.Module]]:
    if not selectors:
        return []
    return [(n, m) for n, m in model.named_modules() if any(_matches(s, n, m) for s in selectors)]


def _outermost(selected: list[tuple[str, nn.Module]], model: nn.Module) -> list[nn.Module]:
    names = [n for n, _ in selected]
    return [m for n, m in selected if not any(_is_strictly_inside(n, other) for other in names)]


def _is_strictly_inside(name: str, ancestor: str) -> bool:
    """True when the module ``name`` lies strictly below ``ancestor`` (qualified names; root is ``""``)."""
    if name == ancestor:
        return False
    return ancestor == "" or name.startswith(ancestor + ".")


def decoder_layer_class_names(model: nn.Module) -> tuple[str, ...]:
    """Class names in the first non-empty ``_no_split_modules`` found in ``model`` (PEFT wrappers included)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return tuple(names)
    return ()


# --------------------------------------------------------------------------------------------------------
# Unit plan


@dataclass(frozen=True)
class FsdpUnit:
    """One planned FSDP unit.

    Attributes:
        name: qualified module name (``""`` for the root).
        reason: why it is a unit (``"root"``, ``"decoder layer"``, ``"plugin <name>"``, ``"trainable split"``).
        trainable: qualified names of the trainable parameters this unit owns (not owned by a nested unit).
        frozen: qualified names of the frozen parameters this unit owns.
    """

    name: str
    reason: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]

    @property
    def kind(self) -> str:
        """``"trainable"``, ``"frozen"``, ``"mixed"`` or ``"empty"``."""
        if self.trainable and self.frozen:
            return "mixed"
        if self.trainable:
            return "trainable"
        return "frozen" if self.frozen else "empty"


@dataclass(frozen=True)
class FsdpUnitPlan:
    """Which modules become FSDP units, in bottom-up order (children before parents, root last).

    Attributes:
        fsdp_version: 1 or 2.
        units: the planned units (root included, last).
        ignored: qualified names of ignored modules.
    """

    fsdp_version: int
    units: tuple[FsdpUnit, ...]
    ignored: tuple[str, ...] = ()

    @property
    def unit_names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units)

    @property
    def mixed_units(self) -> tuple[FsdpUnit, ...]:
        return tuple(u for u in self.units if u.kind == "mixed")

    def unit(self, name: str) -> FsdpUnit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def describe(self) -> list[str]:
        """One line per unit: name, reason, kind and parameter counts."""
        return [
            f"{u.name or '<root>'}: {u.kind} ({u.reason}; {len(u.trainable)} trainable, {len(u.frozen)} frozen)"
            for u in self.units
        ]


def plan_fsdp_units(model: nn.Module, merged: MergedContribution, fsdp_version: int) -> FsdpUnitPlan:
    """Choose the FSDP units of ``model`` (see the module docstring for the rules).

    Args:
        model: the model as it will be passed to ``Accelerator.prepare`` (LoRA already added).
        merged: the merged plugin contributions.
        fsdp_version: 1 or 2.

    Returns:
        The :class:`FsdpUnitPlan`, units bottom-up, root last.
    """
    if fsdp_version not in (1, 2):
        raise ValueError(f"fsdp_version must be 1 or 2, got {fsdp_version!r}")
    modules = dict(model.named_modules())
    ignored = [n for n, m in modules.items() if any(m is x for x in merged.select_ignored(model))]
    scopes = [n for n, _ in _select(model, [s for _, s in merged.fused_scopes])]

    def allowed(name: str) -> bool:
        if any(name == i or _is_strictly_inside(name, i) for i in ignored):
            return False
        return not any(_is_strictly_inside(name, s) for s in scopes)

    reasons: dict[str, str] = {}
    layer_classes = decoder_layer_class_names(model)
    for name, module in modules.items():
        if name and type(module).__name__ in layer_classes and allowed(name):
            reasons[name] = "decoder layer"
    for plugin, selector in merged.wrap_units:
        for name, module in modules.items():
            if name and allowed(name) and _matches(selector, name, module):
                reasons.setdefault(name, f"plugin {plugin}")
    reasons[""] = "root"

    if fsdp_version == 1:
        _split_trainable(model, modules, reasons, ignored, scopes)

    units = _build_units(model, modules, reasons, ignored)
    return FsdpUnitPlan(fsdp_version=fsdp_version, units=units, ignored=tuple(ignored))


def _owner_of(name: str, unit_names: Iterable[str]) -> str:
    """The innermost unit containing module ``name`` (the root ``""`` contains everything)."""
    best = ""
    for u in unit_names:
        if (u == name or _is_strictly_inside(name, u)) and len(u) >= len(best):
            best = u
    return best


def _owned_params(
    model: nn.Module, modules: Mapping[str, nn.Module], unit_names: Sequence[str], ignored: Sequence[str]
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    owned: dict[str, list[tuple[str, nn.Parameter]]] = {u: [] for u in unit_names}
    seen: set[int] = set()
    for mod_name, module in modules.items():
        if any(mod_name == i or _is_strictly_inside(mod_name, i) for i in ignored):
            continue
        owner = _owner_of(mod_name, unit_names)
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights: owned where first seen
                continue
            seen.add(id(param))
            owned[owner].append((f"{mod_name}.{pname}" if mod_name else pname, param))
    return owned


def _split_trainable(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    reasons: dict[str, str],
    ignored: Sequence[str],
    scopes: Sequence[str],
) -> None:
    """FSDP1: make the largest callable all-trainable sub-modules of mixed units units of their own."""
    owned = _owned_params(model, modules, list(reasons), ignored)
    for unit_name, params in owned.items():
        kinds = {p.requires_grad for _, p in params}
        if len(kinds) < 2:
            continue
        # candidates: modules owned by this unit, not inside a fused scope, not containers, whose whole
        # subtree (minus nested units/ignored) is trainable; keep the outermost ones.
        candidates = []
        for name, module in modules.items():
            if name == unit_name or _owner_of(name, reasons) != unit_name or isinstance(module, _CONTAINERS):
                continue
            if any(_is_strictly_inside(name, s) or name == s for s in scopes):
                continue
            if any(name == i or _is_strictly_inside(name, i) for i in ignored):
                continue
            sub = [p for n, p in module.named_parameters() if _owner_of(_module_of(name, n), reasons) == unit_name]
            if sub and all(p.requires_grad for p in sub):
                candidates.append(name)
        for name in candidates:
            if not any(_is_strictly_inside(name, other) for other in candidates):
                reasons[name] = "trainable split"


def _module_of(prefix: str, param_name: str) -> str:
    """Qualified module name of parameter ``param_name`` (relative to module ``prefix``)."""
    full = f"{prefix}.{param_name}" if prefix else param_name
    return full.rsplit(".", 1)[0] if "." in full else ""


def _build_units(
    model: nn.Module, modules: Mapping[str, nn.Module], reasons: Mapping[str, str], ignored: Sequence[str]
) -> tuple[FsdpUnit, ...]:
    names = list(reasons)
    owned = _owned_params(model, modules, names, ignored)
    order = {n: i for i, n in enumerate(modules)}
    # bottom-up: deeper first, then reverse module order; root last
    ordered = sorted(names, key=lambda n: (n == "", -n.count(".") if n else 0, -order[n]))
    return tuple(
        FsdpUnit(
            name=n,
            reason=reasons[n],
            trainable=tuple(pn for pn, p in owned[n] if p.requires_grad),
            frozen=tuple(pn for pn, p in owned[n] if not p.requires_grad),
        )
        for n in ordered
    )


# --------------------------------------------------------------------------------------------------------
# FSDP1


def fsdp1_auto_wrap_policy(model: nn.Module, plan: FsdpUnitPlan) -> Callable[..., bool]:
    """An FSDP1 ``auto_wrap_policy`` callable that wraps exactly the non-root units of ``plan``.

    Args:
        model: the model the plan was made for (the policy matches module *instances*).
        plan: an FSDP1 plan from :func:`plan_fsdp_units`.

    Returns:
        ``policy(module, recurse, nonwrapped_numel) -> bool`` as ``FullyShardedDataParallel`` expects.
    """
    if plan.fsdp_version != 1:
        raise ValueError("fsdp1_auto_wrap_policy needs a plan made with fsdp_version=1")
    targets = {id(model.get_submodule(u.name)) for u in plan.units if u.name}

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if recurse:
            return True
        return id(module) in targets

    policy.fms_acceleration_units = tuple(u.name for u in plan.units if u.name)  # type: ignore[attr-defined]
    return policy


def check_fsdp1_plan(plan: FsdpUnitPlan, *, use_orig_params: bool) -> None:
    """Raise :class:`AccelerationConfigError` when FSDP1 cannot run ``plan`` as configured."""
    mixed = plan.mixed_units
    if mixed and not use_orig_params:
        names = ", ".join(u.name or "<root>" for u in mixed[:4])
        raise AccelerationConfigError(
            f"FSDP1 units {names} hold both trainable and frozen parameters (a fused-kernel scope, or a module "
            "with both kinds of parameters), which FSDP1 flat parameters allow only with use_orig_params",
            fix="set 'fsdp_use_orig_params: true' under fsdp_config in the Accelerate config, or use fsdp_version: 2",
        )


def check_fsdp1_dtypes(
    model: nn.Module, plan: FsdpUnitPlan, merged: MergedContribution, *, mixed_precision: bool
) -> None:
    """Refuse FSDP1 unit plans whose flat parameters cannot hold their parameters' dtypes safely.

    Call with the parameters in their final pre-wrap dtypes (after any trainable upcast). Two cases:

    * FSDP1 flattens each unit's own parameters into one flat parameter, which has one dtype; fp32 LoRA
      adapters kept inside a decoder-layer unit (a fused-kernel scope) next to bf16 weights cannot be flattened.
    * Under mixed precision Accelerate upcasts every *trainable* FSDP1 flat parameter to fp32; a unit that
      also holds packed quantized storage (keep-dtype parameters) would get its storage bytes cast.

    Raises:
        AccelerationConfigError: naming the first offending unit, its parameters, and the fixes.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for unit in plan.units:
        where = unit.name or "<root>"
        by_dtype: dict[torch.dtype, str] = {}
        for name in (*unit.trainable, *unit.frozen):
            param = params.get(name)
            if param is not None:
                by_dtype.setdefault(param.dtype, name)
        if len(by_dtype) > 1:
            found = ", ".join(f"{n} ({str(d).replace('torch.', '')})" for d, n in by_dtype.items())
            raise AccelerationConfigError(
                f"FSDP1 unit {where} would hold parameters of {len(by_dtype)} dtypes ({found}), but an FSDP1 "
                "flat parameter has one dtype",
                fix="keep trainable parameters in the weights' dtype (bitsandbytes plugin: fp32_lora_params: false), "
                "or use fsdp_version: 2, which shards each parameter on its own",
            )
        packed = [n for n in unit.frozen if n in params and merged.keeps_dtype(n, params[n])]
        if mixed_precision and unit.trainable and packed:
            raise AccelerationConfigError(
                f"FSDP1 unit {where} holds trainable parameters ({unit.trainable[0]}, ...) and packed quantized "
                f"storage ({packed[0]}, ...); under mixed precision Accelerate upcasts trainable FSDP1 flat "
                "parameters to fp32, which would cast the packed bytes",
                fix="use fsdp_version: 2 (recommended for QLoRA), or mixed_precision: 'no' with the adapters in the "
                "storage dtype (fp32_lora_params: false), or fused_lora: false so the adapters get units of their own",
            )


def check_keep_dtype_fsdp1(model: nn.Module, merged: MergedContribution, param_dtype: torch.dtype | None) -> None:
    """FSDP1 casts every flat parameter to ``param_dtype``: quantized storage must already be that dtype."""
    if param_dtype is None:
        return
    for name, param in model.named_parameters():
        if merged.keeps_dtype(name, param) and param.dtype != param_dtype:
            raise AccelerationConfigError(
                f"FSDP1 would cast the packed quantized weight {name} ({param.dtype}) to {param_dtype}, corrupting it",
                fix=f"store quantized weights as {param_dtype} (bitsandbytes: bnb_4bit_quant_storage={param_dtype}), "
                "or use fsdp_version: 2",
            )


# --------------------------------------------------------------------------------------------------------
# FSDP2


def upcast_trainable(model: nn.Module, dtype: torch.dtype, merged: MergedContribution) -> list[str]:
    """Cast trainable floating parameters (except keep-dtype ones) to ``dtype`` in place; returns their names."""
    changed = []
    for name, param in model.named_parameters():
        if (
            param.requires_grad
            and param.is_floating_point()
            and param.dtype != dtype
            and not merged.keeps_dtype(name, param)
        ):
            param.data = param.data.to(dtype)
            changed.append(name)
    return changed


def apply_fsdp2_plan(
    model: nn.Module,
    plan: FsdpUnitPlan,
    merged: MergedContribution,
    fully_shard_kwargs: Mapping[str, Any],
    *,
    shard_root: bool = False,
) -> dict[nn.Parameter, nn.Parameter]:
    """Apply ``torch.distributed.fsdp.fully_shard`` to the plan's units, bottom-up.

    Units already sharded are skipped. Units owning keep-dtype parameters get a mixed-precision policy
    without ``param_dtype`` (no cast of packed storage); a plugin's ``customize_fully_shard`` may replace
    the keyword arguments of any unit (two plugins customising the same unit is an error). After each
    ``fully_shard``, every plugin's ``after_unit_sharded`` is called with the unit.

    Args:
        model: the module tree to shard in place (a process group must be initialised).
        plan: an FSDP2 plan from :func:`plan_fsdp_units`.
        merged: the merged contributions.
        fully_shard_kwargs: defaults for every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ``offload_policy``, ``ignored_params``).
        shard_root: also shard the root (leave ``False`` when Accelerate shards the root afterwards).

    Returns:
        ``{old_parameter: new_parameter}`` for every parameter that changed identity and is still referenced
        elsewhere (e.g. by an optimizer created before sharding, see :func:`switch_optimizer_params`). The
        old parameters are held only weakly, so a unit's unsharded tensors can be freed once it is sharded.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if plan.fsdp_version != 2:
        raise ValueError("apply_fsdp2_plan needs a plan made with fsdp_version=2")
    # weak references: a parameter that only the module held (a frozen base weight) is freed as soon as its unit
    # is sharded; one that an optimizer holds stays alive and is mapped below
    before = {n: weakref.ref(p) for n, p in model.named_parameters()}
    for unit in plan.units:
        if unit.name == "" and not shard_root:
            continue
        module = model.get_submodule(unit.name) if unit.name else model
        if isinstance(module, FSDPModule):
            continue
        kwargs = dict(fully_shard_kwargs)
        owned = [*unit.trainable, *unit.frozen]
        params = dict(model.named_parameters())
        keep = [n for n in owned if n in params and merged.keeps_dtype(n, params[n])]
        del params  # holds the unit's unsharded parameters
        if keep:
            policy = kwargs.get("mp_policy") or MixedPrecisionPolicy()
            kwargs["mp_policy"] = dataclasses.replace(policy, param_dtype=None, cast_forward_inputs=False)
        chosen_by = None
        for plugin, customize in merged.customizers:
            custom = customize(unit.name, module, dict(kwargs))
            if custom is None:
                continue
            if chosen_by is not None:
                raise AccelerationConfigError(
                    f"plugins {chosen_by!r} and {plugin!r} both customise the FSDP2 sharding of {unit.name or '<root>'}",
                    fix="deactivate one of the two plugins",
                )
            chosen_by, kwargs = plugin, dict(custom)
        move_unit_states(module, _fully_shard_device(kwargs))
        fully_shard(module, **kwargs)
        for _plugin, callback in merged.unit_sharded_callbacks:
            callback(unit.name, module)
    after = dict(model.named_parameters())
    old = {n: ref() for n, ref in before.items()}
    return {p: after[n] for n, p in old.items() if p is not None and n in after and after[n] is not p}


def _fully_shard_device(kwargs: Mapping[str, Any]) -> torch.device:
    """The device ``fully_shard`` puts a unit on: its mesh's device type, the current device of that type."""
    mesh = kwargs.get("mesh")
    device_type = mesh.device_type if mesh is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, getattr(torch, device_type).current_device())


def move_unit_states(module: nn.Module, device: torch.device) -> int:
    """Move the parameters and buffers of one FSDP2 unit that are not on ``device`` yet (a model staged in host
    memory) there, one unit at a time; sub-units already sharded are left alone. Returns how many parameters moved.

    ``fully_shard`` would move them too, but it swaps tensor-subclass parameters in place
    (``torch.utils.swap_tensors``), which refuses any parameter that a weak reference points to (as
    :func:`apply_fsdp2_plan` keeps to map optimizer parameters). This puts new parameter objects in place instead;
    the optimizer mapping goes by name. A parameter shared by two modules stays shared.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    moved: dict[int, nn.Parameter] = {}
    stack = [module]
    while stack:
        sub = stack.pop()
        for name, param in list(sub._parameters.items()):
            if param is None or isinstance(param, DTensor) or param.is_meta or param.device == device:
                continue
            if id(param) not in moved:
                with torch.no_grad():
                    data = param.to(device)
                new = data if isinstance(data, nn.Parameter) else nn.Parameter(data, requires_grad=param.requires_grad)
                if getattr(param, "module", None) is not None and getattr(new, "module", None) is None:
                    new.module = param.module  # bitsandbytes' Params4bit keeps its owner to restore quant_state
                moved[id(param)] = new
            sub._parameters[name] = moved[id(param)]
        for name, buf in list(sub._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                sub._buffers[name] = buf.to(device)
        stack.extend(child for child in sub.children() if not isinstance(child, FSDPModule))
    return len(moved)


def switch_optimizer_params(optimizer: torch.optim.Optimizer, mapping: Mapping[nn.Parameter, nn.Parameter]) -> int:
    """Re-point ``optimizer``'s parameter groups at new parameters (identity map); returns how many changed.

    The optimizer must have no state yet (created, not stepped), which holds before ``prepare``.
    """
    if not mapping:
        return 0
    if optimizer.state:
        raise AccelerationConfigError(
            "the optimizer already has state (it has stepped) and cannot follow the model's sharded parameters",
            fix="create the optimizer after augmentation and pass it to accelerator.prepare together with the model, "
            "before any optimizer.step()",
        )
    changed = 0
    for group in optimizer.param_groups:
        new = []
        for p in group["params"]:
            q = mapping.get(p, p)
            changed += q is not p
            new.append(q)
        group["params"] = new
    return changed


def fully_shard_kwargs_from_policy(
    *,
    mesh: Any = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool | int | None = True,
    offload_policy: Any = None,
    ignored_params: set[nn.Parameter] | None = None,
) -> dict[str, Any]:
    """Default ``fully_shard`` keyword arguments (a helper for code driving FSDP2 without Accelerate)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": offload_policy if offload_policy is not None else OffloadPolicy(),
    }
    if ignored_params:
        kwargs["ignored_params"] = set(ignored_params)
    return kwargs


def release_replaced_parameters(refs: Iterable[weakref.ref], model: nn.Module) -> tuple[int, int]:
    """Free the storage of pre-sharding parameters that sharding replaced but something outside still holds.

    ``fully_shard`` gives every parameter a new (sharded) object; the old one dies with its last reference. A
    list kept by the training script (``params = [p for p in model.parameters() if p.requires_grad]`` before
    building the optimizer) keeps the whole unsharded model alive on every GPU, e.g. 10 GiB of fp32 weights per
    GPU for a 2.8B-parameter full fine-tune. Accelerate's own ``cpu_ram_efficient_loading`` path avoids this by
    moving the model to ``meta`` first, which our pre-sharded path cannot use. The replaced parameters are
    stale (the model and the optimizer use the shards), so their data is swapped for an empty tensor of the
    same dtype and device, unless the model still uses their storage. Call it after the plugins' ``after_prepare``
    (a plugin may keep undo information about the parameters it replaced).

    Args:
        refs: weak references to the model's parameters taken before sharding.
        model: the sharded model.

    Returns:
        ``(parameters released, bytes released)``.
    """
    from torch.distributed.tensor import DTensor

    current = {id(p) for p in model.parameters()}
    # storage still used by the model (a replacement that views the old tensor, e.g. an unsharded module)
    in_use = {
        t.untyped_storage().data_ptr()
        for t in (*model.parameters(), *model.buffers())
        if not isinstance(t, DTensor) and t.device.type != "meta"
    }
    count = nbytes = 0
    for ref in refs:
        param = ref()
        if param is None or id(param) in current or param.device.type == "meta" or isinstance(param, DTensor):
            continue
        size = param.untyped_storage().nbytes()
        if size == 0 or param.untyped_storage().data_ptr() in in_use:
            continue
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        count += 1
        nbytes += size
    return count, nbytes


def skip_backward_unshard_of_frozen_embeddings(model: nn.Module) -> list[str]:
    """Tell FSDP2 not to all-gather, in backward, the units that hold only frozen embedding tables.

    An embedding lookup has no gradient with respect to its (integer) input, so backward never reads the table;
    with the table frozen (LoRA, QLoRA) nothing in backward needs it at all. FSDP2 still re-gathers a unit in
    backward whenever its forward output requires grad (PEFT and gradient checkpointing make the input
    embeddings' output require grad), and for the input embedding that all-gather comes last in backward, with
    no compute left to hide it behind: a 128k x 4096 bf16 table is 1 GB gathered per step for nothing. A unit
    qualifies when every parameter it manages (those not inside a nested FSDP unit) belongs to an
    ``nn.Embedding`` and none requires grad; tied input/output embeddings never qualify (the output projection
    needs its weight in backward). The root unit is left alone.

    Returns:
        The qualified names of the units changed (empty when the installed torch lacks
        ``FSDPModule.set_unshard_in_backward`` or nothing qualifies).
    """
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_unshard_in_backward"):
        return []
    units = {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    changed = []
    for name, unit in units.items():
        if not name:
            continue
        nested = [n for n in units if n != name and _is_strictly_inside(n, name)]
        managed = [
            (owner, param)
            for owner, sub in unit.named_modules(prefix=name)
            if not any(owner == n or _is_strictly_inside(owner, n) for n in nested)
            for param in sub.parameters(recurse=False)
        ]
        owners = {owner for owner, _ in managed}
        if not managed or any(p.requires_grad for _, p in managed):
            continue
        if all(isinstance(model.get_submodule(o), nn.Embedding) for o in owners):
            unit.set_unshard_in_backward(False)
            changed.append(name)
    return changed


def run_after_prepare(plugins: Iterable[Any], model: nn.Module, context: RunContext) -> None:
    """Call ``after_prepare(model, context)`` on each plugin in order."""
    for plugin in plugins:
        plugin.after_prepare(model, context)


__all__ = [
    "DeepSpeedPlan",
    "DeepSpeedSettings",
    "FsdpSettings",
    "FsdpUnit",
    "FsdpUnitPlan",
    "FullyShardCustomizer",
    "GatheredScope",
    "MergedContribution",
    "ModuleSelector",
    "ParamSelector",
    "PrepareContext",
    "PrepareContribution",
    "RunContext",
    "RunSource",
    "apply_fsdp2_plan",
    "check_deepspeed",
    "check_fsdp1_plan",
    "check_keep_dtype_fsdp1",
    "collect_contributions",
    "decoder_layer_class_names",
    "fsdp1_auto_wrap_policy",
    "fully_shard_kwargs_from_policy",
    "merge_contributions",
    "move_unit_states",
    "plan_deepspeed",
    "plan_fsdp_units",
    "register_zero3_external_parameters",
    "release_replaced_parameters",
    "run_after_prepare",
    "skip_backward_unshard_of_frozen_embeddings",
    "switch_optimizer_params",
    "upcast_trainable",
]
