"""GPTQ rows of the benchmark harness: ``gptq_of`` models (a GPTQ checkpoint written by ``fms-accelerate
quantize`` from a random-init model of the scenarios file), the GPTQ scenario file at the reference shape, and
the GPTQ rows of scenarios-cpu.yaml run end to end on CPU (quantize, then train through ``accelerate launch``)."""

from __future__ import annotations

import argparse
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

GPTQ_SECTION = {"kernel": "triton_v2", "from_quantized": True}


def _models(**extra: object) -> dict:
    return {"base": {"config": {"model_type": "llama", "num_hidden_layers": 2}}, **extra}


# ------------------------------------------------------------------------------------------- model specs
def test_gptq_of_resolves_to_the_parent_config_with_defaults() -> None:
    specs = benchlib.resolve_model_specs(
        _models(q={"gptq_of": {"model": "base", "group_size": 32}}, half={"layers_of": {"model": "base",
                "num_hidden_layers": 1}}, qhalf={"gptq_of": {"model": "half"}}),
        "f.yaml",
    )  # fmt: skip
    q = specs["q"]
    assert q["config"] == {"model_type": "llama", "num_hidden_layers": 2} and q["quantized_from"] == "base"
    assert q["gptq"] == {**benchlib.GPTQ_DEFAULTS, "group_size": 32}
    assert q["gptq"]["method"] == "rtn" and q["gptq"]["bits"] == 4
    assert benchlib.model_layers(q) == 2
    assert benchlib.model_spec_summary(q) == "llama L2 gptq 4b g32 sym rtn"
    assert specs["qhalf"]["quantized_from"] == "half" and benchlib.model_layers(specs["qhalf"]) == 1
    act = benchlib.resolve_model_specs(
        _models(q={"gptq_of": {"model": "base", "method": "gptq", "desc_act": True, "checkpoint_format": "gptq_v2",
                               "group_size": -1, "sym": False}}), "f"
    )["q"]  # fmt: skip
    assert benchlib.gptq_label(act["gptq"]) == "gptq 4b g-1 asym gptq act-order v2"


@pytest.mark.parametrize(
    ("gptq_of", "message"),
    [
        ({"model": "nope"}, r"\.model must name a random-init"),
        ({"model": "p"}, r"\.model must name a random-init"),  # a local path model
        ({"model": "q0"}, r"\.model must name a random-init"),  # another GPTQ model
        ({"model": "base", "bitz": 4}, "unknown setting"),
        ({"model": "base", "bits": 3}, r"bits=3 is not one of 2, 4, 8"),
        ({"model": "base", "group_size": "128"}, "group_size must be an integer"),
        ({"model": "base", "group_size": 0}, "positive divisor"),
        ({"model": "base", "desc_act": "yes"}, "desc_act must be true or false"),
        ({"model": "base", "desc_act": True}, "desc_act .* needs method: gptq"),
        ({"model": "base", "method": "awq"}, "method='awq' is not one of"),
        ({"model": "base", "num_samples": 0}, "num_samples must be >= 1"),
    ],
)
def test_bad_gptq_of_is_refused_naming_the_key(gptq_of: dict, message: str) -> None:
    raw = _models(p={"path": "/some/dir"}, q0={"gptq_of": {"model": "base"}}, bad={"gptq_of": gptq_of})
    with pytest.raises(benchlib.ScenarioError, match=f"model 'bad': gptq_of.*{message}"):
        benchlib.resolve_model_specs(raw, "f.yaml")


def test_layers_of_a_gptq_model_is_refused() -> None:
    raw = _models(q={"gptq_of": {"model": "base"}}, q1={"layers_of": {"model": "q", "num_hidden_layers": 1}})
    with pytest.raises(benchlib.ScenarioError, match=r"layers_of\.model must name a random-init"):
        benchlib.resolve_model_specs(raw, "f.yaml")


@pytest.mark.parametrize(
    "row",
    [
        {"peft": "qlora"},  # no stack: nothing would load the GPTQ checkpoint
        {"peft": "lora", "plugins": {"peft": {"quantization": {"auto_gptq": GPTQ_SECTION}}}},
        {"peft": "qlora", "peer": "liger", "plugins": {"peft": {"quantization": {"auto_gptq": GPTQ_SECTION}}}},
    ],
)
def test_rows_on_a_gptq_model_need_a_qlora_plugin_stack(tmp_path: Path, row: dict) -> None:
    doc = {
        "models": _models(q={"gptq_of": {"model": "base"}}),
        "scenarios": [{"name": "x", "group": "g", "model": "q", **row}],
    }
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(benchlib.ScenarioError, match="is a GPTQ checkpoint, which only a plugin stack loads"):
        benchlib.load_scenarios(path)


