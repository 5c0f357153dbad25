"""``AccelerationFramework``: resolves plugins from a configuration and runs their hooks in order."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from .config import AccelerationConfig, get_section, load_acceleration_config, parse_dataclass_sections
from .errors import AccelerationConfigError, did_you_mean
from .patching import PatchRecorder, PluginPatcher
from .plugin import AccelerationPlugin
from .registry import KNOWN_SECTIONS, PluginEntry, PluginRegistry

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
        self._summary_logged = False
        claimed = self._walk_sections()
        self.plugins: tuple[AccelerationPlugin, ...]
        self.plugins, self.passthrough = self._activate(claimed, check_packages)
        self._check_combination()
        for section in self.passthrough:
            if is_main_process():
                logger.warning("acceleration section %s passed through: %s", section.path, section.reason)

    # ------------------------------------------------------------------------------------ resolution
    def _known_paths(self) -> set[str]:
        return set(self.registry.paths) | set(KNOWN_SECTIONS)

    def _walk_sections(self) -> set[str]:
        """Check the shape of the config tree; return the known section paths present in it."""
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
                hint = did_you_mean(parts[-1], siblings)
                if hint:
                    raise AccelerationConfigError(
                        f"unknown section {parts[-1]!r}.{hint}",
                        path=self.config.path(here),
                        fix=f"valid sections here: {', '.join(sorted(siblings))}",
                    )
                claimed.add(here)  # an unknown (third-party, not installed) plugin section: passed through
                return
            if not isinstance(node, Mapping):
                children = sorted({p.split(".")[len(parts)] for p in known | prefixes if p.startswith(here + ".")})
                raise AccelerationConfigError(
                    f"must be a mapping of plugin sections, got {node!r}",
                    path=self.config.path(here),
                    fix=f"nest one of these sections under it: {', '.join(children)}",
                )
            for key, child in node.items():
                walk(child, (*parts, str(key)))

        walk(self.config.body, ())
        return claimed

    def _activate(
        self, claimed: set[str], check_packages: bool
    ) -> tuple[tuple[AccelerationPlugin, ...], tuple[PassthroughSection, ...]]:
        active: list[AccelerationPlugin] = []
        handled: set[str] = set()
        passthrough: list[PassthroughSection] = []
        for entry in self.registry.entries:
            cls = entry.plugin_class
            if cls is None:
                continue
            matched = self._matched_paths(cls, claimed)
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
            config = parse_dataclass_sections(cls.config_class, self._section_options(cls, matched))
            if check_packages:
                check_requirements(
                    cls.required_packages, who=entry.name, path=self.config.path(primary), install_hint=cls.install_hint
                )
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
        loaders = [p for p in self.plugins if p.requires_custom_loading]
        if len(loaders) > 1:
            raise AccelerationConfigError(
                "more than one active plugin loads the model: "
                + ", ".join(f"{p.plugin_name()} ({self.config.path(p.matched_paths[0])})" for p in loaders),
                fix="keep only one of these sections",
            )
        active_paths = {path: p for p in self.plugins for path in p.matched_paths}
        for plugin in self.plugins:
            for path in plugin.incompatible_paths:
                other = active_paths.get(path)
                if other is not None and other is not plugin:
                    raise AccelerationConfigError(
                        f"plugin {plugin.plugin_name()!r} cannot be combined with {other.plugin_name()!r}",
                        path=self.config.path(path),
                        fix=f"remove either {self.config.path(plugin.matched_paths[0])} or {self.config.path(path)}",
                    )
        for plugin in self.plugins:
            with self._full_paths(plugin):
                plugin.check_compatibility(self.plugins)

    @contextmanager
    def _full_paths(self, plugin: AccelerationPlugin) -> Iterator[None]:
        """Re-raise a plugin's error about a key in its sections with the full key path (root prefixed)."""
        try:
            yield
        except AccelerationConfigError as exc:
            if exc.path is not None and any(
                exc.path == p or exc.path.startswith(p + ".") for p in plugin.matched_paths
            ):
                raise AccelerationConfigError(exc.problem, path=self.config.path(exc.path), fix=exc.fix) from None
            raise

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

    def check_model_type(self, model_type: str | None) -> None:
        """Raise :class:`AccelerationConfigError` if an active plugin does not support ``model_type``."""
        for plugin in self.plugins:
            with self._full_paths(plugin):
                plugin.check_model_type(model_type)

    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> Any:
        """Load the model with the one plugin that owns loading (the model type is checked first)."""
        loaders = [p for p in self.plugins if p.requires_custom_loading]
        if not loaders:
            raise AccelerationConfigError(
                "no active plugin loads models",
                fix="check framework.requires_custom_loading first and load the model yourself when it is False",
            )
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(
            model_name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False)
        )
        self.check_model_type(getattr(model_config, "model_type", None))
        with self._full_paths(loaders[0]):
            return loaders[0].model_loader(model_name_or_path, **kwargs)

    def augmentation(
        self, model: Any, train_args: Any = None, modifiable_args: tuple[Any, ...] = ()
    ) -> tuple[Any, tuple[Any, ...]]:
        """Run every active plugin's augmentation in order; returns ``(model, modifiable_args)``."""
        model_config = getattr(model, "config", None)
        self.check_model_type(getattr(model_config, "model_type", None))
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
        return model, modifiable_args

    def get_callbacks_and_ready_for_train(self, model: Any = None, accelerator: Any = None) -> list[Any]:
        """Collect HF Trainer / TRL callbacks from every active plugin; logs the patch summary once."""
        callbacks: list[Any] = []
        for plugin in self.plugins:
            callbacks.extend(plugin.get_callbacks_and_ready_for_train(model, accelerator))
        self.log_patch_summary()
        return callbacks

    def log_patch_summary(self, force: bool = False) -> None:
        """Print the patch table once, on the main process."""
        if (self._summary_logged and not force) or not is_main_process():
            return
        self._summary_logged = True
        print(self.patches.summary_table(), flush=True)

    def revert(self) -> int:
        """Undo every patch made through this framework; returns how many were undone.

        After FSDP2 sharding this may be collective: a 4-bit layer the bitsandbytes plugin replaced is rebuilt
        from the all-gathered shards of its replacement, so every rank must call it."""
        return self.patches.revert()

    def __enter__(self) -> AccelerationFramework:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()

    @contextmanager
    def applied(self) -> Iterator[AccelerationFramework]:
        """Context manager form: ``with framework.applied(): ...`` reverts all patches on exit."""
        with self.patches.reverting():
            yield self

    def describe(self) -> list[str]:
        """Lines describing what will happen (used by ``fms-accelerate check``); loads no model."""
        lines = [f"config: {self.config.origin}"]
        if not self.plugins:
            lines.append("active plugins: none")
        for plugin in self.plugins:
            entry = _entry_for(self.registry, plugin.plugin_name())
            version = f" {entry.distribution} {entry.version}" if entry and entry.distribution else ""
            paths = ", ".join(self.config.path(p) for p in plugin.matched_paths)
            lines.append(f"activate {plugin.plugin_name()}{version} <- {paths}")
            lines.extend(f"    {line}" for line in plugin.describe())
        for section in self.passthrough:
            lines.append(f"pass through {section.path}: {section.reason}")
        return lines


def _entry_for(registry: PluginRegistry, name: str) -> PluginEntry | None:
    for entry in registry.entries:
        if entry.name == name:
            return entry
    return None


__all__ = ["AccelerationFramework", "PassthroughSection", "check_requirements", "is_main_process"]
