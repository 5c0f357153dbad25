"""CPU tier of the benchmark harness (benchmarks/): scenario files, data, batching, tables, regression check,
and one end-to-end run of the runner on a tiny model through ``accelerate launch``."""

from __future__ import annotations

import csv
import itertools
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
  - {name: compiled, group: g, peft: lora, compile_layers: true}   # the decoder layer under torch.compile
"""


# ------------------------------------------------------------------------------------------- scenario files
def test_multigpu_matrix_measures_the_shipped_fsdp_configs() -> None:
    """The acceleration-only stacks of scenarios-multigpu.yaml carry exactly the section of the shipped
    Accelerate FSDP configs, so its rows measure what those files run."""
    sfile = benchlib.load_scenarios(BENCH / "scenarios-multigpu.yaml")
    used = {s.plugins for s in sfile.scenarios if isinstance(s.plugins, str) and s.uses_plugins}
    body = {name: run_benchmarks.resolve_stack(name, name).body for name in used}
    for shipped, same_as in (
        ("accelerate-fsdp2-qlora-foak", "accelerated-peft-bnb-nf4-foak"),
        ("accelerate-fsdp2-fast-kernels", "foak-fast-kernels"),
    ):
        assert run_benchmarks.resolve_stack(shipped, shipped).body == body[same_as], shipped
    fsdp1 = next(s for s in sfile.scenarios if s.name == "qlora-foak-fsdp1-x2")
    assert fsdp1.plugins == "accelerate-fsdp1-qlora-foak"  # the shipped FSDP1 file itself (pins mixed precision)
    config = sfile.models["llama70b-shape-8l"]["config"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (8192, 28672, 64)
    assert (config["num_key_value_heads"], config["vocab_size"]) == (8, 128256)
    for depth in (2, 4):  # slices of the one 8-layer checkpoint (built once per call)
        assert sfile.models[f"llama70b-shape-{depth}l"]["derived_from"] == "llama70b-shape-8l"
        assert sfile.models[f"llama70b-shape-{depth}l"]["config"]["num_hidden_layers"] == depth
    multi = [s for s in sfile.scenarios if s.num_gpus > 1]
    assert multi and all(s.distributed in ("fsdp1", "fsdp2") and s.rank_data == "replicate" for s in multi)
    assert sfile.scenarios[0].name == "qlora-foak-fsdp2-x2"  # priority order: the flagship row first
    lora = {s.name: s for s in sfile.scenarios if s.peft == "lora"}
    assert lora["lora-foak-fsdp2-x2"].plugins_label == lora["lora-foak-x1"].plugins_label  # scaling pair


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


def test_core_matrix_selection_leaves_out_extended_rows() -> None:
    sfile = benchlib.load_scenarios(BENCH / "scenarios.yaml")
    core = sfile.select([], [])
    extended = [s for s in sfile.scenarios if s.extended]
    assert extended and all(not s.extended for s in core)
    assert len(core) + len(extended) == len(sfile.scenarios) == len(sfile.select([], [], extended=True))
    # every group keeps its baseline, our best stack and the Liger peer in the core matrix
    for group in ("qlora", "lora", "full"):
        rows = [s for s in core if s.group == group]
        assert sfile.baselines[group] in {s.name for s in rows}
        assert any(s.peer == "liger" for s in rows) and any(s.uses_plugins for s in rows)
    # a group leaves its extended rows out unless asked; a name always selects its row
    assert "full-foak" not in {s.name for s in sfile.select([], ["full"])}
    assert "full-foak" in {s.name for s in sfile.select([], ["full"], extended=True)}
    assert [s.name for s in sfile.select(["full-foak"], [])] == ["full-foak"]
    with pytest.raises(benchlib.ScenarioError, match="no group 'fulll'"):
        sfile.select([], ["fulll"])


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"batch_sise": 2}, "unknown key"),
        ({"extended": "yes"}, "true or false"),
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


def test_readme_with_several_tables_regenerates_each_from_its_own_csv(tmp_path: Path) -> None:
    sources = []
    for name, tok in (("core", 1500), ("gptq", 2100)):
        rows = _rows(tok, 8, 1.5)
        for r in rows:
            r.update(group="qlora", plugins="none", peer="none", prep="hf", peft="qlora", date="2026-01-01T00:00:00Z")
        run_benchmarks.write_csv(rows, tmp_path / f"{name}.csv")
        sources.append(run_benchmarks.render_readme_block(str(tmp_path / f"{name}.csv")))
    readme = tmp_path / "README.md"
    current = f"# Title\n\n{sources[0]}\n\n## More\n\n{sources[1]}\n\ntail\n"
    readme.write_text(current, encoding="utf-8")
    assert run_benchmarks.update_readme(readme, None, check=True) == 0
    assert "| qlora | cand | HF | 2100 |" in current.split("## More")[1]
    stale = current.replace("| qlora | cand | HF | 2100 |", "| qlora | cand | HF | 2200 |")  # the second block only
    readme.write_text(stale, encoding="utf-8")
    assert run_benchmarks.update_readme(readme, None, check=True) == 1
    assert run_benchmarks.update_readme(readme, None, check=False) == 0
    assert readme.read_text(encoding="utf-8") == current


# ------------------------------------------------------------------------------------------- end to end
def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _run_cpu_scenarios(tmp_path: Path, text: str, out: Path) -> tuple[str, list[dict[str, str]]]:
    """Run a scenarios file through the runner on CPU; return its stdout and the CSV rows (header checked)."""
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(text, encoding="utf-8")
    run = _run(["benchmarks/run_benchmarks.py", "run", str(scenarios), "--out", str(out), "--device", "cpu"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == benchlib.CSV_COLUMNS
        return run.stdout, list(reader)


@pytest.mark.slow
def test_runner_end_to_end_on_cpu_and_regression_check(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stdout, rows = _run_cpu_scenarios(tmp_path, TINY_SCENARIOS, out)
    by_name = {r["scenario"]: r for r in rows}
    assert list(by_name) == ["base", "slow", "ddp", "compiled"]
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
    compiled = by_name["compiled"]  # the CSV says how many layers were compiled (the scenario's flag alone: True)
    assert compiled["status"] == "ok" and compiled["compile_layers"] == "1", compiled["note"]
    assert base["compile_layers"] == "False" and compiled["loss_match"] == "yes"
    for name in ("throughput_ratio.png", "memory_ratio.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "| base (baseline) | g |" in stdout  # the Markdown table is printed
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


# ------------------------------------------------------------------------------------------- multi-GPU / FSDP
MULTI_SCENARIOS = """
models:
  micro:
    config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
             num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 256, max_position_embeddings: 128,
             tie_word_embeddings: false}
