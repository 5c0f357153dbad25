"""Shared by the multipack tests: the shipped instruction dataset's token lengths, and the 1-process plan."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BENCH = REPO / "benchmarks"


@functools.lru_cache(maxsize=1)
def shipped_lengths() -> tuple[int, ...]:
    """Token lengths of benchmarks/data/instructions.jsonl as the benchmarks train on it: the shipped byte-level BPE
    tokenizer (benchmarks/data/tokenizer.json) over the prompt format, plus ``<eos>``; nothing cut."""
    sys.path.insert(0, str(BENCH))
    try:
        import benchlib
    finally:
        sys.path.remove(str(BENCH))
    return tuple(len(ids) for ids in benchlib.load_instruction_token_lists(seq_len=10**9))
