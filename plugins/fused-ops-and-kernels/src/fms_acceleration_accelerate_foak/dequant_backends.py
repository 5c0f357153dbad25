"""The dequant backends this plugin contributes (``FusedOpsAndKernelsPlugin.dequant_backends()``).

They read the two kinds of base layer a model has whether or not another plugin loaded it:

* ``bnb_4bit``: ``bitsandbytes.nn.Linear4bit`` (nf4 / fp4, double quantisation or not, any ``quant_storage``), as
  transformers' ``BitsAndBytesConfig`` or the bitsandbytes plugin loads it, read as the kernels'
  ``Bnb4bitWeight`` (packed bytes + ``FourBitState``; dequantised by our own kernels, never by bitsandbytes);
* ``dense``: a ``torch.nn.Linear`` with a fp32/bf16/fp16 weight, read as ``DenseWeight``.

``Linear4bit`` subclasses ``nn.Linear``, so ``bnb_4bit`` comes first (and ``dense`` refuses layers that carry a
``quant_state``). Backends of other plugins' layers come before both (plugins that load models run earlier).
Reading the tensors happens inside the patched forwards, where FSDP has gathered them. Declaring the backends
imports neither the kernels package nor Triton (the weight formats are named by path and imported at the first
read), so creating a framework stays cheap.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fms_acceleration_accelerate.dequant import DequantBackend

_DENSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FORMATS = "fms_acceleration_accelerate_kernels.dequant"  # the kernels' weight formats


def read_bnb_4bit(layer: Any) -> Any:
    """``DequantBackend.read`` of ``bnb_4bit``: the packed bytes and quantisation state of a ``Linear4bit`` as a
    ``Bnb4bitWeight``."""
    from fms_acceleration_accelerate_kernels.dequant import Bnb4bitWeight, bnb_four_bit_state

    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        # FSDP may replace Params4bit by a plain parameter; Linear4bit keeps a copy of the state on the module.
        quant_state = getattr(layer, "quant_state", None)
    if quant_state is None:
        raise ValueError(
            f"{type(layer).__name__} has no quant_state: its weight is not quantised yet. Move the layer to "
            "its device first (bitsandbytes quantises in Params4bit.to(device)), e.g. layer.to('cuda')."
        )
    return Bnb4bitWeight(packed=weight.detach(), state=bnb_four_bit_state(quant_state))


def is_dense_linear(layer: Any) -> bool:
    """``DequantBackend.accepts`` of ``dense``: a float weight and no 4-bit quantisation state."""
    weight = layer.weight
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype in _DENSE_DTYPES
        and getattr(weight, "quant_state", None) is None
        and getattr(layer, "quant_state", None) is None
    )


def read_dense(layer: Any) -> Any:
    """``DequantBackend.read`` of ``dense``: the layer's own weight tensor (no copy) as a ``DenseWeight``."""
    from fms_acceleration_accelerate_kernels.dequant import DenseWeight

    return DenseWeight(layer.weight)


BNB_4BIT_BACKEND = DequantBackend(
    name="bnb_4bit",
    module_types=("bitsandbytes.nn:Linear4bit",),
    read=read_bnb_4bit,
    weight_format=f"{_FORMATS}:Bnb4bitWeight",
    base_layer="bitsandbytes",
)
DENSE_BACKEND = DequantBackend(
    name="dense",
    module_types=(nn.Linear,),
    read=read_dense,
    weight_format=f"{_FORMATS}:DenseWeight",
    accepts=is_dense_linear,
)
FOAK_DEQUANT_BACKENDS: tuple[DequantBackend, ...] = (BNB_4BIT_BACKEND, DENSE_BACKEND)
"""What the plugin contributes, in dispatch order."""
