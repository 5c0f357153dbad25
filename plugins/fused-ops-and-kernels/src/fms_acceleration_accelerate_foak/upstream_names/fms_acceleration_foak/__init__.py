"""``fms_acceleration_foak``: the original fms-acceleration's import name for its fused-ops-and-kernels plugin,
provided by fms-acceleration-accelerate-foak (config sections ``training.fused_ops_and_kernels`` and
``peft.quantization.fused_ops_and_kernels``; upstream's option spellings are accepted, see
:mod:`fms_acceleration_accelerate_foak.config`).

Clients of the original (fms-hf-tuning) only check that this name can be found before they write those
sections; the framework then activates the plugin through its entry point. The name exists only while this
plugin package is installed, and an installed original ``fms_acceleration_foak`` is found first (see the
``fms_acceleration`` stand-in).

Where the original framework is installed without this plugin of its own, it imports this name anyway (it imports
every plugin name it finds); a warning then says that the original does not use this project's plugins.
"""

from fms_acceleration_accelerate_foak import FusedOpsAndKernelsConfig, FusedOpsAndKernelsPlugin

from fms_acceleration_accelerate.upstream_plugin_names import warn_if_original_framework_installed

# the original framework imports every plugin name it finds, this stand-in included
warn_if_original_framework_installed("fms_acceleration_foak", "fused_ops_and_kernels", "fms-acceleration-foak")

# the original's class names: one plugin there per config path, one plugin here serving both paths
FastKernelsAccelerationPlugin = FusedOpsAndKernelsPlugin
FastQuantizedPeftAccelerationPlugin = FusedOpsAndKernelsPlugin

__all__ = [
    "FastKernelsAccelerationPlugin",
    "FastQuantizedPeftAccelerationPlugin",
    "FusedOpsAndKernelsConfig",
    "FusedOpsAndKernelsPlugin",
]
