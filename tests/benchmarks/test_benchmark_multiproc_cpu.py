"""The benchmark harness's per-rank model-state bytes (``param_bytes_per_rank`` / ``buffer_bytes_per_rank``) and the
CPU multi-process scenarios file (GPTQ-LoRA under FSDP2, plugin stacks under DeepSpeed ZeRO-2/3, on gloo)."""

from __future__ import annotations

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
