"""Where a quantized model waits between loading and FSDP sharding (option ``load_staging`` of the quantized-LoRA
plugins)."""

from __future__ import annotations

import torch

from fms_acceleration_accelerate.errors import AccelerationConfigError


def staging_device(
    choice: str,
    *,
    world_size: int,
    device: torch.device,
    fsdp_version: int | None,
    config_path: str,
    fsdp1_problem: str,
) -> torch.device:
    """The device a loaded model is staged on for ``load_staging: choice``.

    ``device``: ``device``. ``cpu``: the host (FSDP2 moves one unit at a time to the device while sharding).
    ``auto``: the host under FSDP2 with several processes, else ``device``. On a CPU-only run always ``device``.

    Args:
        choice: ``auto``, ``device`` or ``cpu``.
        world_size: number of processes.
        device: the process's training device.
        fsdp_version: the FSDP version of the coming prepare, ``None`` when not FSDP or not known yet.
        config_path: the plugin's config path, for the error.
        fsdp1_problem: the error message for ``cpu`` staging under FSDP1.

    Raises:
        AccelerationConfigError: ``cpu`` staging under FSDP1.
    """
    if choice == "cpu" and fsdp_version == 1:
        raise AccelerationConfigError(
            fsdp1_problem,
            path=f"plugins.{config_path}.load_staging",
            fix="set load_staging: auto (or device), or use fsdp_version: 2",
        )
    if device.type == "cpu" or choice == "device":
        return device
    host = torch.device("cpu")
    if choice == "cpu":
        return host
    return host if world_size > 1 and fsdp_version == 2 else device
