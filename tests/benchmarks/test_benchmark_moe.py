"""MoE rows of the benchmark harness: the ``experts_implementation`` and ``lora_target_parameters`` scenario keys,
the MoE scenario file (GraniteMoe-3B and Mixtral shapes, HF grouped_mm the baseline of every group), the CSV
column and labels, and the MoE rows of scenarios-cpu.yaml run end to end on CPU through ``accelerate launch``."""

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
import run_benchmarks  # noqa: E402
import train_bench  # noqa: E402

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
SCATTERMOE = {"training": {"moe": {"scattermoe": {"ep_degree": 1, "routing_stats": True}}}}


def _load(tmp_path: Path, *rows: dict) -> benchlib.ScenarioFile:
    doc = {"models": {"m": {"config": {"model_type": "mixtral"}}}, "scenarios": list(rows)}
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return benchlib.load_scenarios(path)


# ------------------------------------------------------------------------------------------- scenario keys
@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"experts_implementation": "grouped"}, r"experts_implementation='grouped' is not one of eager, grouped_mm"),
        ({"experts_implementation": 1}, "experts_implementation must be a string"),
        ({"peft": "full", "lora_target_parameters": ["experts.down_proj"]}, "lora_target_parameters needs peft: lora"),
        ({"lora_target_parameters": 3}, "lora_target_parameters must be a list of names"),
    ],
)
def test_bad_moe_keys_are_refused_naming_the_key(tmp_path: Path, patch: dict, message: str) -> None:
    with pytest.raises(benchlib.ScenarioError, match=message):
        _load(tmp_path, {"name": "x", "group": "g", "model": "m", **patch})


def test_moe_keys_reach_the_training_script(tmp_path: Path) -> None:
    """The runner passes both keys to train_bench.py only when set, and train_bench.py reads them back."""
    sfile = _load(
        tmp_path,
        {"name": "hf", "group": "g", "model": "m", "experts_implementation": "grouped_mm",
         "lora_target_parameters": list(EXPERTS)},
        {"name": "plain", "group": "g", "model": "m"},
    )  # fmt: skip
    hf, plain = sfile.scenarios
    argv = run_benchmarks.train_args_for(hf)
    assert argv[argv.index("--experts-implementation") + 1] == "grouped_mm"
    at = argv.index("--lora-target-parameters")
    assert tuple(argv[at + 1 : at + 3]) == EXPERTS
    plain_argv = run_benchmarks.train_args_for(plain)
    assert "--experts-implementation" not in plain_argv and "--lora-target-parameters" not in plain_argv
    parsed = train_bench.build_parser().parse_args([*argv, "--model-dir", "d", "--result-json", "r"])
    back = train_bench.scenario_from_args(parsed)
    assert back.experts_implementation == "grouped_mm" and back.lora_target_parameters == EXPERTS
    parsed = train_bench.build_parser().parse_args([*plain_argv, "--model-dir", "d", "--result-json", "r"])
    back = train_bench.scenario_from_args(parsed)
    assert back.experts_implementation is None and back.lora_target_parameters == ()


def test_experts_backend_in_the_row_and_the_stack_label() -> None:
    row = {"plugins": "none", "prep": "hf", "peft": "full", "peer": "none", "experts_implementation": "grouped_mm"}
    assert run_benchmarks.stack_label(row) == "HF grouped_mm"
    assert run_benchmarks.stack_label({**row, "experts_implementation": ""}) == "HF"  # dense models: unchanged
    assert run_benchmarks.stack_label({**row, "plugins": "x", "experts_implementation": "fms_scattermoe"}) == "x"
    assert "experts_implementation" in benchlib.CSV_COLUMNS
    spec = {"config": {"model_type": "granitemoe", "hidden_size": 1536, "num_hidden_layers": 8,
                       "num_local_experts": 40, "num_experts_per_tok": 8}}  # fmt: skip
    assert benchlib.model_spec_summary(spec) == "granitemoe h1536 L8 E40 top8"


