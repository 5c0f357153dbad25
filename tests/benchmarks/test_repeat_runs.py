"""benchmarks/repeat_runs.py: the rotation of the rows between runs and the summary of their spread."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import repeat_runs


def test_rows_after_only_rotate_each_run_and_nothing_else_moves():
    args = ["s.yaml", "--only", "a", "b", "c", "--set", "steps=4"]
    assert repeat_runs.rotated_args(args, 0) == args
    assert repeat_runs.rotated_args(args, 1) == ["s.yaml", "--only", "b", "c", "a", "--set", "steps=4"]
    assert repeat_runs.rotated_args(args, 2)[2:5] == ["c", "a", "b"]
    assert repeat_runs.rotated_args(args, 3) == args
    assert repeat_runs.rotated_args(["s.yaml", "--group", "g"], 1) == ["s.yaml", "--group", "g"]


def _run_csv(path: Path, rows: dict[str, float], failed: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["scenario", "status", "train_tokens_per_s"])
        writer.writeheader()
        for name, speed in rows.items():
            writer.writerow({"scenario": name, "status": "ok", "train_tokens_per_s": speed})
        for name in failed:
            writer.writerow({"scenario": name, "status": "failed", "train_tokens_per_s": ""})
    return path


def test_summary_takes_ratios_within_each_run(tmp_path: Path):
    """The second run is on a host 2x slower: speeds spread, ratios to the reference of the same run do not."""
    paths = [
        _run_csv(tmp_path / "r1.csv", {"hf": 100.0, "ours": 130.0}),
        _run_csv(tmp_path / "r2.csv", {"hf": 50.0, "ours": 65.0}),
        _run_csv(tmp_path / "r3.csv", {"ours": 120.0, "hf": 100.0}, failed=("extra",)),
    ]
    rows = {r["scenario"]: r for r in repeat_runs.summarise(repeat_runs.read_runs(paths), "hf")}
    assert set(rows) == {"hf", "ours"}  # a row that failed in every run is not summarised
    ours = rows["ours"]
    assert ours["runs"] == "3" and ours["tok_s"] == "130 65 120"
    assert (ours["tok_s_median"], ours["tok_s_min"], ours["tok_s_max"]) == ("120", "65", "130")
    assert ours["ratio"] == "1.300 1.300 1.200"
    assert (ours["ratio_median"], ours["ratio_min"], ours["ratio_max"]) == ("1.300", "1.200", "1.300")
    assert rows["hf"]["ratio_median"] == "1.000"
    repeat_runs.write_outputs(list(rows.values()), tmp_path, "hf")
    table = (tmp_path / "repeats.md").read_text(encoding="utf-8")
    assert "| ours | 3 | 130 65 120 | 120 | 1.300 1.300 1.200 | 1.300 (1.200-1.300) |" in table


def test_options_the_script_owns_are_refused_after_the_separator(tmp_path: Path):
    with pytest.raises(SystemExit):
        repeat_runs.main(["--reference", "hf", "--out", str(tmp_path), "--", "s.yaml", "--out", "x"])
    with pytest.raises(SystemExit):
        repeat_runs.main(["--reference", "hf", "--out", str(tmp_path)])
