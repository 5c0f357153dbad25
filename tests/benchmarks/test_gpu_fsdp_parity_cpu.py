"""benchmarks/gpu_fsdp_parity.py on CPU: the case matrix, the comparison, the timeout, and one real run.

The real run is the flagship QLoRA stack (bitsandbytes nf4 + fused LoRA / dequant / RMSNorm / RoPE / loss):
its one-process no-FSDP reference and FSDP2 over 2 gloo processes through ``Accelerator.prepare`` (the
script's CPU seam), tiny shapes, fp32, 20 steps. The kernels take their pure-torch paths here (no
``TRITON_INTERPRET``), so this checks the script's plumbing and the FSDP2 path, not the Triton kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_fsdp_parity.py"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("gpu_fsdp_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_fsdp_parity"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_fsdp_parity"]


def test_gpu_matrix_covers_every_stack_fsdp_version_and_world_size(parity):
    cases = parity.build_matrix(["lora-foak", "qlora-foak", "qlora-foak-unpacked", "qlora-foak-fsdp1"],
                                ["fsdp1", "fsdp2"], nproc=2, cpu=False)  # fmt: skip
    assert [c.name for c in cases] == [
        "lora-foak--none--w1",
        "lora-foak--fsdp1--w1",
        "lora-foak--fsdp1--w2",
        "lora-foak--fsdp2--w1",
        "lora-foak--fsdp2--w2",
        "qlora-foak--none--w1",
        "qlora-foak--fsdp2--w1",
        "qlora-foak--fsdp2--w2",
        "qlora-foak-unpacked--fsdp2--w1",
        "qlora-foak-unpacked--fsdp2--w2",
        "qlora-foak-fsdp1--none--w1",
        "qlora-foak-fsdp1--fsdp1--w1",
        "qlora-foak-fsdp1--fsdp1--w2",
    ]
    unpacked = next(c for c in cases if c.stack == "qlora-foak-unpacked")
    assert unpacked.reference == "qlora-foak--none--w1"
    # CPU: no FSDP1 (torch's FSDP1 needs an accelerator) and FSDP2 only with a 2-rank gloo group
    cpu = parity.build_matrix(["lora-foak", "qlora-foak-fsdp1"], ["fsdp1", "fsdp2"], nproc=2, cpu=True)
    assert [c.name for c in cpu] == ["lora-foak--none--w1", "lora-foak--fsdp2--w2", "qlora-foak-fsdp1--none--w1"]
    # world sizes that do not divide the global batch are left out (every rank takes an equal slice)
    four = parity.build_matrix(["qlora-foak"], ["fsdp2"], nproc=4, cpu=False, batch=4)
    assert [c.world for c in four if c.fsdp == "fsdp2"] == [1, 2, 4]


def test_stack_sections_load_and_apply_overrides(parity):
    lora = parity.stack_section(parity.STACKS["lora-foak"])
    assert lora["bench"]["lora"]["r"] == 8 and lora["training"]["fused_ops_and_kernels"]["fused_lora"] is True
    unpacked = parity.stack_section(parity.STACKS["qlora-foak-unpacked"])
    assert unpacked["peft"]["quantization"]["bitsandbytes"] == {"quant_type": "nf4", "fsdp2_packed_all_gather": False}
    assert "bench" not in unpacked
    fused = unpacked["peft"]["quantization"]["fused_ops_and_kernels"]
    assert fused["base_layer"] == "bitsandbytes" and fused["fused_dequant"] and fused["fast_loss"]
    fsdp1 = parity.stack_section(parity.STACKS["qlora-foak-fsdp1"])
    assert fsdp1["peft"]["quantization"]["bitsandbytes"]["fp32_lora_params"] is False
    # the overrides never leak into the stack they are based on
    assert (
        "fp32_lora_params"
        not in parity.stack_section(parity.STACKS["qlora-foak"])["peft"]["quantization"]["bitsandbytes"]
    )


def test_child_env_keeps_nccl_settings_and_drops_rank_variables(parity, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "1")
    env = parity.child_env(["0", "1"])
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert "RANK" not in env and "MASTER_PORT" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def _result(parity, case, losses, fused=True):
    return {
        "case": case.name, "losses": losses, "seconds": 1.0, "prepare_seconds": 0.1,
        "peak_memory_gib_per_rank": [0.5] * case.world, "patch_counts": {"fused_lora": 8} if fused else {},
        "base_layer_class": "Linear", "fsdp_units": 0 if case.fsdp == "none" else 5, "device": "cpu",
    }  # fmt: skip


def test_summary_flags_loss_drift_missing_results_and_unpatched_kernels(parity, tmp_path):
    Case, Job = parity.Case, parity.Job
    ref = Case("lora-foak", "none", 1)
    good, drift, crashed, unfused = (
        Case("lora-foak", "fsdp2", 1),
        Case("lora-foak", "fsdp2", 2),
        Case("lora-foak", "fsdp1", 1),
        Case("lora-foak", "fsdp1", 2),
    )
    losses = [5.0 - 0.1 * i for i in range(20)]
    for case, values, fused in (
        (ref, losses, True),
        (good, [x * (1 + 1e-3) for x in losses], True),
        (drift, [*losses[:10], *(x * 1.1 for x in losses[10:])], True),
        (unfused, losses, False),
    ):
        (tmp_path / f"{case.name}.json").write_text(json.dumps(_result(parity, case, values, fused)))
    (tmp_path / f"{crashed.name}.log").write_text(
        "Traceback (most recent call last):\n[rank0]: ValueError: Must flatten tensors with uniform dtype\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    )
    jobs = [Job(c, exit_code=0, wall=1.0) for c in (ref, good, drift, unfused)] + [Job(crashed, exit_code=1, wall=1.0)]
    summary = parity.summarize(jobs, tmp_path, rtol=3e-2, cpu=False)
    rows = {r["case"]: r for r in summary["cases"]}
    assert not summary["ok"]
    assert rows[ref.name]["ok"] and rows[good.name]["ok"]
    assert rows[good.name]["max_rel_diff"] == pytest.approx(1e-3)
    assert rows[drift.name]["problems"] == ["loss differs by up to 0.1 (> rtol 0.03), first at step 10"]
    assert rows[crashed.name]["problems"] == ["no result (exit 1): ValueError: Must flatten tensors with uniform dtype"]
    assert rows[unfused.name]["problems"] == ["the fused LoRA kernels were not patched"]
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is False
    table = parity.markdown_table(summary)
    assert table.count("| ok |") == 2 and table.count("**FAIL**") == 3
    assert "| lora-foak | fsdp2 | 2 | 1.00e-01 |" in table


def test_a_case_that_outlives_its_timeout_is_killed_with_its_workers(parity, tmp_path):
    # torchrun with 2 workers, stopped while the workers are still importing / loading
    args = parity.argparse.Namespace(cpu=True, per_gpu=1, timeout=6, budget=60, steps=20, batch=4, seq=32, lr=1e-3)
    jobs = parity.run_matrix([parity.Case("lora-foak", "fsdp2", 2)], args, tmp_path)
    assert jobs[0].timed_out and jobs[0].wall < 40
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(tmp_path).encode() in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
        except OSError:
            continue
    assert not leftovers, f"processes of the killed case still run: {leftovers}"
    summary = parity.summarize(jobs, tmp_path, rtol=None, cpu=True)
    assert summary["cases"][0]["problems"][0].startswith("no result (timed out after 6s)")


def test_flagship_qlora_reference_and_fsdp2_over_gloo_match(tmp_path):
    pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # pure-torch kernel paths: fast
    out = tmp_path / "parity"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--nproc", "2", "--stacks", "qlora-foak", "--steps", "20",
           "--out", str(out), "--timeout", "120"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| qlora-foak | fsdp2 | 2 |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [r["case"] for r in summary["cases"]] == ["qlora-foak--none--w1", "qlora-foak--fsdp2--w2"]
    fsdp2 = summary["cases"][1]
    assert fsdp2["max_rel_diff"] <= 2e-3 and fsdp2["steps"] == 20
    assert fsdp2["base_layer_class"] == "Packed4bitLinear" and fsdp2["fsdp_units"] > 0
    assert fsdp2["patch_counts"]["fused_lora"] == 8 and fsdp2["patch_counts"]["fused_dequant"] == 6
    result = json.loads((out / "qlora-foak--fsdp2--w2.json").read_text())
    assert result["distributed_type"] == "FSDP (CPU seam)" and result["world"] == 2
    assert result["plugins"] == ["bitsandbytes", "fused_ops_and_kernels"]
    assert len(set(result["losses"])) > 1  # the adapters really trained
    assert not list(out.glob(".model-*"))  # the per-case checkpoints are removed
