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
   ``ACCELERATE_MIXED_PRECISION``, with ``WORLD_SIZE`` and ``LOCAL_RANK``.
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

from .distributed import FsdpSettings, RunContext
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
    world_size = _int_variable(env, "WORLD_SIZE", 1)
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
    elif world_size > 1:
        distributed_type = "MULTI_GPU" if torch.cuda.is_available() else "MULTI_CPU"
    mixed_precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if mixed_precision not in ("no", "fp16", "bf16", "fp8"):
        raise AccelerationConfigError(
            f"ACCELERATE_MIXED_PRECISION is {mixed_precision!r}, which is no mixed-precision mode",
            fix="set mixed_precision to no, fp16, bf16 or fp8 in the Accelerate config, or unset the variable",
        )
    return RunContext(
        distributed_type=distributed_type,
        fsdp_version=fsdp_version,
        device=_local_device(env),
        mixed_precision=mixed_precision,
        world_size=world_size,
        framework=framework,
        fsdp=fsdp,
        zero_stage=zero_stage,
        client=client,
        source="launcher" if any(k in env for k in _LAUNCHER_MARKS) else "default",
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
    if distributed_type == "DEEPSPEED":
        plugins = state.get("deepspeed_plugins")
        plugin = next(iter(plugins.values()), None) if isinstance(plugins, Mapping) else plugins
        zero_stage = getattr(plugin, "zero_stage", None)
    device = state.get("device")
    return RunContext(
        distributed_type=distributed_type,
        fsdp_version=fsdp_version,
        device=device if isinstance(device, torch.device) else _local_device(env),
        mixed_precision=str(state.get("_mixed_precision") or "no"),
        world_size=int(state.get("num_processes") or 1),
        framework=framework,
        fsdp=fsdp,
        zero_stage=zero_stage,
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


__all__ = ["detect_client", "fsdp_settings", "refine_with_training_arguments", "run_context_from_environment"]