def _runner(tmp_path: Path, doc: dict) -> run_benchmarks.Runner:
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(doc), encoding="utf-8")
    sfile = benchlib.load_scenarios(path)
    args = run_benchmarks.build_parser().parse_args(
        ["run", str(path), "--device", "cpu", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]
    )
    assert isinstance(args, argparse.Namespace)
    return run_benchmarks.Runner(sfile, list(sfile.scenarios), args)


def test_gptq_model_and_stack_must_go_together_before_any_build(tmp_path: Path) -> None:
    """A GPTQ model under a stack without the GPTQ loader, or the GPTQ loader on a plain model: refused before
    any model is built or quantized (a failed row naming the fix, not a crash in the worker)."""
    gptq_stack = {"peft": {"quantization": {"auto_gptq": GPTQ_SECTION}}}
    runner = _runner(
        tmp_path,
        {
            "models": _models(q={"gptq_of": {"model": "base"}}),
            "scenarios": [
                {"name": "no-loader", "group": "g", "model": "q", "peft": "qlora", "plugins": "foak-fast-kernels"},
                {"name": "plain-model", "group": "g", "model": "base", "peft": "lora", "plugins": gptq_stack},
            ],
        },
    )
    no_loader, plain = runner.scenarios
    with pytest.raises(benchlib.ScenarioError, match=r"no peft\.quantization\.auto_gptq section"):
        runner.prepare(no_loader)
    with pytest.raises(benchlib.ScenarioError, match="is not one; use a model with gptq_of"):
        runner.prepare(plain)
    assert not (tmp_path / "w" / "models").exists()  # nothing built


def test_a_failing_quantizer_fails_the_row_with_its_message(tmp_path: Path) -> None:
    runner = _runner(
        tmp_path,
        {
            "models": _models(q={"gptq_of": {"model": "base"}}),
            "scenarios": [{"name": "x", "group": "g", "model": "q", "peft": "qlora",
                           "plugins": {"peft": {"quantization": {"auto_gptq": GPTQ_SECTION}}}}],
        },
    )  # fmt: skip
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(RuntimeError, match=r"quantizing model 'q' failed \(exit 2, logs/quantize-q\.log\): error: .*"
                       "has no config.json"):  # fmt: skip
        runner.quantize_model("q", runner.sfile.models["q"], not_a_model, tmp_path / "w" / "q")
    log = (tmp_path / "out" / "logs" / "quantize-q.log").read_text(encoding="utf-8")
    assert log.startswith("fms-accelerate quantize ") and "--method rtn --sym" in log and "--device cpu" in log


