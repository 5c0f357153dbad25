"""The client examples run as the README and their docstrings say, with every shipped configuration they claim.

``examples/trl_sft.py`` (TRL's SFTTrainer), ``examples/hf_trainer.py`` (the HF Trainer) and
``examples/accelerate_loop.py`` (a plain Accelerate loop) train the tiny model that ``examples/make_tiny_model.py``
writes, under stock ``accelerate launch`` with the shipped CPU launch configs (1 and 2 processes) and with the
acceleration-only sample files: named by an Accelerate config (``acceleration: <file>``) for the trainer scripts,
passed as ``AccelerationKwargs`` (``--acceleration-config``) for the loop.

The examples know nothing of the tests. A report hook (``scripts/example_report/sitecustomize.py``, on
``PYTHONPATH`` only here) writes one JSON file per process when the script ends its training: the active plugins,
the losses given to ``Accelerator.backward``, what the trained model holds, each patch-table row with the calls
that ran through its replacement, and the loss kernels' call counters. Each run must exit 0 and show what its
configuration asks for: 4-bit layers (and the load routed to the plugin) exactly where a bitsandbytes section is,
LoRA adapters that left zero, every patched kernel called, the loss kernels called (through TRL's fused LM head
under TRL), the patch table printed once, and a falling loss.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import ACCELERATE, REPO, SCRIPTS, free_port, run
from .test_launch import needs_hook

EXAMPLES = REPO / "examples"
CONFIGS = REPO / "launch_configs"
REPORT_HOOK = SCRIPTS / "example_report"
CPU_1PROC = "accelerate-cpu-qlora-foak"
CPU_2PROC = "accelerate-cpu-2proc-qlora-foak"
STEPS = 10
LAYERS = 2  # of the tiny model
PROJECTIONS = (
    7 * LAYERS
)  # q, k, v, o, gate, up, down: what the examples' LoRA targets, and what 4-bit loading quantizes
ROUTED = re.compile(r"fms-acceleration: \w+\.from_pretrained\(.*\) loads through plugin 'bitsandbytes'")
TABLE = "fms-acceleration patches:"
# patch-table rows that are not calls: loading hooks, a recomputation setting, the loss property (counted by the
# loss kernels' own counters)
NOT_CALLS = ("._load_from_state_dict", "._gradient_checkpointing_func", ".loss_function")

# what each shipped configuration asks for
BNB_FOAK = {
    "plugins": ["bitsandbytes", "fused_ops_and_kernels"],
    "four_bit": True,
    "kernels": ["kernels.rms_norm", "kernels.apply_rotary_pos_emb", "kernels.lora_qkv [bnb_4bit]",
                "kernels.lora_mlp_swiglu [bnb_4bit]"],
    "loss": "cross_entropy",
}  # fmt: skip
EXPECTED = {
    CPU_1PROC: {**BNB_FOAK, "processes": 1},
    CPU_2PROC: {**BNB_FOAK, "processes": 2},
    "accelerated-peft-bnb-nf4-foak": BNB_FOAK,
    "accelerated-peft-bnb-nf4": {"plugins": ["bitsandbytes"], "four_bit": True, "kernels": [], "loss": None},
    "foak-fast-kernels": {
        "plugins": ["fused_ops_and_kernels"],
        "four_bit": False,
        "kernels": ["kernels.rms_norm", "kernels.apply_rotary_pos_emb", "kernels.swiglu"],
        "loss": "cross_entropy",
    },
    "foak-fast-lora": {
        "plugins": ["fused_ops_and_kernels"],
        "four_bit": False,
        "kernels": ["kernels.rms_norm", "kernels.apply_rotary_pos_emb", "kernels.lora_qkv [dense]",
                    "kernels.lora_mlp_swiglu [dense]"],
        "loss": "fused_linear",
    },
}  # fmt: skip


def shipped(name: str) -> Path:
    """The shipped file of a configuration name (an Accelerate config, or an acceleration-only sample file)."""
    path = CONFIGS / f"{name}.yaml"
    return path if path.exists() else CONFIGS / f"{name}-sample-configuration.yaml"


def naming_config(folder: Path, name: str) -> Path:
    """An Accelerate config for one CPU process whose ``acceleration:`` names the shipped acceleration-only file, as
    the README shows: the Accelerate settings of the shipped 1-process CPU config, and the file's path relative to
    the config's folder (which is not the folder the launch runs in)."""
    settings = yaml.safe_load(shipped(CPU_1PROC).read_text(encoding="utf-8"))
    configs = folder / "configs"
    configs.mkdir(exist_ok=True)
    settings["acceleration"] = os.path.relpath(shipped(name), configs)
    path = configs / f"{name}-cpu.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    reports: list[dict]
    seconds: float

    def failure(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-5000:]}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The README's first step: ``python examples/make_tiny_model.py DIR``."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = run([sys.executable, str(EXAMPLES / "make_tiny_model.py"), str(folder)], env, folder.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    return folder


