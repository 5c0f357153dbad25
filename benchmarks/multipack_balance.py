"""Per-rank token balance of multipack against fixed-size batches, on the shipped instruction data, at N ranks.

No process is started and no model is loaded: the multipack plan is deterministic given the example lengths, the
number of ranks, the seed and the epoch, so every rank's batches can be computed here. What this measures is the
balance of work across data-parallel ranks (tokens per rank per step, packing), not speed: the time proxy is the
sum over steps of the slowest rank's cost, as a step lasts as long as its slowest rank.

Strategies, for each number of ranks N and each per-rank batch size B (examples):

* ``round-robin`` -- what the HF Trainer gives under Accelerate: the shuffled examples cut into batches of B, the
  batches dealt to the ranks in turn (Accelerate's ``BatchSamplerShard``); the last, incomplete step is filled from
  the start of the epoch as ``even_batches=True`` does. Two costs: ``padded`` (a rank's cost is B x its longest
  example, what the padding collator computes) and ``padding-free`` (its tokens, what a flattening collator computes).
* ``multipack`` -- the plugin's sampler as a user configures it: ``effective_batch_size: B x N`` (the same number
  of examples per optimizer step, on average, as the round-robin rows; gradient accumulation 1), so the per-rank
  token budget is the plugin's rule (:func:`budget_for_batch_size`: B examples of average length, at least the
  longest example). Cost: the rank's tokens (multipack batches are padding-free).

Columns (means over the epochs unless named otherwise): ``steps``; ``tokens`` (real tokens per epoch);
``cost_tokens`` (tokens the ranks compute, padding included); ``packing_efficiency`` (multipack: tokens / (steps x N
x budget); padded round-robin: real / padded tokens; padding-free round-robin: 1); ``step_max_min_mean`` and
``step_max_min_worst`` (per step, the max over min of the ranks' costs); ``rank_epoch_balance`` (max / min of the
ranks' epoch costs); ``slowest_rank_sum`` (sum over steps of the slowest rank's cost: the time proxy);
``step_efficiency`` (tokens / (N x slowest_rank_sum): the share of rank time spent on real tokens if a step's time
follows its costliest rank); ``proxy_vs_padded`` (the padded round-robin row's slowest_rank_sum over this row's, same
N and B: >1 means fewer token-steps of waiting).

Usage::

    python benchmarks/multipack_balance.py --out DIR [--ranks 1 2 4 8 16 32] [--batch-sizes 8 16] [--epochs 3]

Writes ``DIR/multipack_balance.csv`` and ``DIR/multipack_balance.md``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fms_acceleration_accelerate_aadp.multipack import MultipackBatchSampler, budget_for_batch_size

BENCH = Path(__file__).resolve().parent

Plan = tuple[tuple[tuple[int, ...], ...], ...]


def shipped_lengths() -> list[int]:
    """Token lengths of the shipped instruction data as the benchmarks train on it (prompt format + ``<eos>``)."""
    sys.path.insert(0, str(BENCH))
    try:
        import benchlib
    finally:
        sys.path.remove(str(BENCH))
    return [len(ids) for ids in benchlib.load_instruction_token_lists(seq_len=10**9)]


def round_robin_plan(num_examples: int, per_batch: int, ranks: int, seed: int) -> Plan:
    """Shuffled examples in batches of ``per_batch``, dealt to the ranks in turn; the last step filled from the start
    of the shuffled order (Accelerate's ``even_batches``), so every rank has a batch at every step."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    per_step = per_batch * ranks
    steps = -(-num_examples // per_step)
    padded = order + order[: steps * per_step - num_examples]
    return tuple(
        tuple(tuple(padded[(s * ranks + r) * per_batch : (s * ranks + r + 1) * per_batch]) for r in range(ranks))
        for s in range(steps)
    )


def multipack_budget(lengths: Sequence[int], effective_batch_size: int, ranks: int, accumulation: int = 1) -> int:
    """The per-rank budget the plugin derives from ``effective_batch_size`` (no ``max_number_tokens``)."""
    return budget_for_batch_size(lengths, effective_batch_size / (ranks * accumulation))


@dataclass(frozen=True)
class Row:
    strategy: str
    cost: str
    ranks: int
    batch_size: int
    budget: int | str
    epochs: int
    steps: float
    tokens: float
    cost_tokens: float
    packing_efficiency: float
    step_max_min_mean: float
    step_max_min_worst: float
    rank_epoch_balance: float
    slowest_rank_sum: float
    step_efficiency: float
    proxy_vs_padded: float | str = ""


def plan_costs(plan: Plan, lengths: Sequence[int], padded: bool) -> list[list[int]]:
    """Each step's per-rank cost: tokens, or rows x longest row when ``padded``."""
    costs = []
    for step in plan:
        row = []
        for batch in step:
            sizes = [lengths[i] for i in batch]
            row.append(len(sizes) * max(sizes) if padded else sum(sizes))
        costs.append(row)
    return costs


def measure(plan: Plan, lengths: Sequence[int], padded: bool, budget: int | None) -> dict[str, float]:
    """Balance figures of one epoch's plan (see the module docstring)."""
    costs = plan_costs(plan, lengths, padded)
    ranks = len(plan[0])
    tokens = sum(lengths[i] for step in plan for batch in step for i in batch)
    cost_tokens = sum(map(sum, costs))
    ratios = [max(c) / max(1, min(c)) for c in costs]
    per_rank = [sum(c[r] for c in costs) for r in range(ranks)]
    slowest = sum(max(c) for c in costs)
    if budget is not None:
        packing = tokens / (len(plan) * ranks * budget)
    else:
        packing = tokens / cost_tokens
    return {
        "steps": len(plan),
        "tokens": tokens,
        "cost_tokens": cost_tokens,
        "packing_efficiency": packing,
        "step_max_min_mean": statistics.fmean(ratios),
        "step_max_min_worst": max(ratios),
        "rank_epoch_balance": max(per_rank) / max(1, min(per_rank)),
        "slowest_rank_sum": slowest,
        "step_efficiency": tokens / (ranks * slowest),
    }


def _mean_row(head: dict, epochs: list[dict[str, float]]) -> Row:
    worst = max(e["step_max_min_worst"] for e in epochs)
    fields = {k: statistics.fmean(e[k] for e in epochs) for k in epochs[0] if k != "step_max_min_worst"}
    return Row(**head, epochs=len(epochs), step_max_min_worst=worst, **fields)


def balance_rows(
    lengths: Sequence[int], ranks_list: Sequence[int], batch_sizes: Sequence[int], epochs: int, seed: int
) -> list[Row]:
    """Every strategy at every number of ranks and batch size (see the module docstring)."""
    rows: list[Row] = []
    for batch_size in batch_sizes:
        for ranks in ranks_list:
            plans = [round_robin_plan(len(lengths), batch_size, ranks, seed + e) for e in range(epochs)]
            head = dict(strategy="round-robin", ranks=ranks, batch_size=batch_size, budget="")
            padded = _mean_row({**head, "cost": "padded"}, [measure(p, lengths, True, None) for p in plans])
            free = _mean_row({**head, "cost": "padding-free"}, [measure(p, lengths, False, None) for p in plans])
            budget = multipack_budget(lengths, batch_size * ranks, ranks)
            sampler = MultipackBatchSampler(lengths, budget, num_replicas=ranks, seed=seed)
            packed = _mean_row(
                dict(strategy="multipack", cost="padding-free", ranks=ranks, batch_size=batch_size, budget=budget),
                [measure(sampler.plan(e), lengths, False, budget) for e in range(epochs)],
            )
            for row in (padded, free, packed):
                ratio = padded.slowest_rank_sum / row.slowest_rank_sum
                rows.append(Row(**{**asdict(row), "proxy_vs_padded": ratio}))
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if value >= 1000 else f"{value:.3f}"
    return str(value)


def write(rows: list[Row], out: Path, lengths: Sequence[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = list(asdict(rows[0]))
    with (out / "multipack_balance.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(row).items()})
    shown = [
        "strategy", "cost", "ranks", "batch_size", "budget", "steps", "cost_tokens", "packing_efficiency",
        "step_max_min_mean", "step_max_min_worst", "rank_epoch_balance", "slowest_rank_sum", "step_efficiency",
        "proxy_vs_padded",
    ]  # fmt: skip
    lines = [
        f"Shipped instruction data: {len(lengths)} examples, {sum(lengths)} tokens, longest {max(lengths)}, "
        f"mean {sum(lengths) / len(lengths):.1f}; means over {rows[0].epochs} epochs.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(_fmt(getattr(r, k)) for k in shown) + " |" for r in rows]
    (out / "multipack_balance.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if min(args.ranks) < 1 or min(args.batch_sizes) < 1 or args.epochs < 1:
        parser.error("--ranks, --batch-sizes and --epochs take positive integers")
    lengths = shipped_lengths()
    rows = balance_rows(lengths, args.ranks, args.batch_sizes, args.epochs, args.seed)
    write(rows, args.out, lengths)
    print((args.out / "multipack_balance.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
