"""The real ``Accelerator.prepare`` FSDP2 path with our pre-sharding, on CPU through a seam (2 gloo ranks)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_torchrun_worker

pytestmark = pytest.mark.slow


def _run_seam(launch_env, tmp_path, mode: str, units: list[str]) -> list[dict]:
    """Run the worker in ``mode`` and check what both modes promise; returns the per-rank reports."""
    env = dict(launch_env, FMS_ACCELERATION_DISABLE_HOOK="1")
    result = run_torchrun_worker("accelerate_fsdp2_seam_worker.py", env, tmp_path, timeout=180, args=(mode,))
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        # same batch on both ranks: the sharded run must follow the unsharded one, step for step
        for ours, ref in zip(report["losses"], report["ref_losses"], strict=True):
            assert abs(ours - ref) < 1e-5
        assert report["units"] == units
        # the script's own list of the pre-sharding trainable parameters no longer pins their unsharded storage
        # (every one was replaced by its shard; the optimizer follows the shards, as the losses above show)
        assert report["held_replaced"] == report["held_count"] > 0
        assert report["held_bytes_before"] > 0 and report["held_bytes_after"] == 0
    return reports


def test_accelerate_fsdp2_prepare_with_plugin_units(launch_env, tmp_path):
    units = [
        "",
        "base_model.model.lm_head",
        "base_model.model.model.embed_tokens",
        "base_model.model.model.layers.0",
        "base_model.model.model.layers.1",
    ]
    for report in _run_seam(launch_env, tmp_path, "lora", units):
        # the frozen input embedding is not all-gathered again in backward (saving exactly its table per step);
        # nothing else changed (the losses above follow the unsharded reference)
        assert report["no_backward_unshard"] == ["base_model.model.model.embed_tokens"]
        assert report["saved_gather_bytes"] == report["embed_bytes"] > 0
        events = report["events"]
        unit_events = [e for e in events if e.startswith("unit_sharded:")]
        assert [e for e in events if e not in unit_events][-2:] == ["prepare_contribution", "after_prepare"]
        # after_unit_sharded: once per unit our plan shards (the decoder layers), right after its fully_shard;
        # Accelerate's own pass shards the root, embeddings and lm_head afterwards (no callback for those)
        assert sorted(unit_events) == [f"unit_sharded:base_model.model.model.layers.{i}:True" for i in (0, 1)]
        first, last = events.index(unit_events[0]), events.index(unit_events[-1])
        assert events.index("prepare_contribution") < first and last < events.index("after_prepare")


def test_accelerate_own_fsdp2_path_releases_held_parameters(launch_env, tmp_path):
    """A plugin that contributes no FSDP2 units leaves the sharding to Accelerate (full fine-tuning with the
    kernels plugin does); without ``fsdp_cpu_ram_efficient_loading`` its ``fully_shard`` replaces every
    parameter, and a script's own list of them must not keep the whole unsharded model alive."""
    # Accelerate's own units (no plugin plan): the root, each decoder layer and the leaf modules it adds
    units = ["", "lm_head", "model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"]
    _run_seam(launch_env, tmp_path, "full", units)
