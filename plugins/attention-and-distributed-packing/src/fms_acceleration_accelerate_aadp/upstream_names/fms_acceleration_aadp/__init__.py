"""``fms_acceleration_aadp``: the original fms-acceleration's import name for its attention-and-distributed-packing
plugins, provided by fms-acceleration-accelerate-aadp (config sections ``training.attention.padding_free`` and
``training.dataloader.multipack``).

Clients of the original (fms-hf-tuning) only check that this name can be found before they write those sections;
the framework then activates the plugins through their entry points. The name exists only while this plugin package
is installed, and an installed original ``fms_acceleration_aadp`` is found first (see the ``fms_acceleration``
stand-in).

The original's plugin class names are kept as aliases of this project's classes:
``PaddingFreeAccelerationPlugin`` (:class:`~fms_acceleration_accelerate_aadp.PaddingFreePlugin`) and
``MultipackDataloaderAccelerationPlugin``
(:class:`~fms_acceleration_accelerate_aadp.MultipackAccelerationPlugin`).
"""

from fms_acceleration_accelerate_aadp import (
    MultipackAccelerationPlugin,
    MultipackConfig,
    PaddingFreeConfig,
    PaddingFreePlugin,
)

from fms_acceleration_accelerate.upstream_plugin_names import warn_if_original_framework_installed

# the original framework imports every plugin name it finds, this stand-in included
warn_if_original_framework_installed("fms_acceleration_aadp", "padding_free / multipack", "fms-acceleration-aadp")

# the original's class names (its package exported these two)
PaddingFreeAccelerationPlugin = PaddingFreePlugin
MultipackDataloaderAccelerationPlugin = MultipackAccelerationPlugin

__all__ = [
    "MultipackAccelerationPlugin",
    "MultipackConfig",
    "MultipackDataloaderAccelerationPlugin",
    "PaddingFreeAccelerationPlugin",
    "PaddingFreeConfig",
    "PaddingFreePlugin",
]
