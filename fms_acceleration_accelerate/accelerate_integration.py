"""The one module that touches Accelerate's internals (with :mod:`~fms_acceleration_accelerate.launch_environment`,
which reads the launcher's environment and Accelerate's process state before this framework's ``Accelerator`` exists).

What it does
------------
* :class:`AccelerationKwargs` — ``Accelerator(kwargs_handlers=[AccelerationKwargs(config="accel.yaml")])``
  with the stock ``accelerate.Accelerator``.
* Accelerate 1.15 looks every kwargs handler up by exact class in a fixed table and raises ``KeyError`` for
  any other class. So :func:`install` wraps exactly two methods of ``accelerate.Accelerator``:

  - ``__init__``: removes :class:`AccelerationKwargs` from ``kwargs_handlers`` before Accelerate sees it, runs
    the original ``__init__`` unchanged, then (only if an acceleration config is present: the handler, or the
    section passed by the launcher in ``$FMS_ACCELERATION_SECTION``) attaches an
    :class:`~fms_acceleration_accelerate.framework.AccelerationFramework` to the instance (see
    :func:`get_framework`): the one that already loaded the script's model, if one did, else a new one.
  - ``prepare``: for an Accelerator *without* a framework it calls the original directly (identical
    behaviour). With one: one model, one framework (a model the script's own framework accelerated is adopted
    when the configurations are equal, refused otherwise) -> ``check_prepared_model`` of each active plugin
    (an active plugin is never silently without effect) -> ``prepare_dataloader`` of each plugin for each DataLoader
    argument -> ``prepare_contribution`` -> the wrap plan (FSDP1: a custom
    ``auto_wrap_policy``, ignored modules and mixed-precision settings on the FSDP plugin, restored after
    the call; FSDP2: our own ``fully_shard`` of the planned units and the optimizer re-pointed at the sharded
    parameters, after which Accelerate shards the rest) -> Accelerate's ``prepare`` -> ``after_prepare`` of
    each plugin. DeepSpeed (whose path never calls Accelerate's ``prepare_model``): the contributions are
    checked against DeepSpeed and turned into DeepSpeed's terms just before Accelerate builds the engine
    (:func:`~fms_acceleration_accelerate.distributed.plan_deepspeed`: under ZeRO-3 the parameters inside the
    plugins' fused scopes become the scopes' external parameters, gathered at the scopes' forward and backward,
    recorded in the framework's patch table; a plugin that cannot run there refuses with an error before
    DeepSpeed starts); ``after_prepare`` gets the ``DeepSpeedEngine``.

  The run's shape those hooks are handed, a :class:`~fms_acceleration_accelerate.distributed.RunContext`, is built
  once from the ``Accelerator`` when it is created (:func:`build_context`) and bound to the framework
  (``framework.run_context``); a model loaded before that gets the one built from the launcher's environment.

  The wrapping is idempotent (a second :func:`install` does nothing), recorded in a
  :class:`~fms_acceleration_accelerate.patching.PatchRecorder` kept on the class itself
  (``Accelerator._fms_acceleration_patches``), and undone by :func:`uninstall`. :func:`install` runs when
  an :class:`AccelerationKwargs` is created, when the start-up hook sees ``$FMS_ACCELERATION_SECTION`` (set
  by ``accelerate launch`` for every worker), or when called directly. The patch table is printed after the
  first ``prepare`` that gets a model (a trainer's DataLoader-only ``prepare`` prints nothing).

* Scripts that load the model themselves (``from_pretrained`` in the script; TRL's ``SFTTrainer`` or the HF
  ``Trainer`` given a model path, which load it before their ``Accelerator`` exists): where an acceleration
  config is in play (a launched worker, an :class:`AccelerationKwargs`), :func:`install_model_loading` routes
  causal-LM ``from_pretrained`` calls to the config's loading plugin (e.g. 4-bit bitsandbytes), through the
  same recorder (see :mod:`~fms_acceleration_accelerate.routing`). One framework per config source serves those
  loads and the ``Accelerator`` created next, so the plugin instance that loaded the model runs its prepare
  hooks.

* The launcher side of ``accelerate launch --config_file cfg.yaml`` with an ``acceleration:`` section:
  :func:`install_launcher_support` wraps ``BaseConfig.from_yaml_file`` (which rejects unknown keys) so that
  the config file is validated *in the launcher* (its Accelerate settings with Accelerate's own config classes,
  and the section; an error exits with status 2, every problem and its key path, before any worker starts), the
  section is removed from what Accelerate parses and written as JSON to a private temporary file whose path
  every process the launcher starts receives in ``$FMS_ACCELERATION_SECTION`` (removed when the launcher
  exits).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, KwargsHandler

from .accelerate_config import check_accelerate_document
from .config import read_yaml
from .deepspeed_offload import check_offload
from .distributed import (
    DeepSpeedSettings,
    FsdpSettings,
    MergedContribution,
    RunContext,
    apply_fsdp2_plan,
    check_fsdp1_dtypes,
    check_fsdp1_plan,
    check_keep_dtype_fsdp1,
    collect_contributions,
    fsdp1_auto_wrap_policy,
    plan_deepspeed,
    plan_fsdp_units,
    register_zero3_external_parameters,
    release_replaced_parameters,
    run_after_prepare,
    skip_backward_unshard_of_frozen_embeddings,
    switch_optimizer_params,
    upcast_trainable,
)
from .errors import AccelerationConfigError, quote, truncate
from .framework import AccelerationFramework, framework_of, is_main_process
from .launch_environment import deepspeed_settings, detect_client, fsdp_settings, run_context_from_environment
from .patching import PatchRecorder
from .registry import PluginRegistry

logger = logging.getLogger("fms_acceleration_accelerate")

ENV_SECTION = "FMS_ACCELERATION_SECTION"
"""Path of the JSON file holding the ``acceleration:`` section, set by the launcher for every worker process (a
value starting with ``{`` is read as the JSON itself). The start-up hook keys on this variable being set."""
ENV_SECTION_ORIGIN = "FMS_ACCELERATION_SECTION_ORIGIN"
"""The config file the section came from (for messages only)."""
ENV_DISABLE_HOOK = "FMS_ACCELERATION_DISABLE_HOOK"
"""Set to ``1`` to turn the interpreter start-up hook off."""

SECTION_KEY = "acceleration"
_RECORDER_ATTR = "_fms_acceleration_patches"
_FRAMEWORK_ATTR = "_fms_acceleration_framework"
_STATE_ATTR = "_fms_acceleration_state"
_WRAPPED_MARK = "__fms_acceleration_wrapped__"
_PATCHER = "accelerate-integration"


@dataclasses.dataclass
class AccelerationKwargs(KwargsHandler):
    """Kwargs handler that activates acceleration plugins on a stock ``accelerate.Accelerator``.

    Example::

        from accelerate import Accelerator
        from fms_acceleration_accelerate import AccelerationKwargs

        accelerator = Accelerator(kwargs_handlers=[AccelerationKwargs(config="accel.yaml")])

    A model loaded with ``from_pretrained`` after the handler is created (before or after the ``Accelerator``)
    goes through the plugin that loads models, when the config has one (see :func:`install_model_loading`); the
    ``Accelerator`` given the handler then runs the prepare hooks of that same framework.

    Args:
        config: acceleration YAML path, an Accelerate YAML with an ``acceleration:`` section, or a dict.
        registry: plugins to choose from (default: installed entry points).
        check_packages: verify each active plugin's required packages (disable only in tests).

    Creating the handler installs the ``Accelerator`` wrapper (idempotent; see :func:`install`).
    """

    config: str | os.PathLike | Mapping[str, Any] | None = None
    registry: PluginRegistry | None = None
    check_packages: bool = True
    _slot: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.config is not None and not isinstance(self.config, (str, os.PathLike, Mapping)):
            raise TypeError(
                f"AccelerationKwargs(config=...) takes a YAML path or a dict, got {type(self.config).__name__}"
            )
        origin = (
            "a dict" if isinstance(self.config, Mapping) else repr(os.fspath(self.config)) if self.config else "None"
        )
        self._slot = _FrameworkSlot(
            functools.partial(
                AccelerationFramework, self.config, registry=self.registry, check_packages=self.check_packages
            ),
            source=f"AccelerationKwargs(config={origin})",
        )
        install()
        state = _process_state()
        state.note_source(self)  # a model loaded from now on goes through this handler's framework
        install_model_loading()

    def to_kwargs(self) -> dict[str, Any]:  # Accelerate never calls this for our handler; kept meaningful
        return {"config": self.config, "check_packages": self.check_packages}

    def build_framework(self) -> AccelerationFramework:
        """The framework this handler describes."""
        return AccelerationFramework(self.config, registry=self.registry, check_packages=self.check_packages)


# ------------------------------------------------------------------------------------------------ lookup


def get_framework(accelerator: Any) -> AccelerationFramework | None:
    """The :class:`AccelerationFramework` attached to ``accelerator`` (``None`` when no acceleration config)."""
    return getattr(accelerator, _FRAMEWORK_ATTR, None)


def attach_framework(accelerator: Any, framework: AccelerationFramework) -> None:
    """Attach ``framework`` to an existing ``accelerator`` (e.g. one created before :func:`install`)."""
    if get_framework(accelerator) is not None:
        raise ValueError("this Accelerator already has an acceleration framework attached")
    setattr(accelerator, _FRAMEWORK_ATTR, framework)


def get_callbacks_and_ready_for_train(model: Any, accelerator: Any) -> list[Any]:
    """Callbacks of the plugins attached to ``accelerator`` (e.g. ``trainer.accelerator``), after their last
    preparation of ``model``; ``[]`` when the Accelerator has no acceleration config.

    For the HF Trainer / TRL, whose Accelerator is created inside the trainer::

        trainer = SFTTrainer(...)
        for callback in get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
            trainer.add_callback(callback)
    """
    framework = get_framework(accelerator)
    if framework is None:
        return []
    if isinstance(model, torch.nn.Module):  # a model the script's own framework accelerated: the same rule as prepare
        framework = _framework_for_models(accelerator, framework, [model])
    return framework.get_callbacks_and_ready_for_train(model, accelerator)


def section_from_environment() -> dict[str, Any] | None:
    """The ``acceleration:`` section the launcher exported, as ``{"acceleration": body}`` (or ``None``).

    ``$FMS_ACCELERATION_SECTION`` holds the path of the JSON file the launcher wrote (see
    :func:`export_section`); a value starting with ``{`` is read as the JSON itself (a section set by hand, or
    by an older launcher).
    """
    raw = os.environ.get(ENV_SECTION)
    if not raw:
        return None
    source = f"${ENV_SECTION}"
    if not raw.lstrip().startswith("{"):
        source = f"the section file {quote(raw)} named by ${ENV_SECTION}"
        try:
            raw = Path(raw).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AccelerationConfigError(
                f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}",
                fix=f"{ENV_SECTION} is set by 'accelerate launch' for the processes it starts and the file is "
                "removed when the launcher exits; start the script through 'accelerate launch' again, or unset "
                f"{ENV_SECTION}",
            ) from None
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AccelerationConfigError(
            f"{source} is not valid JSON ({exc})",
            fix=f"unset {ENV_SECTION}; it is set by 'accelerate launch' from the config file's acceleration section",
        ) from None
    return {SECTION_KEY: body}


def expected_fsdp_version() -> int | None:
    """The FSDP version the coming ``Accelerator.prepare`` will use, as far as is known before it runs: that of
    :func:`~fms_acceleration_accelerate.launch_environment.run_context_from_environment` (an ``Accelerator``
    already created in this process, else the variables ``accelerate launch`` exports). ``None`` when the run
    will not use FSDP or nothing tells yet. Plugins get it as ``run_context.fsdp_version`` instead.
    """
    return run_context_from_environment().fsdp_version


# ------------------------------------------------------------------------------------------------ install


def is_installed(accelerator_cls: type = Accelerator) -> bool:
    """True when :func:`install` has wrapped ``accelerator_cls``."""
    return _RECORDER_ATTR in vars(accelerator_cls)


def install(accelerator_cls: type = Accelerator) -> bool:
    """Wrap ``accelerator_cls.__init__`` and ``.prepare`` (see the module docstring). Idempotent.

    In a launched worker (``$FMS_ACCELERATION_SECTION`` set) it also routes the script's model loads to the
    section's loading plugin (:func:`install_model_loading`).

    Returns:
        True if the wrapper was installed now, False if it already was.
    """
    if is_installed(accelerator_cls):
        if os.environ.get(ENV_SECTION):
            install_model_loading(accelerator_cls)
        return False
    recorder = PatchRecorder()
    state = _ProcessState(recorder)
    original_init = accelerator_cls.__init__
    original_prepare = accelerator_cls.prepare
    recorder.patch(
        accelerator_cls,
        "__init__",
        _make_init(original_init, state),
        plugin=_PATCHER,
        target=f"{accelerator_cls.__name__}.__init__",
        description="accept AccelerationKwargs; attach AccelerationFramework",
    )
    recorder.patch(
        accelerator_cls,
        "prepare",
        _make_prepare(original_prepare),
        plugin=_PATCHER,
        target=f"{accelerator_cls.__name__}.prepare",
        description="plugin wrap contributions -> prepare -> after_prepare",
    )
    setattr(accelerator_cls, _RECORDER_ATTR, recorder)
    setattr(accelerator_cls, _STATE_ATTR, state)
    if os.environ.get(ENV_SECTION):
        install_model_loading(accelerator_cls)
    return True


def uninstall(accelerator_cls: type = Accelerator) -> int:
    """Undo :func:`install` (and :func:`install_model_loading`); returns the number of reverted patches (0 if
    not installed)."""
    recorder: PatchRecorder | None = vars(accelerator_cls).get(_RECORDER_ATTR)
    if recorder is None:
        return 0
    delattr(accelerator_cls, _RECORDER_ATTR)
    if _STATE_ATTR in vars(accelerator_cls):
        delattr(accelerator_cls, _STATE_ATTR)
    return recorder.revert()


def install_model_loading(accelerator_cls: type = Accelerator) -> bool:
    """Route the script's causal-LM ``from_pretrained`` calls to the loading plugin of this process's config.

    Replaces ``transformers.PreTrainedModel.from_pretrained`` by a
    :class:`~fms_acceleration_accelerate.routing.FromPretrainedRouter` (see that module), recorded in the same
    recorder as the ``Accelerator`` wrapper (:func:`uninstall` reverts it). Runs when a launched worker installs
    the wrapper and when an :class:`AccelerationKwargs` is created. When transformers' modeling module is not
    imported yet, it happens right after that import. Idempotent.

    Returns:
        True if installed now; False if it already was, :func:`install` has not run, or it is deferred.
    """
    state: _ProcessState | None = vars(accelerator_cls).get(_STATE_ATTR)
    if state is None or state.router is not None:
        return False
    module = sys.modules.get("transformers.modeling_utils")
    if module is None:
        _after_import("transformers.modeling_utils", functools.partial(install_model_loading, accelerator_cls))
        return False
    if not hasattr(module, "PreTrainedModel"):
        # transformers is importing it right now (it imports accelerate, whose import installed us, before it
        # defines PreTrainedModel); the start-up hook calls install() again as soon as that import is complete
        return False
    from .routing import FromPretrainedRouter

    owner = module.PreTrainedModel
    router = FromPretrainedRouter(vars(owner)["from_pretrained"], state.framework_for_loading)
    state.recorder.patch(
        owner,
        "from_pretrained",
        router.as_classmethod(),
        plugin=_PATCHER,
        target="transformers PreTrainedModel.from_pretrained",
        description="causal-LM loads -> the acceleration plugin that loads models",
    )
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    from transformers.models.auto.configuration_auto import AutoConfig
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    for auto in (AutoConfig, AutoModelForCausalLM):
        # transformers gives each auto class its own copy of the classmethod; fall back to the inherited one
        original = vars(auto).get("from_pretrained") or vars(_BaseAutoModelClass)["from_pretrained"]
        state.recorder.patch(
            auto,
            "from_pretrained",
            router.path_checked_classmethod(original),
            plugin=_PATCHER,
            target=f"transformers {auto.__name__}.from_pretrained",
            description="model path checked while a loading plugin is active",
        )
    state.router = router
    return True


def _after_import(name: str, callback: Callable[[], Any]) -> None:
    """Run ``callback`` once, right after module ``name`` is imported (unless the start-up hook already waits
    for that import, which ends in the same call)."""
    import _fms_acceleration_startup as startup

    if any(isinstance(f, startup.AfterImport) and f.name == name for f in sys.meta_path):
        return
    sys.meta_path.insert(0, startup.AfterImport(name, callback))


class _FrameworkSlot:
    """One acceleration source (the launched section, or one :class:`AccelerationKwargs`) and the framework it
    built most recently.

    One framework serves the model loads that come before its ``Accelerator`` and that ``Accelerator``'s
    prepare, so the plugin instance that loaded the model is the one whose prepare hooks run. A second
    ``Accelerator``, or a load after the first ``Accelerator`` prepared its model, gets a new framework.
    """

    def __init__(self, build: Callable[[], AccelerationFramework], source: str) -> None:
        self._build = build
        self.source = source
        self._framework: AccelerationFramework | None = None
        self._accelerator: weakref.ref[Any] | None = None

    def _new(self) -> AccelerationFramework:
        self._framework = self._build()
        self._accelerator = None
        # a model may be loaded before the Accelerator exists: the launcher's environment tells the run's shape
        self._framework.bind_run_context(run_context_from_environment(framework=self._framework))
        return self._framework

    def for_loading(self) -> AccelerationFramework:
        if self._framework is None:
            return self._new()
        if self._accelerator is not None:
            accelerator = self._accelerator()
            if accelerator is None or getattr(accelerator, "_models", None):
                return self._new()
        return self._framework

    def for_accelerator(self, accelerator: Any) -> AccelerationFramework:
        free = self._framework is not None and self._accelerator is None
        framework = self._framework if free else self._new()
        self._accelerator = weakref.ref(accelerator)
        return framework


class _ProcessState:
    """The acceleration sources of this process, kept on the ``Accelerator`` class by :func:`install` (no module
    state): the launched section's framework slot, the most recent :class:`AccelerationKwargs` or configured
    ``Accelerator``, and the installed ``from_pretrained`` router."""

    def __init__(self, recorder: PatchRecorder) -> None:
        self.recorder = recorder
        self.router: Any = None
        self._section: tuple[str, _FrameworkSlot] | None = None
        self._latest: weakref.ref[Any] | None = None

    def section_slot(self) -> _FrameworkSlot | None:
        """The slot of the section in ``$FMS_ACCELERATION_SECTION`` (a new one when the variable changed)."""
        raw = os.environ.get(ENV_SECTION)
        if not raw:
            return None
        if self._section is None or self._section[0] != raw:
            origin = os.environ.get(ENV_SECTION_ORIGIN)
            source = f"the acceleration section of {origin}" if origin else f"${ENV_SECTION}"
            self._section = (raw, _FrameworkSlot(functools.partial(_section_framework, source), source))
        return self._section[1]

    def note_source(self, source: Any) -> None:
        """``source`` (an :class:`AccelerationKwargs` or an ``Accelerator`` with a framework) is the most recent."""
        self._latest = weakref.ref(source)

    def framework_for_loading(self) -> tuple[AccelerationFramework | None, str]:
        """The framework a model load goes through now, and where its config came from."""
        latest = self._latest() if self._latest is not None else None
        if isinstance(latest, AccelerationKwargs) and latest._slot is not None:
            return latest._slot.for_loading(), latest._slot.source
        if latest is not None:
            framework = get_framework(latest)
            if framework is not None and not getattr(latest, "_models", None):
                origin = framework.config.origin
                return framework, origin if origin.startswith("the ") else f"the Accelerator's config ({origin})"
        slot = self.section_slot()
        if slot is None:
            return None, ""
        return slot.for_loading(), slot.source


def _section_framework(source: str) -> AccelerationFramework:
    section = section_from_environment()
    if section is None:
        raise AccelerationConfigError(
            f"${ENV_SECTION} was unset while this process used it", fix=f"leave {ENV_SECTION} as the launcher set it"
        )
    framework = AccelerationFramework(section)
    framework.config = dataclasses.replace(framework.config, origin=source)  # messages name the launch config
    return framework


def _process_state(accelerator_cls: type = Accelerator) -> _ProcessState:
    state = vars(accelerator_cls).get(_STATE_ATTR)
    if state is None:
        raise RuntimeError("install() has not run for this Accelerator class")
    return state


def _make_init(original_init: Callable[..., None], state: _ProcessState) -> Callable[..., None]:
    signature = inspect.signature(original_init)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        handlers = list(bound.arguments.get("kwargs_handlers") or [])
        ours = [h for h in handlers if isinstance(h, AccelerationKwargs)]
        if len(ours) > 1:
            raise ValueError("pass at most one AccelerationKwargs in kwargs_handlers")
        if ours:
            bound.arguments["kwargs_handlers"] = [h for h in handlers if not isinstance(h, AccelerationKwargs)]
        original_init(*bound.args, **bound.kwargs)
        if ours:
            slot = getattr(ours[0], "_slot", None)
            framework = slot.for_accelerator(self) if slot is not None else ours[0].build_framework()
        else:
            slot = state.section_slot()
            if slot is None:
                return
            framework = slot.for_accelerator(self)  # the framework that loaded the model, if one did
        check_accelerate_settings(self, framework)
        setattr(self, _FRAMEWORK_ATTR, framework)
        state.note_source(self)
        if is_main_process():
            logger.info(
                "fms-acceleration active plugins: %s; run: %s",
                ", ".join(framework.active_plugin_names) or "none",
                framework.run_context.describe(),
            )

    setattr(__init__, _WRAPPED_MARK, original_init)
    __init__.__doc__ = original_init.__doc__
    return __init__


def check_accelerate_settings(accelerator: Any, framework: AccelerationFramework) -> None:
    """Refuse Accelerate settings the prepare hooks cannot honour, when the ``Accelerator`` is created (before
    the script loads a model). ``Accelerator.prepare`` checks the same again as a backstop.

    Raises:
        AccelerationConfigError: a plugin's ``check_run_settings`` refused the run's settings, or FSDP2 with
            ``fsdp_cpu_ram_efficient_loading`` while a plugin shards its own units (``contributes_under_fsdp2``).
    """
    context = framework.bind_run_context(build_context(accelerator, framework))  # built once per Accelerator
    _check_deepspeed_process_group(context)
    check_offload(context)
    for plugin in framework.plugins:
        plugin.check_run_settings(context)
    if context.fsdp_version != 2 or not context.fsdp.cpu_ram_efficient_loading:
        return
    sharding = [p.plugin_name() for p in framework.plugins if p.contributes_under_fsdp2()]
    if sharding:
        raise AccelerationConfigError(
            f"fsdp_cpu_ram_efficient_loading is on, but plugins {', '.join(sharding)} shard their own FSDP2 units, "
            "which Accelerate's meta-device reload does not support",
            fix="set 'fsdp_cpu_ram_efficient_loading: false' under fsdp_config (the bitsandbytes plugin loads on "
            "rank 0 and broadcasts by itself)",
        )


def _check_deepspeed_process_group(context: RunContext) -> None:
    """DeepSpeed without a GPU, several processes: Accelerate chooses no process-group backend when it has no GPU
    and ``cpu`` is off (which DeepSpeed needs), so each process counts itself alone while DeepSpeed sees them all
    (its batch-size check then fails in ``prepare``, after the model was loaded). Refused here instead."""
    if not context.is_deepspeed or context.device.type != "cpu" or context.world_size != 1:
        return
    launched = os.environ.get("WORLD_SIZE", "1").strip()
    if launched.isdigit() and int(launched) > 1:
        raise AccelerationConfigError(
            f"DeepSpeed on CPU with {launched} processes, but this Accelerator counts 1: without a GPU, Accelerate "
            "chooses no process-group backend, so every process would train alone",
            fix="create the Accelerator with kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')] (from "
            "accelerate.utils), or pass ddp_backend='gloo' to the HF Trainer's TrainingArguments",
        )


def _make_prepare(original_prepare: Callable[..., Any]) -> Callable[..., Any]:
    def prepare(self: Any, *args: Any, device_placement: Any = None) -> Any:
        framework = get_framework(self)
        if framework is None:
            return original_prepare(self, *args, device_placement=device_placement)
        return _prepare_with_framework(self, framework, original_prepare, args, device_placement)

    setattr(prepare, _WRAPPED_MARK, original_prepare)
    prepare.__doc__ = original_prepare.__doc__
    return prepare


# ------------------------------------------------------------------------------------------------ prepare


def build_context(accelerator: Any, framework: AccelerationFramework, *, client: str | None = None) -> RunContext:
    """The :class:`~fms_acceleration_accelerate.distributed.RunContext` of ``accelerator``: its distributed type,
    FSDP version and settings, DeepSpeed ZeRO stage, mixed precision, process count and device. ``client``: what
    drives the run, when the caller knows; otherwise the trainer that is creating ``accelerator`` (found on the call
    stack), else ``"accelerate"``."""
    distributed_type = accelerator.distributed_type
    fsdp_version = None
    fsdp = FsdpSettings()
    zero_stage = None
    deepspeed = DeepSpeedSettings()
    if distributed_type == DistributedType.FSDP:
        fsdp_version = 2 if accelerator.is_fsdp2 else 1
        fsdp = fsdp_settings(getattr(accelerator.state, "fsdp_plugin", None))
    elif distributed_type == DistributedType.DEEPSPEED:
        deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        zero_stage = getattr(deepspeed_plugin, "zero_stage", None)
        if deepspeed_plugin is not None:
            deepspeed, _ = deepspeed_settings(deepspeed_plugin)
    return RunContext(
        distributed_type=str(getattr(distributed_type, "value", distributed_type)),
        fsdp_version=fsdp_version,
        device=accelerator.device,
        mixed_precision=str(accelerator.mixed_precision),
        world_size=accelerator.num_processes,
        framework=framework,
        accelerator=accelerator,
        fsdp=fsdp,
        zero_stage=zero_stage,
        deepspeed=deepspeed,
        client=client if client is not None else detect_client("accelerate"),
        source="accelerator",
    )


def context_for_accelerator(framework: AccelerationFramework, accelerator: Any) -> RunContext:
    """The run context ``framework``'s hooks get under ``accelerator``: the one bound when ``accelerator`` was created
    with this framework, as long as ``accelerator``'s settings still read the same (a trainer may adjust its FSDP
    plugin after creating the Accelerator); else one built from ``accelerator`` now and bound (a framework attached
    or adopted later, the framework API given ``trainer.accelerator``, settings changed since)."""
    current = framework.run_context
    fresh = build_context(accelerator, framework, client=current.client)
    if current.accelerator is accelerator and fresh == current:
        return current
    return framework.bind_run_context(fresh)


def _prepare_with_framework(
    accelerator: Any,
    framework: AccelerationFramework,
    original_prepare: Callable[..., Any],
    args: tuple[Any, ...],
    device_placement: Any,
) -> Any:
    models = [a for a in args if isinstance(a, torch.nn.Module)]
    if models:
        framework = _framework_for_models(accelerator, framework, models)
    context = context_for_accelerator(framework, accelerator)
    for model in models:  # never silent: each active plugin refuses a model it cannot have accelerated
        framework.check_prepared_model(model, context)
    if any(isinstance(a, torch.utils.data.DataLoader) for a in args):  # how batches are built (e.g. padding-free)
        args = tuple(
            framework.prepare_dataloader(a, context) if isinstance(a, torch.utils.data.DataLoader) else a for a in args
        )
    optimizers = [a for a in args if isinstance(a, torch.optim.Optimizer)]
    scoped = PatchRecorder()  # changes to Accelerate's FSDP plugin, only for the duration of this call
    ours_fsdp2: list[torch.nn.Module] = []
    # FSDP2: weak references to every parameter before sharding (see release_replaced_parameters)
    before = {id(m): [weakref.ref(p) for p in m.parameters()] for m in models} if context.fsdp_version == 2 else {}
    with scoped.reverting():
        for model in models:
            merged = collect_contributions(framework.plugins, model, context)
            for note in merged.notes:
                logger.info("fms-acceleration: %s", note)
            if context.is_deepspeed:
                _before_deepspeed(framework, model, merged, context)
            elif context.fsdp_version == 1:
                _before_fsdp1(accelerator, model, merged, scoped)
            elif context.fsdp_version == 2 and _before_fsdp2(accelerator, model, merged, optimizers, scoped):
                ours_fsdp2.append(model)
        result = original_prepare(accelerator, *args, device_placement=device_placement)
    for model in ours_fsdp2:  # fully_shard works in place: the prepared model is the same object
        skipped = skip_backward_unshard_of_frozen_embeddings(model)
        if skipped:
            logger.info("fms-acceleration FSDP2: no backward all-gather for frozen embedding units %s", skipped)
    prepared = result if isinstance(result, (tuple, list)) else (result,)
    for obj in prepared:
        if isinstance(obj, torch.nn.Module):
            run_after_prepare(framework.plugins, obj, context)
    # every FSDP2 model, also those Accelerate sharded on its own: without fsdp_cpu_ram_efficient_loading its
    # fully_shard leaves the unsharded (fp32-upcast) parameters to whatever the script still holds
    for model in models:
        released, nbytes = release_replaced_parameters(before.get(id(model), ()), model)
        if released:
            logger.info(
                "fms-acceleration FSDP2: freed %d unsharded parameters (%.1f MiB) that sharding replaced but the "
                "training script still referenced",
                released,
                nbytes / 2**20,
            )
    prepared_models = [obj for obj in prepared if isinstance(obj, torch.nn.Module)]
    if prepared_models:  # not at a DataLoader-only prepare (a trainer's first call): nothing is patched yet
        framework.log_patch_summary(prepared_models)
    return result


def _framework_for_models(
    accelerator: Any, framework: AccelerationFramework, models: list[torch.nn.Module]
) -> AccelerationFramework:
    """The framework whose hooks prepare ``models``: one model is accelerated by one framework.

    A model that a script's own :class:`AccelerationFramework` loaded or augmented (the framework API) meets the
    framework this ``Accelerator`` built from the launched section or an :class:`AccelerationKwargs`: with an
    equal configuration, the script's framework is adopted for the prepare hooks (and attached to the
    ``Accelerator``); with a different one, both would patch the model, which is refused.
    """
    owners = [o for o in dict.fromkeys(framework_of(m) for m in models) if o is not None and o is not framework]
    if not owners:
        for model in models:
            framework.claim_model(model, "Accelerator.prepare")
        return framework
    theirs = "; ".join(o.describe_configuration() for o in owners)
    if len(owners) > 1 or not owners[0].same_configuration(framework):
        raise AccelerationConfigError(
            f"Accelerator.prepare got a model that the script's own AccelerationFramework already accelerated "
            f"({theirs}), while this Accelerator has a different acceleration configuration "
            f"({framework.describe_configuration()}); both would patch the same model",
            fix="keep one of them: remove the acceleration section from the accelerate config (or the "
            "AccelerationKwargs) to let the script's framework do the work, or drop the script's "
            "AccelerationFramework and load the model with from_pretrained (or get_framework(accelerator)"
            ".model_loader)",
        )
    adopted = owners[0]
    setattr(accelerator, _FRAMEWORK_ATTR, adopted)
    for model in models:
        adopted.claim_model(model, "Accelerator.prepare")
    if is_main_process():
        print(
            "fms-acceleration: the model was accelerated by the script's own AccelerationFramework, whose "
            "configuration equals this Accelerator's; its plugins run the prepare hooks (the Accelerator's own "
            "framework is not used, so nothing is patched twice)",
            flush=True,
        )
    return adopted


def _before_deepspeed(
    framework: AccelerationFramework, model: torch.nn.Module, merged: MergedContribution, context: RunContext
) -> None:
    """DeepSpeed's path (``Accelerator._prepare_deepspeed``, which builds the engine) never calls ``prepare_model``:
    the contributions are checked against DeepSpeed here, and under ZeRO-3 the inner parameters of the fused scopes
    become the scopes' external parameters (recorded in the framework's patch table, kept for the whole run)."""
    plan = plan_deepspeed(model, merged, context)
    register_zero3_external_parameters(plan, framework.patches)
    if is_main_process():
        logger.info("fms-acceleration DeepSpeed:\n  %s", "\n  ".join(plan.describe()))


def _before_fsdp1(accelerator: Any, model: torch.nn.Module, merged: MergedContribution, scoped: PatchRecorder) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return  # wrapped by the user already: Accelerate leaves it alone, so do we
    fsdp_plugin = accelerator.state.fsdp_plugin
    plan = plan_fsdp_units(model, merged, 1)
    check_fsdp1_plan(plan, use_orig_params=bool(fsdp_plugin.use_orig_params))
    scoped.patch(
        fsdp_plugin,
        "auto_wrap_policy",
        fsdp1_auto_wrap_policy(model, plan),
        plugin=_PATCHER,
        description=f"unit plan ({len(plan.units) - 1} units)",
    )
    ignored = merged.select_ignored(model)
    if ignored:
        existing = list(fsdp_plugin.ignored_modules or [])
        if isinstance(fsdp_plugin.ignored_modules, str):
            raise AccelerationConfigError(
                "fsdp_ignored_modules is a regular expression in the Accelerate config, and acceleration plugins "
                "also ignore modules",
                fix="remove fsdp_ignored_modules from the Accelerate config",
            )
        scoped.patch(fsdp_plugin, "ignored_modules", [*existing, *ignored], plugin=_PATCHER)
    policy = fsdp_plugin.mixed_precision_policy
    param_dtype = getattr(policy, "param_dtype", None)
    if merged.param_dtype is not None or merged.reduce_dtype is not None:
        from torch.distributed.fsdp import MixedPrecision

        base = policy if policy is not None else MixedPrecision()
        changes = {}
        if merged.param_dtype is not None:
            changes["param_dtype"] = merged.param_dtype
        if merged.reduce_dtype is not None:
            changes["reduce_dtype"] = merged.reduce_dtype
        new_policy = dataclasses.replace(base, **changes)
        param_dtype = new_policy.param_dtype
        scoped.patch(fsdp_plugin, "mixed_precision_policy", new_policy, plugin=_PATCHER)
    check_keep_dtype_fsdp1(model, merged, param_dtype)
    if merged.trainable_dtype is not None:
        upcast_trainable(model, merged.trainable_dtype, merged)
    check_fsdp1_dtypes(model, plan, merged, mixed_precision=str(accelerator.mixed_precision) != "no")
    if is_main_process():
        logger.info("fms-acceleration FSDP1 units:\n  %s", "\n  ".join(plan.describe()))


def _before_fsdp2(
    accelerator: Any,
    model: torch.nn.Module,
    merged: MergedContribution,
    optimizers: list[torch.optim.Optimizer],
    scoped: PatchRecorder,
) -> bool:
    """Shard the plan's units before Accelerate's FSDP2 pass; ``False`` when Accelerate's path is left as is."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy

    if merged.is_empty or isinstance(model, FSDPModule):
        return False  # nothing asked for (Accelerate's own FSDP2 path, unchanged) or sharded by the user
    fsdp_plugin = accelerator.state.fsdp_plugin
    if fsdp_plugin.cpu_ram_efficient_loading:
        raise AccelerationConfigError(
            "fsdp_cpu_ram_efficient_loading is on, but the active acceleration plugins shard some modules "
            "themselves under FSDP2, which Accelerate's meta-device reload does not support",
            fix="set 'fsdp_cpu_ram_efficient_loading: false' under fsdp_config",
        )
    base_policy = fsdp_plugin.mixed_precision_policy or MixedPrecisionPolicy()
    changes = {}
    if merged.param_dtype is not None:
        changes["param_dtype"] = merged.param_dtype
    if merged.reduce_dtype is not None:
        changes["reduce_dtype"] = merged.reduce_dtype
    mp_policy = dataclasses.replace(base_policy, **changes) if changes else base_policy
    if changes:
        scoped.patch(fsdp_plugin, "mixed_precision_policy", mp_policy, plugin=_PATCHER)

    # The same trainable-parameter upcast Accelerate does before fully_shard (its own pass then finds nothing
    # left to cast, so it never touches the parameters we have sharded).
    has_4bit = any(p.__class__.__name__ == "Params4bit" for p in model.parameters())
    if merged.trainable_dtype is not None:
        upcast_trainable(model, merged.trainable_dtype, merged)
    elif accelerator.mixed_precision != "no" and not has_4bit:
        upcast_trainable(model, torch.float32, merged)

    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs: dict[str, Any] = {
        "reshard_after_forward": fsdp_plugin.reshard_after_forward,
        "offload_policy": fsdp_plugin.cpu_offload or OffloadPolicy(),
        "mp_policy": mp_policy,
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    ignored_modules = merged.select_ignored(model)
    if ignored_modules:
        if fsdp_plugin.ignored_modules is not None:
            raise AccelerationConfigError(
                "fsdp_ignored_modules is set in the Accelerate config, and acceleration plugins also ignore modules",
                fix="remove fsdp_ignored_modules from the Accelerate config",
            )
        kwargs["ignored_params"] = {p for m in ignored_modules for p in m.parameters()}
        scoped.patch(fsdp_plugin, "ignored_modules", ignored_modules, plugin=_PATCHER)
    plan = plan_fsdp_units(model, merged, 2)
    mapping = apply_fsdp2_plan(model, plan, merged, kwargs, shard_root=False)
    _point_transformer_policy_at_sharded_units(fsdp_plugin, model, plan, scoped)
    for optimizer in optimizers:
        switch_optimizer_params(optimizer, mapping)
    if is_main_process():
        logger.info("fms-acceleration FSDP2 units:\n  %s", "\n  ".join(plan.describe()))
    return True


def _point_transformer_policy_at_sharded_units(
    fsdp_plugin: Any, model: torch.nn.Module, plan: Any, scoped: PatchRecorder
) -> None:
    """After our ``fully_shard``, the units' classes are FSDP2's ``FSDP<Name>`` subclasses, so Accelerate's
    transformer policy (which looks classes up by name) would no longer find ``LlamaDecoderLayer`` and
    raise. For the duration of the call, name the classes that exist now: Accelerate skips modules that are
    already sharded, and its activation checkpointing still finds the layers."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = fsdp_plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return
    present = {type(m).__name__ for m in model.modules()}
    wanted = list(fsdp_plugin.transformer_cls_names_to_wrap or []) or []
    sharded = sorted({type(model.get_submodule(u.name)).__name__ for u in plan.units if u.name})
    names = [n for n in dict.fromkeys([*wanted, *sharded]) if n in present]
    scoped.patch(fsdp_plugin, "auto_wrap_policy", policy, plugin=_PATCHER, description="restored after prepare")
    scoped.patch(
        fsdp_plugin,
        "transformer_cls_names_to_wrap",
        names,
        plugin=_PATCHER,
        description="classes of the units sharded by fms-acceleration",
    )


# ------------------------------------------------------------------------------------------------ launcher


def split_accelerate_config(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """Read an Accelerate YAML; return ``(document_without_section, section_or_None)``."""
    document = read_yaml(path)
    if not isinstance(document, dict):
        return document, None
    rest = {k: v for k, v in document.items() if k != SECTION_KEY}
    return rest, document.get(SECTION_KEY)


def validate_section(section: Any, origin: str) -> AccelerationFramework:
    """Build (and so validate) a framework from an ``acceleration:`` section read from ``origin``."""
    if isinstance(section, str):  # 'acceleration: other.yaml', relative to the Accelerate config
        nested = Path(section) if Path(section).is_absolute() else Path(origin).parent / section
        return AccelerationFramework(str(nested))
    return AccelerationFramework({SECTION_KEY: section})


def export_section(section: Any, origin: str) -> str:
    """Hand the section to the processes this launcher starts; returns the path of the file holding it.

    ``section`` (a mapping, or the path of an acceleration-only file, resolved against ``origin``) is written
    as JSON to a private temporary file (mode 0600), whose path goes in ``$FMS_ACCELERATION_SECTION``: a
    section of any size travels this way (Linux limits one environment variable to 128 KiB). The file is
    removed when this process exits; workers read it when they create their ``Accelerator``. On several
    machines, each machine's launcher reads the config and writes its own file.
    """
    if isinstance(section, str):
        framework = validate_section(section, origin)
        body: Any = dict(framework.config.body)
    else:
        body = section
    try:
        encoded = json.dumps(body)
    except (TypeError, ValueError) as exc:
        raise AccelerationConfigError(
            f"the acceleration section of {quote(str(origin))} cannot be passed to workers ({truncate(str(exc), 200)})",
            path=SECTION_KEY,
            fix="use only plain YAML values (strings, numbers, booleans, lists, mappings)",
        ) from None
    handle, path = tempfile.mkstemp(prefix="fms_acceleration_section_", suffix=".json")
    atexit.register(_remove_file, path)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(encoded)
    os.environ[ENV_SECTION] = path
    os.environ[ENV_SECTION_ORIGIN] = str(origin)
    return path


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def install_launcher_support() -> bool:
    """Let ``accelerate launch`` read configs with an ``acceleration:`` section. Idempotent.

    Wraps ``accelerate.commands.config.config_args.BaseConfig.from_yaml_file`` and ``load_config_from_file``
    (in ``config_args`` and where Accelerate's commands imported it by name). The config file is checked in
    the launcher, before any worker starts; on error the message goes to stderr and the launcher exits with
    status 2, without a traceback:

    * the file itself (missing, a directory, not UTF-8, invalid YAML, not a mapping, keys given twice);
    * its Accelerate settings, with Accelerate's own config classes (all problems at once; a config without
      the section gets only the checks of what Accelerate would refuse anyway, see
      :mod:`~fms_acceleration_accelerate.accelerate_config`);
    * its ``acceleration:`` section, which is then exported (:func:`export_section`) and stripped from what
      Accelerate parses (through a temporary copy of the file, so Accelerate's own parsing is unchanged).

    Returns:
        True if installed now, False if it already was.
    """
    from accelerate.commands import config as config_package
    from accelerate.commands.config import config_args

    owner = config_args.BaseConfig
    if _RECORDER_ATTR in vars(owner):
        return False
    original = vars(owner)["from_yaml_file"].__func__
    original_load = config_args.load_config_from_file
    recorder = PatchRecorder()

    def from_yaml_file(cls: type, yaml_file: str | None = None) -> Any:
        path = config_args.default_yaml_config_file if yaml_file is None else yaml_file
        with _section_stripped(path) as stripped:
            return original(cls, yaml_file=stripped)

    def load_config_from_file(config_file: str | None) -> Any:
        path = config_args.default_config_file if config_file is None else config_file
        if not str(path).endswith(".json"):  # Accelerate reads the YAML itself before from_yaml_file
            _refuse_unusable(path)
        return original_load(config_file)

    setattr(from_yaml_file, _WRAPPED_MARK, original)
    setattr(load_config_from_file, _WRAPPED_MARK, original_load)
    recorder.patch(
        owner,
        "from_yaml_file",
        classmethod(from_yaml_file),
        plugin=_PATCHER,
        target="accelerate BaseConfig.from_yaml_file",
        description="check the config, export and strip the acceleration: section",
    )
    holders = [config_args, config_package, sys.modules.get("accelerate.commands.launch")]
    for module in holders:
        if module is not None and getattr(module, "load_config_from_file", None) is original_load:
            recorder.patch(
                module,
                "load_config_from_file",
                load_config_from_file,
                plugin=_PATCHER,
                target=f"{module.__name__}.load_config_from_file",
                description="refuse a config file that is missing or not a mapping, without a traceback",
            )
    setattr(owner, _RECORDER_ATTR, recorder)
    return True


def uninstall_launcher_support() -> int:
    """Undo :func:`install_launcher_support`."""
    from accelerate.commands.config import config_args

    recorder: PatchRecorder | None = vars(config_args.BaseConfig).get(_RECORDER_ATTR)
    if recorder is None:
        return 0
    delattr(config_args.BaseConfig, _RECORDER_ATTR)
    return recorder.revert()


def _launcher_error(path: str | os.PathLike, exc: AccelerationConfigError) -> SystemExit:
    """Print a config error the way the launcher reports it; the caller raises the returned ``SystemExit(2)``."""
    rank = os.environ.get("MACHINE_RANK") or "0"
    print(f"fms-acceleration: error in {path} (machine {rank}): {exc}", file=sys.stderr, flush=True)
    return SystemExit(2)


def _refuse_unusable(path: str | os.PathLike) -> Any:
    """The YAML document of the Accelerate config at ``path``; exits (status 2) when it cannot be one."""
    try:
        document = read_yaml(path)
        if not isinstance(document, Mapping):
            check_accelerate_document(document, origin=str(path), strict=False)
    except AccelerationConfigError as exc:
        raise _launcher_error(path, exc) from None
    return document


@contextlib.contextmanager
def _section_stripped(path: str | os.PathLike) -> Iterator[str]:
    """Yield a path Accelerate can parse: ``path`` itself, or a temporary copy without the section; exits with
    status 2 (message on stderr) when the config has a problem."""
    document = _refuse_unusable(path)
    if SECTION_KEY not in document:
        try:
            check_accelerate_document(document, origin=str(path), strict=False)
        except AccelerationConfigError as exc:
            raise _launcher_error(path, exc) from None
        yield str(path)
        return
    rest = {k: v for k, v in document.items() if k != SECTION_KEY}
    try:
        framework = AccelerationFramework(str(path))  # the section and the Accelerate settings, every problem
        export_section(dict(framework.config.body), str(path))
    except AccelerationConfigError as exc:
        raise _launcher_error(path, exc) from None
    handle, tmp = tempfile.mkstemp(prefix="accelerate_config_", suffix=".yaml")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            yaml.safe_dump(rest, out)
        yield tmp
    finally:
        os.unlink(tmp)


def run_accelerate_launch(argv: list[str], prog: str = "fms-accelerate launch") -> int:
    """``fms-accelerate launch ARGS``: the stock ``accelerate launch`` with :func:`install_launcher_support`.

    Workers receive the section through ``$FMS_ACCELERATION_SECTION``; they pick it up through the start-up
    hook (installed with this package) or, when the hook is disabled, by calling :func:`install` / creating
    an :class:`AccelerationKwargs` before their ``Accelerator``.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser

    install_launcher_support()
    parser = launch_command_parser()
    parser.prog = prog
    args = parser.parse_args(argv)
    launch_command(args)
    return 0


def _install_for_launched_worker() -> None:
    """Finish the start-up hook's job when this module was imported before ``accelerate``.

    The hook installs the wrapper right after ``import accelerate``; when that import happens *inside* this
    module's own import, the hook cannot call :func:`install` yet and leaves it to this function.
    """
    startup = sys.modules.get("_fms_acceleration_startup")
    if startup is not None and startup.mode() == "worker":
        install()


_install_for_launched_worker()

__all__ = [
    "ENV_DISABLE_HOOK",
    "ENV_SECTION",
    "ENV_SECTION_ORIGIN",
    "AccelerationKwargs",
    "attach_framework",
    "build_context",
    "context_for_accelerator",
    "expected_fsdp_version",
    "export_section",
    "get_callbacks_and_ready_for_train",
    "get_framework",
    "install",
    "install_launcher_support",
    "install_model_loading",
    "is_installed",
    "run_accelerate_launch",
    "section_from_environment",
    "split_accelerate_config",
    "uninstall",
    "uninstall_launcher_support",
    "validate_section",
]
