"""bitsandbytes QLoRA (nf4/fp4) acceleration plugin for fms-acceleration-accelerate.

Config section ``peft.quantization.bitsandbytes``; see :mod:`.plugin` for what it does.
"""

from .config import CONFIG_PATH, BnbQuantizationConfig
from .packed4bit import Packed4bitLinear, Packed4bitWeight

__all__ = ["CONFIG_PATH", "BnbQuantizationConfig", "Packed4bitLinear", "Packed4bitWeight"]
