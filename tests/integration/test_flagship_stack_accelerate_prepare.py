"""The flagship stack through the real ``Accelerator.prepare`` FSDP2 path, on CPU (2 gloo ranks, seam).

bitsandbytes nf4 QLoRA (``Packed4bitLinear``, packed 4-bit all-gather) + fused ops (``fused_lora``,
``fused_dequant``, ``base_layer: bitsandbytes``), set up only through the public API:
``Accelerator(kwargs_handlers=[AccelerationKwargs(config=...)])`` -> ``framework.model_loader`` ->
``framework.augmentation`` -> ``accelerator.prepare(model, optimizer)``. The two-rank FSDP2 run must follow
a one-process, non-FSDP run of the same stack (``Linear4bit`` bases, kernels patched at augmentation) step
for step; see ``scripts/flagship_accelerate_prepare_worker.py``.
"""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import SCRIPTS, run, run_torchrun_worker

pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.slow

WORKER = "flagship_accelerate_prepare_worker.py"
PROJECTIONS = 7 * 2  # q, k, v, o, gate, up, down per decoder layer, two layers
FUSED_RECORDS = 2 * (3 + 1 + 1)  # per layer: q, k, v (lora_qkv), o (lora_linear), the SwiGLU MLP


def test_flagship_stack_through_accelerator_prepare_fsdp2(launch_env, tmp_path):
    from tests.plugins.accelerated_peft.helpers import tiny_llama

    out = tmp_path / "out"
    tiny_llama(out / "llama")  # hidden 128, intermediate 256: the 4-bit blocks split over 2 ranks
    env = dict(launch_env, FMS_ACCELERATION_DISABLE_HOOK="1")

    single = run([sys.executable, str(SCRIPTS / WORKER), str(out), "--single"], env, out, timeout=180)
    assert single.returncode == 0, single.stderr[-4000:]
    ref = json.loads((out / "single.json").read_text())
    assert ref["world"] == 1 and ref["fsdp_units"] == [] and ref["packed"] == []
    assert ref["base_class"] == "Linear4bit" and ref["plain_base_forwards"] == 0
    # without FSDP the fused kernels are patched at augmentation, over bitsandbytes' Linear4bit
    assert len(ref["records_before_prepare"]) == FUSED_RECORDS
    assert all("[bnb_4bit]" in r for r in ref["records_before_prepare"]), ref["records_before_prepare"]

    result = run_torchrun_worker(WORKER, env, out, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world"] == 2

        # same losses as the one-process, non-FSDP run (each rank trains on its half; the all-reduced mean)
        assert report["losses"] == pytest.approx(ref["losses"], abs=1e-5), (report["losses"], ref["losses"])
        assert len(set(report["losses"])) == len(report["losses"])  # the LoRA weights really moved

        # under FSDP the fused patches wait for after_prepare, then read the packed 4-bit shards
        assert report["records_before_prepare"] == []
        records = report["records_after_prepare"]
        assert len(records) == FUSED_RECORDS, records
        assert all("[bnb_4bit_packed]" in r for r in records), records
        assert report["patch_counts"] == {"fused_lora": 8, "fused_dequant": 6}
        assert report["base_class"] == "Packed4bitLinear" and report["plain_base_forwards"] == 0

        # every 4-bit layer is a Packed4bitLinear whose local shard is a Packed4bitWeight with half the rows
        assert len(report["packed"]) == PROJECTIONS
        assert report["released_swaps"] == PROJECTIONS  # no rank keeps an unsharded copy of any 4-bit layer
        for layer in report["packed"]:
            assert layer["dtensor"] and layer["local_is_packed"], layer
            assert layer["local_rows"] * 2 == layer["out_features"], layer
        assert report["fsdp_units"] == [
            "",
            "base_model.model.lm_head",
            "base_model.model.model.embed_tokens",
            "base_model.model.model.layers.0",
            "base_model.model.model.layers.1",
        ]

        # the optimizer created before prepare now holds the model's sharded LoRA parameters, and stepped them
        opt = report["optimizer"]
        assert opt["count"] == 16 and opt["lora_names"], opt  # lora_A/B of q, k, v, o in two layers
        assert opt["same_objects"] and opt["all_dtensor"] and opt["all_stepped"] and opt["still_model_params"], opt
    assert reports[0]["losses"] == reports[1]["losses"]
