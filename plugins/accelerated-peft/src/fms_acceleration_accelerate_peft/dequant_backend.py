"""Dequant backend that lets the fused-ops plugin read :class:`~.packed4bit.Packed4bitLinear` weights.

Under FSDP2 the bitsandbytes plugin replaces shardable ``Linear4bit`` layers by ``Packed4bitLinear``
(:mod:`.sharding`). The fused LoRA / fused dequant kernels of the fused-ops plugin find the frozen weight of a
projection through an ordered tuple of ``DequantBackend`` dispatchers
(``fms_acceleration_accelerate_kernels.dequant``); :data:`PACKED4BIT_BACKEND` is the entry for this layer, and
the plugin hands it over through ``BitsAndBytesAccelerationPlugin.provided_dequant_backends()``.

The backend is named ``"bnb_4bit_packed"``: the fused-ops plugin counts every backend whose name is
``"bnb_4bit"`` or starts with ``"bnb_4bit_"`` as a bitsandbytes-format base (``base_layer: bitsandbytes``).

``extract`` must run inside the forward of a module that contains the layer (the fused kernels do): FSDP2 has
then all-gathered the shards and ``layer.weight`` is the full :class:`~.packed4bit.Packed4bitWeight`, whose
packed bytes and float32 scales are handed to our own 4-bit kernels (no bitsandbytes call).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .packed4bit import Packed4bitLinear, Packed4bitWeight

BACKEND_NAME = "bnb_4bit_packed"


def is_packed4bit_linear(module: nn.Module) -> bool:
    """``DequantBackend.matches``: True for a :class:`Packed4bitLinear` (sharded or not)."""
    return isinstance(module, Packed4bitLinear)


def packed4bit_quantized_weight(module: nn.Module) -> Any:
    """``DequantBackend.extract``: the gathered packed weight of ``module`` as a ``Bnb4bitWeight``.

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


def packed4bit_backend() -> Any:
    """The ``DequantBackend`` for :class:`Packed4bitLinear` (built on call: the kernels package is imported
    only when the fused-ops plugin asks for it)."""
    from fms_acceleration_accelerate_kernels.dequant import DequantBackend

    return DequantBackend(name=BACKEND_NAME, matches=is_packed4bit_linear, extract=packed4bit_quantized_weight)
