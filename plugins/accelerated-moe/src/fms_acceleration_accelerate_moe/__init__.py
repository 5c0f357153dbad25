"""Mixture-of-experts plugin of fms-acceleration-accelerate (section ``training.moe.scattermoe``).

The experts of every MoE layer run the grouped expert kernels of ``fms_acceleration_accelerate_kernels.moe`` on the
model's own 3-D expert parameters, switched in through transformers' ``ExpertsInterface`` (:mod:`.plugin`,
:mod:`.experts`); LoRA adapters on the experts (PEFT ``target_parameters``) are computed from their factors in the
kernels (:mod:`.expert_lora`); routing statistics (tokens per expert per layer) are counted on the device
(:mod:`.routing`).
"""

from .config import ScatterMoEConfig
from .plugin import ScatterMoEPlugin, moe_model_types
from .routing import LoadSummary, RoutingStats, route

__all__ = ["LoadSummary", "RoutingStats", "ScatterMoEConfig", "ScatterMoEPlugin", "moe_model_types", "route"]