def test_readme_table_names_the_model_of_each_group() -> None:
    common = {"status": "ok", "plugins": "none", "prep": "hf", "peer": "none", "peft": "full", "seq_len": "2048",
              "train_tokens_per_s": "100", "date": "2026-01-01T00:00:00Z"}  # fmt: skip
    rows = [
        {**common, "group": "a-full", "scenario": "a1", "model": "granite (g)", "batch_size": "4"},
        {**common, "group": "a-lora", "scenario": "a2", "model": "granite (g)", "batch_size": "4"},
        {**common, "group": "b-full", "scenario": "b1", "model": "mixtral (m)", "batch_size": "2"},
    ]
    intro = run_benchmarks.readme_table(rows, "x.csv").splitlines()[0]
    assert "Models: granite (g), batch 4 × 2048 tokens (groups a-full, a-lora); mixtral (m), batch 2 × 2048 " in intro
    one = run_benchmarks.readme_table(rows[:1], "x.csv").splitlines()[0]
    assert "Model: granite (g); batch 4 × 2048 tokens; ratios are against" in one  # one workload: as before


# ------------------------------------------------------------------------------------------- scenario file
def test_moe_scenario_file_shapes_baselines_and_priority() -> None:
    sfile = benchlib.load_scenarios(BENCH / "scenarios-moe.yaml")
    granite = sfile.models["granitemoe-3b-shape-8l"]["config"]
    mixtral = sfile.models["mixtral-shape-2l"]["config"]
    assert (granite["model_type"], granite["hidden_size"], granite["intermediate_size"]) == ("granitemoe", 1536, 512)
    assert (granite["num_local_experts"], granite["num_experts_per_tok"], granite["num_hidden_layers"]) == (40, 8, 8)
    assert (mixtral["model_type"], mixtral["hidden_size"], mixtral["intermediate_size"]) == ("mixtral", 4096, 14336)
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"], mixtral["num_hidden_layers"]) == (8, 2, 2)
    batch = {"granitemoe-3b-shape-8l": 4, "mixtral-shape-2l": 2}
    for s in sfile.scenarios:
        assert (s.seq_len, s.dtype, s.steps, s.warmup_steps) == (2048, "bfloat16", 12, 3), s.name
        assert (s.dataset, s.collate, s.batch_size) == ("instructions", "pack", batch[s.model]), s.name
        assert s.name.startswith(s.group), s.name  # one model and one method per group
        if s.uses_plugins:
            assert s.experts_implementation is None, s.name
            body = run_benchmarks.resolve_stack(s.plugins, s.plugins_label).body
            assert body["training"]["moe"]["scattermoe"]["ep_degree"] == 1, s.name
        else:
            assert s.name.endswith(f"-hf-{s.experts_implementation}"), s.name
        assert bool(s.lora_target_parameters) == ("lora-experts" in s.group), s.name
        if s.lora_target_parameters:
            assert s.lora_target_parameters == EXPERTS and s.peft == ("qlora" if "qlora" in s.group else "lora")
    groups = {s.group for s in sfile.scenarios}
    qlora = {"granite-qlora-experts"}  # extended rows: QLoRA with the expert stacks in 4-bit (quantize_experts)
    assert groups - qlora == {f"{m}-{p}" for m in ("granite", "mixtral") for p in ("full", "lora", "lora-experts")}
    assert groups & qlora == qlora
    assert all(s.extended for s in sfile.scenarios if s.group in qlora)
    assert sfile.baselines == {g: f"{g}-hf-grouped_mm" for g in groups}  # ratios are against HF grouped_mm
    core = [s.name for s in sfile.select([], [])]
    assert core[:6] == [
        "granite-full-hf-grouped_mm", "granite-full-ours", "mixtral-full-hf-grouped_mm", "mixtral-full-ours",
        "granite-full-hf-eager", "mixtral-full-hf-eager",
    ]  # fmt: skip
    for group in groups - qlora:  # every group's core rows: the baseline and the plugin alone
        assert {f"{group}-hf-grouped_mm", f"{group}-ours"} <= set(core), group
    extended = {s.name for s in sfile.scenarios if s.extended}
    assert "granite-full-hf-batched_mm" in extended and not extended & set(core)
    # the plugin rows run the shipped configuration
    shipped = run_benchmarks.resolve_stack("moe-scattermoe-granite-ep1", "shipped").body
    assert shipped == SCATTERMOE
    assert all(
        s.plugins == "moe-scattermoe-granite-ep1"
        for s in sfile.scenarios
        if s.name.endswith("-ours") and s.group not in qlora
    )


