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
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import (
    AccelerationConfigError,
    NoPluginsConfiguredError,
    did_you_mean,
    join_path,
    key_name,
    quote,
    truncate,
)

ENV_CONFIG_FILE = "ACCELERATION_FRAMEWORK_CONFIG_FILE"
"""Environment variable naming the acceleration config used when none is passed (upstream's name)."""

BODY_KEYS = ("plugins", "acceleration")
SECTION_KEY = "acceleration"
"""Top-level key of this package's section inside an Accelerate config file."""

MAX_FILE_BYTES = 4 * 2**20
"""Largest configuration file read (a real one is a few kilobytes)."""
MAX_VALUES = 20_000
"""Most values (mappings, lists and scalars, counted after expanding YAML aliases) in one configuration."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists in one configuration."""

EMPTY_FIX = (
    "put at least one plugin section under it, e.g. 'peft: {quantization: {bitsandbytes: {quant_type: nf4}}}' "
    "('fms-accelerate plugins' lists the installed plugins and their sections), or pass no acceleration "
    "configuration at all"
)

T = TypeVar("T")


@dataclass(frozen=True)
class AccelerationConfig:
    """A loaded acceleration configuration.

    Attributes:
        body: the plugin configuration tree (``{"peft": {"quantization": {...}}, ...}``).
        root: key under which the body was found (``"plugins"``, ``"acceleration"`` or ``""``); prefixes
            every key path in error messages.
        origin: where it came from (a file path, ``"<dict>"``), for messages.
        accelerate_settings: the other top-level keys when the body came from an Accelerate config
            (``distributed_type``, ``fsdp_config``, ...); ``None`` otherwise.
    """

    body: Mapping[str, Any]
    root: str = "plugins"
    origin: str = "<dict>"
    accelerate_settings: Mapping[str, Any] | None = None

    def path(self, *parts: str) -> str:
        """Full dotted key path of ``parts`` inside this config, for error messages."""
        return join_path(self.root, *parts)


def _duplicate_keys(root: yaml.Node) -> list[tuple[str, str, int]]:
    """``(key path, key, line)`` of every key given twice in one mapping of a composed YAML document, which
    ``yaml.safe_load`` silently resolves to the last value. Each node is visited once (aliases share nodes)."""
    found: list[tuple[str, str, int]] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    stack.append((value_node, path))  # '<<: *base' may be overridden: not a duplicate
                    continue
                key = key_node.value
                if key in keys:
                    found.append((path, key, key_node.start_mark.line + 1))
                keys.add(key)
                stack.append((value_node, join_path(path, truncate(key, 80))))
    return found


def read_yaml(path: str | os.PathLike) -> Any:
    """Read one YAML document safely (plain data only); errors name the file and say what is wrong.

    Refused: a missing path, a directory, an unreadable or oversized file, bytes that are not UTF-8, invalid
    YAML, several documents in one file, keys given twice in one mapping, and nesting too deep to parse.
    """
    p = Path(path)
    shown = quote(str(p))
    if p.is_dir():
        raise AccelerationConfigError(
            f"config path {shown} is a directory", fix="pass the path of a YAML file, not of a folder"
        )
    if not p.is_file():
        raise AccelerationConfigError(
            f"config file {shown} does not exist",
            fix="pass the path of an existing YAML file (acceleration config or Accelerate config)",
        )
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AccelerationConfigError(
                f"{shown} is {size} bytes, more than a configuration file can be ({MAX_FILE_BYTES} bytes)",
                fix="pass the acceleration or Accelerate config YAML, not a data or model file",
            )
        raw = p.read_bytes()
    except OSError as exc:
        raise AccelerationConfigError(
            f"cannot read {shown}: {exc.strerror or exc}", fix="check the path and its permissions"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AccelerationConfigError(
            f"{shown} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            fix="save the file as UTF-8 (a YAML config is plain text)",
        ) from None
    loader = yaml.SafeLoader(text)  # plain data only: no Python tags
    try:
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node) if node is not None else []
        document = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise AccelerationConfigError(
            f"{shown} is not valid YAML: {truncate(str(exc), 600)}", fix="fix the YAML syntax at the position shown"
        ) from None
    except RecursionError:
        raise AccelerationConfigError(
            f"{shown} is nested too deeply to read", fix=f"a configuration nests at most {MAX_DEPTH} levels"
        ) from None
    finally:
        loader.dispose()
    if duplicates:
        raise AccelerationConfigError.combine(
            AccelerationConfigError(
                f"key {quote(key, 80)} is given twice in one mapping (line {line} of {shown}); YAML would keep only "
                "the last value",
                path=join_path(path, truncate(key, 80)),
                fix="keep one of the two entries",
            )
            for path, key, line in duplicates
        )
    return document


