"""Online data mixing on 2 gloo processes (torchrun, the HF Trainer on CPU, each process reading the stream): both
processes draw the same categories without exchanging them, every example of the stream is trained by exactly one
process, and each update applies the reward reduced over both processes (so both bandits stay identical); one
unlabelled dataset is auto-categorised once (process 0) into the same categories on both. See
``odm_gloo_worker.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("fms_acceleration_accelerate_odm")

from tests.integration.conftest import free_port, run

from .odm_gloo_worker import PER_DEVICE, STEPS, categories

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("odm_gloo_worker.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def test_two_gloo_processes_draw_the_same_categories_and_reduce_the_rewards(tmp_path):
    from fms_acceleration_accelerate_odm import OnlineMixingDataset, read_metrics

    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", FMS_ACCELERATION_DISABLE_HOOK="1", PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="0")
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), str(tmp_path)]
    result = run(cmd, env, tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)]

    # the same mixture on both processes: the same categories drawn, rewarded and counted, the same bandit
    first, second = reports
    assert len(first["history"]) == STEPS
    assert first["history"] == second["history"]
    assert first["probabilities"] == second["probabilities"]
    assert (first["counts"], first["positions"]) == (second["counts"], second["positions"])
    assert first["rewarded_until"] == second["rewarded_until"] == STEPS * PER_DEVICE * 2
    assert len({name for record in first["history"] for name in record["chosen"]}) >= 2  # the mixture mixed

    # each update's reward is the loss averaged over both processes (one forward each per step), although the
    # processes' own losses differ: without the reduction each bandit would learn from its own loss and diverge
    for record, loss0, loss1 in zip(first["history"], first["losses"], second["losses"]):
        (reward,) = set(record["rewards"].values())  # one reward for the categories of the update's examples
        assert reward == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    assert max(abs(a - b) for a, b in zip(first["losses"], second["losses"])) > 1e-3

    # every example of the global stream trained once, by the process whose slice of the global batch it is:
    # a one-process replay of the same stream with the same rewards gives the same examples in the same order
    # (Accelerate's loader reads one global batch ahead, so batch s + 1 is drawn before the reward of step s)
    replay = OnlineMixingDataset(
        categories(), sampling_interval=2, gamma=0.1, eta=0.5, reward_type="train_loss", seed=3
    )
    stream = iter(replay)
    batches = [[next(stream)["id"] for _ in range(2 * PER_DEVICE)]]
    for step, record in enumerate(first["history"]):
        batches.append([next(stream)["id"] for _ in range(2 * PER_DEVICE)])
        (reward,) = set(record["rewards"].values())
        replay.reward(reward, examples=2 * PER_DEVICE, step=step + 1)
    for step in range(STEPS):
        assert first["read"][step] == batches[step][:PER_DEVICE], step
        assert second["read"][step] == batches[step][PER_DEVICE:], step
    assert replay.probabilities() == pytest.approx(first["probabilities"])
    # (the loader's last read-ahead batch, if any, was never trained)
    assert STEPS <= len(first["read"]) == len(second["read"]) <= STEPS + 1

    # metrics are written once (process 0), one line per update
    assert len(read_metrics(tmp_path / "trainer")) == STEPS

    # auto-categorisation: process 0 embedded and clustered, process 1 received the same categories
    assert first["embedded_here"] and not second["embedded_here"]
    assert first["auto_categories"] == second["auto_categories"]
    assert len(first["auto_categories"]) == 3
    assert sorted(i for ids in first["auto_categories"].values() for i in ids) == list(range(60))
