"""Accelerate settings the prepare hooks cannot honour are refused when the Accelerator is created."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from fms_acceleration_accelerate.accelerate_integration import check_accelerate_settings
from fms_acceleration_accelerate.errors import AccelerationConfigError

from ..plugins.fused_ops.tiny_models import make_framework


def _accelerator(fsdp2: bool = True, cpu_ram: bool = True, kind=DistributedType.FSDP, mixed_precision="bf16"):
    plugin = SimpleNamespace(cpu_ram_efficient_loading=cpu_ram)
    return SimpleNamespace(
        distributed_type=kind,
        is_fsdp2=fsdp2,
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=mixed_precision,
        device=torch.device("cpu"),
        num_processes=2,
    )


def test_fsdp2_cpu_ram_efficient_loading_refused_for_self_sharding_plugins():
    fused = make_framework({"fused_lora": True, "fast_rms_layernorm": True})
    with pytest.raises(AccelerationConfigError, match=r"(?s)fused_ops_and_kernels shard their own FSDP2 units.*false"):
        check_accelerate_settings(_accelerator(), fused)
    check_accelerate_settings(_accelerator(cpu_ram=False), fused)  # the fix
    check_accelerate_settings(_accelerator(fsdp2=False), fused)  # FSDP1: Accelerate's own loading path
    check_accelerate_settings(_accelerator(kind=DistributedType.NO), fused)
    # kernels only: no contribution, Accelerate shards as usual, its reload is fine
    check_accelerate_settings(_accelerator(), make_framework({"fast_rms_layernorm": True, "fast_loss": True}))


def test_bitsandbytes_plugin_counts_as_self_sharding():
    pytest.importorskip("bitsandbytes")
    from fms_acceleration_accelerate_peft.plugin import BitsAndBytesAccelerationPlugin

    from fms_acceleration_accelerate.framework import AccelerationFramework
    from fms_acceleration_accelerate.registry import PluginRegistry

    framework = AccelerationFramework(
        {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}},
        registry=PluginRegistry([BitsAndBytesAccelerationPlugin]),
    )
    with pytest.raises(AccelerationConfigError, match="bitsandbytes shard their own FSDP2 units"):
        check_accelerate_settings(_accelerator(), framework)


def test_fsdp1_mixed_precision_with_fused_kernels_over_4bit_bases_refused_before_loading():
    qlora = make_framework({"base_layer": "bitsandbytes", "fused_lora": True}, path="peft.quantization")
    with pytest.raises(AccelerationConfigError, match=r"(?s)FSDP1 with mixed_precision 'bf16'.*fsdp_version: 2"):
        check_accelerate_settings(_accelerator(fsdp2=False, cpu_ram=False), qlora)
    check_accelerate_settings(_accelerator(fsdp2=False, mixed_precision="no"), qlora)  # the shipped FSDP1 setup
    check_accelerate_settings(_accelerator(fsdp2=True, cpu_ram=False), qlora)  # FSDP2: fine
    lora = make_framework({"fused_lora": True})  # bf16 bases: no packed storage
    check_accelerate_settings(_accelerator(fsdp2=False), lora)