defaults: {model: micro, dtype: float32, batch_size: 2, seq_len: 32, steps: 4, warmup_steps: 1,
           gradient_checkpointing: true, learning_rate: 0.001, rank_data: replicate, peft: lora}
scenarios:
  - {name: lora-fsdp2-x2, group: fsdp2-x2, num_gpus: 2, distributed: fsdp2}
  - {name: lora-x1, group: x1}
"""


def test_fsdp_rows_get_the_shared_fsdp_config_and_conflicts_are_refused(tmp_path: Path) -> None:
    stack = run_benchmarks.resolve_stack("none", "none")
    s = benchlib.Scenario(name="x", group="g", model="m", num_gpus=2, distributed="fsdp2")
    cfg = run_benchmarks.write_accelerate_config(
        s, stack, tmp_path / "a.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
    )
    assert cfg["distributed_type"] == "FSDP" and cfg["num_processes"] == 2
    assert (
        cfg["fsdp_config"]["fsdp_version"] == 2
        and cfg["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    )
    one = benchlib.Scenario(name="y", group="g", model="m", num_gpus=1, distributed="fsdp1")
    cfg1 = run_benchmarks.write_accelerate_config(
        one, stack, tmp_path / "b.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
    )
    assert cfg1["distributed_type"] == "FSDP" and cfg1["fsdp_config"]["fsdp_use_orig_params"] is True
    on_cpu = run_benchmarks.write_accelerate_config(
        s, stack, tmp_path / "c.yaml", on_cpu=True, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
    )
    assert on_cpu["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in on_cpu  # FSDP via train_bench's seam
    fsdp1_stack = run_benchmarks.resolve_stack("accelerate-fsdp1-qlora-foak", "accelerate-fsdp1-qlora-foak")
    with pytest.raises(benchlib.ScenarioError, match="distributed: fsdp1"):
        run_benchmarks.write_accelerate_config(
            s, fsdp1_stack, tmp_path / "d.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
        )
    fsdp2_stack = run_benchmarks.resolve_stack("accelerate-fsdp2-qlora-foak", "accelerate-fsdp2-qlora-foak")
    merged = run_benchmarks.write_accelerate_config(
        s, fsdp2_stack, tmp_path / "e.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
    )
    assert merged["num_processes"] == 2 and merged["fsdp_config"]["fsdp_version"] == 2 and merged["acceleration"]
    # Accelerate's rank-0 load stays on (as for the HF rows) unless a plugin shards its own FSDP2 units
    assert cfg["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    assert merged["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False
    for name, self_sharding in (
        ("foak-fast-kernels", False),
        ("foak-fast-lora", True),
        ("accelerated-peft-bnb-nf4", True),
    ):
        acc = run_benchmarks.write_accelerate_config(
            s, run_benchmarks.resolve_stack(name, name), tmp_path / f"{name}.yaml", on_cpu=False,
            entry=run_benchmarks.ENTRY_SECTION, extra_base=None,
        )  # fmt: skip
        assert acc["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is not self_sharding, name


def test_scaling_reference_prefers_same_distribution_and_loss_checks() -> None:
    common = {"model": "m", "peft": "lora", "plugins": "none", "prep": "hf", "peer": "none", "batch_size": "4",
              "seq_len": "64", "gradient_checkpointing": "True", "dataset": "synthetic", "collate": "", "dtype": "bf16"}  # fmt: skip
    multi = {"scenario": "x2", "num_gpus": "2", "distributed": "fsdp2", "status": "ok", **common}
    plain = {"scenario": "x1", "num_gpus": "1", "distributed": "ddp", "status": "ok", **common}
    fsdp1 = {"scenario": "x1-fsdp2", "num_gpus": "1", "distributed": "fsdp2", "status": "ok", **common}
    other = {**plain, "scenario": "x1-other", "peft": "qlora"}
    assert run_benchmarks.scaling_reference(multi, [other, plain, multi]) is plain
    assert run_benchmarks.scaling_reference(multi, [plain, fsdp1, multi]) is fsdp1
    assert run_benchmarks.scaling_reference(multi, [other, multi]) is None
    assert run_benchmarks.scaling_reference(plain, [plain, fsdp1]) is None
    assert run_benchmarks.loss_agreement([2.0, 1.5], [2.0, 1.5], True, 0.01) == (0.0, "yes")
    assert run_benchmarks.loss_agreement([2.0, 1.7], [2.0, 1.5], True, 0.01)[1] == "no"
    assert run_benchmarks.loss_agreement([3.0, 2.0, 1.52, 1.48], [2.0, 2.5, 1.5, 1.5], False, 0.01)[1] == "loose-yes"


def test_memory_extrapolation_is_a_labelled_line_fit() -> None:
    s = {n: benchlib.Scenario(name=n, group="fit", model="m", peft="qlora", extrapolate_layers=80) for n in "abc"}
    base = {"group": "fit", "peft": "qlora", "plugins": "none", "prep": "hf", "peer": "none", "distributed": "fsdp2",
            "num_gpus": "2", "batch_size": "1", "seq_len": "2048", "status": "ok", "gpu_mem_gib": "79.2"}  # fmt: skip
    rows = [
        {**base, "scenario": "a", "num_layers": "2", "peak_alloc_gib": "10.0", "model": "m2 (llama h8 L2 v4)"},
        {
            **base,
            "scenario": "b",
            "num_layers": "4",
            "peak_alloc_gib": "11.0",
            "model": "m4 (llama h8 L4 v4)",
            "group": "fit-4l",
        },  # one group per depth is fine: the series is the stack on one model shape
        {**base, "scenario": "c", "num_layers": "4", "plugins": "other", "peak_alloc_gib": "30.0"},
    ]
    run_benchmarks.compute_fits(rows, s)
    a, b, c = rows
    assert a["fit_gib_per_layer"] == pytest.approx(0.5) and b["fit_peak_alloc_gib_extrapolated"] == pytest.approx(49.0)
    assert a["fit_verdict"].startswith(
        "fits (extrapolated from measured 2L 10.0, 4L 11.0 GiB, one line through the peaks: 49.0 GiB at 80 layers"
    )
    assert c["fit_verdict"].startswith("not extrapolated: 1 measured")  # its own series (another stack)
    rows[1]["peak_alloc_gib"] = "12.0"  # 1 GiB per layer -> 88 GiB at 80 layers
    run_benchmarks.compute_fits(rows, s)
    assert rows[0]["fit_verdict"].startswith("does not fit")
    table = run_benchmarks.fit_table(rows)
    assert "EXTRAPOLATION, not a measurement" in table and "88.0 GiB at 80 layers" in table
    assert a["fit_train_peak_alloc_gib_extrapolated"] == ""  # no training-only peak measured
    # the training steps' own peak (loading + prepare apart) gets its own line: 0.25 GiB per layer -> 29.5 GiB
    rows[0]["train_peak_alloc_gib"], rows[1]["train_peak_alloc_gib"] = "10.0", "10.5"
    run_benchmarks.compute_fits(rows, s)
    assert a["fit_train_gib_per_layer"] == pytest.approx(0.25)
    assert b["fit_train_peak_alloc_gib_extrapolated"] == pytest.approx(29.5)
    assert rows[0]["fit_verdict"].startswith("does not fit")  # the verdict stays on the whole run's peak
    assert "29.5 GiB (0.250 per layer)" in run_benchmarks.fit_table(rows)
    # both phases measured, and the dominant one changes within the series (training at 2 layers, loading +
    # preparing at 8): each phase gets its own line, the peak is the larger at the target -- not one line
    # through the maxima (6.0 -> 8.0 GiB would give 32.0 GiB at 80 layers)
    two = [
        {**base, "scenario": "a", "num_layers": "2", "model": "m2 (llama h8 L2 v4)", "peak_alloc_gib": "6.0",
         "prepare_peak_alloc_gib": "5.0", "train_peak_alloc_gib": "6.0"},
        {**base, "scenario": "b", "num_layers": "8", "model": "m8 (llama h8 L8 v4)", "peak_alloc_gib": "8.0",
         "prepare_peak_alloc_gib": "8.0", "train_peak_alloc_gib": "7.2"},
    ]  # fmt: skip
    run_benchmarks.compute_fits(two, s)
    assert two[0]["fit_peak_alloc_gib_extrapolated"] == pytest.approx(44.0)  # 5.0 + 78 x 0.5
    assert two[0]["fit_gib_per_layer"] == pytest.approx(0.5)
    assert two[1]["fit_train_peak_alloc_gib_extrapolated"] == pytest.approx(21.6)  # 6.0 + 78 x 0.2
    assert "the larger of the load + prepare and the training lines: 44.0 GiB" in two[0]["fit_verdict"]


def test_layers_of_models_link_the_parent_checkpoint(tmp_path: Path) -> None:
    raw = {
        "big": {"config": {"model_type": "llama", "num_hidden_layers": 4}},
        "big-2l": {"layers_of": {"model": "big", "num_hidden_layers": 2}},
    }
    specs = benchlib.resolve_model_specs(raw, "f.yaml")
    assert specs["big-2l"] == {"config": {"model_type": "llama", "num_hidden_layers": 2}, "derived_from": "big"}
    assert benchlib.model_layers(specs["big-2l"]) == 2
    with pytest.raises(benchlib.ScenarioError, match="from 1 to the layers"):
        benchlib.resolve_model_specs({**raw, "bad": {"layers_of": {"model": "big", "num_hidden_layers": 5}}}, "f")
    with pytest.raises(benchlib.ScenarioError, match="exactly one of"):
        benchlib.resolve_model_specs({"x": {"config": {}, "path": "p"}}, "f")
    parent = tmp_path / "big"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({"num_hidden_layers": 4}), encoding="utf-8")
    (parent / "model.safetensors").write_bytes(b"weights")
    run_benchmarks.link_truncated_checkpoint(parent, tmp_path / "small", 2)
    assert json.loads((tmp_path / "small" / "config.json").read_text())["num_hidden_layers"] == 2
    assert (tmp_path / "small" / "model.safetensors").is_symlink()
    assert (tmp_path / "small" / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(benchlib.ScenarioError, match="num_hidden_layers=4"):  # more layers than the parent holds
        run_benchmarks.link_truncated_checkpoint(parent, tmp_path / "bigger", 6)


@pytest.mark.slow
def test_fsdp2_gloo_run_through_the_runner(tmp_path: Path) -> None:
    """2 gloo processes, FSDP2 through Accelerate's prepare (CPU seam) vs the same stack in one process."""
    out = tmp_path / "out"
    stdout, table = _run_cpu_scenarios(tmp_path, MULTI_SCENARIOS, out)
    rows = {r["scenario"]: r for r in table}
    multi, single = rows["lora-fsdp2-x2"], rows["lora-x1"]
    assert multi["status"] == "ok" and single["status"] == "ok", (multi["note"], single["note"])
    assert "cpu seam: FSDP2" in multi["entry"] and multi["distributed"] == "fsdp2" and multi["num_gpus"] == "2"
    assert int(multi["allgather_bytes_per_step"]) > 0 and int(multi["reduce_scatter_bytes_per_step"]) > 0
    assert single["allgather_bytes_per_step"] == ""  # one process: nothing to gather
    assert multi["scaling_reference"] == "lora-x1"
    assert float(multi["scaling_efficiency"]) == pytest.approx(
        float(multi["train_tokens_per_s_per_gpu"]) / float(single["train_tokens_per_s"]), rel=1e-2
    )
    assert int(multi["measured_tokens"]) == 2 * int(single["measured_tokens"])  # both ranks, replicated data
    # every rank saw the 1-GPU batches: the sharded run must follow the 1-GPU loss curve
    assert multi["loss_vs_1gpu_match"] == "yes", multi["loss_vs_1gpu_max_rel_diff"]
    for r in (multi, single):
        parts = [p.split()[0] for p in r["wall_breakdown"].split(" | ")]
        assert parts == ["launch", "imports", "late_imports", "accelerator", "load_and_augment", "prepare", "data",
                         "train", "finish", "exit"]  # fmt: skip
    assert "### Multi-GPU" in stdout and "| lora-fsdp2-x2 | HF | fsdp2 | 2 |" in stdout
    assert "wall seconds: launch" in stdout
    assert (out / "scaling_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_flags_multi_gpu_regressions() -> None:
    """Scaling efficiency, collective bytes per step and 1-GPU loss parity of multi-GPU rows."""

    def row(eff: str, gather: str, parity: str) -> dict[str, str]:
        return {
            "scenario": "x2", "status": "ok", "gpu_name": "H100", "throughput_ratio": "1.3", "memory_ratio": "0.6",
            "train_tokens_per_s": "80000", "peak_alloc_gib": "9", "scaling_efficiency": eff,
            "allgather_bytes_per_step": gather, "reduce_scatter_bytes_per_step": "1000",
            "loss_vs_1gpu_match": parity, "loss_vs_1gpu_max_rel_diff": "0.3" if parity == "no" else "0.002",
        }  # fmt: skip

    ref = [row("0.90", "5000000", "yes")]
    assert not any(f.regression for f in compare.compare_rows(ref, ref, 0.05, 0.05))
    flagged = {f.metric for f in compare.compare_rows([row("0.80", "6000000", "no")], ref, 0.05, 0.05) if f.regression}
    assert flagged == {"scaling_efficiency", "allgather_bytes_per_step", "loss_vs_1gpu_match"}
    assert not any(f.regression for f in compare.compare_rows([row("0.88", "5100000", "yes")], ref, 0.05, 0.05))


def test_memory_trace_groups_live_blocks_by_their_innermost_traced_frames() -> None:
    import types

    import train_bench

    def frame(path: str, line: int, name: str) -> dict:
        return {"filename": path, "line": line, "name": name}

    kernel = [frame("/t/torch/nn/functional.py", 1, "linear"), frame("/s/fms_acceleration_x/lora.py", 5, "_base"),
              frame("/s/transformers/modeling_llama.py", 9, "forward"), frame("/b/train_bench.py", 3, "run"),
              frame("/b/train_bench.py", 1, "main")]  # fmt: skip
    snapshot = {"segments": [{"blocks": [
        {"state": "active_allocated", "size": 300, "frames": kernel},
        {"state": "active_allocated", "size": 100, "frames": kernel},
        {"state": "inactive", "size": 10_000, "frames": kernel},  # cached, not live
        {"state": "active_allocated", "size": 7, "frames": [frame("/t/torch/nn/functional.py", 1, "linear")]},
    ]}]}  # fmt: skip
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(memory=types.SimpleNamespace(_snapshot=lambda: snapshot)))
    sites = train_bench.live_cuda_bytes_by_site(fake)
    assert sites[0] == ("lora.py:5 _base <- modeling_llama.py:9 forward <- train_bench.py:3 run", 400)
    assert sites[1][1] == 7 and sites[1][0].startswith("no traced frame")
    assert len(sites) == 2


