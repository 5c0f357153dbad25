"""Dequant backend that lets fused kernels read :class:`~.layer.GPTQLinear` weights.

Fused kernels (the fused-ops plugin's fused LoRA and fused dequant) find the frozen weight of a projection through
the framework's registry of dequant backends (``fms_acceleration_accelerate.dequant``); this plugin contributes
:data:`GPTQ_BACKEND` through ``AutoGPTQAccelerationPlugin.dequant_backends()``. Its ``base_layer`` is
``"auto_gptq"``, the fused-ops option value (upstream's) that names the GPTQ storage format, so
``fused_ops_and_kernels: {base_layer: auto_gptq, fused_lora: true}`` runs the fused kernels over GPTQ bases.

``GPTQLinear`` subclasses ``nn.Linear`` (for PEFT), so this backend must be tried before the fused-ops plugin's
``dense`` backend for ``nn.Linear``; it is, because this plugin runs earlier (loaders before kernel plugins), and
``dense`` refuses a layer whose ``weight`` is ``None`` anyway.

The backend also reads the layers the plugin puts in place under FSDP: :class:`~.packed.PackedGPTQLinear` (FSDP2;
``read`` must then run inside the forward of a module containing the layer, where FSDP2 has all-gathered the
shards, as the fused kernels do) and ``GPTQLinear`` in parameter storage (FSDP1). All three answer
``quantized_weight()``, which flags the ``GPTQWeight`` with the layer's ``sequential_g_idx`` (set at load, or
computed once at the first read and kept on the layer; never a device read per forward).
"""

from __future__ import annotations

from typing import Any

from fms_acceleration_accelerate.dequant import DequantBackend

from .layer import GPTQLinear
from .packed import PackedGPTQLinear

BACKEND_NAME = "gptq"


def gptq_quantized_weight(module: Any) -> Any:
    """``DequantBackend.read``: the layer's packed tensors as a ``GPTQWeight`` in its compute dtype (no copy; a
    :class:`~.packed.PackedGPTQLinear` read outside its FSDP unit's forward raises ``ValueError``)."""
    return module.quantized_weight()


GPTQ_BACKEND = DequantBackend(
    name=BACKEND_NAME,
    module_types=(GPTQLinear, PackedGPTQLinear),
    read=gptq_quantized_weight,
    # imported at the first read: declaring the backend imports neither the kernels package nor Triton
    weight_format="fms_acceleration_accelerate_kernels.gptq:GPTQWeight",
    base_layer="auto_gptq",
)
"""The backend this plugin contributes (``AutoGPTQAccelerationPlugin.dequant_backends()``)."""