@pytest.fixture
def example_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment (no section inherited, no launcher variables), plus the report hook."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
                "TRITON_INTERPRET", "ACCELERATION_FRAMEWORK_CONFIG_FILE"):  # fmt: skip
        env.pop(key, None)
    reports = tmp_path / "reports"
    reports.mkdir()
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPORT_HOOK), EXAMPLE_REPORT_DIR=str(reports))
    return env


def run_example(command: list[str], env: dict[str, str], cwd: Path) -> Run:
    start = time.perf_counter()
    done = run(command, env, cwd, timeout=240)
    seconds = time.perf_counter() - start
    folder = Path(env["EXAMPLE_REPORT_DIR"])
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    print(f"{seconds:5.1f}s  {' '.join(Path(c).name if os.sep in c else c for c in command[:8])} ...")
    return Run(done.returncode, done.stdout, done.stderr, reports, seconds)


def launch(example: str, config: Path, model: Path, tmp_path: Path, env: dict[str, str], *extra: str) -> Run:
    """``accelerate launch --config_file CONFIG examples/EXAMPLE --model MODEL ...`` on a free port."""
    command = [ACCELERATE, "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
               str(EXAMPLES / example), "--model", str(model), "--steps", str(STEPS), *extra]  # fmt: skip
    if example != "accelerate_loop.py":
        command += ["--output-dir", str(tmp_path / "out")]
    return run_example(command, env, tmp_path)


def check_run(result: Run, name: str, *, trl: bool = False, lora: bool = True) -> None:
    """What configuration ``name`` asks for happened, in every process."""
    assert result.returncode == 0, result.failure()
    expected = EXPECTED[name]
    processes = expected.get("processes", 1)
    assert len(result.reports) == processes, result.failure()
    out = result.stdout

    # loading: through the bitsandbytes plugin exactly where the configuration has it (one line, rank 0)
    assert len(ROUTED.findall(out)) == (1 if expected["four_bit"] else 0), out[-3000:]
    # the patch table once, after the model's prepare
    assert out.count(TABLE) == 1, out[-3000:]

    for report in result.reports:
        assert report["world"] == processes
        assert report["plugins"] == expected["plugins"]
        model = report["model"]
        if expected["four_bit"]:
            assert model["four_bit_layers"] == PROJECTIONS and model["four_bit_kinds"] == ["Linear4bit:nf4"]
        else:
            assert model["four_bit_layers"] == 0
        if lora:  # LoRA over every projection, nothing else trainable, and every B matrix left zero: LoRA trained
            assert model["lora_layers"] == PROJECTIONS
            assert model["lora_bases"] == (["Linear4bit"] if expected["four_bit"] else ["Linear"])
            assert model["trainable_not_lora"] == []
            assert model["lora_b_nonzero"] == model["lora_b_total"] == PROJECTIONS
        else:
            assert model["lora_layers"] == 0 and model["trainable"] > PROJECTIONS

        # every kernel in the patch table ran
        rows = report["patches"]
        kernels = [r for r in rows if r["plugin"] == "fused_ops_and_kernels"]
        for row in rows:
            if row["calls"] is None:
                assert row["target"].endswith(NOT_CALLS), row
            else:
                assert row["calls"] > 0, row
        for wanted in expected["kernels"]:
            assert any(r["replacement"].startswith(wanted) for r in kernels), (wanted, rows)
        loss_calls = report["loss_kernel_calls"]
        if expected["loss"] is None:
            assert kernels == [] and loss_calls == {}
        else:
            assert loss_calls and all(n > 0 for n in loss_calls.values()), loss_calls
            loss_rows = [r for r in kernels if r["target"] in loss_calls]
            served = [r for r in loss_rows if "TRL fused_lm_head=True" in r["replacement"]]
            if trl:  # the loss kernels serve TRL's fused LM head (per-token log-probs): the model's loss never runs
                assert served and all(r["replacement"].startswith("kernels.") for r in loss_rows), loss_rows
            else:
                kernel = "fused_linear_cross_entropy" if expected["loss"] == "fused_linear" else "cross_entropy"
                assert loss_rows and all(r["replacement"].startswith(f"kernels.{kernel}") for r in loss_rows), rows
                assert served == []
        assert len(report["losses"]) == STEPS, report["losses"]

    # the loss falls (averaged over the processes, which see different batches; the median of the last steps, as
    # one batch of harder examples can score above the start)
    per_step = [sum(r["losses"][i] for r in result.reports) / processes for i in range(STEPS)]
    assert statistics.median(per_step[-5:]) < per_step[0] - 0.25, per_step