def test_kernel_profile_summary_categories_and_busy_time() -> None:
    import train_bench

    assert train_bench.kernel_category("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)") == "nccl"
    assert train_bench.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert train_bench.kernel_category("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert train_bench.kernel_category("void at::native::elementwise_kernel<128, 4>(int, Func)") == "other"
    assert train_bench.kernel_category("void at::native::(anonymous namespace)::chunk_cat_cuda_kernel<>") == "copy_cast"
    assert train_bench.kernel_category("_rms_norm_fwd") == "triton"
    events = [  # (name, start us, duration us): NCCL overlapping compute, two overlapping compute kernels
        ("ncclDevKernel_AllGather", 0.0, 100.0),
        ("sm90_xmma_gemm", 10.0, 50.0),
        ("_rms_norm_fwd", 40.0, 40.0),
        ("flash_fwd_kernel<x>", 200.0, 10.0),
    ]
    summary = train_bench.summarize_kernels(events, steps=2, wall_s=0.5)
    assert summary["step_wall_ms"] == 250.0
    # busy = union of the non-NCCL intervals [10, 80] and [200, 210] = 80 us over 2 steps
    assert summary["compute_busy_ms"] == pytest.approx(0.04)
    assert summary["kernel_ms"] == pytest.approx({"nccl": 0.05, "gemm": 0.025, "triton": 0.02, "attention": 0.005})
    assert list(summary["kernel_ms"]) == ["nccl", "gemm", "triton", "attention"]


# ------------------------------------------------------------------------------------------- overlapped start-up
MICRO = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256, "max_position_embeddings": 128,
         "tie_word_embeddings": False}  # fmt: skip
