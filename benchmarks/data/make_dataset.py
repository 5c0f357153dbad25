"""Build the shipped instruction dataset and its tokenizer from Python's standard-library documentation.

Nothing is downloaded and no public dataset is copied: every example is made here from the docstrings,
signatures and member lists of the standard library of the Python that runs this script (documentation
that ships with Python under the PSF licence), phrased by the templates below. The result is a small
instruction-tuning set with a realistic, long-tailed length distribution (short single-function answers,
medium class descriptions, long module overviews), used by the benchmark's real-data scenarios to measure
what padding costs and what padding-free / packing saves.

Outputs (next to this file):
    instructions.jsonl   one JSON object per line: {"id", "instruction", "response", "source"}
    tokenizer.json       byte-level BPE tokenizer trained on that text (``tokenizers`` library)
    DATASET.md           how it was made, the Python version used, and the token-length distribution

Run from the repository root (deterministic for a given Python version)::

    python benchmarks/data/make_dataset.py
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import math
import random
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Modules with import side effects (GUI, sound, easter eggs, network) or that are platform-specific.
SKIP_MODULES = frozenset(
    {
        "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "msvcrt", "winreg", "winsound",
        "_winapi", "nt", "ossaudiodev", "spwd", "crypt", "nis", "msilib", "lib2to3", "pydoc_data", "ensurepip",
        "venv", "__main__", "sre_compile", "sre_constants", "sre_parse", "imp", "asynchat", "asyncore", "smtpd",
        "distutils", "telnetlib", "audioop", "cgi", "cgitb", "chunk", "mailcap", "nntplib", "pipes", "sndhdr",
        "sunau", "uu", "xdrlib", "aifc", "imghdr",
    }
)  # fmt: skip

SEED = 20240601
MIN_TOKENS = 50
MAX_TOKENS = 2000


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    source: str


def _first_line(doc: str) -> str:
    for line in doc.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean(text: str) -> str:
    """Drop what depends on this machine: install paths and object addresses (keeps the output stable)."""
    for path in sorted({sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix}, key=len, reverse=True):
        if path:
            text = text.replace(path, "<python>")
    return _ADDRESS.sub("", text)


def _signature(obj: object) -> str:
    try:
        return _clean(str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return "(...)"


def _public_members(module: object, module_name: str) -> list[tuple[str, object]]:
    members = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != module_name:
            continue
        if not inspect.getdoc(obj):
            continue
        members.append((name, obj))
    return members


def _iter_modules() -> Iterator[tuple[str, object]]:
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except ImportError:  # not built on this platform (e.g. a missing C extension)
                continue
        yield name, module


def _function_examples(module_name: str, name: str, obj: object) -> Iterator[Example]:
    doc = inspect.getdoc(obj) or ""
    sig = _signature(obj)
    yield Example(
        instruction=f"Explain what `{module_name}.{name}{sig}` does and how to call it.",
        response=doc,
        source=f"{module_name}.{name}:explain",
    )
    if len(doc) > 400:
        yield Example(
            instruction=(
                f"Write a docstring for this function from the `{module_name}` module:\n\n"
                f"```python\ndef {name}{sig}:\n    ...\n```"
            ),
            response=f'"""{doc}\n"""',
            source=f"{module_name}.{name}:docstring",
        )


def _class_example(module_name: str, name: str, cls: type) -> Example:
    lines = [inspect.getdoc(cls) or "", "", "Public methods:"]
    for meth_name, meth in sorted(vars(cls).items()):
        if meth_name.startswith("_") or not callable(meth):
            continue
        summary = _first_line(inspect.getdoc(meth) or "") or "(undocumented)"
        lines.append(f"- `{meth_name}{_signature(meth)}`: {summary}")
    if lines[-1] == "Public methods:":
        lines = lines[:-2]
    return Example(
        instruction=f"Describe the class `{module_name}.{name}` and summarise its public methods.",
        response="\n".join(lines),
        source=f"{module_name}.{name}:class",
    )


def _module_example(module_name: str, module: object, members: list[tuple[str, object]]) -> Example:
    lines = [inspect.getdoc(module) or f"The `{module_name}` module.", "", "Contents:"]
    for name, obj in members:
        kind = "class" if inspect.isclass(obj) else "function"
        sig = "" if inspect.isclass(obj) else _signature(obj)
        lines.append(f"- {kind} `{name}{sig}`: {_first_line(inspect.getdoc(obj) or '')}")
    return Example(
        instruction=f"Give an overview of Python's `{module_name}` module: what it is for and what it contains.",
        response="\n".join(lines),
        source=f"{module_name}:module",
    )


def collect_examples() -> list[Example]:
    """Every candidate example from the standard library, in a deterministic order."""
    examples: list[Example] = []
    for module_name, module in _iter_modules():
        members = _public_members(module, module_name)
        if inspect.getdoc(module) or members:
            examples.append(_module_example(module_name, module, members))
        for name, obj in members:
            if inspect.isclass(obj):
                examples.append(_class_example(module_name, name, obj))
            else:
                examples.extend(_function_examples(module_name, name, obj))
    return examples


def format_example(instruction: str, response: str) -> str:
    """The text a model trains on (the prompt format used by the benchmark's real-data scenarios)."""
    return f"### Instruction:\n{instruction}\n\n### Response:\n{response}"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts`` (no download; any byte sequence is encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def select(examples: list[Example], lengths: list[int], budget_bytes: int, rng: random.Random) -> list[int]:
    """Indices of a subset with token lengths in [MIN_TOKENS, MAX_TOKENS] that keeps the long tail.

    The candidates are bucketed by log2 of their length and drawn round-robin across buckets, so the long
    examples (rare in the standard library) keep their share while short ones don't swamp the set.
    """
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if MIN_TOKENS <= n <= MAX_TOKENS:
            buckets.setdefault(int(math.log2(n)), []).append(i)
    for members in buckets.values():
        rng.shuffle(members)
    chosen: list[int] = []
    used = 0
    order = sorted(buckets)
    # short answers are the most common in real instruction data: weight buckets towards them
    weights = {b: max(1, 4 - (b - order[0])) for b in order}
    while any(buckets.values()):
        progressed = False
        for b in order:
            for _ in range(weights[b]):
                if not buckets[b]:
                    break
                i = buckets[b].pop()
                size = len(examples[i].instruction) + len(examples[i].response) + 64
                if used + size > budget_bytes:
                    return sorted(chosen)
                chosen.append(i)
                used += size
                progressed = True
        if not progressed:
            break
    return sorted(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--budget-bytes", type=int, default=1_800_000, help="size cap of instructions.jsonl")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)
    rng = random.Random(SEED)

    examples = collect_examples()
    texts = [format_example(e.instruction, e.response) for e in examples]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    lengths = [len(tokenizer.encode(t).ids) for t in texts]
    keep = select(examples, lengths, args.budget_bytes, rng)
    rng.shuffle(keep)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "instructions.jsonl").open("w", encoding="utf-8") as handle:
        for n, i in enumerate(keep):
            e = examples[i]
            record = {"id": n, "instruction": _clean(e.instruction), "response": _clean(e.response), "source": e.source}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tokenizer.save(str(args.out_dir / "tokenizer.json"))

    kept = sorted(lengths[i] for i in keep)

    def pct(q: float) -> int:
        return kept[min(len(kept) - 1, int(q * len(kept)))]

    stats = {
        "examples": len(kept),
        "tokens": sum(kept),
        "min": kept[0],
        "p10": pct(0.10),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": kept[-1],
        "mean": round(sum(kept) / len(kept), 1),
    }
    hist_edges = [50, 100, 200, 400, 800, 1600, 2001]
    hist = [sum(1 for n in kept if lo <= n < hi) for lo, hi in itertools.pairwise(hist_edges)]
    note = [
        "# Benchmark instruction dataset",
        "",
        "Generated by `python benchmarks/data/make_dataset.py` (do not edit by hand). Each example asks about",
        "an object of the Python standard library and answers with its docstring, signature and member",
        "summaries, phrased by the templates in the script. No text is downloaded and no public dataset is",
        "copied; the source is the documentation of the Python that ran the script (PSF licence).",
        "",
        f"- Python used: {sys.version.split()[0]}",
        f"- Tokenizer: byte-level BPE, vocab {tokenizer.get_vocab_size()}, trained on the candidate texts "
        "(`tokenizer.json`, special tokens `<pad>`=0, `<eos>`=1)",
        f"- Prompt format: `{format_example('{instruction}', '{response}')!r}` + `<eos>`",
        f"- Length selection: examples of {MIN_TOKENS}–{MAX_TOKENS} tokens, drawn across log2 length buckets",
        "",
        "Token lengths (prompt + response, this tokenizer):",
        "",
        "| " + " | ".join(stats) + " |",
        "|" + "---|" * len(stats),
        "| " + " | ".join(str(v) for v in stats.values()) + " |",
        "",
        "| tokens | " + " | ".join(f"{lo}–{hi - 1}" for lo, hi in itertools.pairwise(hist_edges)) + " |",
        "|---|" + "---|" * len(hist),
        "| examples | " + " | ".join(str(h) for h in hist) + " |",
        "",
    ]
    (args.out_dir / "DATASET.md").write_text("\n".join(note), encoding="utf-8")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
