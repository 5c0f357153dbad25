"""DeepSpeed rows of the benchmark runner (``distributed: zero2|zero3``): the Accelerate configs the runner writes
for benchmarks/scenarios-deepspeed.yaml (content, no run), their loss-parity references, and (slow) one ZeRO-3
row and its reference run through the runner on CPU."""

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

DS_FILE = BENCH / "scenarios-deepspeed.yaml"
SHIPPED_SAME_SECTION = {  # shipped DeepSpeed Accelerate config -> acceleration-only name the rows use
    "accelerate-deepspeed-zero2-qlora-foak": "accelerated-peft-bnb-nf4-foak",
    "accelerate-deepspeed-zero3-qlora-foak": "accelerated-peft-bnb-nf4-foak",
    "accelerate-deepspeed-zero2-fast-kernels": "foak-fast-kernels",
    "accelerate-deepspeed-zero3-fast-kernels": "foak-fast-kernels",
}


def _config(s: benchlib.Scenario, tmp_path: Path, on_cpu: bool = False) -> dict:
    stack = run_benchmarks.resolve_stack(s.plugins, s.plugins_label)
    return run_benchmarks.write_accelerate_config(
        s, stack, tmp_path / f"{s.name}.yaml", on_cpu=on_cpu, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
    )


def test_deepspeed_rows_measure_the_shipped_deepspeed_sections() -> None:
    """The stacks of the DeepSpeed rows carry exactly the acceleration section of the shipped DeepSpeed configs."""
    sfile = benchlib.load_scenarios(DS_FILE)
    used = {s.plugins for s in sfile.scenarios if s.uses_plugins}
    assert used == {"foak-fast-lora", "accelerated-peft-bnb-nf4-foak", "foak-fast-kernels"}
    for shipped, same_as in SHIPPED_SAME_SECTION.items():
        shipped_stack = run_benchmarks.resolve_stack(shipped, shipped)
        assert shipped_stack.body == run_benchmarks.resolve_stack(same_as, same_as).body, shipped
        assert shipped_stack.accelerate_base["distributed_type"] == "DEEPSPEED"


def test_generated_configs_of_zero2_and_zero3_rows(tmp_path: Path) -> None:
    """Every DeepSpeed row: DEEPSPEED + the stage's inline deepspeed_config + bf16; the HF row and our stack of one
    stage differ only in the acceleration section; the shipped configs' DeepSpeed keys agree."""
    sfile = benchlib.load_scenarios(DS_FILE)
    configs = {s.name: _config(s, tmp_path) for s in sfile.scenarios}
    for s in sfile.scenarios:
        cfg = configs[s.name]
        assert cfg["num_processes"] == 1 and cfg["use_cpu"] is False
        assert cfg["mixed_precision"] == "bf16", s.name
        assert ("acceleration" in cfg) == s.uses_plugins, s.name
        if s.distributed == "ddp":  # the parity references: the same stacks without DeepSpeed
            assert cfg["distributed_type"] == "NO" and "deepspeed_config" not in cfg, s.name
            continue
        stage = {"zero2": 2, "zero3": 3}[s.distributed]
        ds = cfg["deepspeed_config"]
        assert cfg["distributed_type"] == "DEEPSPEED", s.name
        expected = {
            "zero_stage": stage,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
        }
        if stage == 3:
            expected.update(zero3_init_flag=True, zero3_save_16bit_model=True)
        assert ds == expected, s.name
        assert "optimizer" not in ds and "scheduler" not in ds  # the torch AdamW is DeepSpeed's client optimizer
        # the shipped configs of that stage set the same DeepSpeed keys
        for shipped in SHIPPED_SAME_SECTION:
            if f"zero{stage}" in shipped:
                base = run_benchmarks.resolve_stack(shipped, shipped).accelerate_base
                assert base["deepspeed_config"] == ds and base["mixed_precision"] == "bf16", shipped
    for stage in ("zero2", "zero3"):
        for method in ("lora", "qlora", "full"):
            hf, ours = configs[f"{method}-hf-{stage}"], configs[f"{method}-foak-{stage}"]
            strip = ("acceleration", "main_process_port")
            assert {k: v for k, v in hf.items() if k not in strip} == {
                k: v for k, v in ours.items() if k not in strip
            }, (method, stage)
    written = (tmp_path / "qlora-foak-zero3.yaml").read_text(encoding="utf-8")
    assert "distributed_type: DEEPSPEED" in written and "zero3_init_flag: true" in written


