"""Sharding hooks with 2 gloo processes: FSDP2 ``fully_shard`` of the planned units on a tiny Llama with LoRA."""

from __future__ import annotations

import json

import pytest

from .conftest import run_torchrun_worker

pytestmark = pytest.mark.slow


def test_fsdp2_two_processes_match_one_process(launch_env, tmp_path):
    env = dict(launch_env, FMS_ACCELERATION_DISABLE_HOOK="1")
    result = run_torchrun_worker("fsdp2_gloo_worker.py", env, tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["world"] == 2
    # same loss as 1 process on the full batch, over 3 optimizer steps (optimizer created before sharding)
    for ours, ref in zip(out["losses"], out["ref_losses"], strict=True):
        assert abs(ours - ref) < 1e-5
    assert out["missing_grads"] == []
    assert len(out["grad_max_abs_diff"]) == 12  # q, v, down_proj x A, B x 2 layers
    assert max(out["grad_max_abs_diff"].values()) < 1e-6
    assert out["switched"] == 12 and out["optimizer_params_are_dtensors"]
    # FSDP2 plan: decoder layers (LoRA inside, so fused kernels see gathered adapters) + root
    layers = ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert sorted(u["name"] for u in out["plan"]) == ["", *layers]
    assert out["sharded_units"] == ["", *layers]
    assert {u["name"]: u["kind"] for u in out["plan"]} == {"": "frozen", layers[0]: "mixed", layers[1]: "mixed"}
    # FSDP1 plan of the same model: trainable and frozen never share a unit
    fsdp1 = {u["name"]: u for u in out["plan_fsdp1"]}
    assert {u["kind"] for u in fsdp1.values()} == {"trainable", "frozen"}
    trainable = sorted(n for n, u in fsdp1.items() if u["kind"] == "trainable")
    assert len(trainable) == 12 and all(".lora_A.default" in n or ".lora_B.default" in n for n in trainable)
    assert all(fsdp1[n]["kind"] == "frozen" for n in layers)
