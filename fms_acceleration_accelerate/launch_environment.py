"""The run's shape before this framework's ``Accelerator`` exists: the launcher's environment, Accelerate's process
state and a trainer's training arguments.

With :mod:`~fms_acceleration_accelerate.accelerate_integration` (which builds the
:class:`~fms_acceleration_accelerate.distributed.RunContext` of an ``Accelerator``), this is the only module that
reads Accelerate's state or the variables ``accelerate launch`` exports. Plugins never do: they are handed the
:class:`~fms_acceleration_accelerate.distributed.RunContext` built here or there (see that class).

Sources, first that tells wins:

1. An ``Accelerator`` already created in this process (Accelerate's shared ``AcceleratorState``, read without
   re-initialising it): its distributed type, FSDP plugin, mixed precision, process count and device.
2. The variables ``accelerate launch`` exports to every worker: ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION`` (1 when
   unset, Accelerate's default), ``FSDP_USE_ORIG_PARAMS``, ``FSDP_CPU_RAM_EFFICIENT_LOADING``,
   ``FSDP_ACTIVATION_CHECKPOINTING``, ``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``,
   ``ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE``, ``ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE``,
   ``ACCELERATE_DEEPSPEED_ZERO3_INIT``, ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` (the DeepSpeed JSON file, read for
   its stage, offload devices and bf16 / fp16 mode), ``ACCELERATE_MIXED_PRECISION``, with ``WORLD_SIZE`` and
   ``LOCAL_RANK``.
3. Nothing: one process, no FSDP, the current CUDA device or the CPU (``source="default"``).

A trainer's training arguments (``train_args.fsdp``, as the HF Trainer and TRL read them) refine a context that
no ``Accelerator`` told (:func:`refine_with_training_arguments`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .distributed import DeepSpeedSettings, FsdpSettings, RunContext
from .errors import AccelerationConfigError

_TRUE = ("1", "true", "yes")
_LAUNCHER_MARKS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
_CLIENT_SEARCH_DEPTH = 64


def run_context_from_environment(
    *,
    framework: Any = None,
    client: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunContext:
    """The run's shape as far as it is known before this framework's ``Accelerator`` exists (see the module doc).

    Args:
        framework: the :class:`~fms_acceleration_accelerate.framework.AccelerationFramework` the context is for.
        client: what drives the run when the caller knows it; otherwise a trainer found on the call stack
            (:func:`detect_client`), else ``None``.
        environ: the variables to read (default: this process's environment).

    Raises:
        AccelerationConfigError: a launcher variable holds a value Accelerate would not accept either.
    """
    env = os.environ if environ is None else environ
    client = client if client is not None else detect_client()
    state = _shared_accelerator_state()
    if state:
        return _context_from_state(state, env, framework=framework, client=client)
    distributed_type, fsdp_version, fsdp, zero_stage = "NO", None, FsdpSettings(), None
    deepspeed = DeepSpeedSettings()
    world_size = _int_variable(env, "WORLD_SIZE", 1)
    mixed_precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if mixed_precision not in ("no", "fp16", "bf16", "fp8"):
        raise AccelerationConfigError(
            f"ACCELERATE_MIXED_PRECISION is {mixed_precision!r}, which is no mixed-precision mode",
            fix="set mixed_precision to no, fp16, bf16 or fp8 in the Accelerate config, or unset the variable",
        )
    if _flag(env, "ACCELERATE_USE_FSDP"):
        distributed_type = "FSDP"
        fsdp_version = _int_variable(env, "FSDP_VERSION", 1, allowed=(1, 2))
        fsdp = FsdpSettings(
            use_orig_params=_optional_flag(env, "FSDP_USE_ORIG_PARAMS"),
            cpu_ram_efficient_loading=_optional_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING"),
            activation_checkpointing=_optional_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"),
        )
    elif _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        distributed_type = "DEEPSPEED"
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            zero_stage = _int_variable(env, "ACCELERATE_DEEPSPEED_ZERO_STAGE", 0, allowed=(0, 1, 2, 3))
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").strip()
        config_file = None if config_file in ("", "none") else config_file
        zero3_init = env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT")
        zero_stage, deepspeed, mixed_precision = deepspeed_from_config(
            read_deepspeed_config_file(config_file, "ACCELERATE_DEEPSPEED_CONFIG_FILE") if config_file else None,
            zero_stage=zero_stage,
            offload_param=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
            offload_optimizer=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
            zero3_init=None if zero3_init is None else zero3_init.strip().lower() in _TRUE,
            mixed_precision=mixed_precision,
            config_file=config_file,
        )
    elif world_size > 1:
        distributed_type = "MULTI_GPU" if torch.cuda.is_available() else "MULTI_CPU"
    return RunContext(
        distributed_type=distributed_type,
        fsdp_version=fsdp_version,
        device=_local_device(env),
        mixed_precision=mixed_precision,
        world_size=world_size,
        framework=framework,
        fsdp=fsdp,
        zero_stage=zero_stage,
        deepspeed=deepspeed,
        client=client,
        source="launcher" if any(k in env for k in _LAUNCHER_MARKS) else "default",
    )


def run_context_from_accelerate_settings(settings: Mapping[str, Any], *, origin: str = "") -> RunContext | None:
    """The run's shape an Accelerate config file describes, for checks before any process starts (the launcher,
    ``fms-accelerate check``); ``None`` unless the file configures DeepSpeed (the one distributed type whose plugin
    checks run this early). ``settings`` are the file's Accelerate keys; ``deepspeed_config.deepspeed_config_file``
    is read (relative paths from the current directory, as ``accelerate launch`` does).

    Raises:
        AccelerationConfigError: the DeepSpeed config file cannot be read or is not a JSON object.
    """
    if str(settings.get("distributed_type")) != "DEEPSPEED":
        return None
    inline = settings.get("deepspeed_config")
    inline = inline if isinstance(inline, Mapping) else {}
    mixed = settings.get("mixed_precision")
    mixed = mixed.lower() if isinstance(mixed, str) and mixed.lower() in ("no", "fp16", "bf16", "fp8") else "no"
    processes = settings.get("num_processes")
    world_size = processes if isinstance(processes, int) and not isinstance(processes, bool) and processes > 0 else 1
    config_file = inline.get("deepspeed_config_file")
    config_file = config_file if isinstance(config_file, str) and config_file not in ("", "none") else None
    stage = inline.get("zero_stage")
    zero3_init = inline.get("zero3_init_flag")
    zero_stage, deepspeed, mixed = deepspeed_from_config(
        read_deepspeed_config_file(
            config_file, "deepspeed_config.deepspeed_config_file" + (f" of {origin}" if origin else "")
        )
        if config_file
        else None,
        zero_stage=stage if isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage <= 3 else None,
        offload_param=inline.get("offload_param_device"),
        offload_optimizer=inline.get("offload_optimizer_device"),
        zero3_init=zero3_init if isinstance(zero3_init, bool) else None,
        mixed_precision=mixed,
        config_file=config_file,
    )
    if zero_stage is None:
        zero_stage = 2  # Accelerate's default
    return RunContext(
        distributed_type="DEEPSPEED",
        device=torch.device("cuda") if not settings.get("use_cpu") else torch.device("cpu"),
        mixed_precision=mixed,
        world_size=world_size,
        zero_stage=zero_stage,
        deepspeed=deepspeed,
        source="launcher",
    )


def read_deepspeed_config_file(path: str, what: str) -> Mapping[str, Any]:
    """The DeepSpeed JSON config at ``path`` (named ``what`` in errors).

    Raises:
        AccelerationConfigError: missing, unreadable, not JSON, or not a JSON object.
    """
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise AccelerationConfigError(
            f"cannot read the DeepSpeed config file {path!r} ({what}): {exc.strerror or exc}",
            fix="point deepspeed_config_file at an existing DeepSpeed JSON file (relative paths start from the "
            "directory 'accelerate launch' runs in)",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AccelerationConfigError(
            f"the DeepSpeed config file {path!r} ({what}) is not valid JSON: {exc}",
            fix="write the DeepSpeed config as a JSON object",
        ) from None
    if not isinstance(document, Mapping):
        raise AccelerationConfigError(
            f"the DeepSpeed config file {path!r} ({what}) holds {type(document).__name__}, not a JSON object",
            fix="write the DeepSpeed config as a JSON object with a zero_optimization section",
        )
    return document


def deepspeed_from_config(
    config: Mapping[str, Any] | None,
    *,
    zero_stage: int | None = None,
    offload_param: Any = None,
    offload_optimizer: Any = None,
    zero3_init: bool | None = None,
    mixed_precision: str = "no",
    config_file: str | None = None,
) -> tuple[int | None, DeepSpeedSettings, str]:
    """Combine a DeepSpeed JSON config (``config``; its values win where they are not ``"auto"``, as in Accelerate)
    with the Accelerate-level DeepSpeed settings; returns ``(zero_stage, settings, mixed_precision)``, where
    ``mixed_precision`` is DeepSpeed's: ``"bf16"`` / ``"fp16"`` when the JSON enables it, else the Accelerate one."""

    def concrete(value: Any) -> Any:
        return None if value in (None, "auto") else value

    def device(value: Any) -> str | None:
        value = concrete(value)
        return str(value).strip().lower() if value is not None else None

    force_cpu_optimizer = None
    if config is not None:
        force = concrete(config.get("zero_force_ds_cpu_optimizer"))
        if isinstance(force, bool):
            force_cpu_optimizer = force
        elif isinstance(force, str) and force.strip().lower() in ("true", "false"):
            force_cpu_optimizer = force.strip().lower() == "true"
        zero = config.get("zero_optimization")
        zero = zero if isinstance(zero, Mapping) else {}
        stage = concrete(zero.get("stage"))
        if isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage <= 3:
            zero_stage = stage
        for key in ("offload_param", "offload_optimizer"):
            section = zero.get(key)
            found = device(section.get("device")) if isinstance(section, Mapping) else None
            if found is not None:
                if key == "offload_param":
                    offload_param = found
                else:
                    offload_optimizer = found
        for dtype in ("bf16", "fp16"):
            section = config.get(dtype)
            enabled = concrete(section.get("enabled")) if isinstance(section, Mapping) else None
            if enabled is True or (isinstance(enabled, str) and enabled.lower() == "true"):
                mixed_precision = dtype
    settings = DeepSpeedSettings(
        offload_param=device(offload_param),
        offload_optimizer=device(offload_optimizer),
        zero3_init=zero3_init,
        config_file=config_file,
        force_cpu_optimizer=force_cpu_optimizer,
    )
    return zero_stage, settings, mixed_precision


