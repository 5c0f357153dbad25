"""Triton kernels with pure-torch references for fms-acceleration-accelerate.

Every op ``<op>`` comes as ``<op>_ref`` (pure torch), ``<op>_triton`` (Triton forward/backward with autograd, a
``torch.library`` custom op under ``torch.compile``) and the dispatching ``<op>`` (Triton on CUDA tensors or with
``TRITON_INTERPRET=1``, else the reference).

Importing the package imports Triton (about 0.2 s after torch); kernels compile on first call.
"""

from .cross_entropy import (
    cross_entropy,
    cross_entropy_per_token,
    cross_entropy_per_token_ref,
    cross_entropy_per_token_triton,
    cross_entropy_ref,
    cross_entropy_triton,
)
from .fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_per_token,
    fused_linear_cross_entropy_per_token_ref,
    fused_linear_cross_entropy_per_token_triton,
    fused_linear_cross_entropy_ref,
    fused_linear_cross_entropy_triton,
)
from .glu import geglu, geglu_ref, geglu_triton, swiglu, swiglu_ref, swiglu_triton
from .rms_norm import rms_norm, rms_norm_ref, rms_norm_triton
from .rope import apply_rotary_pos_emb, rope, rope_ref, rope_triton

__version__ = "0.1.0"

__all__ = [
    "apply_rotary_pos_emb",
    "cross_entropy",
    "cross_entropy_per_token",
    "cross_entropy_per_token_ref",
    "cross_entropy_per_token_triton",
    "cross_entropy_ref",
    "cross_entropy_triton",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_per_token",
    "fused_linear_cross_entropy_per_token_ref",
    "fused_linear_cross_entropy_per_token_triton",
    "fused_linear_cross_entropy_ref",
    "fused_linear_cross_entropy_triton",
    "geglu",
    "geglu_ref",
    "geglu_triton",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
    "rope",
    "rope_ref",
    "rope_triton",
    "swiglu",
    "swiglu_ref",
    "swiglu_triton",
]

# --- 4-bit dequantisation backends and fused LoRA (dequant.py, nf4.py, lora.py) ---------------------------
from .dequant import (
    DEFAULT_DEQUANT_BACKENDS,
    DequantBackend,
    QuantizedWeight,
    dequantize_weight,
    get_dequant_backend,
    quantized_weight,
)
from .lora import (
    LoraProjection,
    fused_lora_unsupported_reason,
    lora_linear,
    lora_linear_ref,
    lora_mlp_geglu,
    lora_mlp_geglu_ref,
    lora_mlp_swiglu,
    lora_mlp_swiglu_ref,
    lora_qkv,
    lora_qkv_ref,
    peft_lora_projection,
    quantized_linear,
    quantized_linear_ref,
)
from .nf4 import dequantize_4bit, dequantize_4bit_ref, dequantize_4bit_triton

__all__ += [
    "DEFAULT_DEQUANT_BACKENDS",
    "DequantBackend",
    "LoraProjection",
    "QuantizedWeight",
    "dequantize_4bit",
    "dequantize_4bit_ref",
    "dequantize_4bit_triton",
    "dequantize_weight",
    "fused_lora_unsupported_reason",
    "get_dequant_backend",
    "lora_linear",
    "lora_linear_ref",
    "lora_mlp_geglu",
    "lora_mlp_geglu_ref",
    "lora_mlp_swiglu",
    "lora_mlp_swiglu_ref",
    "lora_qkv",
    "lora_qkv_ref",
    "peft_lora_projection",
    "quantized_linear",
    "quantized_linear_ref",
    "quantized_weight",
]