# --------------------------------------------------------------------------------------------- TRL SFTTrainer

TRL_ACCELERATION_ONLY = ["accelerated-peft-bnb-nf4", "foak-fast-kernels", "foak-fast-lora"]


@pytest.mark.slow
@needs_hook
@pytest.mark.parametrize("name", [CPU_1PROC, CPU_2PROC])
def test_trl_sft_with_the_shipped_cpu_launch_configs(name, tiny_model, tmp_path, example_env):
    result = launch("trl_sft.py", shipped(name), tiny_model, tmp_path, example_env)
    check_run(result, name, trl=True)


@pytest.mark.slow
@needs_hook
def test_trl_sft_with_a_model_it_loaded_itself(tiny_model, tmp_path, example_env):
    result = launch("trl_sft.py", shipped(CPU_1PROC), tiny_model, tmp_path, example_env, "--preloaded")
    check_run(result, CPU_1PROC, trl=True)


@pytest.mark.slow
@needs_hook
@pytest.mark.parametrize("name", TRL_ACCELERATION_ONLY)
def test_trl_sft_with_an_acceleration_only_file(name, tiny_model, tmp_path, example_env):
    result = launch("trl_sft.py", naming_config(tmp_path, name), tiny_model, tmp_path, example_env)
    check_run(result, name, trl=True)


# --------------------------------------------------------------------------------------------- HF Trainer

HF_ACCELERATION_ONLY = [("accelerated-peft-bnb-nf4", True), ("foak-fast-lora", True), ("foak-fast-kernels", False)]


@pytest.mark.slow
@needs_hook
@pytest.mark.parametrize("name", [CPU_1PROC, CPU_2PROC])
def test_hf_trainer_with_the_shipped_cpu_launch_configs(name, tiny_model, tmp_path, example_env):
    result = launch("hf_trainer.py", shipped(name), tiny_model, tmp_path, example_env)
    check_run(result, name)


@pytest.mark.slow
@needs_hook
@pytest.mark.parametrize(("name", "lora"), HF_ACCELERATION_ONLY, ids=[n for n, _ in HF_ACCELERATION_ONLY])
def test_hf_trainer_with_an_acceleration_only_file(name, lora, tiny_model, tmp_path, example_env):
    extra = () if lora else ("--full",)
    result = launch("hf_trainer.py", naming_config(tmp_path, name), tiny_model, tmp_path, example_env, *extra)
    check_run(result, name, lora=lora)


@pytest.mark.slow
@needs_hook
def test_hf_trainer_full_fine_tuning_with_fused_lora_is_refused_at_prepare(tiny_model, tmp_path, example_env):
    """The prepare check in a real client: no LoRA layers to fuse, said with the key path and the fix."""
    result = launch("hf_trainer.py", naming_config(tmp_path, "foak-fast-lora"), tiny_model, tmp_path, example_env,
                    "--full")  # fmt: skip
    assert result.returncode != 0 and result.reports == [], result.failure()
    err = result.stderr
    assert "AccelerationConfigError: [acceleration.training.fused_ops_and_kernels.fused_lora]" in err, err[-3000:]
    assert "fused_lora needs PEFT LoRA layers to fuse, but the model has none at Accelerator.prepare" in err
    assert "for full fine-tuning set fused_lora: false" in err
    assert TABLE not in result.stdout  # nothing was patched


# --------------------------------------------------------------------------------------------- plain Accelerate

