"""Dequant backend that lets fused kernels read :class:`~.packed4bit.Packed4bitLinear` weights.

Under FSDP2 the bitsandbytes plugin replaces shardable ``Linear4bit`` layers by ``Packed4bitLinear``
(:mod:`.sharding`). Fused kernels (the fused-ops plugin's fused LoRA / fused dequant) find the frozen weight of a
projection through the framework's registry of dequant backends (``fms_acceleration_accelerate.dequant``); this
plugin contributes :data:`PACKED4BIT_BACKEND` for its layer through ``BitsAndBytesAccelerationPlugin
.dequant_backends()``. Its ``base_layer`` is ``"bitsandbytes"``: the packed bytes and scales are bitsandbytes'
4-bit format, which the fused-ops option ``base_layer: bitsandbytes`` names.

``read`` must run inside the forward of a module that contains the layer (the fused kernels do): FSDP2 has
then all-gathered the shards and ``layer.weight`` is the full :class:`~.packed4bit.Packed4bitWeight`, whose
packed bytes and float32 scales are handed to our own 4-bit kernels (no bitsandbytes call).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fms_acceleration_accelerate.dequant import DequantBackend

from .packed4bit import Packed4bitLinear, Packed4bitWeight

BACKEND_NAME = "bnb_4bit_packed"


def packed4bit_quantized_weight(module: nn.Module) -> Any:
    """``DequantBackend.read``: the gathered packed weight of ``module`` as a ``Bnb4bitWeight``.

    Args:
        module: a :class:`Packed4bitLinear` whose weight is unsharded (inside a forward under FSDP2).

    Returns:
        ``fms_acceleration_accelerate_kernels.dequant.Bnb4bitWeight`` of logical shape
        ``(out_features, in_features)``, sharing the layer's packed bytes and scales (no copy).

    Raises:
        ValueError: the weight is still a shard (read outside the forward of its FSDP unit).
    """
    from fms_acceleration_accelerate_kernels.dequant import Bnb4bitWeight

    weight = module.weight
    if not isinstance(weight, Packed4bitWeight):
        raise ValueError(
            f"the weight of this Packed4bitLinear is a {type(weight).__name__}, not a gathered Packed4bitWeight: "
            "it was read outside the forward of its FSDP unit; read it inside the forward of a module that "
            "contains the layer (the fused kernels do), where FSDP2 has all-gathered it"
        )
    code = getattr(module, "quant_code", None)
    return Bnb4bitWeight(packed=weight.packed, state=weight.four_bit_state(code))


PACKED4BIT_BACKEND = DequantBackend(
    name=BACKEND_NAME,
    module_types=(Packed4bitLinear,),
    read=packed4bit_quantized_weight,
    # imported at the first read: declaring the backend imports neither the kernels package nor Triton
    weight_format="fms_acceleration_accelerate_kernels.dequant:Bnb4bitWeight",
    base_layer="bitsandbytes",
)
"""The backend this plugin contributes (``BitsAndBytesAccelerationPlugin.dequant_backends()``)."""
