"""Reading acceleration configurations and parsing plugin sections into typed, frozen dataclasses.

A configuration is one of:

* an acceleration-only YAML file (the upstream fms-acceleration format) whose body is under ``plugins:``;
* an Accelerate config YAML with an extra top-level ``acceleration:`` section holding the same body
  (``acceleration:`` may also hold ``plugins:`` or be a path to an acceleration-only file);
* a ``dict`` in any of these shapes, or the body itself (``{"peft": {...}}``);
* ``None``: the file named by the environment variable ``ACCELERATION_FRAMEWORK_CONFIG_FILE``.

YAML is only ever read with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import AccelerationConfigError, did_you_mean, join_path

ENV_CONFIG_FILE = "ACCELERATION_FRAMEWORK_CONFIG_FILE"
"""Environment variable naming the acceleration config used when none is passed (upstream's name)."""

BODY_KEYS = ("plugins", "acceleration")

T = TypeVar("T")


@dataclass(frozen=True)
class AccelerationConfig:
    """A loaded acceleration configuration.

    Attributes:
        body: the plugin configuration tree (``{"peft": {"quantization": {...}}, ...}``).
        root: key under which the body was found (``"plugins"``, ``"acceleration"`` or ``""``); prefixes
            every key path in error messages.
        origin: where it came from (a file path, ``"<dict>"``), for messages.
    """

    body: Mapping[str, Any]
    root: str = "plugins"
    origin: str = "<dict>"

    def path(self, *parts: str) -> str:
        """Full dotted key path of ``parts`` inside this config, for error messages."""
        return join_path(self.root, *parts)


def read_yaml(path: str | os.PathLike) -> Any:
    """Read one YAML document with ``yaml.safe_load``; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise AccelerationConfigError(
            f"acceleration config file {str(p)!r} does not exist",
            fix="pass the path of an existing YAML file (acceleration config or Accelerate config)",
        )
    try:
        with p.open("r", encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise AccelerationConfigError(
            f"{str(p)!r} is not valid YAML: {exc}", fix="fix the YAML syntax at the position shown"
        ) from None


def load_acceleration_config(source: str | os.PathLike | Mapping[str, Any] | None) -> AccelerationConfig:
    """Load an acceleration configuration from a path, a mapping or the environment.

    Args:
        source: YAML path, mapping, or ``None`` to use ``$ACCELERATION_FRAMEWORK_CONFIG_FILE``.

    Returns:
        The parsed :class:`AccelerationConfig`.

    Raises:
        AccelerationConfigError: missing file, invalid YAML, or no acceleration body found.
    """
    if source is None:
        env_path = os.environ.get(ENV_CONFIG_FILE)
        if not env_path:
            raise AccelerationConfigError(
                "no acceleration configuration given",
                fix=f"pass a YAML path or dict, or set the environment variable {ENV_CONFIG_FILE}",
            )
        source = env_path
    if isinstance(source, Mapping):
        return _from_document(source, origin="<dict>", base_dir=Path.cwd(), allow_bare_body=True)
    if isinstance(source, (str, os.PathLike)):
        document = read_yaml(source)
        return _from_document(document, origin=str(source), base_dir=Path(source).parent, allow_bare_body=False)
    raise AccelerationConfigError(
        f"acceleration config must be a YAML path, a dict or None, got {type(source).__name__}",
        fix="pass e.g. AccelerationFramework('accel.yaml') or AccelerationFramework({'peft': {...}})",
    )


def _from_document(
    document: Any, *, origin: str, base_dir: Path, allow_bare_body: bool, allow_redirect: bool = True
) -> AccelerationConfig:
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise AccelerationConfigError(
            f"{origin} must hold a mapping at the top level, got {type(document).__name__}",
            fix="start the file with 'plugins:' (acceleration-only file) or 'acceleration:' (Accelerate config)",
        )
    present = [k for k in BODY_KEYS if k in document]
    if len(present) == 2:
        raise AccelerationConfigError(
            f"{origin} has both 'plugins:' and 'acceleration:' sections",
            fix="keep one: 'plugins:' in an acceleration-only file, 'acceleration:' in an Accelerate config",
        )
    if not present:
        if allow_bare_body:
            return AccelerationConfig(body=_check_body(document, ""), root="", origin=origin)
        raise AccelerationConfigError(
            f"{origin} has no 'plugins:' or 'acceleration:' section",
            fix="put the plugin configuration under a top-level 'plugins:' (acceleration-only file) or "
            "'acceleration:' (inside an Accelerate config) key",
        )
    root = present[0]
    body = document[root]
    if root == "acceleration" and isinstance(body, (str, os.PathLike)):
        if not allow_redirect:
            raise AccelerationConfigError(
                f"{origin} points to another file ({body!r}) but was itself named by an 'acceleration:' path",
                path="acceleration",
                fix="let 'acceleration:' name an acceleration-only file (with a 'plugins:' section)",
            )
        nested = Path(body) if Path(body).is_absolute() else base_dir / body
        return _from_document(
            read_yaml(nested), origin=str(nested), base_dir=nested.parent, allow_bare_body=False, allow_redirect=False
        )
    if root == "acceleration" and isinstance(body, Mapping) and "plugins" in body:
        if set(body) != {"plugins"}:
            others = ", ".join(sorted(str(k) for k in body if k != "plugins"))
            raise AccelerationConfigError(
                f"holds 'plugins:' next to other keys ({others})",
                path="acceleration",
                fix="put every plugin section either directly under 'acceleration:' or under 'acceleration.plugins:'",
            )
        root, body = "acceleration.plugins", body["plugins"]
    return AccelerationConfig(body=_check_body(body, root), root=root, origin=origin)


def _check_body(body: Any, root: str) -> Mapping[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise AccelerationConfigError(
            f"must be a mapping of plugin sections, got {type(body).__name__} ({body!r})",
            path=root or None,
            fix="nest plugin sections under it, e.g. 'peft: {quantization: {bitsandbytes: {quant_type: nf4}}}'",
        )
    for key in body:
        if not isinstance(key, str):
            raise AccelerationConfigError(
                f"keys must be strings, got {key!r}", path=root or None, fix="quote the key in the YAML file"
            )
    return body


def get_section(body: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """Return ``(present, value)`` for the dotted path ``dotted`` in ``body``."""
    node: Any = body
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


# ---------------------------------------------------------------------------------------------------------
# Strict dataclass parsing


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown by ``fms-accelerate check`` and in generated configs)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["help"] = help
    if isinstance(default, (list, dict, set)):
        raise TypeError("use default_factory for mutable defaults")
    return field(default=default, metadata=metadata, **kwargs)


def field_help(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)


def parse_dataclass(cls: type[T], data: Any, path: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data`` (a mapping from YAML), strictly.

    Unknown keys, wrong types and invalid values raise :class:`AccelerationConfigError` with the full key
    path, the valid keys or values, and a "did you mean" suggestion for typos. ``None`` or an empty
    section means "all defaults".

    Args:
        cls: a dataclass type.
        data: mapping of field name -> value (or ``None``).
        path: dotted key path of ``data``, for messages.

    Returns:
        An instance of ``cls``.
    """
    return parse_dataclass_sections(cls, [(path, data)])


def parse_dataclass_sections(cls: type[T], sections: Sequence[tuple[str, Any]]) -> T:
    """Build ``cls`` from the options of several config sections (a plugin with several AND paths).

    Every section is checked on its own (messages name the section's path); together they may set each
    option at most once. With one section this is :func:`parse_dataclass`.

    Args:
        cls: a dataclass type.
        sections: ``(dotted path, mapping or None)`` pairs; the first one is the plugin's primary section.

    Returns:
        An instance of ``cls``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not sections:
        raise ValueError("parse_dataclass_sections needs at least one section")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    primary = sections[0][0]
    values: dict[str, Any] = {}
    set_at: dict[str, str] = {}
    for path, data in sections:
        if data is None or data is True:
            data = {}
        if not isinstance(data, Mapping):
            raise AccelerationConfigError(
                f"must be a mapping of options, got {type(data).__name__} ({data!r})",
                path=path,
                fix=f"write the options under it (valid keys: {', '.join(sorted(fields)) or 'none'}), "
                "or leave it empty for the defaults",
            )
        for key in data:
            if key not in fields:
                raise AccelerationConfigError(
                    f"unknown key {key!r}.{did_you_mean(key, fields)}",
                    path=join_path(path, str(key)),
                    fix=f"valid keys here: {', '.join(sorted(fields)) or 'none'}",
                )
            if key in set_at:
                raise AccelerationConfigError(
                    f"option {key!r} is set twice (also at {join_path(set_at[key], key)})",
                    path=join_path(path, key),
                    fix="set it in one section only",
                )
            set_at[key] = path
            values[key] = coerce_value(data[key], hints[key], join_path(path, key))
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise AccelerationConfigError(
                f"missing required key {name!r}",
                path=primary,
                fix=f"add '{name}: ...' ({f.metadata.get('help', 'see the plugin documentation')})",
            )
    try:
        return cls(**values)
    except AccelerationConfigError as exc:
        if exc.path is None:
            raise AccelerationConfigError(exc.problem, path=primary, fix=exc.fix) from None
        raise


def describe_type(annotation: Any) -> str:
    """Human-readable name of a type annotation, for messages."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is bool:
        return "true | false"
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {describe_type(args[0])}" if args else "list"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def coerce_value(value: Any, annotation: Any, path: str) -> Any:
    """Check ``value`` against ``annotation`` and convert it (lists -> tuples, ints -> floats, enums)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise AccelerationConfigError(
            f"invalid value {value!r}.{did_you_mean(value, [str(a) for a in allowed])}",
            path=path,
            fix=f"valid values: {', '.join(repr(a) for a in allowed)}",
        )
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
        else:
            errors = []
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return coerce_value(value, arg, path)
                except AccelerationConfigError as exc:
                    errors.append(exc)
            if len(errors) == 1:
                raise errors[0]
        choices = [str(a) for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        raise AccelerationConfigError(
            f"invalid value {value!r}.{did_you_mean(value, choices) if isinstance(value, str) else ''}",
            path=path,
            fix=f"expected {describe_type(annotation)}",
        )
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise AccelerationConfigError(
                f"expected a list, got {type(value).__name__} ({value!r})",
                path=path,
                fix=f"write a YAML list, e.g. [{value!r}]" if value is not None else "write a YAML list",
            )
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis] or [Any]
        return tuple(coerce_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise AccelerationConfigError(f"expected a mapping, got {type(value).__name__}", path=path)
        args = typing.get_args(annotation)
        if not args:
            return dict(value)
        return {k: coerce_value(v, args[1], join_path(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return parse_dataclass(annotation, value, path)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        for member in annotation:
            if value == member.value or value == member.name:
                return member
        valid = [m.value for m in annotation]
        raise AccelerationConfigError(
            f"invalid value {value!r}.{did_you_mean(value, [str(v) for v in valid])}",
            path=path,
            fix=f"valid values: {', '.join(repr(v) for v in valid)}",
        )
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise AccelerationConfigError(
            f"expected true or false, got {value!r}", path=path, fix="write true or false (no quotes)"
        )
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise AccelerationConfigError(f"expected an integer, got {value!r}", path=path, fix="write a whole number")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise AccelerationConfigError(f"expected a number, got {value!r}", path=path, fix="write a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise AccelerationConfigError(
            f"expected a string, got {type(value).__name__} ({value!r})", path=path, fix="quote the value"
        )
    raise TypeError(f"unsupported annotation {annotation!r} at {path}")
