"""``fms_acceleration_peft``: the original fms-acceleration's import name for its PEFT plugins, provided by
fms-acceleration-accelerate-peft (this project's bitsandbytes QLoRA plugin, config section
``peft.quantization.bitsandbytes``).

Clients of the original (fms-hf-tuning) only check that this name can be found before they configure
``peft.quantization.bitsandbytes``; the framework then activates the plugin through its entry point. The name
exists only while this plugin package is installed, and an installed original ``fms_acceleration_peft`` is found
first (see the ``fms_acceleration`` stand-in). The original's GPTQ plugin (``peft.quantization.auto_gptq``) has no
counterpart here: that section is passed through with a message.

Where the original framework is installed without this plugin of its own, it imports this name anyway (it imports
every plugin name it finds); a warning then says that the original does not use this project's plugins.
"""

import warnings
from importlib import metadata

try:
    _original = metadata.distribution("fms-acceleration")
except metadata.PackageNotFoundError:
    _original = None
if _original is not None:  # the original framework imports every plugin name it finds, this stand-in included
    warnings.warn(
        f"fms_acceleration_peft is fms-acceleration-accelerate's stand-in, but the original fms-acceleration "
        f"{_original.version} is installed and does not use this project's plugins: its peft.quantization.bitsandbytes "
        "sections activate nothing there. Install the original's fms-acceleration-peft as well, or uninstall "
        "the original fms-acceleration to run this project's framework",
        stacklevel=2,
    )

from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
from fms_acceleration_accelerate_peft.plugin import BitsAndBytesAccelerationPlugin

__all__ = ["BitsAndBytesAccelerationPlugin", "BnbQuantizationConfig"]
