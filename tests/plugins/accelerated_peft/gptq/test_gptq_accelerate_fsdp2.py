"""GPTQ-LoRA with fused LoRA kernels through the real ``Accelerator.prepare`` FSDP2 path, on CPU (2 gloo ranks
under torchrun, the same seam as the bitsandbytes flagship test): rank-0 loading, ``PackedGPTQLinear`` shards,
the optimizer re-pointed at the sharded adapters, the fused kernels patched after wrapping; the two-rank run
follows a one-process, non-FSDP run step for step. See ``accelerate_fsdp2_worker.py``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .gptq_helpers import GPTQCase, make_gptq_checkpoint

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("accelerate_fsdp2_worker.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
LAYERS = 7 * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="0", FMS_ACCELERATION_DISABLE_HOOK="1", PYTHONSAFEPATH="1")
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_gptq_lora_through_accelerator_prepare_fsdp2(tmp_path):
    ckpt, _ = make_gptq_checkpoint(tmp_path / "ckpt", GPTQCase(desc_act=True))
    out = tmp_path / "out"
    out.mkdir()
    single = _run([sys.executable, str(WORKER), str(ckpt), str(out), "--single"], out)
    assert single.returncode == 0, single.stderr[-4000:]
    ref = json.loads((out / "single.json").read_text())
    assert ref["world"] == 1 and ref["packed"] == [] and ref["fsdp_units"] == []
    assert ref["base_class"] == "GPTQLinear" and ref["plain_base_forwards"] == 0

    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER), str(ckpt), str(out)]
    result = _run(cmd, out)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["world"] == 2
        assert report["rank_reads"] == 0  # rank 1 received the checkpoint from rank 0 (rank 0's count is not kept)
        # same losses as the one-process run (each rank trains on its half; the all-reduced mean)
        assert report["losses"] == pytest.approx(ref["losses"], abs=1e-5), (report["losses"], ref["losses"])
        assert len(set(report["losses"])) == len(report["losses"])
        # every GPTQ layer is a PackedGPTQLinear holding half of its output channels in packed form
        assert len(report["packed"]) == LAYERS
        for layer in report["packed"]:
            assert layer["local_is_packed"] and layer["local_rows"] * 2 == layer["out_features"], layer
        # the fused kernels were patched after wrapping, over the packed layers, and the layers' own forwards
        # never ran
        assert report["base_class"] == "PackedGPTQLinear" and report["plain_base_forwards"] == 0
        assert len(report["fused_records"]) == len(ref["fused_records"]) == 2 * (3 + 1 + 1)
        assert all("[gptq]" in r for r in report["fused_records"]), report["fused_records"]
        assert "base_model.model.model.layers.0" in report["fsdp_units"] and "" in report["fsdp_units"]
        # the optimizer made before prepare holds the sharded adapters
        assert report["optimizer_follows_model"] and report["optimizer_all_dtensor"]
