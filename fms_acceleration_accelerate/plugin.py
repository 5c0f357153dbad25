"""The plugin contract.

A plugin is a subclass of :class:`AccelerationPlugin` that declares, as class attributes:

* ``name``: unique name (defaults to the class name);
* ``configuration_and_paths`` (all must be present) and/or ``configuration_or_paths`` (any one activates):
  dotted config paths it registers under, e.g. ``"peft.quantization.bitsandbytes"``;
* ``config_class``: a frozen dataclass the section at the matched path is parsed into (strictly);
* ``required_packages``: PEP 508 requirement strings checked when the plugin activates;
* ``install_hint``: the pip command that installs those packages;
* ``supported_model_types``: HF ``config.model_type`` values it supports (``None``: any);
* ``order``: position in the deterministic run order (lower first; loaders ~100, augmentation ~200,
  kernels ~300);
* ``incompatible_paths``: config paths that may not be active together with this plugin;

and implements any of the hooks below. Hooks return what they change; patches go through ``self.patches``
(a :class:`~fms_acceleration_accelerate.patching.PluginPatcher`) so the framework can report and revert them.

Hooks, in the order a run calls them (phase: what it is for):

* ``check_compatibility(active: Sequence[AccelerationPlugin]) -> None`` -- the framework is created: refuse
  combinations with the other active plugins.
* ``dequant_backends() -> tuple[DequantBackend, ...]`` -- the framework is created: how fused kernels read the
  weights of the layers this plugin puts on models (a contribution, not a hook on the model).
* ``check_model_type(model_type: str | None) -> None`` -- before loading / augmenting: refuse architectures.
* ``check_run_settings(context: RunContext) -> None`` and ``contributes_under_fsdp2() -> bool`` -- the
  ``Accelerator`` is created, no model yet: refuse distributed / precision settings the plugin cannot work with;
  say whether the plugin shards its own FSDP2 units. Under DeepSpeed ``check_run_settings`` also runs earlier:
  in the launcher and ``fms-accelerate check`` (the run the Accelerate config file describes) and before
  ``model_loader`` (the launcher's environment).
* ``model_loader(model_name_or_path: str, **kwargs) -> nn.Module`` -- loading: the one plugin that owns loading
  builds the model.
* ``augmentation(model: nn.Module, train_args, modifiable_args: tuple) -> tuple[nn.Module, tuple]`` -- after
  loading: change the model (adapters, kernels).
* ``check_prepared_model(model: nn.Module, context: RunContext) -> None`` -- ``Accelerator.prepare``, first:
  refuse a model the plugin cannot accelerate (an active plugin is never silently without effect).
* ``prepare_contribution(model: nn.Module, context: RunContext) -> PrepareContribution | None`` --
  ``Accelerator.prepare``, before wrapping: FSDP units, fused scopes, dtypes the plugin needs.
* ``after_prepare(model: nn.Module, context: RunContext) -> None`` -- ``Accelerator.prepare``, after wrapping:
  patch what needs the wrapped / sharded model.
* ``prepare_dataloader(dataloader: DataLoader, context: RunContext) -> DataLoader`` -- ``Accelerator.prepare``
  given a ``torch.utils.data.DataLoader`` (a trainer's DataLoader-only call too), before Accelerate wraps it:
  change how batches are built (e.g. the ``collate_fn``, through ``self.patches``); returns the DataLoader to prepare.
* ``get_callbacks_and_ready_for_train(model: nn.Module | None, accelerator: Accelerator | None)
  -> list[TrainerCallback]`` -- the trainer is built: last changes to the trainer's model; callbacks to add.

The run's shape (FSDP version and settings, mixed precision, world size, DeepSpeed, device, client) is a
:class:`~fms_acceleration_accelerate.distributed.RunContext`, built once by the framework's Accelerate side. The
prepare-time hooks get it as ``context``; ``model_loader``, ``augmentation`` and
``get_callbacks_and_ready_for_train`` (signatures fixed by the original framework) read
:attr:`AccelerationPlugin.run_context`, set by the framework before they run. A plugin never reads Accelerate's
state or environment variables itself.
A plugin that patches should do each kind of patch in one documented phase (its module docstring says which).

Plugins are discovered through the entry-point group ``fms_acceleration_accelerate.plugins``; nothing is
registered in a global table. The seed's ``AccelerationPlugin.register_plugin(cls, configuration_and_paths=[...])``
still works: it sets the class attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import AccelerationConfigError

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback

    from .dequant import DequantBackend, DequantBackendRegistry
    from .distributed import PrepareContribution, RunContext
    from .patching import PluginPatcher


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Config class of plugins whose section takes no options."""


