"""CPU tier of the benchmark harness (benchmarks/): scenario files, data, batching, tables, regression check,
and one end-to-end run of the runner on a tiny model through ``accelerate launch``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import compare  # noqa: E402
import run_benchmarks  # noqa: E402

SHIPPED_SCENARIO_FILES = sorted(BENCH.glob("scenarios*.yaml"))

TINY_SCENARIOS = """
models:
  micro:
    config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 256, max_position_embeddings: 128,
             tie_word_embeddings: false}
defaults: {model: micro, dtype: float32, batch_size: 2, seq_len: 32, steps: 4, warmup_steps: 1,
           gradient_checkpointing: true, learning_rate: 0.001}
scenarios:
  - {name: base, group: g, peft: lora}
  - {name: slow, group: g, peft: lora, inject_delay_ms: 1500}   # the same run with an injected slowdown
  - {name: ddp, group: g2, peft: lora, num_gpus: 2}   # 2 processes (gloo on CPU): ranks split the batches
"""


# ------------------------------------------------------------------------------------------- scenario files
@pytest.mark.parametrize("path", SHIPPED_SCENARIO_FILES, ids=lambda p: p.name)
def test_shipped_scenario_files_load_and_name_existing_stacks(path: Path) -> None:
    sfile = benchlib.load_scenarios(path)
    assert sfile.scenarios
    groups = {s.group for s in sfile.scenarios}
    assert set(sfile.baselines) == groups, f"every group needs a baseline row: {groups - set(sfile.baselines)}"
    for s in sfile.scenarios:
        if s.uses_plugins:  # a renamed launch config must be caught here, not on the GPU
            stack = run_benchmarks.resolve_stack(s.plugins, s.plugins_label)
            assert stack.body, f"{s.name}: {s.plugins} resolved to an empty acceleration body"


def test_reference_matrix_is_the_design_shape() -> None:
    sfile = benchlib.load_scenarios(BENCH / "scenarios.yaml")
    config = sfile.models["llama3-8b-shape-8l"]["config"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (4096, 14336, 32)
    assert (config["num_key_value_heads"], config["vocab_size"], config["num_hidden_layers"]) == (8, 128256, 8)
    peft_methods = {s.peft for s in sfile.scenarios}
    assert peft_methods == {"full", "lora", "qlora"}
    assert all((s.batch_size, s.seq_len, s.dtype) == (4, 2048, "bfloat16") for s in sfile.scenarios)
    qlora = {s.name: s for s in sfile.scenarios if s.group == "qlora"}
    assert qlora["qlora-hf"].baseline and qlora["qlora-hf-lean"].prep == "lean"
    assert {s.peer for s in sfile.scenarios} == {"none", "liger"}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"batch_sise": 2}, "unknown key"),
        ({"peft": "qlora4"}, "not one of"),
        ({"steps": 3, "warmup_steps": 3}, "must exceed"),
        ({"gradient_checkpointing": "yes"}, "true or false"),
        ({"collate": "flatten"}, "synthetic data is full-length"),
    ],
)
def test_bad_scenarios_are_refused_with_the_key(tmp_path: Path, patch: dict, message: str) -> None:
    raw = {"name": "x", "group": "g", "model": "m", **patch}
    doc = {"models": {"m": {"config": {"model_type": "llama"}}}, "scenarios": [raw]}
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(benchlib.ScenarioError, match=message):
        benchlib.load_scenarios(path)


def test_unknown_launch_config_is_a_skip_not_a_plain_run() -> None:
    with pytest.raises(run_benchmarks.SkipScenario, match="no launch config named"):
        run_benchmarks.resolve_stack("no-such-stack", "no-such-stack")


def test_inline_stack_and_accelerate_config_written_with_section(tmp_path: Path) -> None:
    body = {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}}
    stack = run_benchmarks.resolve_stack(body, "inline")
    s = benchlib.Scenario(name="x", group="g", model="m", peft="qlora", plugins=body)
    cfg = run_benchmarks.write_accelerate_config(
        s, stack, tmp_path / "a.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
    )
    assert cfg["acceleration"] == body and cfg["mixed_precision"] == "bf16" and cfg["num_processes"] == 1
    cfg_env = run_benchmarks.write_accelerate_config(
        s, stack, tmp_path / "b.yaml", on_cpu=True, entry=run_benchmarks.ENTRY_ENV, extra_base=None
    )
    assert "acceleration" not in cfg_env and cfg_env["use_cpu"] is True and cfg_env["mixed_precision"] == "no"


# ------------------------------------------------------------------------------------------- data
def test_shipped_dataset_is_small_and_long_tailed() -> None:
    assert benchlib.INSTRUCTIONS_JSONL.stat().st_size <= 2 * 1024 * 1024
    lengths = sorted(len(t) for t in benchlib.load_instruction_token_lists(seq_len=4096))
    assert lengths[0] >= 50 and lengths[-1] <= 2001
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert p99 > 5 * median, "the length distribution should be long-tailed"


def test_pad_and_flatten_batches_hold_the_same_tokens() -> None:
    kw = {"name": "x", "group": "g", "model": "m", "dataset": "instructions", "batch_size": 4, "seq_len": 512}
    pad = benchlib.make_batches(benchlib.Scenario(collate="pad", **kw), 8192, 3, rank=0, world=1)
    flat = benchlib.make_batches(benchlib.Scenario(collate="flatten", **kw), 8192, 3, rank=0, world=1)
    for p, f in zip(pad, flat):
        assert p["num_tokens"] == f["num_tokens"] == int(p["attention_mask"].sum())
        assert f["input_ids"].shape == (1, p["num_tokens"])
        assert f["input_ids"][0].tolist() == p["input_ids"][p["attention_mask"].bool()].tolist()
        starts = int((f["position_ids"] == 0).sum())
        assert starts == 4 and int((f["labels"] == -100).sum()) == starts
        assert int((p["labels"] == -100).sum()) == p["input_ids"].numel() - p["num_tokens"]


def test_batches_split_across_ranks_without_overlap() -> None:
    s = benchlib.Scenario(name="x", group="g", model="m", batch_size=2, seq_len=8)
    whole = benchlib.make_batches(s, 100, 4, rank=0, world=1)
    r0 = benchlib.make_batches(s, 100, 2, rank=0, world=2)
    r1 = benchlib.make_batches(s, 100, 2, rank=1, world=2)
    assert [b["input_ids"].tolist() for b in whole] == [b["input_ids"].tolist() for b in (r0[0], r1[0], r0[1], r1[1])]


# ------------------------------------------------------------------------------------------- compare / tables
def _rows(tok_s: float, mem: float, ratio: float, loss_match: str = "yes") -> list[dict[str, str]]:
    common = {"status": "ok", "gpu_name": "NVIDIA H100", "device": "cuda"}
    return [
        {"scenario": "base", "train_tokens_per_s": "1000", "peak_alloc_gib": "10", "throughput_ratio": "1",
         "memory_ratio": "1", "loss_match": "baseline", **common},
        {"scenario": "cand", "train_tokens_per_s": str(tok_s), "peak_alloc_gib": str(mem),
         "throughput_ratio": str(ratio), "memory_ratio": str(mem / 10), "loss_match": loss_match, **common},
    ]  # fmt: skip


def test_compare_flags_slowdown_memory_growth_and_loss_divergence() -> None:
    ref = _rows(1500, 8, 1.5)
    assert not any(f.regression for f in compare.compare_rows(ref, ref, 0.05, 0.05))
    slow = {f.metric for f in compare.compare_rows(_rows(1300, 8, 1.3), ref, 0.05, 0.05) if f.regression}
    assert slow == {"train_tokens_per_s", "throughput_ratio"}
    fat = {f.metric for f in compare.compare_rows(_rows(1500, 9, 1.5), ref, 0.05, 0.05) if f.regression}
    assert fat == {"peak_alloc_gib", "memory_ratio"}
    diverged = {f.metric for f in compare.compare_rows(_rows(1500, 8, 1.5, "no"), ref, 0.05, 0.05) if f.regression}
    assert diverged == {"loss_match"}
    within = compare.compare_rows(_rows(1460, 8.2, 1.46), ref, 0.05, 0.05)
    assert not any(f.regression for f in within)


def test_compare_other_device_checks_only_ratios() -> None:
    ref = _rows(1500, 8, 1.5)
    new = [dict(r, gpu_name="NVIDIA H200") for r in _rows(3000, 12, 1.5)]
    findings = compare.compare_rows(new, ref, 0.05, 0.05)
    assert {f.metric for f in findings if f.scenario == "cand"} == {"throughput_ratio", "memory_ratio"}
    assert [f.metric for f in findings if f.regression] == ["memory_ratio"]


def test_readme_table_is_generated_and_checked(tmp_path: Path) -> None:
    rows = _rows(1500, 8, 1.5)
    for r in rows:
        r.update(group="qlora", plugins="none", peer="none", prep="hf", peft="qlora", date="2026-01-01T00:00:00Z")
    csv_path = tmp_path / "results.csv"
    run_benchmarks.write_csv(rows, csv_path)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n", encoding="utf-8")
    assert run_benchmarks.update_readme(readme, str(csv_path), check=False) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Title") and "| qlora | cand | HF | 1500 | 1.50× | 8.0 | 0.80× | yes |" in text
    assert run_benchmarks.update_readme(readme, None, check=True) == 0  # the marker names its source CSV
    readme.write_text(text.replace("1.50×", "1.70×"), encoding="utf-8")  # a hand-edited number
    assert run_benchmarks.update_readme(readme, None, check=True) == 1
    assert run_benchmarks.update_readme(readme, None, check=False) == 0
    assert readme.read_text(encoding="utf-8") == text


# ------------------------------------------------------------------------------------------- end to end
def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_runner_end_to_end_on_cpu_and_regression_check(tmp_path: Path) -> None:
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(TINY_SCENARIOS, encoding="utf-8")
    out = tmp_path / "out"
    run = _run(["benchmarks/run_benchmarks.py", "run", str(scenarios), "--out", str(out), "--device", "cpu"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == benchlib.CSV_COLUMNS
        rows = list(reader)
    by_name = {r["scenario"]: r for r in rows}
    assert list(by_name) == ["base", "slow", "ddp"]
    assert by_name["ddp"]["status"] == "ok", by_name["ddp"]["note"]
    assert int(by_name["ddp"]["measured_tokens"]) == 2 * 3 * 2 * 32  # counted over both ranks
    assert by_name["ddp"]["num_gpus"] == "2" and by_name["ddp"]["is_baseline"] == "yes"
    for r in (by_name["base"], by_name["slow"]):
        assert r["status"] == "ok", r["note"]
        assert float(r["train_tokens_per_s"]) > 0 and float(r["step_time_s"]) > 0 and float(r["peak_rss_gib"]) > 0
        assert int(r["measured_tokens"]) == 3 * 2 * 32  # 3 timed steps x batch 2 x 32 tokens, no padding
        assert r["device"] == "cpu" and r["torch"] and r["transformers"] and r["peft_version"] and r["date"]
        assert r["command"].startswith(("accelerate launch --config_file", "fms-accelerate launch --config_file"))
    base, slow = by_name["base"], by_name["slow"]
    assert base["is_baseline"] == "yes" and float(base["throughput_ratio"]) == 1.0
    assert float(slow["step_time_s"]) >= 1.5 and float(slow["throughput_ratio"]) < 0.8
    assert slow["loss_match"] == "yes", "same model, data and seed: the loss curves must agree"
    for name in ("throughput_ratio.png", "memory_ratio.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "| base (baseline) | g |" in run.stdout  # the Markdown table is printed
    assert len(json.loads((out / "losses.json").read_text())["slow"]) == 4

    # the regression check: a reference where the scenario ran at full speed vs a new run where it was slowed
    reference, new = tmp_path / "reference.csv", tmp_path / "new.csv"
    run_benchmarks.write_csv([base], reference)
    run_benchmarks.write_csv([dict(slow, scenario="base", is_baseline="yes", throughput_ratio="")], new)
    flagged = _run(["benchmarks/compare.py", str(new), "--reference", str(reference), "--threshold", "0.3"])
    assert flagged.returncode == 1, flagged.stdout
    assert "| base | train_tokens_per_s |" in flagged.stdout and "REGRESSION" in flagged.stdout
    same = _run(["benchmarks/compare.py", str(out / "results.csv"), "--reference", str(out / "results.csv")])
    assert same.returncode == 0, same.stdout


def test_merge_joins_whole_groups_and_refuses_split_groups(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    run_benchmarks.write_csv([dict(r, group="qlora") for r in _rows(1500, 8, 1.5)], a / "results.csv")
    run_benchmarks.write_csv(
        [dict(r, group="lora", scenario="l-" + r["scenario"]) for r in _rows(1200, 8, 1.2)], b / "results.csv"
    )
    assert run_benchmarks.merge_results([a / "results.csv", b / "results.csv"], tmp_path / "m") == 0
    merged = run_benchmarks.read_csv(tmp_path / "m" / "results.csv")
    assert [r["scenario"] for r in merged] == ["base", "cand", "l-base", "l-cand"]
    assert (tmp_path / "m" / "throughput_ratio.png").is_file()
    run_benchmarks.write_csv(
        [dict(r, group="qlora", scenario="x-" + r["scenario"]) for r in _rows(1, 1, 1)], b / "results.csv"
    )
    assert run_benchmarks.merge_results([a / "results.csv", b / "results.csv"], tmp_path / "m2") == 2
