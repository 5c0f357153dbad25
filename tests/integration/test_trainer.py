"""HF Trainer and TRL SFTTrainer, launched with ``accelerate launch``, pick the acceleration section up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ACCELERATE, SCRIPTS, free_port, run, write_config
from .test_launch import needs_hook

pytestmark = pytest.mark.slow


@needs_hook
def test_trainer_and_sft_trainer_pick_the_section_up(launch_env, tmp_path):
    pytest.importorskip("trl")
    cfg = write_config(
        tmp_path / "cfg.yaml",
        """\
        compute_environment: LOCAL_MACHINE
        distributed_type: 'NO'
        num_machines: 1
        num_processes: 1
        mixed_precision: 'no'
        use_cpu: true
        acceleration:
          testing:
            toy_lora: {r: 2}
        """,
    )
    port = str(free_port())
    result = run(
        [
            ACCELERATE,
            "launch",
            "--config_file",
            str(cfg),
            "--main_process_port",
            port,
            str(SCRIPTS / "trainer_worker.py"),
        ],
        launch_env,
        tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((Path(launch_env["REPORT_DIR"]) / "trainer.json").read_text())
    assert report["script_imported_package"] is False
    for key in ("trainer", "sft"):
        assert report[key]["plugins"] == ["toy_lora"]
        # each trainer's own Accelerator ran the prepare hooks around its prepare
        assert report[key]["events"][:1] == ["callbacks"]
        assert "prepare_contribution" in report[key]["events"] and "after_prepare" in report[key]["events"]
        events = report[key]["events"]
        assert events.index("prepare_contribution") < events.index("after_prepare")
