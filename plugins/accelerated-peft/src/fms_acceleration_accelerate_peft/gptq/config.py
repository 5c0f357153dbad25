"""Configuration of the GPTQ-LoRA plugin (section ``peft.quantization.auto_gptq``).

The first three option names and values are upstream fms-acceleration's (``kernel: triton_v2``,
``from_quantized: true``, ``use_external_lib: false``), so an upstream configuration works unchanged; the
others match the bitsandbytes plugin's (``no_peft_model``, ``fp32_lora_params``, ``fp32_norm_compute``,
``load_staging``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError

CONFIG_PATH = "peft.quantization.auto_gptq"

KERNELS = ("triton_v2",)
"""Values of ``kernel`` this plugin runs (upstream's default; its kernels are this project's own)."""

_OTHER_KERNELS = MappingProxyType(
    {
        "exllama": "auto-gptq's exllama CUDA kernel",
        "exllamav2": "auto-gptq's exllama v2 CUDA kernel",
        "exllama_v2": "auto-gptq's exllama v2 CUDA kernel",
        "marlin": "the marlin CUDA kernel",
        "triton": "auto-gptq's first Triton kernel",
        "cuda": "auto-gptq's CUDA kernel",
        "cuda_old": "auto-gptq's older CUDA kernel",
        "torch": "gptqmodel's torch kernel",
        "tritonv2": "gptqmodel's Triton kernel",
    }
)

QUANTIZE_COMMAND = "fms-accelerate quantize MODEL OUT --bits 4 --group-size 128"
"""The command that writes a GPTQ checkpoint from a Hugging Face model (for messages)."""

TRAINING_DTYPES = MappingProxyType({torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"})
"""Training dtypes of the non-quantized weights and of the matmul (the packed weights are integers)."""


@dataclass(frozen=True)
class GPTQLoraConfig:
    """Options of ``peft.quantization.auto_gptq``.

    Attributes:
        kernel: the quantized matmul kernel; only ``triton_v2`` (this project's own Triton dequant and fused
            dequant-matmul, with pure-torch references on CPU). Upstream's other values name auto-gptq's CUDA
            kernels, which this plugin does not ship.
        from_quantized: ``true``: the model path is a GPTQ checkpoint (the only mode; quantize a model first).
        use_external_lib: ``false``: the checkpoint format is read by this plugin (auto-gptq / gptqmodel are not
            used). ``true`` is refused.
        no_peft_model: when true the plugin only loads the GPTQ model and adds no LoRA adapters (the caller adds
            them, e.g. TRL's ``SFTTrainer`` with ``peft_config``).
        fp32_lora_params: keep LoRA A/B weights in float32 (peft's default) instead of the training dtype; with
            float16 training this is what keeps the adapter updates from underflowing without a grad scaler.
        fp32_norm_compute: compute RMSNorm/LayerNorm in float32 (weights stay in the training dtype).
        load_staging: where the loaded GPTQ model waits until FSDP2 shards it. ``device``: on the process's GPU
            (every GPU holds the whole packed model before sharding). ``cpu``: in host memory; FSDP2 moves one unit
            at a time to the GPU while sharding, so loading needs about one decoder layer of GPU memory (host
            memory: the whole packed model per process). FSDP2 only. ``auto``: ``cpu`` under FSDP2 with more than
            one process, else ``device``.
    """

    kernel: str = option("triton_v2", help="quantized matmul kernel: triton_v2 (this project's own Triton kernels)")
    from_quantized: bool = option(True, help="true: the model path is a GPTQ checkpoint (the only mode)")
    use_external_lib: bool = option(
        False, help="false: the GPTQ format is read natively (auto-gptq / gptqmodel are not used); true is refused"
    )
    no_peft_model: bool = option(False, help="true: load the GPTQ model only, do not add LoRA adapters")
    fp32_lora_params: bool = option(True, help="keep LoRA adapter weights in float32 (peft's default)")
    fp32_norm_compute: bool = option(
        False, help="compute RMSNorm/LayerNorm in float32 (no fp32 copies of the weights are kept)"
    )
    load_staging: Literal["auto", "device", "cpu"] = option(
        "auto",
        help="where the GPTQ model waits until FSDP2 shards it: device (GPU), cpu (host memory, FSDP2 moves one "
        "unit at a time to the GPU), auto = cpu under FSDP2 with several processes, else device",
    )

    def __post_init__(self) -> None:
        # no key paths here: the parser puts the section's full path on the first problem; each text names its key
        problems: list[AccelerationConfigError] = []
        if self.kernel not in KERNELS:
            what = _OTHER_KERNELS.get(self.kernel)
            problems.append(
                AccelerationConfigError(
                    f"kernel {self.kernel!r} is not available"
                    + (f": it names {what}, which this plugin does not ship" if what else "")
                    + "; the GPTQ matmul runs this project's own Triton kernels",
                    fix="set kernel: triton_v2 (the only valid value)",
                )
            )
        if self.from_quantized is not True:
            problems.append(
                AccelerationConfigError(
                    "from_quantized: false would quantize the model while loading, which this plugin does not do: "
                    "it loads GPTQ checkpoints",
                    fix=f"make a GPTQ checkpoint first with `{QUANTIZE_COMMAND}`, train from OUT with "
                    "from_quantized: true; or use peft.quantization.bitsandbytes to quantize while loading",
                )
            )
        if self.use_external_lib is not False:
            problems.append(
                AccelerationConfigError(
                    "use_external_lib: true asks for auto-gptq, which is archived and does not install on current "
                    "torch; this plugin reads the GPTQ checkpoint format natively and runs its own kernels",
                    fix="set use_external_lib: false (or remove the key)",
                )
            )
        error = AccelerationConfigError.combine(problems)
        if error is not None:
            raise error


def check_training_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return ``dtype`` if the GPTQ model can train in it (bfloat16, float16 or float32), else raise.

    Raises:
        AccelerationConfigError: any other dtype, naming the fix.
    """
    if dtype not in TRAINING_DTYPES:
        raise AccelerationConfigError(
            f"training dtype {str(dtype).replace('torch.', '')} is not supported for GPTQ-LoRA: the non-quantized "
            "weights and the dequantized matmul run in bfloat16, float16 or float32",
            path=CONFIG_PATH,
            fix="pass torch_dtype=torch.bfloat16 (or float16 / float32) to the loader, or save the checkpoint in one "
            "of those dtypes",
        )
    return dtype
