"""benchmarks/moe_ep_cpu.py: the run list, the tiny models' routing shapes, and one real 2-process expert-parallel run
(gloo) whose all-to-all byte count must equal what the dispatch sends (one hidden row per token and destination
process, counted from the routing, not from the counter), whose experts are halved per rank and whose losses match
one process."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import moe_ep_cpu as ep  # noqa: E402


def test_runs_cover_both_shapes_methods_degrees_and_fsdp2():
    names = {r.name for r in ep.default_runs()}
    for model in ("granite", "mixtral"):
        for method in ("full", "lora"):
            assert {f"{model}-{method}-ep{e}-n{n}" for e, n in ((1, 2), (2, 2), (4, 4), (2, 4))} <= names
        assert f"{model}-full-ep2-n2-fsdp2" in names
    assert (ep.MODELS["granite"]["num_local_experts"], ep.MODELS["granite"]["num_experts_per_tok"]) == (40, 8)
    assert (ep.MODELS["mixtral"]["num_local_experts"], ep.MODELS["mixtral"]["num_experts_per_tok"]) == (8, 2)


def test_unknown_run_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        ep.main(["--out", str(tmp_path), "--only", "mixtral-full-ep3-n2"])


@pytest.mark.slow
def test_two_process_run_counts_the_dispatch_bytes_and_matches_one_process(tmp_path):
    assert ep.main(["--out", str(tmp_path), "--only", "mixtral-full-ep2-n2", "--steps", "2"]) == 0
    with (tmp_path / "moe_ep_cpu.csv").open(encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["status"] == "ok" and row["loss_parity"] == "yes" and float(row["loss_max_rel_diff"]) <= 1e-5
    assert row["experts_per_rank"] == "4"  # 8 experts over 2 processes

    cfg = ep.MODELS["mixtral"]
    hidden, layers, k = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts_per_tok"]
    full_experts = layers * cfg["num_local_experts"] * 3 * hidden * cfg["intermediate_size"] * 4  # gate, up, down
    assert int(row["expert_param_bytes_per_rank"]) == full_experts // 2

    reports = [json.loads((tmp_path / "runs" / row["run"] / f"rank{r}.json").read_text()) for r in range(2)]
    slots = ep.ROWS * ep.SEQ * k  # every token's k routing slots, over both processes
    for step in range(2):
        tokens, slots_seen, offrank, pairs, offrank_pairs = (
            sum(r["routing"][step][i] for r in reports) for i in range(5)
        )
        assert tokens == ep.ROWS * ep.SEQ * layers and slots_seen == slots * layers
        assert 0 < offrank < slots_seen and offrank_pairs <= offrank and slots_seen / k <= pairs < slots_seen
        # per layer and step, over both processes: the counts (2 x 2 int64 from each), per slot its row index and
        # local id (2 int64) and its weight (float32, forward and backward), and one float32 x hidden row per
        # distinct (token, destination) pair four times (dispatched and combined, forward and backward)
        expected = layers * 2 * (2 * 2 * 8) + slots_seen * (2 * 8 + 2 * 4) + pairs * 4 * hidden * 4
        assert sum(r["a2a_bytes"][step] for r in reports) == expected
        # forward: counts, slot metadata, rows, weights, combined rows; backward: the rows both ways, the weights
        assert all(r["a2a_calls"][step] == 8 * layers for r in reports)
        # off-rank: the other process's row of the counts, the off-rank slots' metadata and weights, the off-rank rows
        expected_offrank = layers * 2 * (2 * 8) + offrank * (2 * 8 + 2 * 4) + offrank_pairs * 4 * hidden * 4
        assert sum(r["a2a_offrank_bytes"][step] for r in reports) == expected_offrank
    assert float(row["offrank_rows_if_once_per_rank"]) <= 1.0
    assert row["a2a_bytes_as_expected"] == "yes"  # the benchmark's own check (dispatch_bytes) agrees
