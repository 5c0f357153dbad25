"""Checks of the Accelerate part of an Accelerate config file, with Accelerate's own config classes.

``accelerate launch --config_file cfg.yaml`` parses the file with
``accelerate.commands.config.config_args.ClusterConfig`` (``SageMakerConfig`` when ``compute_environment`` is
``AMAZON_SAGEMAKER``): ``BaseConfig.from_yaml_file`` -> ``process_config`` (defaults, legacy keys, a missing
``distributed_type``) -> unknown keys -> ``__post_init__`` (``ComputeEnvironment(...)``,
``DistributedType(...)``). Each of these raises a bare ``ValueError`` with a traceback, one problem at a time,
and other mistakes (a list where ``fsdp_config`` should be, an unquoted ``mixed_precision: no``, which YAML
reads as ``false``) only fail later in the launcher.

:func:`accelerate_settings_problems` reports all of them at once, as :class:`AccelerationConfigError`s with the
key path, a "did you mean" and the valid values; then it runs Accelerate's own parsing on the settings as a
last check, so whatever Accelerate would refuse is reported here too, without a traceback.

Two levels:

* ``strict=False`` (``accelerate launch`` of a config without an ``acceleration:`` section): only what makes
  Accelerate fail anyway, so the start-up hook never refuses a config stock Accelerate would run.
* ``strict=True`` (``fms-accelerate check``, and any config with an ``acceleration:`` section): also mistakes
  Accelerate silently accepts: a misspelt key inside ``fsdp_config`` / ``deepspeed_config`` /
  ``dynamo_config`` (Accelerate ignores it), a quoted boolean (``use_cpu: "false"`` is true to Accelerate),
  numbers out of range, and ``fsdp_version`` other than 1 or 2.

Accelerate is imported only when a check runs.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from typing import Any

from .config import SECTION_KEY
from .errors import AccelerationConfigError, did_you_mean, join_path, key_name, quote, truncate

# nested mappings whose keys `accelerate launch` copies onto its own arguments (Accelerate's prefixing rule)
_NESTED_PREFIX = {"fsdp_config": "fsdp_", "dynamo_config": "dynamo_", "deepspeed_config": ""}
# keys Accelerate reads from the nested mappings without a command-line option of the same name
_NESTED_EXTRA = {"fsdp_config": frozenset({"fsdp_ignored_modules"})}
# keys `process_config` converts before checking for unknown keys
_LEGACY_KEYS = frozenset({"fp16", "dynamo_backend"})


def _classes() -> Any:
    from accelerate.commands.config import config_args

    return config_args


def _enum_values(enum_cls: type[enum.Enum]) -> list[str]:
    return [str(m.value) for m in enum_cls]


def _enum_problem(value: Any, enum_cls: type[enum.Enum], path: str, what: str) -> AccelerationConfigError | None:
    valid = _enum_values(enum_cls)
    if isinstance(value, enum_cls) or (isinstance(value, str) and value in valid):
        return None
    hint = did_you_mean(value, valid) if isinstance(value, str) else ""
    if not hint and isinstance(value, str):
        upper = [v for v in valid if v.lower() == value.lower()]
        hint = f" Did you mean {upper[0]!r}?" if upper else ""
    extra = " (YAML reads an unquoted NO as false: write 'NO')" if value is False else ""
    return AccelerationConfigError(
        f"invalid {what} {quote(value)}{extra}.{hint}",
        path=path,
        fix=f"valid values: {', '.join(valid)}",
    )


def _type_problem(value: Any, annotation: Any, path: str) -> AccelerationConfigError | None:
    """A problem when ``value`` does not fit the plain annotation of a config field (``None`` if it does)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        annotation = non_none[0] if len(non_none) == 1 else annotation
        origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return None
        return AccelerationConfigError(
            f"expected true or false, got {quote(value)}",
            path=path,
            fix='write true or false without quotes (a quoted "false" counts as true)',
        )
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        return AccelerationConfigError(
            f"expected an integer, got {quote(value)}", path=path, fix="write a whole number"
        )
    if annotation is str:
        if isinstance(value, str):
            return None
        return AccelerationConfigError(
            f"expected a string, got {type(value).__name__} ({quote(value)})",
            path=path,
            fix=f"quote the value: '{value}'" if isinstance(value, (int, float)) else "quote the value",
        )
    if annotation is dict or origin is dict:
        if isinstance(value, Mapping):
            return None
        return AccelerationConfigError(
            f"must be a mapping, got {type(value).__name__} ({quote(value)})",
            path=path,
            fix="write its options as a mapping (key: value lines indented under it), or remove it",
        )
    if origin is list:
        if isinstance(value, list) or value is None:
            return None
        return AccelerationConfigError(
            f"expected a list, got {type(value).__name__} ({quote(value)})", path=path, fix="write a YAML list"
        )
    return None


