"""The FSDP1 contribution: packed storage is keep-dtype, LoRA split from the frozen 4-bit units."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fms_acceleration_accelerate.distributed import (
    PrepareContext,
    check_keep_dtype_fsdp1,
    collect_contributions,
    plan_fsdp_units,
)
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .helpers import plugin_model, tiny_llama


def test_fsdp1_plan_keeps_packed_dtype_and_splits_lora(tmp_path):
    fw, model = plugin_model(tiny_llama(tmp_path / "llama"))
    merged = collect_contributions(fw.plugins, model, PrepareContext(distributed_type="FSDP", fsdp_version=1))
    assert merged.trainable_dtype == torch.float32 and merged.reduce_dtype == torch.float32
    check_keep_dtype_fsdp1(model, merged, torch.float32)  # storage == param_dtype: fine
    with pytest.raises(AccelerationConfigError, match="corrupting"):
        check_keep_dtype_fsdp1(model, merged, torch.bfloat16)  # a cast would scramble packed codes
    plan = plan_fsdp_units(model, merged, 1)
    assert not plan.mixed_units
    layer = next(u for u in plan.units if u.reason == "decoder layer")
    assert layer.frozen and not layer.trainable  # 4-bit storage + norms only; LoRA got units of their own
    assert any(u.reason == "trainable split" and "lora_A" in u.name for u in plan.units)
    assert not any(type(m).__name__ == "Packed4bitLinear" for m in model.modules())  # FSDP1 keeps bnb layers


def test_fsdp1_dtype_checks_refuse_unflattenable_or_upcast_units(tmp_path):
    from fms_acceleration_accelerate.distributed import PrepareContribution, check_fsdp1_dtypes, merge_contributions

    fw, model = plugin_model(tiny_llama(tmp_path / "llama"))
    context = PrepareContext(distributed_type="FSDP", fsdp_version=1)
    bnb = fw.plugins[0]
    split = collect_contributions(fw.plugins, model, context)
    check_fsdp1_dtypes(model, plan_fsdp_units(model, split, 1), split, mixed_precision=True)  # LoRA units apart

    # fused-kernel scopes keep the adapters inside the decoder-layer unit, next to the packed storage
    fused = merge_contributions(
        [
            (bnb.plugin_name(), bnb.prepare_contribution(model, context)),
            ("foak", PrepareContribution(fused_scopes=("LlamaAttention", "LlamaMLP"))),
        ]
    )
    plan = plan_fsdp_units(model, fused, 1)
    assert plan.mixed_units
    with pytest.raises(AccelerationConfigError, match=r"(?s)upcasts trainable FSDP1 flat parameters .*fsdp_version: 2"):
        check_fsdp1_dtypes(model, plan, fused, mixed_precision=True)
    check_fsdp1_dtypes(model, plan, fused, mixed_precision=False)  # one dtype, no upcast: FSDP1 can flatten it
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    with pytest.raises(AccelerationConfigError, match=r"(?s)2 dtypes .*lora_.*bfloat16.*fp32_lora_params: false"):
        check_fsdp1_dtypes(model, plan, fused, mixed_precision=False)
