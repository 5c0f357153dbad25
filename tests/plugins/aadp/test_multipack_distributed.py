"""Multipack over 2 gloo processes (torchrun, a stock ``Accelerator(cpu=True)`` with the plugin): each process gets
its own batches of the one-process plan, disjoint and together covering the epoch, the same number on both; a resumed
epoch (skipped batches, epoch from the callback) continues with exactly the remaining batches. See
``multipack_gloo_worker.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from fms_acceleration_accelerate_aadp.multipack import MultipackBatchSampler

from tests.integration.conftest import free_port, run

from .multipack_helpers import shipped_lengths

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("multipack_gloo_worker.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def test_two_gloo_processes_follow_the_one_process_plan(tmp_path):
    lengths = list(shipped_lengths())
    (tmp_path / "lengths.json").write_text(json.dumps(lengths))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", FMS_ACCELERATION_DISABLE_HOOK="1", PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="0")
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), str(tmp_path)]
    result = run(cmd, env, tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    plan = MultipackBatchSampler(lengths, 4096, num_replicas=2, seed=7)
    for rank, report in enumerate(reports):
        assert (report["world"], report["rank"], report["num_replicas"], report["sampler_rank"]) == (2, rank, 2, None)
        assert report["max_tokens"] == 4096
        # sharded once by Accelerate's BatchSamplerShard: this rank's column of the one-process plan
        assert report["len"] == len(plan.plan(0))
        assert report["epoch0"] == [sorted(step[rank]) for step in plan.plan(0)]
        assert all(tokens <= 4096 for tokens in report["epoch0_tokens"])
        # the prepared loader's set_epoch reached the sampler; a resumed epoch continues exactly where it stopped
        assert report["epoch_after_set_epoch"] == 1
        epoch1 = [sorted(step[rank]) for step in plan.plan(1)]
        assert report["epoch1_head"] == epoch1[: len(report["epoch1_head"])]
        assert report["epoch1_head"] + report["epoch1_rest"] == epoch1
    assert len(reports[0]["epoch0"]) == len(reports[1]["epoch0"])  # no rank waits for a batch that never comes
    seen = [[i for batch in report["epoch0"] for i in batch] for report in reports]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(lengths)))
    # balance of the real run: each rank's tokens over the epoch, and the slowest rank of each step
    totals = [sum(report["epoch0_tokens"]) for report in reports]
    slowest = sum(max(pair) for pair in zip(reports[0]["epoch0_tokens"], reports[1]["epoch0_tokens"]))
    print(
        f"\n2 gloo ranks: tokens per rank {totals}, max/min {max(totals) / min(totals):.4f}, "
        f"step efficiency {sum(totals) / (2 * slowest):.4f}, {len(reports[0]['epoch0'])} steps"
    )
    assert max(totals) / min(totals) <= 1.01 and sum(totals) / (2 * slowest) >= 0.99