def test_deepspeed_rows_on_cpu_keep_deepspeed_and_conflicting_stacks_are_refused(tmp_path: Path) -> None:
    s = benchlib.Scenario(name="x", group="g", model="m", distributed="zero3", dtype="float32")
    cpu = _config(s, tmp_path, on_cpu=True)
    # DeepSpeed's CPU accelerator: Accelerate must not be told use_cpu (that turns DeepSpeed off)
    assert cpu["distributed_type"] == "DEEPSPEED" and cpu["use_cpu"] is False and cpu["mixed_precision"] == "no"
    assert cpu["deepspeed_config"]["gradient_clipping"] == 0.0  # max_grad_norm's default: no clipping
    for shipped, message in (
        ("accelerate-deepspeed-zero2-qlora-foak", "DEEPSPEED ZeRO-2 but the scenario says distributed: zero3"),
        ("accelerate-fsdp2-qlora-foak", "FSDP but the scenario says distributed: zero3"),
    ):
        stack = run_benchmarks.resolve_stack(shipped, shipped)
        with pytest.raises(benchlib.ScenarioError, match=message):
            run_benchmarks.write_accelerate_config(
                s, stack, tmp_path / "bad.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
            )
    plain = benchlib.Scenario(name="y", group="g", model="m")
    stack = run_benchmarks.resolve_stack("accelerate-deepspeed-zero3-qlora-foak", "z3")
    with pytest.raises(benchlib.ScenarioError, match="distributed: ddp"):
        run_benchmarks.write_accelerate_config(
            plain, stack, tmp_path / "bad2.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
        )
    # the shipped ZeRO-3 file on a zero3 row: accepted, its DeepSpeed keys equal the runner's
    same = run_benchmarks.write_accelerate_config(
        benchlib.Scenario(name="z", group="g", model="m", distributed="zero3", max_grad_norm=1.0), stack,
        tmp_path / "ok.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None,
    )  # fmt: skip
    assert same["num_processes"] == 1 and same["deepspeed_config"]["zero_stage"] == 3
    with pytest.raises(benchlib.ScenarioError, match="max_grad_norm must be >= 0"):
        benchlib.make_scenario({"name": "n", "group": "g", "model": "m", "max_grad_norm": -1.0}, {}, "here")


def test_every_deepspeed_row_of_our_stacks_has_its_reference_without_deepspeed() -> None:
    """Priority order (ZeRO-3, the references, ZeRO-2), >= 20 steps, and each DeepSpeed row of our stacks finds the
    same stack without DeepSpeed as its loss-parity reference (not another DeepSpeed row)."""
    sfile = benchlib.load_scenarios(DS_FILE)
    names = [s.name for s in sfile.scenarios]
    order = [s.distributed for s in sfile.scenarios]
    assert order == ["zero3"] * 6 + ["ddp"] * 3 + ["zero2"] * 6
    assert names[:2] == ["lora-hf-zero3", "lora-foak-zero3"]
    assert all(s.steps >= 20 and s.steps - s.warmup_steps >= 20 and s.max_grad_norm == 1.0 for s in sfile.scenarios)
    assert all(s.prep == "lean" for s in sfile.scenarios if s.peft == "qlora" and not s.uses_plugins)
    rows = [{**run_benchmarks.base_row(s, sfile), "status": "ok"} for s in sfile.scenarios]
    by_name = {r["scenario"]: r for r in rows}
    for row in rows:
        ref = run_benchmarks.scaling_reference(row, rows)
        if row["distributed"] == "ddp":
            assert ref is None
        elif row["plugins"] == "none":  # the HF rows: no run of theirs without DeepSpeed in this file
            assert ref is None, row["scenario"]
        else:
            assert ref is by_name[row["scenario"].rsplit("-", 1)[0]], row["scenario"]
    assert run_benchmarks.is_multi_gpu(by_name["lora-foak-zero2"]) and not run_benchmarks.is_multi_gpu(
        by_name["lora-foak"]
    )


