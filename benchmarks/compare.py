"""Compare a new benchmark CSV with committed reference results; non-zero exit on a regression.

    python benchmarks/compare.py NEW.csv                       # reference: newest committed run on that device
    python benchmarks/compare.py NEW.csv --reference benchmarks/results/<date>-<gpu>-x<count>-<topic>/results.csv
    python benchmarks/compare.py NEW.csv --threshold 0.05 --memory-threshold 0.05

Rows are matched by scenario name. A row regresses when, beyond the thresholds:

* its speed-up over its group's baseline (``throughput_ratio``, measured within one run, so it compares
  across machines and days) dropped;
* on the same device (same ``gpu_name``): its absolute train tokens/s dropped, or its peak allocated GPU
  memory grew (``memory_ratio`` is checked on any device);
* its loss matched the baseline in the reference and no longer does;
* multi-GPU rows: its scaling efficiency dropped, its all-gather / reduce-scatter bytes per step grew (memory
  threshold), or its loss matched the 1-GPU row in the reference and no longer does;
* it ran in the reference and failed now (a row skipped now, e.g. a missing wheel, is reported, not failed,
  unless ``--strict``).

Exit codes: 0 no regression, 1 regression, 2 usage error (no reference found, unreadable files).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


@dataclass(frozen=True)
class Finding:
    """One compared metric of one scenario."""

    scenario: str
    metric: str
    reference: str
    new: str
    change: str
    regression: bool
    note: str = ""


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _f(row: Mapping[str, str], key: str) -> float | None:
    value = row.get(key, "")
    if value in ("", None):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def find_reference(new_csv: Path, rows: Sequence[Mapping[str, str]], results_dir: Path = RESULTS_DIR) -> Path | None:
    """Newest ``results.csv`` under ``results_dir`` from the same device as ``rows`` (not ``new_csv`` itself)."""
    device = next((r.get("gpu_name") or r.get("device") for r in rows if r.get("status") == "ok"), None)
    best: tuple[str, Path] | None = None
    for path in sorted(results_dir.rglob("results.csv")):
        if path.resolve() == new_csv.resolve():
            continue
        try:
            candidates = read_rows(path)
        except (OSError, csv.Error):
            continue
        ok = [r for r in candidates if r.get("status") == "ok"]
        if not ok or (device is not None and (ok[0].get("gpu_name") or ok[0].get("device")) != device):
            continue
        date = max(r.get("date", "") for r in ok)
        if best is None or date > best[0]:
            best = (date, path)
    return best[1] if best else None


def compare_rows(
    new: Sequence[Mapping[str, str]],
    ref: Sequence[Mapping[str, str]],
    threshold: float,
    memory_threshold: float,
    strict: bool = False,
) -> list[Finding]:
    """All findings of ``new`` against ``ref`` (see the module docstring for the rules)."""
    findings: list[Finding] = []
    ref_by = {r["scenario"]: r for r in ref}
    for row in new:
        name = row["scenario"]
        base = ref_by.get(name)
        if base is None:
            findings.append(Finding(name, "status", "-", row.get("status", ""), "", False, "not in the reference"))
            continue
        if base.get("status") == "ok" and row.get("status") != "ok":
            regression = row.get("status") == "failed" or strict
            findings.append(
                Finding(name, "status", "ok", row.get("status", ""), "", regression, row.get("note", "")[:120])
            )
            continue
        if row.get("status") != "ok" or base.get("status") != "ok":
            continue
        same_device = (row.get("gpu_name") or row.get("device")) == (base.get("gpu_name") or base.get("device"))
        checks: list[tuple[str, bool, float]] = [
            ("throughput_ratio", True, threshold)
        ]  # (column, higher is better, tol)
        if same_device:
            checks += [("train_tokens_per_s", True, threshold), ("peak_alloc_gib", False, memory_threshold)]
        checks.append(("memory_ratio", False, memory_threshold))
        # multi-GPU rows: scaling efficiency (a ratio within one run) and collective bytes per step (exact counts,
        # device independent) must not get worse
        checks += [
            ("scaling_efficiency", True, threshold),
            ("allgather_bytes_per_step", False, memory_threshold),
            ("reduce_scatter_bytes_per_step", False, memory_threshold),
        ]
        for column, higher_better, tol in checks:
            a, b = _f(row, column), _f(base, column)
            if a is None or b is None or b == 0:
                continue
            change = a / b - 1.0
            regression = change < -tol if higher_better else change > tol
            findings.append(Finding(name, column, f"{b:.4g}", f"{a:.4g}", f"{change:+.1%}", regression))
        if base.get("loss_match") == "yes" and row.get("loss_match") == "no":
            findings.append(
                Finding(name, "loss_match", "yes", "no", "", True, f"max rel diff {row.get('loss_max_rel_diff', '')}")
            )
        if base.get("loss_vs_1gpu_match") == "yes" and row.get("loss_vs_1gpu_match") == "no":
            detail = f"max rel diff {row.get('loss_vs_1gpu_max_rel_diff', '')}"
            findings.append(Finding(name, "loss_vs_1gpu_match", "yes", "no", "", True, detail))
    return findings


def format_findings(findings: Sequence[Finding]) -> str:
    lines = ["| scenario | metric | reference | new | change | verdict |", "|---|---|---|---|---|---|"]
    for f in findings:
        verdict = "REGRESSION" if f.regression else "ok"
        if f.note:
            verdict += f" ({f.note})"
        lines.append(f"| {f.scenario} | {f.metric} | {f.reference} | {f.new} | {f.change} | {verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("new", help="results.csv of the new run")
    parser.add_argument("--reference", help="reference results.csv (default: newest committed run on the same device)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where to look for references")
    parser.add_argument("--threshold", type=float, default=0.05, help="allowed relative drop of throughput")
    parser.add_argument("--memory-threshold", type=float, default=0.05, help="allowed relative growth of memory")
    parser.add_argument("--strict", action="store_true", help="a scenario skipped now but ok in the reference fails")
    args = parser.parse_args(argv)
    new_path = Path(args.new)
    try:
        new_rows = read_rows(new_path)
    except OSError as exc:
        print(f"error: cannot read {new_path}: {exc}", file=sys.stderr)
        return 2
    ref_path = Path(args.reference) if args.reference else find_reference(new_path, new_rows, Path(args.results_dir))
    if ref_path is None:
        print(
            f"error: no reference results for this device under {args.results_dir}; pass --reference", file=sys.stderr
        )
        return 2
    try:
        ref_rows = read_rows(ref_path)
    except OSError as exc:
        print(f"error: cannot read {ref_path}: {exc}", file=sys.stderr)
        return 2
    findings = compare_rows(new_rows, ref_rows, args.threshold, args.memory_threshold, args.strict)
    print(f"new: {new_path}\nreference: {ref_path}\n")
    print(format_findings(findings))
    bad = [f for f in findings if f.regression]
    if bad:
        print(
            f"\n{len(bad)} regression(s) beyond the thresholds (throughput {args.threshold:.0%}, memory {args.memory_threshold:.0%})"
        )
        return 1
    print("\nno regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
