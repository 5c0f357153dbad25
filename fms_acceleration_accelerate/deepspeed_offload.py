"""DeepSpeed ZeRO-Offload (``offload_param`` / ``offload_optimizer``: ``cpu`` or ``nvme``): what this machine must be
able to build for it, checked before any model is loaded, and what it does to a run, for ``fms-accelerate check``.

What DeepSpeed does with the settings (DeepSpeed 0.19):

* ``offload_optimizer`` (ZeRO-1/2/3): fp32 master weights, gradients' fp32 copies and optimizer states live in host
  memory (``cpu``) or in files under ``nvme_path`` (``nvme``); the optimizer steps on the host. By default
  (``zero_force_ds_cpu_optimizer`` not set, or true) Accelerate replaces the script's or trainer's torch optimizer
  by DeepSpeed's ``DeepSpeedCPUAdam`` with the same hyper-parameters, a C++ op that DeepSpeed compiles the first
  time a process uses it (a C++ compiler and ninja; no nvcc, also on CUDA machines) unless the wheel was built with
  it (``DS_BUILD_CPU_ADAM=1``). ``zero_force_ds_cpu_optimizer: false`` in the DeepSpeed config keeps the script's
  optimizer, which then steps on the host copies itself.
* ``offload_param`` (ZeRO-3 only; ZeRO-0/1/2 ignore it): every parameter's partition lives in host memory or
  in files; ZeRO-3 fetches it when it gathers the parameter for a forward / backward, so modules and kernels only
  ever see whole parameters on the compute device.
* ``nvme``: under ZeRO-3, files under ``nvme_path`` written through DeepSpeed's ``async_io`` op, compiled the same
  way, which needs the libaio development files; ZeRO-1/2 keep nvme-offloaded optimizer states in host memory.

The plugins' parameters need nothing more: the fused kernels' scopes gather through the same ZeRO-3 path, and
bitsandbytes' packed 4-bit storage is moved or swapped as the raw partition it is, in its storage dtype (DeepSpeed
never casts on offload), while its quantization state (no parameter) stays on the compute device.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import AccelerationConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import RunContext

_DEVICES = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class OffloadOps:
    """Whether DeepSpeed can get the ops offload needs on this machine (installed prebuilt, or compilable now).

    Attributes:
        cpu_adam: ``DeepSpeedCPUAdam``'s op; ``None`` when the reason it cannot is not known.
        async_io: the ``async_io`` op of ``nvme`` offload.
        cpu_adam_missing: what is missing for ``cpu_adam`` (for the error message).
        async_io_missing: what is missing for ``async_io``.
    """

    cpu_adam: bool
    async_io: bool
    cpu_adam_missing: str = ""
    async_io_missing: str = ""


def probe_offload_ops(need_cpu_adam: bool, need_async_io: bool) -> OffloadOps:
    """Ask DeepSpeed about the ops (only those needed; the ``async_io`` probe compiles a tiny libaio test)."""
    from deepspeed.git_version_info import installed_ops

    cpu_adam, cpu_adam_missing = True, ""
    if need_cpu_adam and not installed_ops.get("cpu_adam", False):
        compiler = os.environ.get("CXX", "c++")
        missing = [what for what, found in ((compiler, shutil.which(compiler)), ("ninja", _has_ninja())) if not found]
        cpu_adam = not missing
        if missing:
            cpu_adam_missing = (
                f"{' and '.join(missing)} not found, and the installed DeepSpeed has no prebuilt cpu_adam"
            )
    async_io, async_io_missing = True, ""
    if need_async_io and not installed_ops.get("async_io", False):
        from deepspeed.ops.op_builder import AsyncIOBuilder

        async_io = bool(AsyncIOBuilder().is_compatible(verbose=False))
        if not async_io:
            async_io_missing = "DeepSpeed cannot build its async_io op here (the libaio development files are missing)"
    return OffloadOps(cpu_adam, async_io, cpu_adam_missing, async_io_missing)


def _has_ninja() -> bool:
    return shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None


def _key(context: RunContext, which: str) -> str:
    """How the user wrote the setting: the DeepSpeed JSON's key, or the Accelerate config's."""
    if context.deepspeed.config_file:
        return f"zero_optimization.{which}.device in the DeepSpeed config {context.deepspeed.config_file}"
    return f"{which}_device (Accelerate deepspeed_config; zero_optimization.{which}.device in a DeepSpeed JSON)"


def check_offload(context: RunContext, probe: Callable[[bool, bool], OffloadOps] | None = None) -> None:
    """Refuse ZeRO-Offload settings DeepSpeed could not honour on this machine, before any model is loaded (when the
    ``Accelerator`` is created, and when ``accelerate launch`` / ``fms-accelerate check`` read the config).

    Args:
        context: the run; nothing is checked unless it is DeepSpeed with some offload.
        probe: ``probe(need_cpu_adam, need_async_io)`` -> :class:`OffloadOps` (default: ask DeepSpeed).

    Raises:
        AccelerationConfigError: an offload device DeepSpeed does not know; ``nvme`` without DeepSpeed's
            ``async_io`` op; ``offload_optimizer`` with ``DeepSpeedCPUAdam`` (the default) and no way to build it.
    """
    if not context.is_deepspeed:
        return
    settings = context.deepspeed
    devices = {"offload_param": settings.offload_param, "offload_optimizer": settings.offload_optimizer}
    for which, device in devices.items():
        if device is not None and device not in _DEVICES:
            raise AccelerationConfigError(
                f"{_key(context, which)} is {device!r}, which DeepSpeed does not offload to",
                fix="use none, cpu or nvme",
            )
    optimizer = devices["offload_optimizer"] not in (None, "none")
    need_cpu_adam = optimizer and settings.force_cpu_optimizer is not False
    # ZeRO-0/1/2 keep nvme-offloaded optimizer states in host memory (no files: no async_io) and ignore offload_param
    nvme = [which for which, device in devices.items() if device == "nvme" and context.zero_stage in (3, None)]
    if not (need_cpu_adam or nvme):
        return
    ops = (probe or probe_offload_ops)(need_cpu_adam, bool(nvme))
    if nvme and not ops.async_io:
        raise AccelerationConfigError(
            f"{_key(context, nvme[0])} is nvme, but {ops.async_io_missing or 'DeepSpeed has no async_io op here'}",
            fix="install the libaio development files (apt-get install libaio-dev, or dnf install libaio-devel) so "
            "DeepSpeed can build its async_io op, or offload to cpu",
        )
    if need_cpu_adam and not ops.cpu_adam:
        raise AccelerationConfigError(
            f"{_key(context, 'offload_optimizer')} is {devices['offload_optimizer']}: Accelerate then replaces the "
            f"torch optimizer by DeepSpeedCPUAdam, whose op DeepSpeed compiles at the first step, but "
            f"{ops.cpu_adam_missing}",
            fix='install a C++ compiler and ninja (pip install ninja), or set "zero_force_ds_cpu_optimizer": false in '
            "the DeepSpeed config file to keep the script's optimizer (it then steps on the host copies)",
        )


def describe_offload(context: RunContext, parameters: str) -> list[str]:
    """The lines of a plugin's ``describe_run`` on offload (empty when the run offloads nothing): ``parameters``
    says, in the plugin's words, what happens to its parameters when ZeRO-3 offloads them."""
    if not context.is_deepspeed:
        return []
    settings = context.deepspeed
    param = settings.offload_param not in (None, "none")
    optimizer = settings.offload_optimizer not in (None, "none")
    lines = []
    if param and context.zero_stage == 3:
        lines.append(f"DeepSpeed offload_param {settings.offload_param}: {parameters}")
    elif param:
        lines.append(
            f"DeepSpeed offload_param {settings.offload_param}: ignored under ZeRO-{context.zero_stage} (ZeRO-3 only)"
        )
    if optimizer:
        how = (
            "the script's torch optimizer steps on the host copies (zero_force_ds_cpu_optimizer: false)"
            if settings.force_cpu_optimizer is False
            else "Accelerate replaces the script's torch optimizer by DeepSpeedCPUAdam (same hyper-parameters; its "
            "C++ op is compiled at the first step unless prebuilt; zero_force_ds_cpu_optimizer: false keeps the "
            "script's)"
        )
        where = (
            "in host memory (nvme files are ZeRO-3 only)"
            if settings.offload_optimizer == "nvme" and context.zero_stage in (0, 1, 2)
            else "in files under nvme_path"
            if settings.offload_optimizer == "nvme"
            else "in host memory"
        )
        lines.append(
            f"DeepSpeed offload_optimizer {settings.offload_optimizer}: fp32 master weights and optimizer states of "
            f"the trainable parameters live {where}, the optimizer steps on the host; {how}"
        )
    return lines


__all__ = ["OffloadOps", "check_offload", "describe_offload", "probe_offload_ops"]
