"""Fused operations and kernels plugin of fms-acceleration-accelerate.

Config sections ``training.fused_ops_and_kernels`` or ``peft.quantization.fused_ops_and_kernels`` (one of
them); options in :class:`FusedOpsAndKernelsConfig`. Kernels come from ``fms-acceleration-accelerate-kernels``;
which modules they replace comes from :mod:`fms_acceleration_accelerate.model_specs`.
"""

from .config import FusedOpsAndKernelsConfig
from .plugin import FusedOpsAndKernelsPlugin

__all__ = ["FusedOpsAndKernelsConfig", "FusedOpsAndKernelsPlugin"]