LOOP_ACCELERATION_ONLY = [
    ("accelerated-peft-bnb-nf4", True),
    ("accelerated-peft-bnb-nf4-foak", True),
    ("foak-fast-lora", True),
    ("foak-fast-kernels", True),
    ("foak-fast-kernels", False),
]


@pytest.mark.slow
@needs_hook
@pytest.mark.parametrize("name", [CPU_1PROC, CPU_2PROC])
def test_accelerate_loop_with_the_shipped_cpu_launch_configs(name, tiny_model, tmp_path, example_env):
    result = launch("accelerate_loop.py", shipped(name), tiny_model, tmp_path, example_env)
    check_run(result, name)
    assert f"plugins: {', '.join(EXPECTED[name]['plugins'])}; first loss" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "lora"),
    LOOP_ACCELERATION_ONLY,
    ids=[f"{n}-{'lora' if lora else 'full'}" for n, lora in LOOP_ACCELERATION_ONLY],
)
def test_accelerate_loop_with_acceleration_kwargs(name, lora, tiny_model, tmp_path, example_env):
    """``python examples/accelerate_loop.py --acceleration-config FILE``: no launcher, ``AccelerationKwargs``."""
    command = [sys.executable, str(EXAMPLES / "accelerate_loop.py"), "--model", str(tiny_model), "--steps", str(STEPS),
               "--acceleration-config", str(shipped(name)), *(() if lora else ("--full",))]  # fmt: skip
    result = run_example(command, example_env, tmp_path)
    check_run(result, name, lora=lora)


# --------------------------------------------------------------------------------------------- claims


def test_the_cpu_launch_configs_carry_the_bnb_foak_sample_section():
    """The trainer examples claim ``accelerated-peft-bnb-nf4-foak`` through the CPU launch configs, which carry
    exactly its body (so the launches above run it)."""
    body = yaml.safe_load(shipped("accelerated-peft-bnb-nf4-foak").read_text(encoding="utf-8"))["plugins"]
    for name in (CPU_1PROC, CPU_2PROC):
        assert yaml.safe_load(shipped(name).read_text(encoding="utf-8"))["acceleration"] == body


def _readme_excerpts() -> list[tuple[str, list[str]]]:
    """(example file, code lines) of each Python block in the README's Clients section that starts with
    ``# examples/<file> (abridged...``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Clients\n") :]
    section = section[: section.index("\n## ", 1)]
    excerpts = []
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        lines = block.splitlines()
        match = re.match(r"# examples/(\w+\.py) \(abridged", lines[0])
        if match:
            excerpts.append((match.group(1), lines[1:]))
    return excerpts


def test_readme_client_excerpts_are_the_examples_lines():
    """Every line of the README's abridged client scripts is a line of the example it names (its code, up to
    indentation and the trailing comment), so the README cannot drift from what the tests run."""
    excerpts = _readme_excerpts()
    assert sorted(name for name, _ in excerpts) == ["accelerate_loop.py", "hf_trainer.py", "trl_sft.py"]
    for name, lines in excerpts:
        source = {line.strip() for line in (EXAMPLES / name).read_text(encoding="utf-8").splitlines()}
        source |= {line.split("  #")[0].strip() for line in source}
        missing = [line for line in lines if line.strip() and line.split("  #")[0].strip() not in source]
        assert not missing, (name, missing)


def test_each_example_names_the_configs_it_is_tested_with():
    """Each example's docstring lists the shipped configurations the tests above run it with, and no other."""
    tested = {
        "trl_sft.py": {CPU_1PROC, CPU_2PROC, "accelerated-peft-bnb-nf4-foak", *TRL_ACCELERATION_ONLY},
        "hf_trainer.py": {CPU_1PROC, CPU_2PROC, "accelerated-peft-bnb-nf4-foak", *(n for n, _ in HF_ACCELERATION_ONLY)},
        "accelerate_loop.py": {CPU_1PROC, CPU_2PROC, *(n for n, _ in LOOP_ACCELERATION_ONLY)},
    }
    names = {p.name.removesuffix("-sample-configuration.yaml").removesuffix(".yaml") for p in CONFIGS.glob("*.yaml")}
    for example, configs in tested.items():
        text = (EXAMPLES / example).read_text(encoding="utf-8")
        docstring = text.split('"""')[1]
        named = {n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", docstring)}
        assert named == configs, (example, sorted(named ^ configs))
