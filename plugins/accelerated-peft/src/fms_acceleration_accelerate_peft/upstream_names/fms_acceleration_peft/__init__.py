"""``fms_acceleration_peft``: the original fms-acceleration's import name for its PEFT plugins, provided by
fms-acceleration-accelerate-peft (this project's bitsandbytes QLoRA plugin, config section
``peft.quantization.bitsandbytes``).

Clients of the original (fms-hf-tuning) only check that this name can be found before they configure
``peft.quantization.bitsandbytes``; the framework then activates the plugin through its entry point. The name
exists only while this plugin package is installed, and an installed original ``fms_acceleration_peft`` is found
first (see the ``fms_acceleration`` stand-in). The original's GPTQ plugin (``peft.quantization.auto_gptq``) has no
counterpart here: that section is passed through with a message.
"""

from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
from fms_acceleration_accelerate_peft.plugin import BitsAndBytesAccelerationPlugin

__all__ = ["BitsAndBytesAccelerationPlugin", "BnbQuantizationConfig"]