def _crashing_types(name: str) -> bool:
    """Whether a wrong type of top-level setting ``name`` makes ``accelerate launch`` itself fail."""
    return name in {
        "num_processes", "num_machines", "machine_rank", "gpu_ids", "fsdp_config", "deepspeed_config",
        "fp8_config", "parallelism_config", "megatron_lm_config", "mpirun_config", "dynamo_config",
    }  # fmt: skip


def _launch_options() -> frozenset[str]:
    from accelerate.commands.launch import launch_command_parser

    return frozenset(action.dest for action in launch_command_parser()._actions)


def accelerate_settings_problems(
    settings: Any, *, origin: str, strict: bool = True, with_section: bool = True
) -> list[AccelerationConfigError]:
    """Every problem of the Accelerate settings of a config file (the file without its ``acceleration:``).

    Args:
        settings: the top-level mapping of the Accelerate config, without the ``acceleration:`` section.
        origin: where it came from, for messages.
        strict: also report mistakes Accelerate accepts silently (see the module docstring).
        with_section: the file has an ``acceleration:`` section (only changes the wording of suggestions).

    Returns:
        The problems, in file order (empty when Accelerate would accept the settings).
    """
    if not isinstance(settings, Mapping):
        return [
            AccelerationConfigError(
                f"the Accelerate config {quote(origin)} must hold a mapping at the top level, got "
                f"{type(settings).__name__} ({quote(settings)})",
                fix="write 'key: value' lines such as 'distributed_type: MULTI_GPU' (see 'accelerate config')",
            )
        ]
    config_args = _classes()
    from accelerate.utils import ComputeEnvironment, DistributedType, PrecisionType, SageMakerDistributedType

    problems: list[AccelerationConfigError] = []
    for key in settings:
        if not isinstance(key, str):
            problems.append(
                AccelerationConfigError(
                    f"top-level keys must be strings, got {quote(key, 80)}", fix="quote the key in the YAML file"
                )
            )
    if problems:
        return problems

    env = settings.get("compute_environment", ComputeEnvironment.LOCAL_MACHINE.value)
    env_problem = _enum_problem(env, ComputeEnvironment, "compute_environment", "compute environment")
    if env_problem is not None:
        problems.append(env_problem)
        env = ComputeEnvironment.LOCAL_MACHINE.value
    sagemaker = str(getattr(env, "value", env)) == ComputeEnvironment.AMAZON_SAGEMAKER.value
    config_cls = config_args.SageMakerConfig if sagemaker else config_args.ClusterConfig
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    known = fields | _LEGACY_KEYS

    for key in settings:
        if key in known:
            continue
        hint = did_you_mean(key, sorted(known | {SECTION_KEY}))
        problems.append(
            AccelerationConfigError(
                f"unknown top-level key {quote(key, 80)} of {config_cls.__name__}.{hint}",
                path=key_name(key),
                fix=f"Accelerate's keys are those 'accelerate config' writes ({truncate(', '.join(sorted(fields)), 500)})"
                + (f"; this package's section is '{SECTION_KEY}:'" if not hint else ""),
            )
        )

    if "distributed_type" not in settings:
        problems.append(
            AccelerationConfigError(
                "Accelerate needs a 'distributed_type'",
                path="distributed_type",
                fix="add e.g. \"distributed_type: 'NO'\" (one process), MULTI_GPU or FSDP",
            )
        )
    else:
        value = settings["distributed_type"]
        if not (value is False and not sagemaker):  # unquoted NO: Accelerate's checks all treat it as NO
            enum_cls = SageMakerDistributedType if sagemaker else DistributedType
            problem = _enum_problem(value, enum_cls, "distributed_type", "distributed_type")
            if problem is not None:
                problems.append(problem)

    mixed = settings.get("mixed_precision")
    valid_precisions = _enum_values(PrecisionType)
    if mixed is not None and (not isinstance(mixed, str) or mixed.lower() not in valid_precisions):
        hint = did_you_mean(mixed, valid_precisions) if isinstance(mixed, str) else ""
        note = " (YAML reads an unquoted no as false: write 'no')" if mixed is False else ""
        problems.append(
            AccelerationConfigError(
                f"invalid mixed_precision {quote(mixed)}{note}.{hint}",
                path="mixed_precision",
                fix=f"valid values: {', '.join(repr(v) for v in valid_precisions)}",
            )
        )

    for key, value in settings.items():
        if key in ("compute_environment", "distributed_type", "mixed_precision") or key not in hints:
            continue
        if not strict and not _crashing_types(key):
            continue
        if key == "downcast_bf16" and value in ("yes", "no"):
            continue  # what 'accelerate config' writes for it
        problem = _type_problem(value, hints[key], key)
        if problem is not None:
            problems.append(problem)
    if strict:
        problems.extend(_strict_problems(settings))
    if problems:
        return problems
    return _accelerate_parse(settings, config_cls, origin)


