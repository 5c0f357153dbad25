"""benchmarks/multipack_balance.py: the round-robin plan, the balance figures, the rows on the shipped data, the
files it writes."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import multipack_balance as mb  # noqa: E402


@pytest.fixture(scope="module")
def lengths() -> list[int]:
    return mb.shipped_lengths()


@pytest.mark.parametrize(("examples", "per_batch", "ranks"), [(20, 3, 2), (16, 4, 4), (7, 8, 1)])
def test_round_robin_deals_batches_in_turn_and_fills_the_last_step(examples, per_batch, ranks):
    plan = mb.round_robin_plan(examples, per_batch, ranks, seed=0)
    steps = math.ceil(examples / (per_batch * ranks))
    assert len(plan) == steps
    assert all(len(step) == ranks and all(len(b) == per_batch for b in step) for step in plan)
    flat = [i for step in plan for batch in step for i in batch]
    assert set(flat) == set(range(examples))  # every example, the repeats only fill the last step
    assert len(flat) == steps * per_batch * ranks
    assert flat[examples:] == flat[: len(flat) - examples]  # filled from the start of the shuffled order
    assert (
        plan
        == mb.round_robin_plan(examples, per_batch, ranks, seed=0)
        != mb.round_robin_plan(examples, per_batch, ranks, seed=1)
    )


def test_measure_on_a_hand_made_plan():
    lengths = [10, 30, 20, 20, 5, 5]
    plan = (((0, 1), (2, 3)), ((4,), (5,)))  # step 0: rank costs 40 / 40 (padded 60 / 40); step 1: 5 / 5
    free = mb.measure(plan, lengths, padded=False, budget=50)
    assert free["tokens"] == free["cost_tokens"] == 90
    assert free["slowest_rank_sum"] == 45 and free["step_efficiency"] == pytest.approx(90 / 90)
    assert free["packing_efficiency"] == pytest.approx(90 / (2 * 2 * 50))
    assert free["step_max_min_mean"] == free["step_max_min_worst"] == 1.0
    padded = mb.measure(plan, lengths, padded=True, budget=None)
    assert padded["cost_tokens"] == 60 + 40 + 5 + 5 and padded["slowest_rank_sum"] == 65
    assert padded["packing_efficiency"] == pytest.approx(90 / 110)
    assert padded["step_max_min_worst"] == pytest.approx(1.5)
    assert padded["rank_epoch_balance"] == pytest.approx(65 / 45)
    assert padded["step_efficiency"] == pytest.approx(90 / (2 * 65))


def test_budget_is_the_plugins_effective_batch_size_rule(lengths):
    mean = sum(lengths) / len(lengths)
    for ranks in (1, 2, 8):
        assert mb.multipack_budget(lengths, 8 * ranks, ranks) == max(max(lengths), math.ceil(8 * mean))
        assert mb.multipack_budget(lengths, 16 * ranks, ranks, accumulation=2) == max(max(lengths), math.ceil(8 * mean))
    assert mb.multipack_budget(lengths, 64, 2) == math.ceil(32 * mean)


def test_rows_on_the_shipped_data(lengths):
    rows = mb.balance_rows(lengths, [1, 4], [8], epochs=1, seed=42)
    by = {(r.strategy, r.cost, r.ranks): r for r in rows}
    assert len(rows) == 6
    for row in rows:
        if row.ranks == 1:  # one rank: nothing to balance
            assert row.step_max_min_worst == row.rank_epoch_balance == 1.0
    packed, free, padded = (by["multipack", "padding-free", 4], by["round-robin", "padding-free", 4],
                            by["round-robin", "padded", 4])  # fmt: skip
    assert packed.tokens == sum(lengths)  # every example once
    assert free.tokens > sum(lengths)  # the last step repeats examples
    assert packed.step_efficiency >= 0.99 and packed.step_max_min_worst < 1.1
    assert free.step_efficiency < 0.9 and free.step_max_min_worst > 2
    assert padded.packing_efficiency < 0.5 and padded.proxy_vs_padded == 1.0
    assert packed.proxy_vs_padded > free.proxy_vs_padded > 1
    assert packed.slowest_rank_sum == pytest.approx(padded.slowest_rank_sum / packed.proxy_vs_padded)


def test_main_writes_csv_and_markdown(tmp_path):
    assert mb.main(["--out", str(tmp_path), "--ranks", "2", "--batch-sizes", "8", "--epochs", "2"]) == 0
    with (tmp_path / "multipack_balance.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["strategy"], r["cost"]) for r in rows] == [
        ("round-robin", "padded"), ("round-robin", "padding-free"), ("multipack", "padding-free")
    ]  # fmt: skip
    assert all(r["ranks"] == "2" and r["epochs"] == "2" for r in rows)
    table = (tmp_path / "multipack_balance.md").read_text(encoding="utf-8")
    assert table.count("\n| ") == 4 and "| multipack | padding-free | 2 | 8 |" in table
    with pytest.raises(SystemExit):
        mb.main(["--out", str(tmp_path), "--ranks", "0"])