def deepspeed_settings(deepspeed_plugin: Any) -> tuple[DeepSpeedSettings, str | None]:
    """The :class:`~fms_acceleration_accelerate.distributed.DeepSpeedSettings` of Accelerate's DeepSpeed plugin
    object, and DeepSpeed's mixed precision from its config (``None`` when the config enables neither)."""
    config = getattr(deepspeed_plugin, "deepspeed_config", None)
    mixed = None
    force_cpu_optimizer = None
    if isinstance(config, Mapping):
        _, from_config, found = deepspeed_from_config(config, mixed_precision="")
        mixed = found or None
        force_cpu_optimizer = from_config.force_cpu_optimizer

    def device(name: str) -> str | None:
        value = getattr(deepspeed_plugin, name, None)
        return str(value).lower() if value is not None else None

    init = getattr(deepspeed_plugin, "zero3_init_flag", None)
    return (
        DeepSpeedSettings(
            offload_param=device("offload_param_device"),
            offload_optimizer=device("offload_optimizer_device"),
            zero3_init=None if init is None else bool(init),
            force_cpu_optimizer=force_cpu_optimizer,
        ),
        mixed,
    )


def refine_with_training_arguments(context: RunContext, train_args: Any) -> RunContext:
    """``context`` with FSDP as a trainer's training arguments ask for it (``train_args.fsdp``; the version from
    ``train_args.fsdp_config["version"]``, 2 when not given, as transformers does), when nothing more reliable
    (an ``Accelerator``, the launcher's FSDP or DeepSpeed settings) told the run's wrapping already."""
    if context.source == "accelerator" or context.is_fsdp or context.is_deepspeed or train_args is None:
        return context
    if not getattr(train_args, "fsdp", None):
        return context
    config = getattr(train_args, "fsdp_config", None)
    version = config.get("version", 2) if isinstance(config, Mapping) else 2
    if str(version).strip() not in ("1", "2"):
        raise AccelerationConfigError(
            f"the training arguments' fsdp_config version is {version!r}; FSDP has versions 1 and 2",
            fix="set fsdp_config={'version': 2} (or 1) in the training arguments",
        )
    return dataclasses.replace(context, distributed_type="FSDP", fsdp_version=int(version), source="training_arguments")


