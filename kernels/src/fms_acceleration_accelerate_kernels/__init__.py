"""Triton kernels with pure-torch references for fms-acceleration-accelerate.

Every op ``<op>`` comes as ``<op>_ref`` (pure torch), ``<op>_triton`` (Triton forward/backward with autograd, a
``torch.library`` custom op under ``torch.compile``) and the dispatching ``<op>`` (Triton on CUDA tensors or with
``TRITON_INTERPRET=1``, else the reference).

Importing the package imports Triton (about 0.2 s after torch); kernels compile on first call.
"""

from .cross_entropy import cross_entropy, cross_entropy_ref, cross_entropy_triton
from .fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
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
    "cross_entropy_ref",
    "cross_entropy_triton",
    "fused_linear_cross_entropy",
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
