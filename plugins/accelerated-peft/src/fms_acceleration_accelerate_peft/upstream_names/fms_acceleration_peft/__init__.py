"""``fms_acceleration_peft``: the original fms-acceleration's import name for its PEFT plugins, provided by
fms-acceleration-accelerate-peft (this project's bitsandbytes QLoRA plugin, config section
``peft.quantization.bitsandbytes``, and its GPTQ-LoRA plugin, config section ``peft.quantization.auto_gptq``).

Clients of the original (fms-hf-tuning) only check that this name can be found before they configure
``peft.quantization.bitsandbytes`` or ``peft.quantization.auto_gptq``; the framework then activates the plugin
through its entry point. The name
exists only while this plugin package is installed, and an installed original ``fms_acceleration_peft`` is found
first (see the ``fms_acceleration`` stand-in). The GPTQ plugin reads GPTQ checkpoints natively (the original
used auto-gptq); its options are the original's.

Where the original framework is installed without this plugin of its own, it imports this name anyway (it imports
every plugin name it finds); a warning then says that the original does not use this project's plugins.
"""

from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
from fms_acceleration_accelerate_peft.gptq.plugin import AutoGPTQAccelerationPlugin
from fms_acceleration_accelerate_peft.plugin import BitsAndBytesAccelerationPlugin

from fms_acceleration_accelerate.upstream_plugin_names import warn_if_original_framework_installed

# the original framework imports every plugin name it finds, this stand-in included
warn_if_original_framework_installed(
    "fms_acceleration_peft", "peft.quantization.bitsandbytes / auto_gptq", "fms-acceleration-peft"
)

# the original's class name for its bitsandbytes plugin (clients import it by that name)
BNBAccelerationPlugin = BitsAndBytesAccelerationPlugin

__all__ = [
    "AutoGPTQAccelerationPlugin",
    "BNBAccelerationPlugin",
    "BitsAndBytesAccelerationPlugin",
    "BnbQuantizationConfig",
]