_SEQUENCE_DECLARATIONS = (
    "configuration_and_paths",
    "configuration_or_paths",
    "required_packages",
    "supported_model_types",
    "incompatible_paths",
)
_DECLARATIONS = (*_SEQUENCE_DECLARATIONS, "name", "config_class", "install_hint", "order")


class AccelerationPlugin:
    """Base class of every acceleration plugin. See the module docstring for the declarations."""

    name: ClassVar[str] = ""
    configuration_and_paths: ClassVar[tuple[str, ...]] = ()
    configuration_or_paths: ClassVar[tuple[str, ...]] = ()
    config_class: ClassVar[type] = NoOptions
    required_packages: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""
    supported_model_types: ClassVar[tuple[str, ...] | None] = None
    order: ClassVar[int] = 500
    incompatible_paths: ClassVar[tuple[str, ...]] = ()

    config_root: str = "plugins"
    """Key under which the framework found this plugin's sections (``plugins``, ``acceleration``,
    ``acceleration.plugins`` or ``""``); set by the framework, used by :meth:`key_path`."""

    dequant_registry: DequantBackendRegistry | None = None
    """The framework's :class:`~fms_acceleration_accelerate.dequant.DequantBackendRegistry`: every active plugin's
    :meth:`dequant_backends`, in run order; set by the framework once all plugins are activated (before
    :meth:`check_compatibility`). ``None`` for a plugin created outside a framework."""

    _run_context: RunContext | None = None

    @property
    def run_context(self) -> RunContext:
        """How the run is wrapped (:class:`~fms_acceleration_accelerate.distributed.RunContext`): set by the
        framework before ``model_loader``, ``augmentation`` and ``get_callbacks_and_ready_for_train`` run (from the
        ``Accelerator`` once one exists, else from the launcher's environment and the training arguments); the same
        object the prepare-time hooks get as ``context``. A plugin created outside a framework sees the defaults
        (one process, no FSDP)."""
        if self._run_context is None:
            from .distributed import RunContext

            return RunContext()
        return self._run_context

    @run_context.setter
    def run_context(self, context: RunContext) -> None:
        self._run_context = context

    def __init__(self, config: Any, *, matched_paths: tuple[str, ...], patches: PluginPatcher) -> None:
        """Create an activated plugin.

        Args:
            config: instance of ``config_class`` parsed from the section at ``matched_paths[0]``.
            matched_paths: the registered paths present in the configuration (AND: all; OR: the one found).
            patches: recorder view through which all patches must be made.
        """
        self.config = config
        self.matched_paths = matched_paths
        self.patches = patches

    # ------------------------------------------------------------------ registration (seed compatibility)
    @staticmethod
    def register_plugin(
        plugin: type[AccelerationPlugin],
        configuration_and_paths: Sequence[str] | None = None,
        configuration_or_paths: Sequence[str] | None = None,
        **attributes: Any,
    ) -> type[AccelerationPlugin]:
        """Declare the config paths (and any other class attribute) of ``plugin``; returns ``plugin``.

        This is the seed's API; it only sets class attributes. Discovery still happens through the
        plugin package's entry point.
        """
        if not (isinstance(plugin, type) and issubclass(plugin, AccelerationPlugin)):
            raise TypeError(f"register_plugin expects an AccelerationPlugin subclass, got {plugin!r}")
        updates: dict[str, Any] = {}
        if configuration_and_paths is not None:
            updates["configuration_and_paths"] = configuration_and_paths
        if configuration_or_paths is not None:
            updates["configuration_or_paths"] = configuration_or_paths
        for key, value in attributes.items():
            if key not in _DECLARATIONS:
                raise TypeError(
                    f"register_plugin: unknown plugin attribute {key!r}; valid: {', '.join(sorted(_DECLARATIONS))}"
                )
            updates[key] = value
        for key, value in updates.items():
            if key in _SEQUENCE_DECLARATIONS and value is not None:
                if isinstance(value, str):
                    raise TypeError(f"register_plugin: {key} must be a list of strings, not the string {value!r}")
                updates[key] = tuple(value)
        previous = {key: plugin.__dict__[key] for key in updates if key in plugin.__dict__}
        for key, value in updates.items():
            setattr(plugin, key, value)
        try:
            plugin.validate_declaration()
        except TypeError:
            for key in updates:  # leave the class as it was
                if key in previous:
                    setattr(plugin, key, previous[key])
                else:
                    delattr(plugin, key)
            raise
        return plugin

    def key_path(self, *keys: str) -> str:
        """Full dotted path of ``keys`` inside this plugin's (first) section, for error messages.

        E.g. ``self.key_path("quant_type")`` -> ``"acceleration.peft.quantization.bitsandbytes.quant_type"``
        when the config was an Accelerate config. (An :class:`AccelerationConfigError` whose ``path`` is
        relative to the config body, e.g. ``"peft.quantization.bitsandbytes"``, is also completed by the
        framework when raised from a hook.)
        """
        return ".".join(k for k in (self.config_root, *self.matched_paths[:1], *keys) if k)

    @classmethod
    def plugin_name(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def all_paths(cls) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*cls.configuration_and_paths, *cls.configuration_or_paths)))

    @classmethod
    def validate_declaration(cls) -> None:
        """Check the class-level declarations (internal consistency, not user input)."""
        for key in _SEQUENCE_DECLARATIONS:
            value = getattr(cls, key)
            if value is None and key == "supported_model_types":
                continue
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"plugin {cls.plugin_name()}: {key} must be a tuple of strings, got {value!r}")
        if not isinstance(cls.order, int) or isinstance(cls.order, bool):
            raise TypeError(f"plugin {cls.plugin_name()}: order must be an int, got {cls.order!r}")
        if not cls.all_paths():
            raise TypeError(f"plugin {cls.plugin_name()} declares no configuration paths")
        if cls.configuration_and_paths and cls.configuration_or_paths:
            raise TypeError(f"plugin {cls.plugin_name()} declares both AND and OR paths; declare one kind")
        if not dataclasses.is_dataclass(cls.config_class):
            raise TypeError(f"plugin {cls.plugin_name()}: config_class must be a dataclass")
        for path in (*cls.all_paths(), *cls.incompatible_paths):
            if not path or any(not part.isidentifier() for part in path.split(".")):
                raise TypeError(f"plugin {cls.plugin_name()}: invalid configuration path {path!r}")

    # ------------------------------------------------------------------ hooks: loading and augmentation
    @property
    def requires_custom_loading(self) -> bool:
        """True when this plugin loads the model (overrides :meth:`model_loader`)."""
        return type(self).model_loader is not AccelerationPlugin.model_loader

    @property
    def requires_augmentation(self) -> bool:
        """True when this plugin changes the loaded model (overrides :meth:`augmentation`)."""
        return type(self).augmentation is not AccelerationPlugin.augmentation

    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> nn.Module:
        """Load and return the model (only for plugins that own loading). The run's shape (where to put the
        weights, whether FSDP will shard them) is :attr:`run_context`; ``kwargs`` are ``from_pretrained``'s."""
        raise NotImplementedError(f"plugin {self.plugin_name()} does not load models")

    def augmentation(
        self, model: nn.Module, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[nn.Module, tuple[Any, ...]]:
        """Change the model (e.g. add LoRA adapters, patch kernels); return ``(model, modifiable_args)``.
        ``train_args`` are the client's training arguments (e.g. ``transformers.TrainingArguments``) or ``None``;
        the run's shape, refined by them, is :attr:`run_context`."""
        raise NotImplementedError(f"plugin {self.plugin_name()} does not augment models")

    # ------------------------------------------------------------------ hooks: Accelerator.prepare
    def prepare_contribution(self, model: nn.Module, context: RunContext) -> PrepareContribution | None:
        """Before FSDP wrapping: return a :class:`~fms_acceleration_accelerate.distributed.PrepareContribution`
        (wrap policy units, ignored modules, mixed-precision needs) for this plugin's layers, or ``None``."""
        return None

    def check_run_settings(self, context: RunContext) -> None:
        """Refuse distributed / precision settings this plugin cannot work with, from ``context`` alone: called
        when the ``Accelerator`` is created, before the script loads a model. Raise
        :class:`~fms_acceleration_accelerate.errors.AccelerationConfigError` naming the setting and the fix.
        Default: accept everything."""
        return None

    def contributes_under_fsdp2(self) -> bool:
        """Whether ``prepare_contribution`` may return a contribution under FSDP2, known from the config alone
        (no model). The framework then applies its own ``fully_shard`` plan, which rules out Accelerate
        settings it cannot follow (``fsdp_cpu_ram_efficient_loading``); answering here lets them be refused
        when the ``Accelerator`` is created, before any model is loaded. Default: whether the plugin overrides
        ``prepare_contribution``."""
        return type(self).prepare_contribution is not AccelerationPlugin.prepare_contribution

    def check_prepared_model(self, model: nn.Module, context: RunContext) -> None:
        """At ``Accelerator.prepare``, before any other prepare hook: refuse a model this plugin cannot have
        accelerated, so an active plugin is never silently without effect.

        ``model`` is the object handed to ``prepare`` (possibly a PEFT model, whose LoRA was added by a trainer
        rather than by this framework's ``augmentation``); ``context`` is the run's shape.
        Raise :class:`~fms_acceleration_accelerate.errors.AccelerationConfigError` that says what the model lacks,
        why (e.g. it was loaded outside the plugin) and the fix. Examples: a loading plugin checks that the layers
        it loads are there; a kernel plugin checks that the modules its options need exist. Default: accept."""
        return None

    def after_prepare(self, model: nn.Module, context: RunContext) -> None:
        """After wrapping: patch what needs the wrapped/sharded model (through ``self.patches``). ``model`` is what
        ``Accelerator.prepare`` returned (possibly a DDP / FSDP wrapper)."""
        return None

    def prepare_dataloader(self, dataloader: DataLoader, context: RunContext) -> DataLoader:
        """``Accelerator.prepare`` got ``dataloader``: return the DataLoader Accelerate should prepare (the same
        object, changed through ``self.patches``, or another one). Default: ``dataloader`` unchanged."""
        return dataloader

    def get_callbacks_and_ready_for_train(
        self, model: nn.Module | None = None, accelerator: Accelerator | None = None
    ) -> list[TrainerCallback]:
        """HF Trainer / TRL callbacks this plugin needs, after any last preparation of ``model`` (the trainer's
        model, once the trainer is built); :attr:`run_context` is then the ``accelerator``'s, when one is given."""
        return []

    # ------------------------------------------------------------------ contributions
    def dequant_backends(self) -> tuple[DequantBackend, ...]:
        """Dequant backends this plugin contributes: how fused kernels read the frozen weights of the linear layers
        this plugin puts on models (see :mod:`fms_acceleration_accelerate.dequant`). The framework calls it once,
        after activating every plugin, and orders the entries by plugin run order, then as returned; the first
        backend that handles a layer wins. Must not import optional packages. Default: none."""
        return ()

    # ------------------------------------------------------------------ checks and reporting
    def check_compatibility(self, active: Sequence[AccelerationPlugin]) -> None:
        """Raise :class:`AccelerationConfigError` if this plugin cannot run with the ``active`` ones."""
        return None

    def check_model_type(self, model_type: str | None) -> None:
        """Raise :class:`AccelerationConfigError` if this plugin does not support ``model_type``."""
        supported = self.supported_model_types
        if supported is None or model_type in supported:
            return
        raise AccelerationConfigError(
            f"plugin {self.plugin_name()!r} does not support model type {model_type!r}",
            path=self.matched_paths[0] if self.matched_paths else None,
            fix=f"supported model types: {', '.join(supported)}; remove this section for this model",
        )

    def describe(self) -> list[str]:
        """One line per thing this plugin will do, for ``fms-accelerate check`` (no model needed)."""
        options = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return [f"options: {options}" if options else "no options"]

    def describe_run(self, context: RunContext) -> list[str]:
        """What this plugin does differently in the run ``context`` describes (e.g. under DeepSpeed ZeRO-3), one line
        per thing, for ``fms-accelerate check`` of an Accelerate config file (no model needed). Default: nothing."""
        return []
