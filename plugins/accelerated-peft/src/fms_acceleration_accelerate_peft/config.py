"""Configuration of the bitsandbytes QLoRA plugin (section ``peft.quantization.bitsandbytes``).

Option names follow upstream fms-acceleration (``quant_type``, ``no_peft_model``) and, for the bitsandbytes
knobs, Hugging Face's ``BitsAndBytesConfig`` (``bnb_4bit_use_double_quant``, ``bnb_4bit_compute_dtype``,
``bnb_4bit_quant_storage``), so a user can copy values between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError

CONFIG_PATH = "peft.quantization.bitsandbytes"

_DTYPES = MappingProxyType(
    {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
)


def dtype_from_name(name: str, auto: torch.dtype) -> torch.dtype:
    """Resolve a dtype option value; ``"auto"`` means ``auto`` (the training dtype)."""
    if name == "auto":
        return auto
    return _DTYPES[name]


@dataclass(frozen=True)
class BnbQuantizationConfig:
    """Options of ``peft.quantization.bitsandbytes``.

    Attributes:
        quant_type: 4-bit data type, ``nf4`` or ``fp4``.
        bnb_4bit_use_double_quant: quantize the per-block scales again (saves ~0.4 bit/param).
        bnb_4bit_compute_dtype: dtype of the dequantized weight in the matmul (``auto``: training dtype).
        bnb_4bit_quant_storage: dtype of the tensor holding the packed 4-bit bytes (``auto``: training dtype).
            Must equal the training dtype so FSDP can flatten/shard it next to the other parameters.
        no_peft_model: when true the plugin only loads the quantized model and adds no LoRA adapters (the
            caller adds them, e.g. TRL's SFTTrainer with ``peft_config``).
        fp32_lora_params: keep LoRA A/B weights in float32 (peft's default, more stable) instead of the
            training dtype.
        fp32_norm_compute: compute RMSNorm/LayerNorm in float32 (weights stay in the training dtype, no
            memory cost), instead of the model's own norm arithmetic.
        fsdp2_packed_all_gather: under FSDP2, shard the 4-bit weights as packed bytes + scales (a tensor
            subclass), so each rank keeps only its 4-bit shard and all-gathers move packed bytes. When false,
            4-bit layers are left to FSDP2's default handling of bitsandbytes parameters.
        load_staging: where the 4-bit model waits between loading and FSDP2 sharding. ``device``: on the local
            GPU, as bitsandbytes loads it (the whole 4-bit model is on every GPU before sharding). ``cpu``: in
            host memory; each weight is quantized on the GPU and moved to the host at once, and FSDP2 moves one
            unit at a time to the GPU while sharding, so loading needs about one layer of GPU memory instead of
            the whole 4-bit model (host memory: the whole 4-bit model per process). FSDP2 only. ``auto``:
            ``cpu`` under FSDP2 with more than one process, else ``device``.
    """

    quant_type: Literal["nf4", "fp4"] = option("nf4", help="4-bit data type: nf4 (normal float) or fp4")
    bnb_4bit_use_double_quant: bool = option(
        True, help="quantize the per-block absmax scales a second time (double quantization)"
    )
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", help="dtype of the matmul after dequantization; auto = training dtype (torch_dtype)"
    )
    bnb_4bit_quant_storage: Literal["auto", "bfloat16", "float16", "float32", "uint8"] = option(
        "auto",
        help="dtype holding the packed 4-bit bytes; must equal the training dtype so FSDP can shard it; "
        "auto = training dtype",
    )
    no_peft_model: bool = option(False, help="true: load the quantized model only, do not add LoRA adapters")
    fp32_lora_params: bool = option(True, help="keep LoRA adapter weights in float32 (peft's default)")
    fp32_norm_compute: bool = option(
        False, help="compute RMSNorm/LayerNorm in float32 (no fp32 copies of the weights are kept)"
    )
    fsdp2_packed_all_gather: bool = option(
        True, help="FSDP2: shard 4-bit weights as packed bytes (all-gather moves 4-bit data, not bf16)"
    )
    load_staging: Literal["auto", "device", "cpu"] = option(
        "auto",
        help="where the 4-bit model waits until FSDP2 shards it: device (GPU), cpu (host memory, FSDP2 moves one "
        "unit at a time to the GPU), auto = cpu under FSDP2 with several processes, else device",
    )

    def __post_init__(self) -> None:
        if self.bnb_4bit_compute_dtype == "float16" and self.bnb_4bit_quant_storage == "bfloat16":
            raise AccelerationConfigError(
                "bnb_4bit_compute_dtype float16 with bnb_4bit_quant_storage bfloat16 mixes two 16-bit training dtypes",
                fix="use 'auto' for both (the training dtype), or set both to the same dtype",
            )

    def compute_dtype(self, training_dtype: torch.dtype) -> torch.dtype:
        """The matmul dtype for a model trained in ``training_dtype``."""
        return dtype_from_name(self.bnb_4bit_compute_dtype, training_dtype)

    def storage_dtype(self, training_dtype: torch.dtype) -> torch.dtype:
        """The packed-storage dtype for a model trained in ``training_dtype``."""
        return dtype_from_name(self.bnb_4bit_quant_storage, training_dtype)