def fsdp_settings(fsdp_plugin: Any) -> FsdpSettings:
    """The :class:`~fms_acceleration_accelerate.distributed.FsdpSettings` of Accelerate's FSDP plugin object."""

    def read(name: str) -> bool | None:
        value = getattr(fsdp_plugin, name, None)
        return None if value is None else bool(value)

    return FsdpSettings(
        use_orig_params=read("use_orig_params"),
        cpu_ram_efficient_loading=read("cpu_ram_efficient_loading"),
        activation_checkpointing=read("activation_checkpointing"),
    )


def detect_client(default: str | None = None) -> str | None:
    """The trainer driving this call, as ``<package>.<class>`` (``"trl.SFTTrainer"``, ``"transformers.Trainer"``),
    when an HF ``Trainer`` (or subclass) method is on the call stack; else ``default``. Cheap: looks only when
    transformers' trainer module is imported, and at most a fixed number of frames up."""
    trainer_module = sys.modules.get("transformers.trainer")
    base = getattr(trainer_module, "Trainer", None)
    if base is None:
        return default
    frame = sys._getframe(1)
    for _ in range(_CLIENT_SEARCH_DEPTH):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, base):
            cls = type(candidate)
            return f"{cls.__module__.split('.')[0]}.{cls.__name__}"
        frame = frame.f_back
    return default


