"""Run the same benchmark rows several times and report each row's spread, for steps whose speed moves with the host.

A padding-free LoRA step of a few thousand tokens is paced by the host (Python and kernel launches), and its speed
moves from one run to the next by more than the difference between two attention calls. One run of each row cannot
rank such rows. This script runs ``run_benchmarks.py run`` ``--repeats`` times, without overlapped start-up (no other
row's process starts while a row trains), rotating the order of the ``--only`` rows every time so that no row
always runs first or after the same row, and summarises:

* per row: tokens/s of every run, their median, min and max;
* per row and run: the ratio to ``--reference`` (a row of the same run), and the median, min and max of those
  ratios; a ratio whose min and max fall on either side of a threshold is not a ranking.

Usage::

    python benchmarks/repeat_runs.py --repeats 3 --reference pf-lora-flatten-flex-hf --out DIR -- \\
        benchmarks/scenarios-padding-free.yaml --only pf-lora-flatten-flex-hf pf-lora-ours --set steps=40

Everything after ``--`` is passed to ``run_benchmarks.py run`` (its ``--out`` and ``--overlap`` are set here).
Writes ``DIR/repeat<k>/`` (each run's own results), ``DIR/repeats.csv`` and ``DIR/repeats.md``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "run_benchmarks.py"
COLUMNS = ("scenario", "runs", "tok_s", "tok_s_median", "tok_s_min", "tok_s_max", "ratio", "ratio_median",
           "ratio_min", "ratio_max")  # fmt: skip


def rotated_args(args: Sequence[str], index: int) -> list[str]:
    """``args`` with the names after ``--only`` rotated left by ``index`` (other arguments unchanged)."""
    out = list(args)
    if "--only" not in out:
        return out
    start = out.index("--only") + 1
    end = start
    while end < len(out) and not out[end].startswith("--"):
        end += 1
    names = out[start:end]
    if names:
        shift = index % len(names)
        out[start:end] = names[shift:] + names[:shift]
    return out


def read_runs(csv_paths: Sequence[Path]) -> list[dict[str, float]]:
    """tokens/s by scenario for each run's ``results.csv`` (rows that did not finish ``ok`` are left out)."""
    runs = []
    for path in csv_paths:
        with path.open(newline="", encoding="utf-8") as handle:
            runs.append(
                {
                    row["scenario"]: float(row["train_tokens_per_s"])
                    for row in csv.DictReader(handle)
                    if row.get("status") == "ok" and row.get("train_tokens_per_s")
                }
            )
    return runs


def summarise(runs: Sequence[dict[str, float]], reference: str) -> list[dict[str, str]]:
    """One row per scenario seen in any run: its tokens/s per run and the spread, and its ratio to
    ``reference`` in each run where both ran."""
    names: list[str] = []
    for values in runs:
        names += [name for name in values if name not in names]
    rows = []
    for name in names:
        speeds = [values[name] for values in runs if name in values]
        ratios = [values[name] / values[reference] for values in runs if name in values and reference in values]
        row = {
            "scenario": name,
            "runs": str(len(speeds)),
            "tok_s": " ".join(f"{v:.0f}" for v in speeds),
            "tok_s_median": f"{statistics.median(speeds):.0f}",
            "tok_s_min": f"{min(speeds):.0f}",
            "tok_s_max": f"{max(speeds):.0f}",
            "ratio": " ".join(f"{r:.3f}" for r in ratios),
            "ratio_median": f"{statistics.median(ratios):.3f}" if ratios else "",
            "ratio_min": f"{min(ratios):.3f}" if ratios else "",
            "ratio_max": f"{max(ratios):.3f}" if ratios else "",
        }
        rows.append(row)
    return rows


def write_outputs(rows: Sequence[dict[str, str]], out: Path, reference: str) -> None:
    with (out / "repeats.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"| row | runs | tok/s per run | median tok/s | x {reference} per run | median (min-max) |",
        "|---|---:|---|---:|---|---|",
    ]
    for r in rows:
        spread = f"{r['ratio_median']} ({r['ratio_min']}-{r['ratio_max']})" if r["ratio"] else ""
        lines.append(
            f"| {r['scenario']} | {r['runs']} | {r['tok_s']} | {r['tok_s_median']} | {r['ratio']} | {spread} |"
        )
    (out / "repeats.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    runner_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", required=True, help="the row every ratio is taken against (same run)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(own)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not runner_args:
        parser.error("give run_benchmarks.py run's arguments after --: a scenarios file and e.g. --only ROWS")
    if any(a in ("--out", "--overlap", "--no-overlap") for a in runner_args):
        parser.error("--out and --overlap / --no-overlap are set by this script; remove them after --")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_paths = []
    for k in range(args.repeats):
        run_out = out / f"repeat{k + 1}"
        command = [sys.executable, str(RUNNER), "run", *rotated_args(runner_args, k), "--no-overlap",
                   "--out", str(run_out)]  # fmt: skip
        print(f"[repeat] run {k + 1}/{args.repeats}: {' '.join(command)}", flush=True)
        done = subprocess.run(command, check=False)
        if done.returncode != 0:
            print(f"[repeat] run {k + 1} exited with {done.returncode}", flush=True)
        if (run_out / "results.csv").exists():
            csv_paths.append(run_out / "results.csv")
    if not csv_paths:
        print("[repeat] no run wrote results", flush=True)
        return 1
    rows = summarise(read_runs(csv_paths), args.reference)
    write_outputs(rows, out, args.reference)
    print((out / "repeats.md").read_text(encoding="utf-8"), flush=True)
    return 0 if len(csv_paths) == args.repeats else 1


if __name__ == "__main__":
    raise SystemExit(main())