def _run_tiny_rows(out: Path, names: list[str], settings: list[str]) -> dict[str, dict[str, str]]:
    """Run rows ``names`` of the DeepSpeed file on CPU through the runner into ``out`` (tiny Llama, batch 1 x 32,
    one warm-up step, plus ``settings``) and return the results CSV's rows by scenario name."""
    cmd = [
        sys.executable, str(BENCH / "run_benchmarks.py"), "run", str(DS_FILE), "--device", "cpu", "--out", str(out),
        "--only", *names, "--set", "seq_len=32", "batch_size=1", "warmup_steps=1", *settings,
        "--model-set", "hidden_size=32", "intermediate_size=64", "num_hidden_layers=1", "num_attention_heads=2",
        "num_key_value_heads=1", "vocab_size=8192",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {r["scenario"]: r for r in csv.DictReader((out / "results.csv").open(encoding="utf-8"))}


@pytest.mark.slow
@pytest.mark.extended  # the two-process ZeRO-3 runner row (test_benchmark_multiproc_cpu.py) covers this path
def test_zero3_row_follows_its_run_without_deepspeed_through_the_runner(tmp_path: Path) -> None:
    """A tiny LoRA + fused-ops row under ZeRO-3 (DeepSpeed's CPU accelerator) and the same stack without DeepSpeed,
    through the runner and stock ``accelerate launch``: both train, and the parity columns say they agree."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    rows = _run_tiny_rows(out, ["lora-foak-zero3", "lora-foak"], ["dtype=float32", "steps=4"])
    z3 = rows["lora-foak-zero3"]
    assert z3["status"] == "ok" and rows["lora-foak"]["status"] == "ok", rows
    assert z3["deepspeed"] and z3["active_plugins"] == "fused_ops_and_kernels"
    assert z3["scaling_reference"] == "lora-foak" and z3["loss_vs_1gpu_match"] == "yes"
    assert float(z3["loss_vs_1gpu_max_rel_diff"]) < 1e-4
    losses = json.loads((out / "losses.json").read_text(encoding="utf-8"))
    mine, ref = losses["lora-foak-zero3"], losses["lora-foak"]
    assert len(mine) == len(ref) == 4 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(mine, ref))
    assert len(set(ref)) == 4  # the loss moves: batches differ step by step and the adapters train
    log = (out / "logs" / "lora-foak-zero3.log").read_text(encoding="utf-8")
    assert "deepspeed: version" in log and "zero_stage 3" in log and "gradient_clipping 1.0" in log


def test_full_ft_reference_trains_fp32_master_weights_under_bf16_autocast(tmp_path: Path) -> None:
    """The full-FT parity reference without DeepSpeed keeps float32 master weights as DeepSpeed's bf16 mode does
    (``master_weights: float32``: float32 weights, Accelerate mixed_precision bf16); the key's bad uses are errors."""
    import dataclasses

    import train_bench

    sfile = benchlib.load_scenarios(DS_FILE)
    by_name = {s.name: s for s in sfile.scenarios}
    assert [s.name for s in sfile.scenarios if s.master_weights == "float32"] == ["full-foak"]
    ref = by_name["full-foak"]
    assert ref.dtype == "bfloat16" and ref.distributed == "ddp" and ref.learning_rate == 1.0e-5
    assert by_name["full-foak-zero3"].loss_rtol == by_name["full-foak-zero2"].loss_rtol == 0.02
    assert _config(ref, tmp_path)["mixed_precision"] == "bf16"
    # on CPU too: torch's CPU bf16 autocast (other rows train in their dtype there); plain float32 for the dry run
    assert _config(ref, tmp_path, on_cpu=True)["mixed_precision"] == "bf16"
    assert _config(dataclasses.replace(ref, dtype="float32"), tmp_path, on_cpu=True)["mixed_precision"] == "no"
    with pytest.raises(benchlib.ScenarioError, match="no float16 autocast on CPU"):
        _config(dataclasses.replace(ref, dtype="float16"), tmp_path, on_cpu=True)
    # train_bench.py gets the key and reads it back
    argv = run_benchmarks.train_args_for(ref)
    assert argv[argv.index("--master-weights") + 1] == "float32"
    parsed = train_bench.build_parser().parse_args([*argv, "--model-dir", "m", "--result-json", "r.json"])
    assert train_bench.scenario_from_args(parsed).master_weights == "float32"
    assert run_benchmarks.base_row(ref, sfile)["master_weights"] == "float32"

    base = {"name": "n", "group": "g", "model": "m", "peft": "full"}
    for extra, message in (
        ({"master_weights": "fp32"}, "master_weights='fp32' is not one of dtype, float32"),
        ({"master_weights": "float32", "peft": "qlora"}, "needs peft: full or lora"),
        ({"master_weights": "float32", "distributed": "zero3"}, "DeepSpeed's bf16 mode keeps float32 master weights"),
    ):
        with pytest.raises(benchlib.ScenarioError, match=message):
            benchlib.make_scenario({**base, **extra}, {}, "here")
    # a stack whose Accelerate config pins another mixed precision would silently train without autocast
    lora = benchlib.make_scenario(
        {**base, "peft": "lora", "master_weights": "float32", "distributed": "fsdp1"}, {}, "x"
    )
    pinned = run_benchmarks.resolve_stack("accelerate-fsdp1-qlora-foak", "fsdp1")
    with pytest.raises(benchlib.ScenarioError, match="pins mixed_precision: no"):
        run_benchmarks.write_accelerate_config(
            lora, pinned, tmp_path / "bad.yaml", on_cpu=False, entry=run_benchmarks.ENTRY_SECTION, extra_base=None
        )


@pytest.mark.slow
@pytest.mark.extended  # full fine-tuning under ZeRO-3 against its run without DeepSpeed: test_deepspeed_cpu.py
def test_full_ft_zero3_row_follows_its_fp32_master_weights_reference_on_cpu(tmp_path: Path) -> None:
    """bf16 on CPU: the ZeRO-3 full fine-tuning row (bf16 weights, DeepSpeed's float32 partitions) and its reference
    without DeepSpeed (float32 weights under CPU bf16 autocast), both with the fused-ops kernels, through the runner:
    the parity columns say they agree step by step."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    rows = _run_tiny_rows(out, ["full-foak-zero3", "full-foak"], ["dtype=bfloat16", "steps=6", "learning_rate=1.0e-4"])
    z3, ref = rows["full-foak-zero3"], rows["full-foak"]
    assert z3["status"] == "ok" and ref["status"] == "ok", rows
    assert ref["master_weights"] == "float32" and z3["master_weights"] == "dtype"
    assert z3["scaling_reference"] == "full-foak" and z3["loss_vs_1gpu_match"] == "yes"
    assert float(z3["loss_vs_1gpu_max_rel_diff"]) < 1e-3
    log = (out / "logs" / "full-foak.log").read_text(encoding="utf-8")
    assert "master weights: float32" in log and "autocast bf16 (cpu)" in log
    losses = json.loads((out / "losses.json").read_text(encoding="utf-8"))
    assert len(set(losses["full-foak"])) == 6  # it trains