def check_size(document: Any, origin: str) -> None:
    """Refuse a configuration tree with more than :data:`MAX_VALUES` values or deeper than :data:`MAX_DEPTH`.

    Counts every visit, so a YAML alias counts each time it is used: a small file of nested aliases (which
    expands exponentially) is refused here, before anything walks, prints or serialises it."""
    stack: list[tuple[Any, int]] = [(document, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise AccelerationConfigError(
                f"{origin} holds more than {MAX_VALUES} values (counting every use of a YAML alias)",
                fix="a configuration holds a few dozen options; remove the generated or aliased data",
            )
        if depth > MAX_DEPTH:
            raise AccelerationConfigError(
                f"{origin} nests mappings or lists more than {MAX_DEPTH} levels deep",
                fix="plugin sections nest at most a few levels (e.g. peft.quantization.bitsandbytes.quant_type)",
            )
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def load_acceleration_config(source: str | os.PathLike | Mapping[str, Any] | None) -> AccelerationConfig:
    """Load an acceleration configuration from a path, a mapping or the environment.

    Args:
        source: YAML path, mapping, or ``None`` to use ``$ACCELERATION_FRAMEWORK_CONFIG_FILE``.

    Returns:
        The parsed :class:`AccelerationConfig`.

    Raises:
        NoPluginsConfiguredError: the configuration (or its ``plugins:`` / ``acceleration:`` body) is empty.
        AccelerationConfigError: missing file, invalid YAML, no acceleration body found, a misspelt top-level
            key, a body that is not a mapping.
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
        check_size(source, "the configuration")
        return _from_document(source, origin="<dict>", base_dir=Path.cwd(), allow_bare_body=True)
    if isinstance(source, (str, os.PathLike)):
        document = read_yaml(source)
        check_size(document, quote(str(source)))
        return _from_document(document, origin=str(source), base_dir=Path(source).parent, allow_bare_body=False)
    raise AccelerationConfigError(
        f"acceleration config must be a YAML path, a dict or None, got {type(source).__name__}",
        fix="pass e.g. AccelerationFramework('accel.yaml') or AccelerationFramework({'peft': {...}})",
    )


def accelerate_setting_names() -> frozenset[str]:
    """Top-level keys of an Accelerate config (without importing Accelerate: the names of its
    ``ClusterConfig``/``SageMakerConfig`` fields and legacy keys, as of Accelerate 1.x). Used only to tell an
    Accelerate config from an acceleration-only file and to suggest spellings; Accelerate's own classes check
    the settings themselves (:mod:`~fms_acceleration_accelerate.accelerate_config`)."""
    return _ACCELERATE_KEYS


_ACCELERATE_KEYS = frozenset(
    {
        "compute_environment", "distributed_type", "mixed_precision", "use_cpu", "debug", "num_processes",
        "machine_rank", "num_machines", "gpu_ids", "main_process_ip", "main_process_port", "rdzv_backend",
        "same_network", "main_training_function", "enable_cpu_affinity", "fp8_config", "deepspeed_config",
        "fsdp_config", "parallelism_config", "megatron_lm_config", "mpirun_config", "downcast_bf16", "tpu_name",
        "tpu_zone", "tpu_use_cluster", "tpu_use_sudo", "command_file", "commands", "tpu_vm", "tpu_env",
        "dynamo_config", "dynamo_backend", "fp16", "ec2_instance_type", "iam_role_name", "image_uri", "profile",
        "region", "base_job_name", "pytorch_version", "transformers_version", "py_version",
        "sagemaker_inputs_file", "sagemaker_metrics_file", "additional_args",
    }
)  # fmt: skip


def _top_level_typos(
    keys: Sequence[Any], origin: str, *, accelerate: bool, only_close: bool
) -> list[AccelerationConfigError]:
    """Errors for top-level ``keys`` that are neither a body key nor (``accelerate``) an Accelerate setting;
    with ``only_close``, only those close to a known key (the rest may be plugin sections or settings that
    another check knows)."""
    known = set(BODY_KEYS) | (set(_ACCELERATE_KEYS) if accelerate else set())
    errors = []
    for key in keys:
        if key in known:
            continue
        hint = did_you_mean(key, known)
        if only_close and not hint:
            continue
        errors.append(
            AccelerationConfigError(
                f"unknown top-level key {quote(key, 80)} in {quote(origin)}.{hint}",
                path=key_name(key),
                fix="this package's section is 'acceleration:' in an Accelerate config and 'plugins:' in an "
                "acceleration-only file"
                + ("; the other top-level keys are Accelerate's settings" if accelerate else ""),
            )
        )
    return errors


def _from_document(
    document: Any, *, origin: str, base_dir: Path, allow_bare_body: bool, allow_redirect: bool = True
) -> AccelerationConfig:
    if document is None or (isinstance(document, Mapping) and not document):
        raise NoPluginsConfiguredError(
            f"{quote(origin)} is empty", fix=EMPTY_FIX.replace("under it", "under 'plugins:'"), root=None
        )
    if not isinstance(document, Mapping):
        raise AccelerationConfigError(
            f"{quote(origin)} must hold a mapping at the top level, got {type(document).__name__} ({quote(document)})",
            fix="start the file with 'plugins:' (acceleration-only file) or 'acceleration:' (Accelerate config)",
        )
    for key in document:
        if not isinstance(key, str):
            raise AccelerationConfigError(
                f"top-level keys must be strings, got {quote(key, 80)} in {quote(origin)}",
                fix="quote the key in the YAML file",
            )
    present = [k for k in BODY_KEYS if k in document]
    others = [k for k in document if k not in BODY_KEYS]
    accelerate = any(k in _ACCELERATE_KEYS for k in others)
    if len(present) == 2:
        raise AccelerationConfigError(
            f"{quote(origin)} has both 'plugins:' and 'acceleration:' sections",
            fix="keep one: 'plugins:' in an acceleration-only file, 'acceleration:' in an Accelerate config",
        )
    if not present:
        typos = _top_level_typos(others, origin, accelerate=accelerate, only_close=True)
        if typos:
            raise AccelerationConfigError.combine(typos)
        if allow_bare_body and not accelerate:
            return AccelerationConfig(body=_check_body(document, ""), root="", origin=origin)
        raise AccelerationConfigError(
            f"{quote(origin)} has no 'plugins:' or 'acceleration:' section",
            fix="put the plugin configuration under a top-level 'plugins:' (acceleration-only file) or "
            "'acceleration:' (inside an Accelerate config) key",
        )
    root = present[0]
    if root == "plugins" and others:
        if accelerate:
            raise AccelerationConfigError(
                f"{quote(origin)} is an Accelerate config (it has {', '.join(sorted(k for k in others if k in _ACCELERATE_KEYS)[:3])}), "
                "whose section for this package is 'acceleration:'; Accelerate refuses the key 'plugins'",
                path="plugins",
                fix="rename 'plugins:' to 'acceleration:'",
            )
        raise AccelerationConfigError.combine(_top_level_typos(others, origin, accelerate=False, only_close=False))
    settings = {k: document[k] for k in others} if root == "acceleration" and others else None
    body = document[root]
    if root == "acceleration" and isinstance(body, (str, os.PathLike)):
        if not allow_redirect:
            raise AccelerationConfigError(
                f"{quote(origin)} points to another file ({quote(str(body))}) but was itself named by an "
                "'acceleration:' path",
                path="acceleration",
                fix="let 'acceleration:' name an acceleration-only file (with a 'plugins:' section)",
            )
        if not str(body).strip():
            raise AccelerationConfigError(
                "is an empty string",
                path="acceleration",
                fix="write the plugin sections under it, or the path of an acceleration-only YAML file",
            )
        nested = Path(body) if Path(body).is_absolute() else base_dir / body
        document = read_yaml(nested)
        check_size(document, quote(str(nested)))
        loaded = _from_document(
            document, origin=str(nested), base_dir=nested.parent, allow_bare_body=False, allow_redirect=False
        )
        if loaded.accelerate_settings is not None:
            raise AccelerationConfigError(
                f"{quote(str(nested))}, named by 'acceleration:' in {quote(origin)}, is an Accelerate config itself",
                path="acceleration",
                fix="let 'acceleration:' name an acceleration-only file (with a 'plugins:' section)",
            )
        return dataclasses.replace(loaded, accelerate_settings=settings)
    if root == "acceleration" and isinstance(body, Mapping) and "plugins" in body:
        if set(body) != {"plugins"}:
            extra = ", ".join(sorted(key_name(k) for k in body if k != "plugins"))
            raise AccelerationConfigError(
                f"holds 'plugins:' next to other keys ({truncate(extra, 300)})",
                path="acceleration",
                fix="put every plugin section either directly under 'acceleration:' or under 'acceleration.plugins:'",
            )
        root, body = "acceleration.plugins", body["plugins"]
    if body is None or (isinstance(body, Mapping) and not body):
        raise NoPluginsConfiguredError(
            f"'{root}:' in {quote(origin)} is empty ({'null' if body is None else '{}'})",
            fix=EMPTY_FIX,
            root=root,
        )
    return AccelerationConfig(body=_check_body(body, root), root=root, origin=origin, accelerate_settings=settings)


def _check_body(body: Any, root: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise AccelerationConfigError(
            f"must be a mapping of plugin sections, got {type(body).__name__} ({quote(body)})",
            path=root or None,
            fix="nest plugin sections under it, e.g. 'peft: {quantization: {bitsandbytes: {quant_type: nf4}}}'",
        )
    for key in body:
        if not isinstance(key, str):
            raise AccelerationConfigError(
                f"keys must be strings, got {quote(key, 80)}", path=root or None, fix="quote the key in the YAML file"
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
    errors: list[AccelerationConfigError] = []
    valid_keys = ", ".join(sorted(fields)) or "none"
    for path, data in sections:
        if data is None or data is True:
            data = {}
        if not isinstance(data, Mapping):
            errors.append(
                AccelerationConfigError(
                    f"must be a mapping of options, got {type(data).__name__} ({quote(data)})",
                    path=path,
                    fix=f"write the options under it (valid keys: {valid_keys}), or leave it empty for the defaults",
                )
            )
            continue
        for key in data:
            if key not in fields:
                errors.append(
                    AccelerationConfigError(
                        f"unknown key {quote(key, 80)}.{did_you_mean(key, fields)}",
                        path=join_path(path, key_name(key)),
                        fix=f"valid keys here: {valid_keys}",
                    )
                )
                continue
            if key in set_at:
                errors.append(
                    AccelerationConfigError(
                        f"option {key!r} is set twice (also at {join_path(set_at[key], key)})",
                        path=join_path(path, key),
                        fix="set it in one section only",
                    )
                )
                continue
            set_at[key] = path
            try:
                values[key] = coerce_value(data[key], hints[key], join_path(path, key))
            except AccelerationConfigError as exc:
                errors.append(exc)
    for name, f in fields.items():
        if name not in set_at and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(
                AccelerationConfigError(
                    f"missing required key {name!r}",
                    path=primary,
                    fix=f"add '{name}: ...' ({f.metadata.get('help', 'see the plugin documentation')})",
                )
            )
    if errors:
        raise AccelerationConfigError.combine(errors)  # every problem of the section at once
    try:
        return cls(**values)
    except AccelerationConfigError as exc:
        if exc.path is None:
            raise AccelerationConfigError(exc.problem, path=primary, fix=exc.fix, more=exc.problems[1:]) from None
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
            f"invalid value {quote(value)}.{did_you_mean(value, [str(a) for a in allowed])}",
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
            f"invalid value {quote(value)}.{did_you_mean(value, choices) if isinstance(value, str) else ''}",
            path=path,
            fix=f"expected {describe_type(annotation)}",
        )
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise AccelerationConfigError(
                f"expected a list, got {type(value).__name__} ({quote(value)})",
                path=path,
                fix=f"write a YAML list, e.g. [{quote(value, 60)}]" if value is not None else "write a YAML list",
            )
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis] or [Any]
        items, errors = [], []
        for i, v in enumerate(value):
            try:
                items.append(coerce_value(v, args[0], f"{path}[{i}]"))
            except AccelerationConfigError as exc:
                errors.append(exc)
        if errors:
            raise AccelerationConfigError.combine(errors)
        return tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise AccelerationConfigError(
                f"expected a mapping, got {type(value).__name__} ({quote(value)})", path=path, fix="write a mapping"
            )
        args = typing.get_args(annotation)
        if not args:
            return dict(value)
        return {k: coerce_value(v, args[1], join_path(path, key_name(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return parse_dataclass(annotation, value, path)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        for member in annotation:
            if value == member.value or value == member.name:
                return member
        valid = [m.value for m in annotation]
        raise AccelerationConfigError(
            f"invalid value {quote(value)}.{did_you_mean(value, [str(v) for v in valid])}",
            path=path,
            fix=f"valid values: {', '.join(repr(v) for v in valid)}",
        )
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise AccelerationConfigError(
            f"expected true or false, got {quote(value)}", path=path, fix="write true or false (no quotes)"
        )
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise AccelerationConfigError(f"expected an integer, got {quote(value)}", path=path, fix="write a whole number")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise AccelerationConfigError(
                    f"expected a finite number, got {quote(value)}", path=path, fix="write a finite number"
                )
            return float(value)
        raise AccelerationConfigError(f"expected a number, got {quote(value)}", path=path, fix="write a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise AccelerationConfigError(
            f"expected a string, got {type(value).__name__} ({quote(value)})", path=path, fix="quote the value"
        )
    raise TypeError(f"unsupported annotation {annotation!r} at {path}")
