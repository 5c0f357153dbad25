"""Build the calibration text shipped with the GPTQ quantizer (``fms-accelerate quantize``).

The text is a deterministic selection of the repository's own benchmark dataset
(``benchmarks/data/instructions.jsonl``: questions about the Python standard library answered with its
documentation, made by ``benchmarks/data/make_dataset.py``; no public dataset is copied). Each record becomes
one ``{"text": ...}`` line: the instruction, a blank line, the response. Records are drawn in a seeded order
until the file reaches the size budget (about 250 KB), so that it stays small as package data while giving a
few tens of thousands of tokens of varied English prose, code names and punctuation.

Run from the repository root::

    python plugins/accelerated-peft/scripts/make_gptq_calibration.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SOURCE = ROOT / "benchmarks" / "data" / "instructions.jsonl"
TARGET = ROOT / "plugins/accelerated-peft/src/fms_acceleration_accelerate_peft/gptq/calibration/calibration.jsonl"
SEED = 20250101
BUDGET_BYTES = 250_000


def main() -> None:
    records = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(SEED).shuffle(records)
    lines, size = [], 0
    for record in records:
        line = json.dumps({"text": f"{record['instruction']}\n\n{record['response']}"}, ensure_ascii=False)
        if size + len(line.encode("utf-8")) + 1 > BUDGET_BYTES:
            continue
        lines.append(line)
        size += len(line.encode("utf-8")) + 1
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {TARGET} ({len(lines)} records, {size} bytes)")


if __name__ == "__main__":
    main()
