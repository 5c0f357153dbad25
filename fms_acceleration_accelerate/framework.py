"""``AccelerationFramework``: resolves plugins from a configuration and runs their hooks in order."""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from packaging.requirements import InvalidRequirement, Requirement

from .config import (
    BODY_KEYS,
    AccelerationConfig,
    get_section,
    load_acceleration_config,
    parse_dataclass_sections,
)
from .dequant import DequantBackendRegistry
from .errors import (
    AccelerationConfigError,
    NoPluginsConfiguredError,
    Problem,
    did_you_mean,
    key_name,
    quote,
    truncate,
)
from .patching import PatchRecorder, PluginPatcher
from .plugin import AccelerationPlugin
from .registry import KNOWN_SECTIONS, PluginEntry, PluginRegistry

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .distributed import RunContext

logger = logging.getLogger("fms_acceleration_accelerate")


@dataclass(frozen=True)
class PassthroughSection:
    """A configured section that no installed plugin handles (kept, not acted on)."""

    path: str
    reason: str


def is_main_process() -> bool:
    """True on global rank 0 (or when not distributed)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover - torch is always present in practice
        pass
    return int(os.environ.get("RANK", "0")) == 0


def check_requirements(requirements: Sequence[str], *, who: str, path: str, install_hint: str) -> None:
    """Raise :class:`AccelerationConfigError` unless every PEP 508 requirement is installed."""
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:  # a plugin bug, not a user error
            raise TypeError(f"{who}: invalid requirement {text!r}: {exc}") from None
        if req.marker is not None and not req.marker.evaluate():
            continue  # not needed on this platform / Python
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or (req.specifier and not req.specifier.contains(installed, prereleases=True)):
            have = "is not installed" if installed is None else f"is {installed}"
            raise AccelerationConfigError(
                f"plugin {who!r} needs {text} but {req.name} {have}",
                path=path,
                fix=install_hint or f"pip install '{text}'",
            )


class AccelerationFramework:
    """Activate the installed plugins named by a configuration and run their hooks.

    Args:
        configuration_file_or_dict: YAML path, dict, or ``None`` for ``$ACCELERATION_FRAMEWORK_CONFIG_FILE``
            (see :func:`~fms_acceleration_accelerate.config.load_acceleration_config`).
        registry: plugins to choose from; default: those installed (entry points).
        check_packages: verify each active plugin's ``required_packages`` (disable only in tests).

    Raises:
        AccelerationConfigError: any configuration problem, before any model is loaded.
    """

    def __init__(
        self,
        configuration_file_or_dict: str | os.PathLike | Mapping[str, Any] | None = None,
        *,
        registry: PluginRegistry | None = None,
        check_packages: bool = True,
    ) -> None:
        self.config: AccelerationConfig = load_acceleration_config(configuration_file_or_dict)
        self.registry = registry if registry is not None else PluginRegistry.discover()
        self.patches = PatchRecorder()
        self._summary_logged: set[int] | None = None  # ids of the records log_patch_summary printed
        self._claimed: weakref.WeakSet[Any] = weakref.WeakSet()  # models marked by claim_model
        self._run_context: RunContext | None = None  # see run_context
        # every problem of the configuration is collected and reported at once: the Accelerate settings (when
        # the body came from an Accelerate config), the section tree, each plugin's options and packages
        errors: list[AccelerationConfigError] = []
        if self.config.accelerate_settings:
            from .accelerate_config import accelerate_settings_problems

            errors.extend(accelerate_settings_problems(self.config.accelerate_settings, origin=self.config.origin))
        settings_errors = len(errors)
        claimed = self._walk_sections(errors)
        self.plugins: tuple[AccelerationPlugin, ...]
        self.plugins, self.passthrough = self._activate(claimed, check_packages, errors)
        if not self.plugins and len(errors) == settings_errors:  # a body that is valid but activates nothing
            errors.append(self._nothing_activated())
        if errors:
            raise AccelerationConfigError.combine(errors)
        self.dequant_registry = DequantBackendRegistry.from_plugins(self.plugins)
        """Dequant backends every active plugin contributes (``dequant_backends()``), in run order."""
        for plugin in self.plugins:
            plugin.dequant_registry = self.dequant_registry
        self._check_combination()
        for section in self.passthrough:
            if is_main_process():
                logger.warning("acceleration section %s passed through: %s", section.path, section.reason)

    def _nothing_activated(self) -> NoPluginsConfiguredError:
        """The original framework's error for a configuration that activates no plugin, saying which sections
        were passed through and why."""
        installed = sorted(self.registry.paths)
        found = "every section was passed through: " + "; ".join(f"{s.path} ({s.reason})" for s in self.passthrough)
        fix = "add the missing sections or install the plugins named above, or correct the section paths" + (
            f" (installed plugins register: {', '.join(self.config.path(p) for p in installed)})"
            if installed
            else " (no plugin is installed: 'fms-accelerate plugins' lists them)"
        )
        return NoPluginsConfiguredError(truncate(found, 1200), fix=truncate(fix, 800), root=self.config.root or None)

    # ------------------------------------------------------------------------------------ resolution
    def _known_paths(self) -> set[str]:
        return set(self.registry.paths) | set(KNOWN_SECTIONS)

    def _walk_sections(self, errors: list[AccelerationConfigError]) -> set[str]:
        """Check the shape of the config tree; return the known section paths present in it. Problems are
        appended to ``errors`` (every misspelt or misshapen section, not only the first)."""
        known = self._known_paths()
        prefixes = {".".join(p.split(".")[:i]) for p in known for i in range(1, p.count(".") + 1)}
        claimed: set[str] = set()

        def walk(node: Any, parts: tuple[str, ...]) -> None:
            here = ".".join(parts)
            if here in known:
                claimed.add(here)
                return
            if parts and here not in prefixes:
                siblings = {
                    p.split(".")[len(parts) - 1]
                    for p in known | prefixes
                    if p.count(".") >= len(parts) - 1 and p.split(".")[: len(parts) - 1] == list(parts[:-1])
                }
                candidates = siblings | (set(BODY_KEYS) if len(parts) == 1 and not self.config.root else set())
                hint = did_you_mean(parts[-1], candidates)
                if hint:
                    errors.append(
                        AccelerationConfigError(
                            f"unknown section {quote(parts[-1], 80)}.{hint}",
                            path=self.config.path(here),
                            fix=f"valid sections here: {', '.join(sorted(siblings))}",
                        )
                    )
                    return
                claimed.add(here)  # an unknown (third-party, not installed) plugin section: passed through
                return
            if not isinstance(node, Mapping) or not node:
                children = sorted({p.split(".")[len(parts)] for p in known | prefixes if p.startswith(here + ".")})
                empty = node is None or (isinstance(node, Mapping) and not node)
                errors.append(
                    AccelerationConfigError(
                        "is empty" if empty else f"must be a mapping of plugin sections, got {quote(node)}",
                        path=self.config.path(here),
                        fix=f"nest one of these sections under it: {', '.join(children)}"
                        + (", or remove it" if empty else ""),
                    )
                )
                return
            for key, child in node.items():
                walk(child, (*parts, key_name(key)))

        walk(self.config.body, ())
        return claimed

    def _activate(
        self, claimed: set[str], check_packages: bool, errors: list[AccelerationConfigError]
    ) -> tuple[tuple[AccelerationPlugin, ...], tuple[PassthroughSection, ...]]:
        """Parse the options of every plugin whose sections are present; problems go to ``errors``."""
        active: list[AccelerationPlugin] = []
        handled: set[str] = set()
        passthrough: list[PassthroughSection] = []
        for entry in self.registry.entries:
            cls = entry.plugin_class
            if cls is None:
                continue
            try:
                matched = self._matched_paths(cls, claimed)
            except AccelerationConfigError as exc:
                errors.append(exc)
                continue
            if matched is None:
                continue
            handled.update(matched)
            if cls.configuration_and_paths and len(matched) < len(cls.configuration_and_paths):
                missing = [p for p in cls.configuration_and_paths if p not in matched]
                passthrough.extend(
                    PassthroughSection(
                        self.config.path(p),
                        f"plugin {entry.name!r} activates only when all of its sections are present; missing: "
                        + ", ".join(self.config.path(m) for m in missing),
                    )
                    for p in matched
                )
                continue
            primary = matched[0]
            try:
                config = parse_dataclass_sections(cls.config_class, self._section_options(cls, matched))
            except AccelerationConfigError as exc:
                errors.append(exc)
                config = None
            if check_packages:
                try:
                    check_requirements(
                        cls.required_packages,
                        who=entry.name,
                        path=self.config.path(primary),
                        install_hint=cls.install_hint,
                    )
                except AccelerationConfigError as exc:
                    errors.append(exc)
                    continue
            if config is None:
                continue
            plugin = cls(config, matched_paths=matched, patches=PluginPatcher(self.patches, entry.name))
            plugin.config_root = self.config.root
            active.append(plugin)
        failed = ", ".join(f"{e.name} ({e.load_error})" for e in self.registry.failed())
        for path in sorted(claimed - handled):
            hint = KNOWN_SECTIONS.get(path)
            if hint:
                reason = f"its plugin is not installed; enable it with: {hint}"
            elif path in KNOWN_SECTIONS:
                reason = "upstream fms-acceleration section with no plugin in this release"
            else:
                reason = "no installed plugin registers this section"
            if failed:
                reason += f" (plugins that failed to load: {failed})"
            passthrough.append(PassthroughSection(self.config.path(path), reason))
        return tuple(active), tuple(passthrough)

    def _matched_paths(self, cls: type[AccelerationPlugin], claimed: set[str]) -> tuple[str, ...] | None:
        """The plugin's registered paths present in the config, in the plugin's declaration order.

        AND plugins: the present ones (the caller passes the plugin through unless all are there). OR plugins:
        every present one; several are merged by :meth:`_section_options` (the original framework, too, hands
        a plugin every OR section that is configured)."""
        declared = cls.configuration_and_paths or cls.configuration_or_paths
        matched = tuple(p for p in declared if p in claimed)
        return matched or None

    def _section_options(self, cls: type[AccelerationPlugin], matched: tuple[str, ...]) -> list[tuple[str, Any]]:
        """``(full key path, options)`` of each matched section, ready for ``parse_dataclass_sections``.

        Each section first goes through the config class's ``normalize_section(data, path)`` when it has one
        (a plugin's way to accept other spellings of its options, e.g. upstream fms-acceleration's).

        AND paths: the sections as they are (together they may set each option once). OR paths configured more
        than once (fms-hf-tuning writes ``--fast_kernels`` to ``training.fused_ops_and_kernels`` and
        ``--fused_lora`` to ``peft.quantization.fused_ops_and_kernels``) are merged key by key: an option set in
        one section is kept; one set to the same value in several is kept once; one set to different values
        takes the value from the path the plugin declares first, with a warning naming both. That is the
        section the original framework's fused-ops plugin reads: it takes ``training.fused_ops_and_kernels``
        when present and ignores the other section, even the options only the other section sets (kept here).
        """
        normalize = getattr(cls.config_class, "normalize_section", None)
        sections: list[tuple[str, Any]] = []
        for dotted in matched:
            full = self.config.path(dotted)
            data = get_section(self.config.body, dotted)[1]
            sections.append((full, normalize(data, full) if callable(normalize) else data))
        if cls.configuration_and_paths or len(sections) < 2:
            return sections
        first_set: dict[str, tuple[str, Any]] = {}  # option -> (path of the section that set it first, value)
        merged: list[tuple[str, Any]] = []
        for full, data in sections:
            if not isinstance(data, Mapping):
                merged.append((full, data))  # None / true mean "defaults"; anything else is refused when parsed
                continue
            own: dict[str, Any] = {}
            for key, value in data.items():
                if key not in first_set:
                    first_set[key] = (full, value)
                    own[key] = value
                    continue
                kept_path, kept = first_set[key]
                if kept != value and is_main_process():
                    logger.warning(
                        f"acceleration option {key!r} of plugin {cls.plugin_name()!r} is set in two sections: "
                        f"{kept_path}.{key} = {kept!r} and {full}.{key} = {value!r}; using {kept!r} (the plugin's "
                        "first section wins, as in fms-acceleration)"
                    )
            merged.append((full, own))
        return merged

    def _check_combination(self) -> None:
        """Refuse plugin combinations that cannot work (every such problem at once)."""
        errors: list[AccelerationConfigError] = []
        loaders = [p for p in self.plugins if p.requires_custom_loading]
        if len(loaders) > 1:
            errors.append(
                AccelerationConfigError(
                    "more than one active plugin loads the model: "
                    + ", ".join(f"{p.plugin_name()} ({self.config.path(p.matched_paths[0])})" for p in loaders),
                    fix="keep only one of these sections",
                )
            )
        active_paths = {path: p for p in self.plugins for path in p.matched_paths}
        for plugin in self.plugins:
            for path in plugin.incompatible_paths:
                other = active_paths.get(path)
                if other is not None and other is not plugin:
                    errors.append(
                        AccelerationConfigError(
                            f"plugin {plugin.plugin_name()!r} cannot be combined with {other.plugin_name()!r}",
                            path=self.config.path(path),
                            fix=f"remove either {self.config.path(plugin.matched_paths[0])} or {self.config.path(path)}",
                        )
                    )
        for plugin in self.plugins:
            try:
                with self._full_paths(plugin):
                    plugin.check_compatibility(self.plugins)
            except AccelerationConfigError as exc:
                errors.append(exc)
        errors.extend(self._check_configured_run())
        if errors:
            raise AccelerationConfigError.combine(errors)

    def _check_configured_run(self) -> list[AccelerationConfigError]:
        """The run the Accelerate settings of the config file describe (DeepSpeed only, see
        :func:`~fms_acceleration_accelerate.launch_environment.run_context_from_accelerate_settings`), checked by
        every plugin's ``check_run_settings`` now: in the launcher and in ``fms-accelerate check``, before any
        process loads a model. Sets :attr:`configured_run`; returns the problems."""
        self.configured_run = None
        if not self.config.accelerate_settings:
            return []
        from .launch_environment import run_context_from_accelerate_settings

        try:
            context = run_context_from_accelerate_settings(self.config.accelerate_settings, origin=self.config.origin)
        except AccelerationConfigError as exc:
            return [exc]
        if context is None:
            return []
        self.configured_run = dataclasses.replace(context, framework=self)
        errors = []
        from .deepspeed_offload import check_offload

        try:
            check_offload(self.configured_run)
        except AccelerationConfigError as exc:
            errors.append(exc)
        for plugin in self.plugins:
            try:
                with self._full_paths(plugin):
                    plugin.check_run_settings(self.configured_run)
            except AccelerationConfigError as exc:
                errors.append(exc)
        return errors

    @contextmanager
    def _full_paths(self, plugin: AccelerationPlugin) -> Iterator[None]:
        """Re-raise a plugin's error about a key in its sections with the full key path (root prefixed)."""
        try:
            yield
        except AccelerationConfigError as exc:
            if not any(self._in_sections(p.path, plugin) for p in exc.problems):
                raise
            first, *rest = (
                Problem(self.config.path(p.path), p.problem, p.fix) if self._in_sections(p.path, plugin) else p
                for p in exc.problems
            )
            raise AccelerationConfigError(first.problem, path=first.path, fix=first.fix, more=rest) from None

    @staticmethod
    def _in_sections(path: str | None, plugin: AccelerationPlugin) -> bool:
        """Whether ``path`` is a key path relative to the body inside one of ``plugin``'s sections."""
        return path is not None and any(path == p or path.startswith(p + ".") for p in plugin.matched_paths)

    # ------------------------------------------------------------------------------------ public API
    @property
    def active_plugins(self) -> list[tuple[str, AccelerationPlugin]]:
        """``(name, plugin)`` pairs of the active plugins, in run order (the original framework's attribute;
        :attr:`plugins` holds the plugin objects alone)."""
        return [(p.plugin_name(), p) for p in self.plugins]

    @property
    def active_plugin_names(self) -> tuple[str, ...]:
        return tuple(p.plugin_name() for p in self.plugins)

    def plugin(self, name: str) -> AccelerationPlugin:
        """The active plugin called ``name``."""
        for p in self.plugins:
            if p.plugin_name() == name:
                return p
        raise KeyError(f"no active plugin named {name!r}; active: {', '.join(self.active_plugin_names) or 'none'}")

    @property
    def plugins_require_custom_loading(self) -> list[str]:
        """Names of the active plugins that load the model (at most one; the original framework's attribute)."""
        return [p.plugin_name() for p in self.plugins if p.requires_custom_loading]

    @property
    def requires_custom_loading(self) -> bool:
        return any(p.requires_custom_loading for p in self.plugins)

    @property
    def requires_augmentation(self) -> bool:
        return any(p.requires_augmentation for p in self.plugins)

    # upstream spelled it this way; kept so existing integrations keep working
    requires_agumentation = requires_augmentation

    # ------------------------------------------------------------------------------------ the run's shape
    @property
    def run_context(self) -> RunContext:
        """How the run is wrapped (a :class:`~fms_acceleration_accelerate.distributed.RunContext`): what every hook
        that needs the run's shape is handed (the prepare-time hooks as ``context``, the others as
        ``plugin.run_context``).

        The Accelerate integration binds the ``Accelerator``'s when it is created with this framework, or given to
        :meth:`get_callbacks_and_ready_for_train` / ``Accelerator.prepare`` (rebuilt only when that Accelerator's
        settings changed since); until then it is built once, on first use, from the launcher's environment
        (:mod:`~fms_acceleration_accelerate.launch_environment`) and refined by the training arguments given to
        :meth:`augmentation`.
        """
        context = self._run_context
        if context is None:
            from .launch_environment import detect_client, run_context_from_environment

            context = self.bind_run_context(
                run_context_from_environment(framework=self, client=detect_client("framework-api"))
            )
        return context

    def bind_run_context(self, context: RunContext) -> RunContext:
        """Make ``context`` the run's shape of this framework's hooks (each active plugin's ``run_context``);
        returns it, with ``framework`` set to this framework. Called by the Accelerate integration; a script
        driving the hooks without an ``Accelerator`` may call it too."""
        if context.framework is not self:
            context = dataclasses.replace(context, framework=self)
        self._run_context = context
        for plugin in self.plugins:
            plugin.run_context = context
        return context

    def _context_for_hook(self, *, accelerator: Any = None, train_args: Any = None) -> RunContext:
        """The run context a hook about to run is handed: the ``Accelerator``'s (``accelerator``, else the one the
        current context came from) when there is one, else the environment's refined by ``train_args``."""
        from accelerate import Accelerator

        context = self.run_context
        if not isinstance(accelerator, Accelerator):
            accelerator = context.accelerator
        if accelerator is not None:
            from .accelerate_integration import context_for_accelerator

            return context_for_accelerator(self, accelerator)
        from .launch_environment import refine_with_training_arguments

        refined = refine_with_training_arguments(context, train_args)  # e.g. train_args.fsdp
        return context if refined is context else self.bind_run_context(refined)

    def check_model_type(self, model_type: str | None) -> None:
        """Raise :class:`AccelerationConfigError` if an active plugin does not support ``model_type``."""
        for plugin in self.plugins:
            with self._full_paths(plugin):
                plugin.check_model_type(model_type)

    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> Any:
        """Load the model with the one plugin that owns loading (the path and the model type are checked first).

        The model is marked as accelerated by this framework (see :meth:`claim_model`). ``from_pretrained`` calls
        inside the plugin's loader are never routed (see :mod:`~fms_acceleration_accelerate.routing`).

        Raises:
            AccelerationConfigError: no active plugin loads models; ``model_name_or_path`` does not exist and is not
                a hub id; the model type is not supported; any problem the plugin finds before loading.
        """
        loaders = [p for p in self.plugins if p.requires_custom_loading]
        if not loaders:
            raise AccelerationConfigError(
                "no active plugin loads models",
                fix="check framework.requires_custom_loading first and load the model yourself when it is False",
            )
        from transformers import AutoConfig, PretrainedConfig

        from .routing import check_model_path, plugin_loading

        check_model_path(model_name_or_path, subfolder=kwargs.get("subfolder"))
        given = kwargs.get("config")
        if isinstance(given, PretrainedConfig):
            model_config = given
        else:
            model_config = AutoConfig.from_pretrained(
                given if isinstance(given, (str, os.PathLike)) else model_name_or_path,
                trust_remote_code=kwargs.get("trust_remote_code", False),
            )
        self.check_model_type(getattr(model_config, "model_type", None))
        context = self._context_for_hook()  # the loader reads it as plugin.run_context
        if context.is_deepspeed:  # no Accelerator may exist yet (a trainer given a model path): refuse before loading
            for plugin in self.plugins:
                with self._full_paths(plugin):
                    plugin.check_run_settings(context)
        logger.debug("fms-acceleration: %s loads the model; run: %s", loaders[0].plugin_name(), context.describe())
        with self._full_paths(loaders[0]), plugin_loading():
            model = loaders[0].model_loader(model_name_or_path, **kwargs)
        self.claim_model(model, "model_loader")
        return model

    # ------------------------------------------------------------------------------------ one model, one framework
    def claim_model(self, model: Any, hook: str = "augmentation") -> None:
        """Mark ``model`` as accelerated by this framework.

        One model is accelerated by one framework: a model that another live framework has loaded, augmented or
        prepared is refused, since both would patch it. (``Accelerator.prepare`` recognises the case of a
        script's own framework whose configuration equals the launched one; see the integration module.)

        Raises:
            AccelerationConfigError: ``model`` belongs to another framework; the message names both configs.
        """
        owner = framework_of(model)
        if owner is None:
            if isinstance(model, _module_types()):
                object.__setattr__(model, _OWNER_ATTR, weakref.ref(self))
                self._claimed.add(model)
            return
        if owner is not self:
            raise AccelerationConfigError(
                f"{hook} got a model that another AccelerationFramework already accelerated "
                f"({owner.describe_configuration()}); this one is {self.describe_configuration()}. Both would "
                "patch the same modules",
                fix="accelerate each model with one framework: keep using the framework that loaded or augmented "
                "it, or load a fresh model for this one",
            )

    def same_configuration(self, other: AccelerationFramework) -> bool:
        """Whether ``other`` activates the same plugins with the same options."""
        return [(p.plugin_name(), p.config) for p in self.plugins] == [
            (p.plugin_name(), p.config) for p in other.plugins
        ]

    def describe_configuration(self) -> str:
        """One line: where the configuration came from and the active plugins with their non-default options."""
        parts = []
        for plugin in self.plugins:
            changed = [
                f"{f.name}={getattr(plugin.config, f.name)!r}"
                for f in dataclasses.fields(plugin.config)
                if f.default is dataclasses.MISSING or getattr(plugin.config, f.name) != f.default
            ]
            parts.append(f"{plugin.plugin_name()}({', '.join(changed)})")
        origin = self.config.origin
        return f"{origin if origin.startswith('the ') else 'config ' + origin}: {', '.join(parts) or 'no plugins'}"

    def augmentation(
        self, model: Any, train_args: Any = None, modifiable_args: tuple[Any, ...] = ()
    ) -> tuple[Any, tuple[Any, ...]]:
        """Run every active plugin's augmentation in order; returns ``(model, modifiable_args)``.

        Raises:
            AccelerationConfigError: the model type is not supported, or another framework already accelerated
                ``model`` (see :meth:`claim_model`).
        """
        model_config = getattr(model, "config", None)
        self.check_model_type(getattr(model_config, "model_type", None))
        self.claim_model(model, "augmentation")
        self._context_for_hook(train_args=train_args)  # the plugins read it as plugin.run_context
        modifiable_args = tuple(modifiable_args)
        for plugin in self.plugins:
            if plugin.requires_augmentation:
                with self._full_paths(plugin):
                    result = plugin.augmentation(model, train_args, modifiable_args)
                if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], tuple)):
                    raise TypeError(
                        f"plugin {plugin.plugin_name()!r}: augmentation must return (model, modifiable_args) with "
                        f"modifiable_args a tuple, got {type(result).__name__}"
                    )
                if len(result[1]) != len(modifiable_args):
                    raise TypeError(
                        f"plugin {plugin.plugin_name()!r}: augmentation returned {len(result[1])} modifiable_args "
                        f"for {len(modifiable_args)} given; return one value per argument (None to consume one)"
                    )
                model, modifiable_args = result
        self.claim_model(model, "augmentation")  # the returned object (e.g. a PEFT model wrapping the given one)
        return model, modifiable_args

    def check_prepared_model(self, model: nn.Module, context: RunContext) -> None:
        """Run every active plugin's :meth:`~fms_acceleration_accelerate.plugin.AccelerationPlugin.check_prepared_model`
        on ``model`` (called by ``Accelerator.prepare`` before any other prepare hook)."""
        for plugin in self.plugins:
            with self._full_paths(plugin):
                plugin.check_prepared_model(model, context)

    def prepare_dataloader(self, dataloader: Any, context: RunContext) -> Any:
        """Run every active plugin's
        :meth:`~fms_acceleration_accelerate.plugin.AccelerationPlugin.prepare_dataloader` on ``dataloader``, in
        order, each given the previous one's result (called by ``Accelerator.prepare`` for each DataLoader)."""
        from torch.utils.data import DataLoader

        for plugin in self.plugins:
            with self._full_paths(plugin):
                result = plugin.prepare_dataloader(dataloader, context)
            if not isinstance(result, DataLoader):
                raise TypeError(
                    f"plugin {plugin.plugin_name()!r}: prepare_dataloader must return a torch DataLoader, got "
                    f"{type(result).__name__}"
                )
            dataloader = result
        return dataloader

    def get_callbacks_and_ready_for_train(self, model: Any = None, accelerator: Any = None) -> list[Any]:
        """Collect HF Trainer / TRL callbacks from every active plugin; prints the patch table (see
        :meth:`log_patch_summary`). With an ``accelerator`` (e.g. ``trainer.accelerator``), the plugins' run
        context is that Accelerator's from here on (see :attr:`run_context`)."""
        self._context_for_hook(accelerator=accelerator)  # the plugins read it as plugin.run_context
        callbacks: list[Any] = []
        for plugin in self.plugins:
            callbacks.extend(plugin.get_callbacks_and_ready_for_train(model, accelerator))
        self.log_patch_summary(model)
        return callbacks

    def log_patch_summary(self, model: Any = None, force: bool = False) -> None:
        """Print the patch table on the main process, once. Patches added after it was printed (e.g. kernels
        patched in ``Accelerator.prepare`` after ``get_callbacks_and_ready_for_train``) are printed later as a
        table of the added rows only; nothing is printed while nothing is patched; ``force`` prints the whole
        table (even an empty one) again.

        With ``model`` (a module or a list of them), patches of module instances that are no longer part of it
        (a layer another plugin replaced after it was patched) are left out: the table lists what runs.
        """
        if not is_main_process():
            return
        if isinstance(model, bool):  # the former signature was log_patch_summary(force)
            model, force = None, model
        modules = _attached_modules(model)
        records = [r for r in self.patches.records if modules is None or _runs_in(r, modules)]
        printed = self._summary_logged
        if not records and not force:
            return  # nothing patched (yet): no table; e.g. kernels a trainer's prepare patches come later
        if printed is None or force:
            self._summary_logged = {id(r) for r in records}
            print(self.patches.summary_table(records), flush=True)
            return
        added = [r for r in records if id(r) not in printed]
        if added:
            printed.update(id(r) for r in added)
            table = self.patches.summary_table(added).replace(
                "fms-acceleration patches:", "fms-acceleration patches added since the table above:", 1
            )
            print(table, flush=True)

    def revert(self) -> int:
        """Undo every patch made through this framework; returns how many were undone.

        After FSDP2 sharding this may be collective: a 4-bit layer the bitsandbytes plugin replaced is rebuilt
        from the all-gathered shards of its replacement, so every rank must call it. The models this framework
        marked (:meth:`claim_model`) are released, so another framework may accelerate them afterwards."""
        count = self.patches.revert()
        for model in list(self._claimed):
            if vars(model).get(_OWNER_ATTR) is not None and vars(model)[_OWNER_ATTR]() is self:
                del vars(model)[_OWNER_ATTR]
        self._claimed = weakref.WeakSet()
        self._summary_logged = None
        return count

    def __enter__(self) -> AccelerationFramework:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()

    @contextmanager
    def applied(self) -> Iterator[AccelerationFramework]:
        """Context manager form: ``with framework.applied(): ...`` reverts all patches on exit."""
        try:
            yield self
        finally:
            self.revert()

    def describe(self) -> list[str]:
        """Lines describing what will happen (used by ``fms-accelerate check``); loads no model."""
        lines = [f"config: {self.config.origin}"]
        run = getattr(self, "configured_run", None)
        if run is not None:
            lines.append(f"run (from the Accelerate settings): {_describe_configured_run(run)}")
        if not self.plugins:
            lines.append("active plugins: none")
        for plugin in self.plugins:
            entry = _entry_for(self.registry, plugin.plugin_name())
            version = f" {entry.distribution} {entry.version}" if entry and entry.distribution else ""
            paths = ", ".join(self.config.path(p) for p in plugin.matched_paths)
            lines.append(f"activate {plugin.plugin_name()}{version} <- {paths}")
            lines.extend(f"    {line}" for line in plugin.describe())
            if run is not None:
                lines.extend(f"    {line}" for line in plugin.describe_run(run))
        for section in self.passthrough:
            lines.append(f"pass through {section.path}: {section.reason}")
        return lines