# ------------------------------------------------------------------------------------------------ helpers


def _shared_accelerator_state() -> Mapping[str, Any]:
    """Accelerate's shared ``AcceleratorState`` (empty until an ``Accelerator`` exists), read as it is:
    ``AcceleratorState()`` would re-initialise it from ``PartialState``."""
    from accelerate.state import AcceleratorState

    return AcceleratorState._shared_state


def _context_from_state(
    state: Mapping[str, Any], env: Mapping[str, str], *, framework: Any, client: str | None
) -> RunContext:
    kind = state.get("distributed_type")
    distributed_type = str(getattr(kind, "value", kind) or "NO")
    fsdp_plugin = state.get("fsdp_plugin")
    fsdp_version = None
    fsdp = FsdpSettings()
    if distributed_type == "FSDP" and fsdp_plugin is not None:
        fsdp_version = int(getattr(fsdp_plugin, "fsdp_version", 1) or 1)
        fsdp = fsdp_settings(fsdp_plugin)
    zero_stage = None
    deepspeed = DeepSpeedSettings()
    mixed_precision = str(state.get("_mixed_precision") or "no")
    if distributed_type == "DEEPSPEED":
        plugins = state.get("deepspeed_plugins")
        plugin = next(iter(plugins.values()), None) if isinstance(plugins, Mapping) else plugins
        zero_stage = getattr(plugin, "zero_stage", None)
        if plugin is not None:
            deepspeed, mixed = deepspeed_settings(plugin)
            mixed_precision = mixed or mixed_precision
    device = state.get("device")
    return RunContext(
        distributed_type=distributed_type,
        fsdp_version=fsdp_version,
        device=device if isinstance(device, torch.device) else _local_device(env),
        mixed_precision=mixed_precision,
        world_size=int(state.get("num_processes") or 1),
        framework=framework,
        fsdp=fsdp,
        zero_stage=zero_stage,
        deepspeed=deepspeed,
        client=client,
        source="accelerator",
    )


def _local_device(env: Mapping[str, str]) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = env.get("LOCAL_RANK")
    index = int(local_rank) if local_rank and local_rank.strip().isdigit() else torch.cuda.current_device()
    return torch.device("cuda", index)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in _TRUE


def _optional_flag(env: Mapping[str, str], name: str) -> bool | None:
    return _flag(env, name) if name in env else None


def _int_variable(env: Mapping[str, str], name: str, default: int, allowed: tuple[int, ...] | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = int(raw) if raw.isdigit() else None
    if value is None or (value not in allowed if allowed is not None else value < 1):
        valid = "one of " + ", ".join(map(str, allowed)) if allowed is not None else "a positive integer"
        raise AccelerationConfigError(
            f"{name} is {raw!r}; expected {valid}",
            fix=f"unset {name} or set it as 'accelerate launch' does (it exports it from the Accelerate config)",
        )
    return value


__all__ = [
    "deepspeed_from_config",
    "deepspeed_settings",
    "detect_client",
    "fsdp_settings",
    "read_deepspeed_config_file",
    "refine_with_training_arguments",
    "run_context_from_accelerate_settings",
    "run_context_from_environment",
]
