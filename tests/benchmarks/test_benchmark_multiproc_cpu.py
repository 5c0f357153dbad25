"""The benchmark harness's per-rank model-state bytes (``param_bytes_per_rank`` / ``buffer_bytes_per_rank``) and the
CPU multi-process scenarios file (GPTQ-LoRA under FSDP2, plugin stacks under DeepSpeed ZeRO-2/3, on gloo)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import run_benchmarks  # noqa: E402
import train_bench  # noqa: E402

SCENARIOS = BENCH / "scenarios-multiproc-cpu.yaml"


def _packed_weight(rows: int = 8, in_features: int = 64, group_size: int = 32):
    packed = pytest.importorskip("fms_acceleration_accelerate_peft.gptq.packed")
    groups = in_features // group_size
    return packed.GPTQPackedWeight(
        torch.zeros(rows, in_features // 8, dtype=torch.int32),  # 4 bits: 8 codes per int32 word
        torch.zeros(rows // 8, groups, dtype=torch.int32),
        torch.ones(rows, groups, dtype=torch.float16),
        torch.arange(in_features, dtype=torch.int32) // group_size,
        (rows, in_features),
        torch.float32,
        4,
        group_size,
        "gptq",
    )


def test_tensor_bytes_counts_packed_storage_not_the_logical_shape() -> None:
    weight = _packed_weight()
    assert weight.numel() * weight.element_size() == 8 * 64 * 4  # what numel() reports: the dequantized weight
    expected = 8 * 8 * 4 + 1 * 2 * 4 + 8 * 2 * 2 + 64 * 4  # qweight, qzeros, scales (fp16), g_idx
    assert train_bench.tensor_bytes(weight) == expected
    assert train_bench.tensor_bytes(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30


def test_tensor_bytes_reads_a_zero3_partition() -> None:
    placeholder = nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves in the module
    placeholder.ds_tensor = torch.zeros(10)  # this rank's partition
    assert train_bench.tensor_bytes(placeholder) == 40


def test_held_bytes_counts_tied_weights_once_and_splits_buffers() -> None:
    model = nn.Sequential(nn.Embedding(16, 4), nn.Linear(4, 16, bias=False))
    model[1].weight = model[0].weight  # tied
    model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    assert train_bench.held_bytes(model) == (16 * 4 * 4, 3 * 8)


def test_result_columns_reach_the_csv() -> None:
    row: dict = {}
    run_benchmarks.fill_result(row, {"status": "ok", "param_bytes_per_rank": 5, "buffer_bytes_per_rank": 7})
    assert row["param_bytes_per_rank"] == 5 and row["buffer_bytes_per_rank"] == 7
    assert {"param_bytes_per_rank", "buffer_bytes_per_rank"} <= set(benchlib.CSV_COLUMNS)


def test_multiproc_cpu_rows_have_a_one_process_reference_and_replicated_data() -> None:
    parsed = benchlib.load_scenarios(SCENARIOS)
    by_name = {s.name: s for s in parsed.scenarios}
    multi = [s for s in parsed.scenarios if s.num_gpus > 1]
    assert multi and all(s.rank_data == "replicate" for s in multi)
    rows = [{**run_benchmarks.base_row(s, parsed), "status": "ok"} for s in parsed.scenarios]
    refs = {row["scenario"]: run_benchmarks.scaling_reference(row, rows) for row in rows}
    # every multi-process float32 row of a plugin stack is checked step by step against that stack in one process
    for s in multi:
        if s.dtype == "float32" and s.plugins not in (None, "", "none"):
            ref = refs[s.name]
            assert ref is not None, s.name
            assert by_name[ref["scenario"]].num_gpus == 1 and by_name[ref["scenario"]].distributed in ("ddp", None)
    assert refs["gptq-lora-fsdp2-x4"]["scenario"] == "gptq-lora-x1"
    assert refs["qlora-foak-zero3-x2"]["scenario"] == "qlora-foak"


@pytest.mark.slow
def test_gptq_lora_under_fsdp1_and_fsdp2_on_gloo_matches_one_process(tmp_path: Path) -> None:
    """GPTQ-LoRA on 2 gloo processes under FSDP1 and FSDP2 (replicated data) follows the 1-process loss curve step
    by step; under FSDP2 each rank holds about half of the packed model, and the per-step all-gather of the packed
    model is well under the 16-bit model's."""
    out = tmp_path / "out"
    rows_run = ["gptq-lora-x1", "gptq-lora-fsdp2-x2", "gptq-lora-fsdp1-x2", "gptq-lora-fsdp2-x2-bf16",
                "lora-fsdp2-x2-bf16"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "benchmarks/run_benchmarks.py", "run", str(SCENARIOS), "--only", *rows_run,
         "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        rows = {r["scenario"]: r for r in csv.DictReader(handle)}
    for name in rows_run:
        assert rows[name]["status"] == "ok", (name, rows[name]["note"])
    one = rows["gptq-lora-x1"]
    whole = int(one["param_bytes_per_rank"]) + int(one["buffer_bytes_per_rank"])  # packed buffers in one process
    for name in ("gptq-lora-fsdp2-x2", "gptq-lora-fsdp1-x2"):
        row = rows[name]
        assert row["scaling_reference"] == "gptq-lora-x1" and row["loss_vs_1gpu_match"] == "yes", row
        assert float(row["loss_vs_1gpu_max_rel_diff"]) <= 1e-3
        assert 0.45 * whole < int(row["param_bytes_per_rank"]) < 0.6 * whole, (name, whole, row["param_bytes_per_rank"])
    packed, dense = rows["gptq-lora-fsdp2-x2-bf16"], rows["lora-fsdp2-x2-bf16"]
    assert 0 < int(packed["allgather_bytes_per_step"]) < 0.5 * int(dense["allgather_bytes_per_step"])


@pytest.mark.slow
def test_zero3_on_two_processes_counts_deepspeed_collectives_and_halves_the_parameters(tmp_path: Path) -> None:
    """LoRA + fused ops under ZeRO-3 on 2 gloo processes against the same stack in one process: the loss curves
    agree step by step, each rank holds half the parameters, the all-gathers DeepSpeed issues through its
    communication backend are counted, and the reduce-scatter is the LoRA gradients (float32)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    rows_run = ["lora-foak", "lora-foak-zero3-x2"]
    done = subprocess.run(
        [sys.executable, "benchmarks/run_benchmarks.py", "run", str(SCENARIOS), "--only", *rows_run,
         "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        rows = {r["scenario"]: r for r in csv.DictReader(handle)}
    one, zero3 = rows["lora-foak"], rows["lora-foak-zero3-x2"]
    assert one["status"] == "ok" and zero3["status"] == "ok", (one["note"], zero3["note"])
    assert zero3["scaling_reference"] == "lora-foak" and zero3["loss_vs_1gpu_match"] == "yes"
    assert int(zero3["param_bytes_per_rank"]) == int(one["param_bytes_per_rank"]) // 2
    lora_values = 2 * 8 * (256 + 256) + 2 * 8 * (256 + 128)  # per layer: r8 on q, o (256 -> 256), k, v (256 -> 128)
    assert int(zero3["reduce_scatter_bytes_per_step"]) == 2 * lora_values * 4  # 2 layers, float32
    assert int(zero3["allgather_bytes_per_step"]) >= int(one["param_bytes_per_rank"])  # every weight at least once