def _describe_configured_run(run: RunContext) -> str:
    """E.g. ``DeepSpeed ZeRO-3 (offload: params cpu), bf16, 8 processes``."""
    parts = [run.describe().split(" on ", 1)[0]]
    if run.deepspeed.config_file:
        parts.append(f"DeepSpeed config {run.deepspeed.config_file}")
    return "; ".join(parts)


_OWNER_ATTR = "_fms_acceleration_framework"
"""Attribute (a weak reference) by which a model names the framework that accelerated it."""


def _module_types() -> tuple[type, ...]:
    import torch

    return (torch.nn.Module,)


def framework_of(model: Any) -> AccelerationFramework | None:
    """The live framework that loaded, augmented or prepared ``model`` (or a module inside it, e.g. the base
    model of a PEFT model or of a DDP wrapper); ``None`` when none did."""
    modules = model.modules() if isinstance(model, _module_types()) else ()
    for module in modules:
        ref = vars(module).get(_OWNER_ATTR)
        framework = ref() if ref is not None else None
        if framework is not None:
            return framework
    return None


def _attached_modules(model: Any) -> set[int] | None:
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models or not all(isinstance(m, _module_types()) for m in models):
        return None
    return {id(module) for m in models for module in m.modules()}


def _runs_in(record: Any, modules: set[int]) -> bool:
    """Whether a patch record still acts on the model whose module ids are ``modules`` (patches of library
    objects always do; a patch of a module instance only while that module is part of the model)."""
    owner = record.owner
    return not isinstance(owner, _module_types()) or id(owner) in modules


def _entry_for(registry: PluginRegistry, name: str) -> PluginEntry | None:
    for entry in registry.entries:
        if entry.name == name:
            return entry
    return None


__all__ = ["AccelerationFramework", "PassthroughSection", "check_requirements", "framework_of", "is_main_process"]