def _strict_problems(settings: Mapping[str, Any]) -> list[AccelerationConfigError]:
    """Mistakes Accelerate accepts silently: ranges, nested typos, ``fsdp_version``, FSDP option pairs."""
    problems: list[AccelerationConfigError] = []

    def integer(key: str) -> int | None:
        value = settings.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    processes, machines, rank, port = (
        integer("num_processes"), integer("num_machines"), integer("machine_rank"), integer("main_process_port")
    )  # fmt: skip
    if processes is not None and processes < 1 and processes != -1:
        problems.append(
            AccelerationConfigError(
                f"must be at least 1, got {processes}",
                path="num_processes",
                fix="set the total number of processes (all machines), or -1 to pass --num_processes when launching",
            )
        )
    if machines is not None and machines < 1:
        problems.append(
            AccelerationConfigError(f"must be at least 1, got {machines}", path="num_machines", fix="set 1 or more")
        )
    if rank is not None and (rank < 0 or (machines is not None and machines >= 1 and rank >= machines)):
        problems.append(
            AccelerationConfigError(
                f"must be between 0 and num_machines - 1, got {rank}",
                path="machine_rank",
                fix="give each machine its rank 0, 1, ... (usually with --machine_rank when launching)",
            )
        )
    if port is not None and not 1 <= port <= 65535:
        problems.append(
            AccelerationConfigError(
                f"is not a TCP port: {port}", path="main_process_port", fix="use a port in 1..65535"
            )
        )
    if any(isinstance(settings.get(name), Mapping) for name in _NESTED_PREFIX):
        options = _launch_options()
        for name, prefix in _NESTED_PREFIX.items():
            nested = settings.get(name)
            if not isinstance(nested, Mapping):
                continue
            family = sorted(o for o in options if prefix and o.startswith(prefix)) or sorted(options)
            allowed = options | _NESTED_EXTRA.get(name, frozenset())
            for key in nested:
                if not isinstance(key, str):
                    problems.append(
                        AccelerationConfigError(
                            f"keys must be strings, got {quote(key, 80)}", path=name, fix="quote the key"
                        )
                    )
                    continue
                full = key if key.startswith(prefix) else prefix + key
                if full in allowed:
                    continue
                hint = did_you_mean(full, [*family, *_NESTED_EXTRA.get(name, ())])
                if hint:  # keys close to no option may be read by code this check does not know: left alone
                    problems.append(
                        AccelerationConfigError(
                            f"unknown key {quote(key, 80)} (Accelerate would ignore it).{hint}",
                            path=join_path(name, key),
                            fix="correct the spelling ('accelerate launch --help' lists the options)",
                        )
                    )
    fsdp = settings.get("fsdp_config")
    if isinstance(fsdp, Mapping):
        version = fsdp.get("fsdp_version", fsdp.get("version"))
        if version is not None and str(version) not in ("1", "2"):
            problems.append(
                AccelerationConfigError(
                    f"invalid fsdp_version {quote(version)}", path="fsdp_config.fsdp_version", fix="valid values: 1, 2"
                )
            )
        if settings.get("distributed_type") == "FSDP":
            ram = fsdp.get("fsdp_cpu_ram_efficient_loading", "true")
            sync = fsdp.get("fsdp_sync_module_states", "true")
            if ram and not sync:  # the launcher raises this one only after it parsed everything else
                problems.append(
                    AccelerationConfigError(
                        "fsdp_cpu_ram_efficient_loading needs fsdp_sync_module_states (Accelerate refuses the pair)",
                        path="fsdp_config.fsdp_sync_module_states",
                        fix="set fsdp_sync_module_states: true, or fsdp_cpu_ram_efficient_loading: false",
                    )
                )
    return problems


def _accelerate_parse(settings: Mapping[str, Any], config_cls: type, origin: str) -> list[AccelerationConfigError]:
    """Run Accelerate's own parsing (``process_config``, unknown keys, ``__post_init__``) on a copy of the
    settings; whatever it raises becomes a problem (a safety net: the checks above should have said it)."""
    try:
        config_dict = config_cls.process_config(dict(settings))
        extra = sorted(set(config_dict) - {f.name for f in dataclasses.fields(config_cls)})
        if extra:
            raise ValueError(f"unknown keys {extra}")
        config_cls(**config_dict)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return [
            AccelerationConfigError(
                f"Accelerate refuses the settings of {quote(origin)}: {truncate(str(exc), 600)}",
                fix="correct the setting named in Accelerate's message",
            )
        ]
    return []


def check_accelerate_document(document: Any, *, origin: str, strict: bool) -> None:
    """Raise one :class:`AccelerationConfigError` with every problem of a whole Accelerate config document
    (its ``acceleration:`` section, if any, is left to the framework)."""
    if isinstance(document, Mapping):
        document = {k: v for k, v in document.items() if k != SECTION_KEY}
    error = AccelerationConfigError.combine(accelerate_settings_problems(document, origin=origin, strict=strict))
    if error is not None:
        raise error


__all__ = ["accelerate_settings_problems", "check_accelerate_document"]
