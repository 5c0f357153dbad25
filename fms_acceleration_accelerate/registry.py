"""Plugin discovery through Python entry points.

Each plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."fms_acceleration_accelerate.plugins"]
    bitsandbytes = "fms_acceleration_accelerate_peft.bnb:BitsAndBytesAccelerationPlugin"

A :class:`PluginRegistry` is an immutable snapshot; every framework owns its own, so two frameworks in one
process never interfere, and tests pass a registry built from classes directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from types import MappingProxyType

from .errors import AccelerationConfigError
from .plugin import AccelerationPlugin

ENTRY_POINT_GROUP = "fms_acceleration_accelerate.plugins"

KNOWN_SECTIONS: Mapping[str, str] = MappingProxyType(
    {
        "peft.quantization.bitsandbytes": "pip install fms-acceleration-accelerate-peft",
        "peft.quantization.auto_gptq": "pip install fms-acceleration-accelerate-peft",
        "training.fused_ops_and_kernels": "pip install fms-acceleration-accelerate-foak",
        "peft.quantization.fused_ops_and_kernels": "pip install fms-acceleration-accelerate-foak",
        "training.attention.padding_free": "pip install fms-acceleration-accelerate-aadp",
        "training.dataloader.multipack": "pip install fms-acceleration-accelerate-aadp",
        "training.moe.scattermoe": "pip install fms-acceleration-accelerate-moe",
        "training.odm.odm": "pip install fms-acceleration-accelerate-odm",
    }
)
"""Config sections this project knows about, with the install command of the package that handles them
('' = no released plugin for it yet). Used only for messages about sections no installed plugin handles;
discovery never reads it."""


@dataclass(frozen=True)
class PluginEntry:
    """One discovered plugin.

    Attributes:
        name: plugin name.
        plugin_class: the class (``None`` when importing the entry point failed).
        distribution: distribution that provides it (``None`` for classes given directly).
        version: that distribution's version.
        entry_point: ``module:attr`` string of the entry point.
        load_error: why the entry point could not be loaded, if it could not.
    """

    name: str
    plugin_class: type[AccelerationPlugin] | None
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None
    load_error: str | None = None


class PluginRegistry:
    """An immutable set of plugin classes, keyed by name and by config path."""

    def __init__(self, entries: Iterable[PluginEntry | type[AccelerationPlugin]] = ()) -> None:
        normalised: list[PluginEntry] = []
        for item in entries:
            if isinstance(item, type):
                normalised.append(PluginEntry(name=item.plugin_name(), plugin_class=item))
            else:
                normalised.append(item)
        by_name: dict[str, PluginEntry] = {}
        by_path: dict[str, PluginEntry] = {}
        for entry in normalised:
            if entry.name in by_name:
                raise AccelerationConfigError(
                    f"two plugins are named {entry.name!r} ({_origin(by_name[entry.name])} and {_origin(entry)})",
                    fix="uninstall one of the two packages",
                )
            by_name[entry.name] = entry
            if entry.plugin_class is None:
                continue
            entry.plugin_class.validate_declaration()
            for path in entry.plugin_class.all_paths():
                if path in by_path:
                    raise AccelerationConfigError(
                        f"config path {path!r} is claimed by both {by_path[path].name!r} ({_origin(by_path[path])}) "
                        f"and {entry.name!r} ({_origin(entry)})",
                        fix="uninstall one of the two packages",
                    )
                by_path[path] = entry
        self._entries = tuple(sorted(normalised, key=_sort_key))
        self._by_path = MappingProxyType(by_path)

    @classmethod
    def discover(cls, group: str = ENTRY_POINT_GROUP) -> PluginRegistry:
        """Load every plugin registered under the entry-point ``group`` in the current environment.

        An entry point that fails to import is kept with its ``load_error`` (reported when its section is
        configured) instead of breaking every other plugin.
        """
        entries = []
        for ep in metadata.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            try:
                plugin_class = ep.load()
            except (ImportError, AttributeError) as exc:  # missing module / missing attribute in the module
                entries.append(
                    PluginEntry(ep.name, None, dist_name, version, ep.value, load_error=f"{type(exc).__name__}: {exc}")
                )
                continue
            if not (isinstance(plugin_class, type) and issubclass(plugin_class, AccelerationPlugin)):
                entries.append(
                    PluginEntry(ep.name, None, dist_name, version, ep.value, load_error="not an AccelerationPlugin")
                )
                continue
            try:
                plugin_class.validate_declaration()
            except TypeError as exc:  # a broken plugin must not take every other plugin down with it
                entries.append(PluginEntry(ep.name, None, dist_name, version, ep.value, load_error=str(exc)))
                continue
            entries.append(PluginEntry(plugin_class.plugin_name(), plugin_class, dist_name, version, ep.value))
        return cls(entries)

    @property
    def entries(self) -> tuple[PluginEntry, ...]:
        """All entries in run order (``order``, then name)."""
        return self._entries

    @property
    def paths(self) -> Mapping[str, PluginEntry]:
        """Config path -> entry, for every loadable plugin."""
        return self._by_path

    def failed(self) -> tuple[PluginEntry, ...]:
        return tuple(e for e in self._entries if e.plugin_class is None)


def _sort_key(entry: PluginEntry) -> tuple[int, str]:
    order = entry.plugin_class.order if entry.plugin_class is not None else 10**6
    return (order, entry.name)


def _origin(entry: PluginEntry) -> str:
    if entry.distribution:
        return f"{entry.distribution} {entry.version}"
    if entry.plugin_class is not None:
        return f"{entry.plugin_class.__module__}.{entry.plugin_class.__qualname__}"
    return entry.entry_point or "?"