def test_cpu_scenario_file_has_moe_rows() -> None:
    sfile = benchlib.load_scenarios(BENCH / "scenarios-cpu.yaml")
    rows = {s.name: s for s in sfile.scenarios if s.group.startswith("moe-")}
    assert set(rows) == {"moe-full-hf-grouped_mm", "moe-full-hf-eager", "moe-full-ours",
                         "moe-lora-experts-hf-grouped_mm", "moe-lora-experts-ours"}  # fmt: skip
    assert sfile.baselines["moe-full"] == "moe-full-hf-grouped_mm"
    assert sfile.baselines["moe-lora-experts"] == "moe-lora-experts-hf-grouped_mm"
    assert {sfile.models[s.model]["config"]["model_type"] for s in rows.values()} == {"granitemoe", "mixtral"}


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_moe_rows_train_on_cpu_with_the_same_losses(tmp_path: Path) -> None:
    """The MoE rows of scenarios-cpu.yaml through the runner: transformers' grouped_mm and eager experts and the
    plugin (its torch reference on CPU) train the same data to the same losses; the plugin's rows switch the
    experts backend, LoRA on the experts trains the same parameters as HF's."""
    out, work = tmp_path / "out", tmp_path / "work"
    names = ["moe-full-hf-grouped_mm", "moe-full-hf-eager", "moe-full-ours", "moe-lora-experts-hf-grouped_mm",
             "moe-lora-experts-ours"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "benchmarks/run_benchmarks.py", "run", "benchmarks/scenarios-cpu.yaml", "--only", *names,
         "--device", "cpu", "--out", str(out), "--work-dir", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        rows = {r["scenario"]: r for r in csv.DictReader(handle)}
    assert list(rows) == names
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["note"])
        assert row["loss_match"] in ("baseline", "yes") and float(row["loss_max_rel_diff"]) < 1e-4, name
    # +lora_factors: the plugin computed the expert adapters from their factors in its kernels
    assert [rows[n]["experts_implementation"] for n in names] == [
        "grouped_mm", "eager", "fms_scattermoe", "grouped_mm", "fms_scattermoe+lora_factors"
    ]  # fmt: skip
    for name in ("moe-full-ours", "moe-lora-experts-ours"):
        assert rows[name]["active_plugins"] == "scattermoe" and int(rows[name]["patches"]) > 0
    assert rows["moe-full-hf-grouped_mm"]["is_baseline"] == "yes"
    assert rows["moe-full-hf-eager"]["model"] == "tiny-granitemoe (granitemoe h64 i32 L2 v8192 E16 top8)"
    losses = json.loads((out / "losses.json").read_text(encoding="utf-8"))
    assert losses["moe-full-ours"][-1] < losses["moe-full-ours"][0]
    results = {n: json.loads((work / f"{n}.json").read_text(encoding="utf-8")) for n in names}
    lora_hf, lora_ours = results["moe-lora-experts-hf-grouped_mm"], results["moe-lora-experts-ours"]
    attention_only = 2 * (2 * 16 * (64 + 64) + 2 * 16 * (64 + 32))  # r16 on q,o (64->64), k,v (64->32); 2 layers
    assert lora_hf["trainable_params"] == lora_ours["trainable_params"] > attention_only  # the experts' LoRA too