# ------------------------------------------------------------------------------------------- scenario files
def test_gptq_scenario_file_is_the_reference_shape_in_priority_order() -> None:
    sfile = benchlib.load_scenarios(BENCH / "scenarios-gptq.yaml")
    config = sfile.models["llama3-8b-shape-8l"]["config"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (4096, 14336, 32)
    assert (config["num_key_value_heads"], config["vocab_size"], config["num_hidden_layers"]) == (8, 128256, 8)
    gptq_model = sfile.models["llama3-8b-shape-8l-gptq"]
    assert gptq_model["quantized_from"] == "llama3-8b-shape-8l" and gptq_model["config"] == config
    assert {k: gptq_model["gptq"][k] for k in ("bits", "group_size", "desc_act", "method")} == {
        "bits": 4, "group_size": 128, "desc_act": False, "method": "rtn"
    }  # fmt: skip
    for s in sfile.scenarios:
        assert (s.batch_size, s.seq_len, s.lora_r, s.gradient_checkpointing) == (4, 2048, 16, True), s.name
        assert s.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj") and s.group == "qlora"
    core = [s.name for s in sfile.select([], [])]
    assert core[:4] == ["qlora-hf", "qlora-bnb-foak-flce", "gptq-lora-foak-flce", "gptq-lora"]
    assert sfile.baselines == {"qlora": "qlora-hf"}
    by_name = {s.name: s for s in sfile.scenarios}
    assert by_name["qlora-hf"].dtype == "bfloat16" and not by_name["qlora-hf"].uses_plugins
    assert {by_name[n].dtype for n in core[4:]} == {"float16"}
    # the bnb stack is the one of the core GPU matrix, and the GPTQ stack runs the same kernels on GPTQ bases
    core_matrix = {s.name: s for s in benchlib.load_scenarios(BENCH / "scenarios.yaml").scenarios}
    bnb = run_benchmarks.resolve_stack(by_name["qlora-bnb-foak-flce"].plugins, "bnb").body
    assert bnb == run_benchmarks.resolve_stack(core_matrix["qlora-bnb-foak-flce"].plugins, "core").body
    gptq = run_benchmarks.resolve_stack(by_name["gptq-lora-foak-flce"].plugins, "gptq").body["peft"]["quantization"]
    bnb_kernels = bnb["peft"]["quantization"]["fused_ops_and_kernels"]
    assert gptq["fused_ops_and_kernels"] == {**bnb_kernels, "base_layer": "auto_gptq"}
    assert gptq["auto_gptq"]["kernel"] == "triton_v2" and gptq["auto_gptq"]["from_quantized"] is True
    for name in core[2:]:
        stack = run_benchmarks.resolve_stack(by_name[name].plugins, name)
        assert by_name[name].model == "llama3-8b-shape-8l-gptq"
        assert run_benchmarks.check_stack_activates(stack)[0] == "auto_gptq", name


def test_cpu_scenario_file_has_gptq_rows() -> None:
    sfile = benchlib.load_scenarios(BENCH / "scenarios-cpu.yaml")
    rows = {s.name: s for s in sfile.scenarios if "gptq" in sfile.models[s.model]}
    assert set(rows) == {"gptq-lora", "gptq-lora-fused-ops"}
    assert all(s.group == "qlora" for s in rows.values()) and sfile.baselines["qlora"] == "qlora-hf"


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_gptq_rows_quantize_once_and_train_on_cpu(tmp_path: Path) -> None:
    """The GPTQ rows of scenarios-cpu.yaml with their HF QLoRA baseline: the runner builds the random-init model,
    writes its GPTQ checkpoint once with `fms-accelerate quantize`, and both GPTQ rows load it through the GPTQ
    plugin (one with the fused kernels patched) and train with the baseline's loss curve."""
    out, work = tmp_path / "out", tmp_path / "work"
    rows_run = ["qlora-hf", "gptq-lora", "gptq-lora-fused-ops"]
    # the kernels' pure-torch references (fast); their Triton bodies are checked in the interpreter by the
    # kernel tests
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "benchmarks/run_benchmarks.py", "run", "benchmarks/scenarios-cpu.yaml", "--only", *rows_run,
         "--device", "cpu", "--out", str(out), "--work-dir", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("[bench] quantizing model tiny-llama-gptq") == 1
    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        rows = {r["scenario"]: r for r in csv.DictReader(handle)}
    assert list(rows) == rows_run
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["note"])
    base, alone, fused = rows["qlora-hf"], rows["gptq-lora"], rows["gptq-lora-fused-ops"]
    assert base["is_baseline"] == "yes" and base["model"].startswith("tiny-llama (")
    for row in (alone, fused):
        assert row["model"] == "tiny-llama-gptq (llama h64 i176 L2 v8192 gptq 4b g16 sym rtn)"
        assert row["entry"] == "accelerate launch: acceleration section"
        assert float(row["throughput_ratio"]) > 0 and row["loss_match"] == "yes", row["loss_max_rel_diff"]
    assert alone["active_plugins"] == "auto_gptq" and alone["patches"] == "0"
    assert fused["active_plugins"] == "auto_gptq+fused_ops_and_kernels" and int(fused["patches"]) > 0
    log = (out / "logs" / "gptq-lora-fused-ops.log").read_text(encoding="utf-8")
    assert "kernels.lora_qkv [gptq]" in log and "kernels.lora_mlp_swiglu [gptq]" in log  # fused over GPTQ bases
    losses = json.loads((out / "losses.json").read_text(encoding="utf-8"))
    assert len(losses["gptq-lora"]) == 6 and losses["gptq-lora"][-1] < losses["gptq-lora"][0]
    # the checkpoint the rows trained on: a standard GPTQ checkpoint written by the project's quantizer
    checkpoint = work / "models" / "tiny-llama-gptq"
    qconfig = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert (qconfig["quant_method"], qconfig["bits"], qconfig["group_size"], qconfig["meta"]["method"]) == (
        "gptq", 4, 16, "rtn"
    )  # fmt: skip
    quantize_log = (out / "logs" / "quantize-tiny-llama-gptq.log").read_text(encoding="utf-8")
    assert quantize_log.startswith("fms-accelerate quantize ") and "--device cpu" in quantize_log
    assert "14 quantized linears in 2 layers" in quantize_log
