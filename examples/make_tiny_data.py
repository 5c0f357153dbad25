"""Write examples/data/tiny_instructions.jsonl: small, learnable instruction data for the main job.

Deterministic (seeded); each record is {"instruction": ..., "response": ...}. Tasks: addition, reversing a word,
upper-casing, counting letters, sorting numbers. Run: python examples/make_tiny_data.py
"""

import json
import random
from pathlib import Path

WORDS = (
    "adapter accelerate bucket checkpoint dataset dtype epoch float gradient kernel layer lora memory norm "
    "optimizer packing quantize rotary shard softmax tensor token triton vocab warmup weight"
).split()


def make_records(n: int, seed: int = 1234) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            records.append({"instruction": f"Add {a} and {b}.", "response": f"{a} + {b} = {a + b}"})
        elif kind == 1:
            w = rng.choice(WORDS)
            records.append({"instruction": f"Reverse the word '{w}'.", "response": w[::-1]})
        elif kind == 2:
            w = " ".join(rng.sample(WORDS, 3))
            records.append({"instruction": f"Write in capitals: {w}", "response": w.upper()})
        elif kind == 3:
            w = rng.choice(WORDS)
            c = rng.choice(sorted(set(w)))
            records.append({"instruction": f"How many times does '{c}' occur in '{w}'?", "response": str(w.count(c))})
        else:
            nums = [rng.randrange(50) for _ in range(rng.randrange(3, 7))]
            records.append(
                {
                    "instruction": f"Sort ascending: {', '.join(map(str, nums))}",
                    "response": ", ".join(map(str, sorted(nums))),
                }
            )
    return records


def main() -> None:
    out = Path(__file__).parent / "data" / "tiny_instructions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for record in make_records(512):
            handle.write(json.dumps(record) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