OVERLAP_SCENARIOS = f"""
models:
  micro: {{config: {json.dumps(MICRO)}}}
  micro2: {{config: {json.dumps(dict(MICRO, num_hidden_layers=2))}}}   # built at its row's turn, before its go
defaults: {{model: micro, dtype: float32, batch_size: 2, seq_len: 32, steps: 4, warmup_steps: 1,
           gradient_checkpointing: true, learning_rate: 0.001, peft: lora, rank_data: replicate}}
scenarios:
  - {{name: first, group: g, inject_delay_ms: 1500}}   # trains 6 s: the next row's start-up ends meanwhile
  - {{name: two-ranks, group: g, num_gpus: 2}}         # 2 gloo processes: each waits for the go
  - {{name: broken, group: g3, lora_target_modules: [no_such_module]}}   # fails after its go
  - {{name: built-late, group: g2, model: micro2}}     # still runs
"""


@pytest.mark.slow
def test_overlapped_start_up_trains_only_after_the_previous_row_exited(tmp_path: Path) -> None:
    """--overlap on CPU: every row after the first is launched while the previous one runs, and no process of it
    starts training before every process of the previous row has exited; a row that fails after its go does not
    keep the next from running; a model first needed by a prestarted row is built between the rows."""
    out = tmp_path / "out"
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(OVERLAP_SCENARIOS, encoding="utf-8")
    run = _run(["benchmarks/run_benchmarks.py", "run", str(scenarios), "--out", str(out), "--device", "cpu",
                "--overlap"])  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["scenario"]: r for r in run_benchmarks.read_csv(out / "results.csv")}
    assert rows.pop("broken")["status"] == "failed"
    assert all(r["status"] == "ok" for r in rows.values()), {n: r["note"] for n, r in rows.items()}
    timeline = json.loads((out / "logs" / "timeline.json").read_text(encoding="utf-8"))
    assert [e["scenario"] for e in timeline] == ["first", "two-ranks", "broken", "built-late"]
    assert [e["prestarted"] for e in timeline] == [False, True, True, True]
    for prev, cur in itertools.pairwise(timeline):
        assert cur["launched_at"] < prev["exited_at"], "the start-up did not overlap the previous row"
        assert cur["go_at"] >= prev["exited_at"]
        if cur["scenario"] == "broken":
            assert cur["worker_go_seen"] >= cur["go_at"] and "worker_train_start" not in cur
            continue
        assert len(cur["worker_ranks_go_seen"]) == len(cur["worker_ranks_train_start"])
        assert min(cur["worker_ranks_go_seen"]) >= cur["go_at"]
        assert min(cur["worker_ranks_train_start"]) > prev["exited_at"], (
            f"{cur['scenario']} started training before {prev['scenario']} had exited"
        )
    first, second, broken, late = timeline
    assert second["worker_waiting_from"] < first["exited_at"]  # its imports were done while the first row ran
    assert late["built_model"] and broken["exited_at"] <= late["model_ready_at"] <= late["go_at"]  # built in between
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    for e in (first, second, late):
        assert e["worker_cuda_initialized_at_wait"] is False and e["worker_deferred_modules_loaded_at_wait"] == []
        assert e["worker_nice_while_waiting"] == min(nice + benchlib.START_NICE, 19)
        assert nice <= e["worker_nice_at_train"] <= e["worker_nice_while_waiting"]
    assert all(run_benchmarks.row_processes(e["row"]) == [] for e in timeline)  # every process of every row ended
    parts = [p.split()[0] for p in rows["two-ranks"]["wall_breakdown"].split(" | ")]
    assert parts == ["launch", "imports", "waited", "late_imports", "accelerator", "load_and_augment", "prepare",
                     "data", "train", "finish", "exit"]  # fmt: skip
    assert float(rows["two-ranks"]["wall_breakdown"].split("waited ")[1].split()[0]) > 0
    # the waiting changes nothing that is measured: 2 ranks on the 1-process row's batches follow its losses
    assert rows["two-ranks"]["loss_vs_1gpu_match"] == "yes", rows["two-ranks"]["loss_vs_1gpu_max_rel_diff"]
    assert "two-ranks: prestarted, waits for its go" in run.stdout and "after its go" in run.stdout


