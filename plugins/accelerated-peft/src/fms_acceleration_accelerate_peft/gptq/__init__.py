"""GPTQ-LoRA: LoRA on standard Hugging Face GPTQ checkpoints, read natively (no auto-gptq / gptqmodel).

Config section ``peft.quantization.auto_gptq`` (upstream fms-acceleration's path and keys); see :mod:`.plugin` for
what each hook does, :mod:`.checkpoint` for the checkpoint format and its checks, :mod:`.layer` for the quantized
linear layer. Importing this package imports neither Triton nor the kernels package.
"""

from .config import CONFIG_PATH, GPTQLoraConfig

__all__ = ["CONFIG_PATH", "GPTQLoraConfig"]
