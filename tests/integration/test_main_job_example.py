"""The README's main job (examples/train_tiny.py through stock `accelerate launch`) is reproducible: a rerun that
reuses the saved base model trains the same adapters and gives the same losses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import ACCELERATE, REPO, free_port, run


def test_main_job_reruns_give_identical_losses(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    env.update(OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # as the README runs it (the root conftest turns the interpreter on)
    losses = []
    for attempt in range(2):  # the first run builds and saves the base model, the second finds it
        metrics = tmp_path / f"metrics{attempt}.json"
        done = run(
            [ACCELERATE, "launch", "--config_file", str(REPO / "launch_configs/accelerate-cpu-qlora-foak.yaml"),
             "--main_process_port", str(free_port()), str(REPO / "examples/train_tiny.py"), "--steps", "6",
             "--work-dir", str(tmp_path / "work"), "--metrics-out", str(metrics)],
            env, REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        result = json.loads(metrics.read_text())
        assert result["plugins"] == ["bitsandbytes", "fused_ops_and_kernels"]
        losses.append(result["losses"])
    assert (tmp_path / "work" / "base" / "config.json").exists()
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert losses[0][-1] < losses[0][0]  # and it learns