@pytest.mark.slow
def test_a_prestarted_row_the_time_budget_leaves_out_is_stopped_and_skipped(tmp_path: Path) -> None:
    model = tmp_path / "micro"  # built beforehand: the budget check then asks for the minimum only
    built = _run(["benchmarks/benchlib.py", "build-model", "--config", json.dumps(MICRO), "--out", str(model),
                  "--dtype", "float32"])  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(
        f"""
models: {{micro: {{path: {model}}}}}
defaults: {{model: micro, dtype: float32, batch_size: 2, seq_len: 32, steps: 4, warmup_steps: 1, peft: lora}}
scenarios:
  - {{name: first, group: g, inject_delay_ms: 2000}}   # over 10 s in all: the budget is then short of the minimum
  - {{name: second, group: g}}
  - {{name: third, group: g}}
""",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    run = _run(["benchmarks/run_benchmarks.py", "run", str(scenarios), "--out", str(out), "--device", "cpu",
                "--overlap", "--time-budget", "40", "--min-scenario-time", "30"])  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["scenario"]: r for r in run_benchmarks.read_csv(out / "results.csv")}
    assert rows["first"]["status"] == "ok", rows["first"]["note"]
    for name in ("second", "third"):
        assert rows[name]["status"] == "skipped" and "time budget (40s) used up" in rows[name]["note"], rows[name]
    timeline = {e["scenario"]: e for e in json.loads((out / "logs" / "timeline.json").read_text(encoding="utf-8"))}
    assert list(timeline) == ["first", "second"]  # the third was never launched
    second = timeline["second"]
    assert second["prestarted"] and second["go_at"] is None and second["cancelled_at"] >= timeline["first"]["exited_at"]
    assert second["launched_at"] < timeline["first"]["exited_at"]
    assert "worker_train_start" not in second  # it never trained (nor wrote a result)
    assert run_benchmarks.row_processes(second["row"]) == []  # every process of it ended
    assert "\nstep " not in (out / "logs" / "second.log").read_text(encoding="utf-8")  # no training step logged


