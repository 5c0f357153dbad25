"""Triton kernels with pure-torch references for fms-acceleration-accelerate.

Every op ``<op>`` comes as ``<op>_ref`` (pure torch), ``<op>_triton`` (Triton forward/backward with autograd, a
``torch.library`` custom op under ``torch.compile``) and the dispatching ``<op>`` (Triton on CUDA tensors or with
``TRITON_INTERPRET=1``, else the reference). The fused LoRA functions and the 4-bit dequantisation follow the same
dispatch rule; they take the frozen base weight as a weight format (``DenseWeight``, ``Bnb4bitWeight``, ``GPTQWeight``).

Everything here takes and returns tensors: nothing reads ``nn.Module``s or PEFT layers (the plugins do).
Triton is a hard requirement: importing the package imports it (about 0.2 s after torch); kernels compile on
first call. README.md lists every op with its reference, Triton function, autograd wrapper and user.
"""

from .cross_entropy import (
    cross_entropy,
    cross_entropy_per_token,
    cross_entropy_per_token_ref,
    cross_entropy_per_token_triton,
    cross_entropy_ref,
    cross_entropy_triton,
)
from .dequant import Bnb4bitWeight, DenseWeight, QuantizedWeight, bnb_four_bit_state
from .fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_per_token,
    fused_linear_cross_entropy_per_token_ref,
    fused_linear_cross_entropy_per_token_triton,
    fused_linear_cross_entropy_ref,
    fused_linear_cross_entropy_triton,
)
from .glu import geglu, geglu_ref, geglu_triton, swiglu, swiglu_ref, swiglu_triton
from .gptq import GPTQWeight, gptq_dequantize, gptq_dequantize_ref, gptq_linear, pack_gptq, unpack_gptq
from .lora import (
    LoraProjection,
    lora_linear,
    lora_linear_ref,
    lora_mlp_geglu,
    lora_mlp_geglu_ref,
    lora_mlp_swiglu,
    lora_mlp_swiglu_ref,
    lora_qkv,
    lora_qkv_ref,
    quantized_linear,
    quantized_linear_ref,
)
from .moe import MoERouting, moe_experts, moe_experts_ref, moe_experts_triton, moe_route, moe_route_ref
from .moe_lora import ExpertLoRA, moe_experts_lora, moe_experts_lora_ref, moe_experts_lora_triton
from .nf4 import FourBitState, dequantize_4bit, dequantize_4bit_ref, dequantize_4bit_triton
from .rms_norm import rms_norm, rms_norm_ref, rms_norm_triton
from .rope import apply_rotary_pos_emb, rope, rope_ref, rope_triton

__version__ = "0.1.0"

__all__ = [
    "Bnb4bitWeight",
    "DenseWeight",
    "ExpertLoRA",
    "FourBitState",
    "GPTQWeight",
    "LoraProjection",
    "MoERouting",
    "QuantizedWeight",
    "apply_rotary_pos_emb",
    "bnb_four_bit_state",
    "cross_entropy",
    "cross_entropy_per_token",
    "cross_entropy_per_token_ref",
    "cross_entropy_per_token_triton",
    "cross_entropy_ref",
    "cross_entropy_triton",
    "dequantize_4bit",
    "dequantize_4bit_ref",
    "dequantize_4bit_triton",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_per_token",
    "fused_linear_cross_entropy_per_token_ref",
    "fused_linear_cross_entropy_per_token_triton",
    "fused_linear_cross_entropy_ref",
    "fused_linear_cross_entropy_triton",
    "geglu",
    "geglu_ref",
    "geglu_triton",
    "gptq_dequantize",
    "gptq_dequantize_ref",
    "gptq_linear",
    "lora_linear",
    "lora_linear_ref",
    "lora_mlp_geglu",
    "lora_mlp_geglu_ref",
    "lora_mlp_swiglu",
    "lora_mlp_swiglu_ref",
    "lora_qkv",
    "lora_qkv_ref",
    "moe_experts",
    "moe_experts_lora",
    "moe_experts_lora_ref",
    "moe_experts_lora_triton",
    "moe_experts_ref",
    "moe_experts_triton",
    "moe_route",
    "moe_route_ref",
    "pack_gptq",
    "quantized_linear",
    "quantized_linear_ref",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
    "rope",
    "rope_ref",
    "rope_triton",
    "swiglu",
    "swiglu_ref",
    "swiglu_triton",
    "unpack_gptq",
]
