"""Accelerate settings the prepare hooks cannot honour are refused when the Accelerator is created."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from fms_acceleration_accelerate.accelerate_integration import check_accelerate_settings
from fms_acceleration_accelerate.errors import AccelerationConfigError

from ..plugins.fused_ops.tiny_models import make_framework


def _accelerator(fsdp2: bool = True, cpu_ram: bool = True, kind=DistributedType.FSDP):
    plugin = SimpleNamespace(cpu_ram_efficient_loading=cpu_ram)
    return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, state=SimpleNamespace(fsdp_plugin=plugin))


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