@pytest.mark.slow
def test_imports_before_the_go_leave_out_what_initialises_cuda(tmp_path: Path) -> None:
    """What a waiting process imports (with the start-up hook of a launched worker active) must not import
    bitsandbytes, which initialises CUDA when imported, nor what imports it (peft, TrainingArguments)."""
    section = tmp_path / "section.yaml"
    section.write_text("plugins: {}\n", encoding="utf-8")
    code = (
        f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); import torch, train_bench; "
        "train_bench.import_before_go(); "
        "print(json.dumps([torch.cuda.is_initialized(), [m for m in train_bench.DEFERRED_MODULES if m in sys.modules],"
        " [m for m in ('accelerate', 'transformers.modeling_utils') if m in sys.modules]]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FMS_ACCELERATION_SECTION": str(section)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    initialized, deferred, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert (initialized, deferred, loaded) == (False, [], ["accelerate", "transformers.modeling_utils"])


def test_waiting_for_the_go_sleeps_and_stops_without_a_runner(tmp_path: Path, monkeypatch) -> None:
    import threading
    import time

    import train_bench

    go = tmp_path / "go"
    monkeypatch.setenv(benchlib.RUNNER_PID_ENV, str(os.getpid()))
    monkeypatch.delenv(benchlib.BASE_NICE_ENV, raising=False)
    timer = threading.Timer(0.5, go.touch)
    wall, cpu = time.time(), time.process_time()
    timer.start()
    info = train_bench.wait_for_go(str(go))
    assert 0.5 <= time.time() - wall < 2.0 and info["go_seen"] >= wall + 0.5
    assert time.process_time() - cpu < 0.2  # it slept: a busy wait would have used about 0.5 s of CPU
    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.setenv(benchlib.RUNNER_PID_ENV, str(gone.pid))
    with pytest.raises(SystemExit, match=r"runner \(pid \d+\) is gone"):
        train_bench.wait_for_go(str(tmp_path / "never"))
