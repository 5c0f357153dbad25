"""The README's performance tables are generated from the committed CSVs, never typed by hand."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_performance_table_matches_its_csv():
    result = subprocess.run(
        [sys.executable, "benchmarks/run_benchmarks.py", "readme", "README.md", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tables match" in result.stdout
