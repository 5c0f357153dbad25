"""Benchmark runner: every scenario of a scenarios file through ``accelerate launch``, one CSV + charts.

Usage (from the repository root)::

    python benchmarks/run_benchmarks.py run benchmarks/scenarios.yaml            # the GPU matrix
    python benchmarks/run_benchmarks.py run benchmarks/scenarios-cpu.yaml --out /tmp/bench
    python benchmarks/run_benchmarks.py table  RESULTS.csv                        # Markdown table
    python benchmarks/run_benchmarks.py charts RESULTS.csv --out DIR              # PNG charts again
    python benchmarks/run_benchmarks.py merge A.csv B.csv --out DIR               # join calls (whole groups)
    python benchmarks/run_benchmarks.py readme README.md --csv RESULTS.csv        # (re)generate a README table
    python benchmarks/run_benchmarks.py readme README.md --check                  # fail if it is out of date

Each scenario runs as its own process tree: the runner writes an Accelerate config (single node, the
scenario's number of processes, mixed precision from its dtype) with the plugin stack as its top-level
``acceleration:`` section, and runs ``accelerate launch --config_file THAT.yaml benchmarks/train_bench.py
...``. Baselines, peers and accelerated stacks of a group run in the same invocation on the same device,
so the ratios in the CSV compare like with like. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import yaml
from benchlib import CSV_COLUMNS, REPO_ROOT, Scenario, ScenarioError, ScenarioFile

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_bench.py"
README_BEGIN = "<!-- benchmark-table:begin"
README_END = "<!-- benchmark-table:end -->"
ENTRY_SECTION = "section"
ENTRY_ENV = "env"


GPTQ_PLUGIN = "auto_gptq"
"""Name of the plugin that loads GPTQ checkpoints (the rows of a ``gptq_of`` model need it in their stack)."""


class SkipScenario(Exception):
    """The scenario cannot run here (missing plugin / peer / GPUs); recorded as ``skipped`` with the reason."""


# ----------------------------------------------------------------------------------------------- stacks
@dataclass(frozen=True)
class Stack:
    """A resolved plugin stack.

    Attributes:
        label: as written in the scenario.
        body: the acceleration body (``{"peft": {...}}``) or ``None`` for no plugins.
        accelerate_base: Accelerate settings that came with the stack's config file (e.g. FSDP), or ``None``.
        origin: the file it was read from.
    """

    label: str
    body: Mapping[str, Any] | None
    accelerate_base: Mapping[str, Any] | None = None
    origin: str = ""


def shipped_launch_configs() -> dict[str, Path]:
    """Short name -> file of the configurations in launch_configs/ (from its CONTENTS.yaml)."""
    folder = REPO_ROOT / "launch_configs"
    contents = folder / "CONTENTS.yaml"
    out: dict[str, Path] = {}
    if contents.is_file():
        doc = yaml.safe_load(contents.read_text(encoding="utf-8")) or {}
        for _key, items in doc.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, Mapping) and "shortname" in item and "filename" in item:
                    out.setdefault(str(item["shortname"]), folder / str(item["filename"]))
    for path in sorted(folder.rglob("*.yaml")):  # files not listed in CONTENTS are still usable by stem
        if path.name != "CONTENTS.yaml":
            out.setdefault(path.stem, path)
    return out


def resolve_stack(plugins: str | Mapping[str, Any], label: str) -> Stack:
    """Turn a scenario's ``plugins`` value into a :class:`Stack`.

    Raises:
        SkipScenario: the named configuration does not exist (yet).
        AccelerationConfigError: the configuration is invalid.
    """
    from fms_acceleration_accelerate.config import load_acceleration_config

    if isinstance(plugins, Mapping):
        return Stack(label, dict(load_acceleration_config(dict(plugins)).body), None, "<inline>")
    if plugins == "none":
        return Stack(label, None)
    path = Path(plugins)
    if not path.is_file() and not path.is_absolute():
        path = REPO_ROOT / plugins
    if not path.is_file():
        shipped = shipped_launch_configs()
        if plugins not in shipped:
            names = ", ".join(sorted(shipped)) or "none yet"
            raise SkipScenario(f"no launch config named {plugins!r} (shipped: {names})")
        path = shipped[plugins]
    config = load_acceleration_config(path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    base = None
    if "acceleration" in doc:
        base = {k: v for k, v in doc.items() if k != "acceleration"} or None
    return Stack(label, dict(config.body), base, str(path))


def check_stack_activates(stack: Stack) -> list[str]:
    """Names of the plugins the stack activates; :class:`SkipScenario` if any section has no installed plugin."""
    from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework

    if stack.body is None:
        return []
    try:
        framework = AccelerationFramework(dict(stack.body))
    except AccelerationConfigError as exc:
        if "is not installed" in str(exc) or "needs" in str(exc):
            raise SkipScenario(f"plugin requirements missing: {exc}") from None
        raise
    if framework.passthrough:
        raise SkipScenario(
            "not accelerated here: " + "; ".join(f"{p.path} ({p.reason})" for p in framework.passthrough)
        )
    names = list(framework.active_plugin_names)
    framework.revert()
    return names


def integration_available() -> bool:
    """True when the Accelerate integration (the ``acceleration:`` section in ``accelerate launch``) is installed."""
    return benchlib.has_module("fms_acceleration_accelerate.accelerate_integration")


# ----------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mixed_precision_for(s: Scenario, on_cpu: bool) -> str:
    """Accelerate's ``mixed_precision`` of a row: its ``dtype`` as autocast on a GPU, none on CPU (the weights train
    in ``dtype`` there) unless the row keeps float32 master weights (``master_weights: float32``), which trains
    under bf16 autocast on CPU too."""
    autocast = {"bfloat16": "bf16", "float16": "fp16"}.get(s.dtype, "no")
    if not on_cpu:
        return autocast
    if s.master_weights != "float32":
        return "no"
    if autocast == "fp16":
        raise ScenarioError(
            f"{s.name}: master_weights: float32 with dtype: float16 on CPU: Accelerate runs no float16 autocast on "
            "CPU (the row would train in plain float32); use dtype: bfloat16 or float32 (--set dtype=...)"
        )
    return autocast


def shards_own_fsdp2_units(body: Mapping[str, Any]) -> bool:
    """Whether a plugin of the acceleration ``body`` shards FSDP2 units of its own (``contributes_under_fsdp2``),
    known from the configuration alone (installed packages are not checked: this only reads the config)."""
    from fms_acceleration_accelerate import AccelerationFramework

    framework = AccelerationFramework({"plugins": dict(body)}, check_packages=False)
    return any(plugin.contributes_under_fsdp2() for plugin in framework.plugins)


def fsdp_config_for(version: int) -> dict[str, Any]:
    """The ``fsdp_config`` every row of one FSDP version gets (baseline and plugin stacks alike).

    Stock Accelerate settings as the HF docs use them for (Q)LoRA: one unit per decoder layer
    (``TRANSFORMER_BASED_WRAP``), rank 0 reads the checkpoint and the others receive it
    (``cpu_ram_efficient_loading`` + ``sync_module_states``), full sharding; FSDP1 with ``use_orig_params``
    (frozen base and trainable adapters share a unit). Accelerate's own activation checkpointing stays off:
    every row enables the model's (non-reentrant) gradient checkpointing itself.
    """
    common = {
        "fsdp_version": version,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_sync_module_states": True,
        "fsdp_offload_params": False,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_activation_checkpointing": False,
    }
    if version == 1:
        return {
            **common,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_use_orig_params": True,
        }
    return {**common, "fsdp_reshard_after_forward": True}


def fsdp_version_of(s: Scenario) -> int | None:
    return {"fsdp1": 1, "fsdp2": 2}.get(s.distributed)


def deepspeed_config_for(stage: int, s: Scenario) -> dict[str, Any]:
    """The inline ``deepspeed_config`` every row of one ZeRO stage gets (baseline and plugin stacks alike).

    The keys stock ``accelerate config`` writes, as in the shipped ``accelerate-deepspeed-zero*`` configs: no
    offload, ``gradient_accumulation_steps`` 1, ``gradient_clipping`` = the scenario's ``max_grad_norm`` (the rows
    without DeepSpeed clip at the same value through ``accelerator.clip_grad_norm_``); ZeRO-3 with
    ``zero3_init_flag`` (16/32-bit models load partitioned; the bitsandbytes loader builds its 4-bit model outside
    ``zero.Init`` and DeepSpeed partitions it when the engine is built) and ``zero3_save_16bit_model``. No
    ``optimizer`` section: the AdamW ``train_bench.py`` creates reaches DeepSpeed as its client optimizer (nothing
    of DeepSpeed's compiled ops, such as FusedAdam, is built or loaded).
    """
    cfg: dict[str, Any] = {
        "zero_stage": stage,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": s.max_grad_norm,
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
    }
    if stage == 3:
        cfg["zero3_init_flag"] = True
        cfg["zero3_save_16bit_model"] = True
    return cfg


DEEPSPEED_ENV = {"DS_BUILD_OPS": "0"}
"""Environment of every DeepSpeed row: no op is built ahead of time or just in time (the client AdamW needs
none); ``DS_ACCELERATOR`` is pinned to the row's device as well (``cuda`` / ``cpu``)."""


def write_accelerate_config(
    s: Scenario, stack: Stack, path: Path, *, on_cpu: bool, entry: str, extra_base: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Write the Accelerate config of one scenario; returns it.

    ``distributed: fsdp1|fsdp2`` gives ``distributed_type: FSDP`` with :func:`fsdp_config_for` (also on one GPU);
    a stack or ``accelerate_config`` file may refine it but not name another FSDP version (ScenarioError).
    ``distributed: zero2|zero3`` gives ``distributed_type: DEEPSPEED`` with :func:`deepspeed_config_for` (also on
    one GPU, and on CPU, where DeepSpeed runs its CPU accelerator over gloo: ``use_cpu`` stays false); a stack may
    not bring an Accelerate config of another distribution (ScenarioError).
    On CPU, Accelerate cannot run FSDP: the config asks for plain multi-process (gloo) and ``train_bench.py``
    switches the ``Accelerator`` to FSDP through a test seam (its ``entry`` column says so).
    """
    version = fsdp_version_of(s)
    stage = benchlib.DEEPSPEED_STAGES.get(s.distributed)
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO" if s.num_gpus == 1 else "MULTI_GPU",
        "num_machines": 1,
        "machine_rank": 0,
        "gpu_ids": "all",
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "downcast_bf16": "no",
    }
    if version is not None:
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = fsdp_config_for(version)
    if stage is not None:
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = deepspeed_config_for(stage, s)
    for base in (stack.accelerate_base, extra_base):
        if not base:
            continue
        base_type = base.get("distributed_type")
        base_stage = (base.get("deepspeed_config") or {}).get("zero_stage")
        if (base_type == "DEEPSPEED" and base_stage != stage) or (
            stage is not None and base_type not in (None, "DEEPSPEED")
        ):
            raise ScenarioError(
                f"{s.name}: the stack's Accelerate config runs {base_type}"
                f"{f' ZeRO-{base_stage}' if base_type == 'DEEPSPEED' else ''} but the scenario says distributed: "
                f"{s.distributed}; use an acceleration-only stack (the runner writes the DeepSpeed settings)"
            )
        base_version = (base.get("fsdp_config") or {}).get("fsdp_version", 1)
        if base.get("distributed_type") == "FSDP" and base_version != version:
            raise ScenarioError(
                f"{s.name}: the stack's Accelerate config runs FSDP{base_version} but the scenario says "
                f"distributed: {s.distributed}; set distributed: fsdp{base_version} (or use an acceleration-only stack)"
            )
        for key, value in base.items():
            if key == "acceleration":
                continue
            if key == "fsdp_config" and "fsdp_config" in cfg:
                cfg["fsdp_config"] = {**cfg["fsdp_config"], **value}
            elif key == "deepspeed_config" and "deepspeed_config" in cfg:
                cfg["deepspeed_config"] = {**cfg["deepspeed_config"], **value}
            else:
                cfg[key] = value
    if version == 2 and stack.body is not None and "fsdp_config" in cfg and shards_own_fsdp2_units(stack.body):
        # a plugin of the stack shards its own FSDP2 units, which Accelerate's meta-device reload cannot follow
        # (the framework refuses the combination; the shipped FSDP2 configs of such stacks turn it off). Other
        # stacks (full FT with kernels) keep the setting of the HF rows. Loading is not timed.
        cfg["fsdp_config"] = {**cfg["fsdp_config"], "fsdp_cpu_ram_efficient_loading": False}
    cfg["num_processes"] = s.num_gpus
    cfg["main_process_port"] = free_port()
    # a stack's own Accelerate config may pin mixed precision (the shipped FSDP1 QLoRA config trains in plain
    # bf16: Accelerate's FSDP1 fp32 upcast of trainable units would reach the packed 4-bit storage)
    pinned = (stack.accelerate_base or {}).get("mixed_precision")
    if s.master_weights == "float32":  # the AMP recipe: the autocast of the row's dtype, whatever the device
        cfg["mixed_precision"] = mixed_precision_for(s, on_cpu)
        if pinned is not None and str(pinned) != cfg["mixed_precision"]:
            raise ScenarioError(
                f"{s.name}: the stack's Accelerate config pins mixed_precision: {pinned}, but master_weights: float32 "
                f"with dtype: {s.dtype} trains under mixed_precision: {cfg['mixed_precision']}; remove "
                "master_weights from this row or use an acceleration-only stack"
            )
    else:
        cfg["mixed_precision"] = (
            "no" if on_cpu else str(pinned) if pinned is not None else mixed_precision_for(s, on_cpu)
        )
    cfg["use_cpu"] = on_cpu and stage is None  # DeepSpeed needs use_cpu false (its CPU accelerator, gloo)
    if on_cpu and stage is None:  # Accelerate refuses FSDP on CPU: gloo processes here, FSDP through train_bench's seam
        cfg["distributed_type"] = "NO" if s.num_gpus == 1 else "MULTI_GPU"
        cfg.pop("fsdp_config", None)
    if stack.body is not None and entry == ENTRY_SECTION:
        cfg["acceleration"] = dict(stack.body)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return cfg


def train_args_for(s: Scenario) -> list[str]:
    """``train_bench.py`` options for the scenario fields that differ from the defaults."""
    defaults = Scenario(name="", group="", model="")
    out: list[str] = []
    for name in benchlib.SCENARIO_FIELDS:
        if name in ("baseline", "plugins"):
            continue
        value = getattr(s, name)
        if name not in ("name", "group", "model") and value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if name in ("lora_target_modules", "lora_target_parameters"):
            out += [flag, *value]
        else:
            out += [flag, str(value)]
    out += ["--plugins", s.plugins_label if not isinstance(s.plugins, Mapping) else "inline"]
    return out


LAUNCHERS = {
    # the stock command, through its console script's module (so the interpreter/venv cannot differ)
    "accelerate": (["-m", "accelerate.commands.accelerate_cli", "launch"], ["accelerate", "launch"]),
    # this project's wrapper taking the same arguments (needed only when the start-up hook is not installed)
    "fms-accelerate": (["-m", "fms_acceleration_accelerate.cli", "launch"], ["fms-accelerate", "launch"]),
}


def pick_launcher(requested: str) -> str:
    """``accelerate`` when the start-up hook that lets it read ``acceleration:`` sections is installed."""
    if requested != "auto":
        return requested
    if startup_hook_installed() or not integration_available():
        return "accelerate"
    return "fms-accelerate"


def startup_hook_installed() -> bool:
    """True when a ``.pth`` file in site-packages runs this package's interpreter start-up hook."""
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for pth in folder.glob("*.pth"):
            try:
                if "_fms_acceleration_startup" in pth.read_text(encoding="utf-8", errors="replace"):
                    return True
            except OSError:
                continue
    return False


def launch_argv(launcher: str) -> list[str]:
    return [sys.executable, *LAUNCHERS[launcher][0]]


def display_command(argv: Sequence[str]) -> str:
    """The command as a user would type it (``accelerate launch ...``)."""
    argv = list(argv)
    for module_args, shown in LAUNCHERS.values():
        prefix = [sys.executable, *module_args]
        if argv[: len(prefix)] == prefix:
            argv = [*shown, *argv[len(prefix) :]]
            break
    text = shlex.join(str(a) for a in argv)
    return text.replace(str(REPO_ROOT) + os.sep, "")


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop the process group this runner started for one scenario (by its id)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def row_processes(tag: str) -> list[int]:
    """Live processes of the row tagged ``tag`` (their environment holds ``FMS_BENCH_ROW=tag``: the launcher,
    torchrun's agent, every worker and whatever they started, in whichever session). Linux (``/proc``); elsewhere
    an empty list."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    needle = b"\0" + f"{benchlib.ROW_ENV}={tag}".encode() + b"\0"
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for a zombie: it holds no memory any longer
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if needle in b"\0" + environ:
            found.append(int(entry.name))
    return found


def reap_row(tag: str, grace: float = 10.0) -> list[int]:
    """Wait up to ``grace`` seconds for the processes of row ``tag`` to end (its launcher has exited or was
    stopped), then kill those left, by their ids. Returns the ids that had to be killed."""
    deadline = time.monotonic() + grace
    left = row_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = row_processes(tag)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def gpu_memory_used_mib() -> list[float] | None:
    """Memory in use on every GPU (MiB) from ``nvidia-smi``, which creates no CUDA context; None without it."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return [float(line) for line in out.stdout.split()] if out.returncode == 0 else None
    except ValueError:
        return None


def _lower_priority() -> None:
    """Run in the child between fork and exec (``preexec_fn``): the row's launcher and all it starts get a lower
    priority, which its workers give up again at their go."""
    os.nice(benchlib.START_NICE)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _last_error_line(log: Path) -> str:
    for line in reversed(_tail(log, 200).splitlines()):
        stripped = line.strip()
        if stripped and ("Error" in stripped or "error" in stripped or "Exception" in stripped):
            return stripped[:300]
    return ""


def wall_breakdown(result: Mapping[str, Any], started_at: float, ended_at: float) -> str:
    """Where one row's wall time went: ``launch 5.1 | imports 4.2 | ... | exit 1.3`` (seconds).

    ``launch``: from starting ``accelerate launch`` to the first line of ``train_bench.py`` (the launcher's own
    imports and checks, process start); then the script's phases on rank 0 (``imports`` (none initialises
    CUDA), ``tokenize`` (instruction data only), ``waited`` (overlapped start-up only: blocked until its go),
    ``late_imports`` (peft / bitsandbytes, after the go), ``accelerator``, ``load_and_augment``, ``prepare``,
    ``data``, ``train`` = warmup + timed steps, ``finish``); ``exit``: from writing the result to the launcher's
    exit (interpreter and CUDA teardown of every process). With overlap, everything up to ``waited`` ran while
    the previous row ran.
    Empty when the worker wrote no timestamps (it never started).
    """
    stamps = result.get("timestamps") or {}
    phases = result.get("phase_seconds") or {}
    if "script_start" not in stamps:
        return ""
    parts = [("launch", stamps["script_start"] - started_at), *phases.items()]
    if "result_written" in stamps:
        parts.append(("exit", ended_at - stamps["result_written"]))
    return " | ".join(f"{name} {max(float(sec), 0.0):.1f}" for name, sec in parts)


# ----------------------------------------------------------------------------------------------- rows
def _fmt(value: Any, digits: int) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.{digits}f}"
    return str(value)


def base_row(s: Scenario, models: ScenarioFile, model_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    spec = models.models.get(s.model)
    if spec is not None and "config" in spec and model_overrides:
        spec = {**spec, "config": {**spec["config"], **model_overrides}}
    return {
        "scenario": s.name,
        "group": s.group,
        "is_baseline": "yes" if models.baselines.get(s.group) == s.name else "no",
        "peft": s.peft,
        "plugins": s.plugins_label,
        "prep": s.prep,
        "peer": s.peer,
        "experts_implementation": s.experts_implementation or "",
        "model": f"{s.model} ({benchlib.model_spec_summary(spec)})" if spec else s.model,
        "batch_size": s.batch_size,
        "seq_len": s.seq_len,
        "steps": s.steps,
        "warmup_steps": s.warmup_steps,
        "gradient_checkpointing": s.gradient_checkpointing,
        "num_gpus": s.num_gpus,
        "distributed": s.distributed,
        "rank_data": s.rank_data,
        "num_layers": benchlib.model_layers(spec),
        "dataset": s.dataset,
        "collate": s.collate if s.dataset != "synthetic" else "",
        "dtype": s.dtype,
        "master_weights": s.master_weights,
        "compile_layers": s.compile_layers,
    }


def fill_result(row: dict[str, Any], result: Mapping[str, Any]) -> None:
    row["status"] = result.get("status", "failed")
    for key in (
        "train_tokens_per_s", "train_tokens_per_s_per_gpu", "step_time_s", "step_time_p50_s",
        "padding_fraction", "measured_tokens", "peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib",
        "gpu_mem_gib", "state_alloc_gib", "forward_alloc_gib", "prepare_peak_alloc_gib", "train_peak_alloc_gib",
        "device_allocs_per_step", "alloc_retries", "allgather_bytes_per_step",
        "reduce_scatter_bytes_per_step", "param_bytes_per_rank", "buffer_bytes_per_rank", "device", "gpu_name", "torch", "transformers", "accelerate", "peft_version", "bitsandbytes", "triton",
        "liger_kernel", "deepspeed", "python", "date", "entry", "patches", "experts_implementation",
        "compile_layers",
    ):  # fmt: skip
        if key in result:
            row[key] = result[key]
    losses = result.get("losses") or []
    if losses:
        row["loss_first"] = losses[0]
        row["loss_final"] = losses[-1]
    if "active_plugins" in result:
        row["active_plugins"] = "+".join(result["active_plugins"])


def memory_metric(row: Mapping[str, Any]) -> float | None:
    """Peak allocated GPU memory, or peak RSS on CPU (GiB)."""
    for key in ("peak_alloc_gib", "peak_rss_gib"):
        value = _to_float(row.get(key))
        if value is not None:
            return value
    return None


def _to_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def compute_relative(
    rows: list[dict[str, Any]], losses: Mapping[str, list[float]], s_by_name: Mapping[str, Scenario]
) -> None:
    """Fill ratio and loss-agreement columns of every row against its group's baseline row."""
    by_name = {r["scenario"]: r for r in rows}
    for row in rows:
        base_name = next(
            (r["scenario"] for r in rows if r["group"] == row["group"] and r["is_baseline"] == "yes"), None
        )
        base = by_name.get(base_name) if base_name else None
        for key in ("throughput_ratio", "memory_ratio", "reserved_ratio", "loss_max_rel_diff", "loss_match"):
            row[key] = ""
        if base is None or base.get("status") != "ok" or row.get("status") != "ok":
            continue
        for key, a, b in (
            ("throughput_ratio", _to_float(row.get("train_tokens_per_s")), _to_float(base.get("train_tokens_per_s"))),
            ("memory_ratio", memory_metric(row), memory_metric(base)),
            ("reserved_ratio", _to_float(row.get("peak_reserved_gib")), _to_float(base.get("peak_reserved_gib"))),
        ):
            if a is not None and b:
                row[key] = a / b
        mine, ref = losses.get(row["scenario"]), losses.get(base_name)
        if row is base:
            row["loss_max_rel_diff"] = 0.0
            row["loss_match"] = "baseline"
        elif mine and ref:
            n = min(len(mine), len(ref))
            diff = max(abs(mine[i] - ref[i]) / max(abs(ref[i]), 1e-8) for i in range(n))
            row["loss_max_rel_diff"] = diff
            tol = s_by_name[row["scenario"]].loss_rtol if row["scenario"] in s_by_name else 0.03
            row["loss_match"] = "yes" if diff <= tol else "no"


SCALING_KEY = (
    "model", "peft", "plugins", "prep", "peer", "batch_size", "seq_len", "gradient_checkpointing", "dataset",
    "collate", "dtype",
)  # fmt: skip
"""Columns a multi-GPU row and its 1-GPU reference row must share (everything but the GPUs / FSDP)."""
SPLIT_DATA_LOSS_RTOL = 0.1
FIT_HEADROOM = 0.95
DEFAULT_GPU_MEM_GIB = 80.0


def scaling_reference(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The successful 1-GPU row with the same stack and workload as ``row`` (``None`` if there is none).

    Preference: the same ``distributed`` value (e.g. FSDP2 on 1 GPU), then a plain 1-GPU row (``ddp``: no
    wrapper), then any; the earliest such row of the run. A 1-GPU DeepSpeed row (``zero2`` / ``zero3``) has one
    too: the same stack on 1 GPU without DeepSpeed (plain ``ddp`` only), so its loss columns check DeepSpeed's
    training against the run without it and ``scaling_efficiency`` is its speed relative to that run.
    """
    one_gpu = str(row.get("num_gpus")) in ("", "1")
    if one_gpu and row.get("distributed") not in benchlib.DEEPSPEED_STAGES:
        return None
    key = tuple(str(row.get(k, "")) for k in SCALING_KEY)
    candidates = [
        r for r in rows
        if r is not row and str(r.get("num_gpus")) == "1" and r.get("status") == "ok"
        and tuple(str(r.get(k, "")) for k in SCALING_KEY) == key
    ]  # fmt: skip
    for wanted in ("ddp",) if one_gpu else (row.get("distributed"), "ddp", None):
        for r in candidates:
            if wanted is None or r.get("distributed", "ddp") == wanted:
                return r
    return None


def loss_agreement(mine: Sequence[float], ref: Sequence[float], replicate: bool, rtol: float) -> tuple[float, str]:
    """``(difference, verdict)`` of a multi-GPU loss curve against its 1-GPU reference.

    ``replicate`` (every rank saw the 1-GPU run's batches): the largest relative per-step difference, ``yes``
    within ``rtol``. Otherwise (split data: each step of the N-GPU run averages N different batches) only a
    loose check is possible: the relative difference of the mean loss over the second half of the steps,
    ``loose-yes`` within :data:`SPLIT_DATA_LOSS_RTOL`.
    """
    n = min(len(mine), len(ref))
    if n == 0:
        return math.nan, ""
    if replicate:
        diff = max(abs(mine[i] - ref[i]) / max(abs(ref[i]), 1e-8) for i in range(n))
        return diff, "yes" if diff <= rtol else "no"
    half = slice(n // 2, n)
    a, b = statistics.fmean(mine[:n][half]), statistics.fmean(ref[:n][half])
    diff = abs(a - b) / max(abs(b), 1e-8)
    return diff, "loose-yes" if diff <= SPLIT_DATA_LOSS_RTOL else "loose-no"


def compute_scaling(
    rows: list[dict[str, Any]], losses: Mapping[str, list[float]], s_by_name: Mapping[str, Scenario]
) -> None:
    """Fill ``scaling_reference``, ``scaling_efficiency`` (tokens/s per GPU at N / tokens/s of the 1-GPU row)
    and the loss agreement with that row, for every multi-GPU row and every 1-GPU DeepSpeed row (whose reference is
    the same stack without DeepSpeed; one process sees the same batches either way, so its check is step by step)."""
    for row in rows:
        for key in ("scaling_reference", "scaling_efficiency", "loss_vs_1gpu_max_rel_diff", "loss_vs_1gpu_match"):
            row[key] = ""
        if row.get("status") != "ok":
            continue
        ref = scaling_reference(row, rows)
        if ref is None:
            continue
        row["scaling_reference"] = ref["scenario"]
        per_gpu, single = _to_float(row.get("train_tokens_per_s_per_gpu")), _to_float(ref.get("train_tokens_per_s"))
        if per_gpu is not None and single:
            row["scaling_efficiency"] = per_gpu / single
        mine, theirs = losses.get(row["scenario"]), losses.get(ref["scenario"])
        if mine and theirs:
            s = s_by_name.get(row["scenario"])
            rtol = s.loss_rtol if s is not None else 0.03
            replicate = row.get("rank_data") == "replicate" or str(row.get("num_gpus")) in ("", "1")
            diff, verdict = loss_agreement(mine, theirs, replicate, rtol)
            row["loss_vs_1gpu_max_rel_diff"], row["loss_vs_1gpu_match"] = diff, verdict


def _line_at(points: Sequence[tuple[float, float]], target: float) -> tuple[float, float]:
    """Least-squares line through ``points`` (x, y): (slope, value at ``target``)."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope, mean_y + slope * (target - mean_x)


FIT_KEYS = (
    "fit_target_layers", "fit_gib_per_layer", "fit_peak_alloc_gib_extrapolated", "fit_verdict",
    "fit_train_gib_per_layer", "fit_train_peak_alloc_gib_extrapolated",
)  # fmt: skip


def _phase_line(rows: Sequence[Mapping[str, Any]], column: str, target: float) -> tuple[float, float] | None:
    """``(slope, value at target)`` of one memory column against the layer count; None under two layer counts."""
    points = [(float(r["num_layers"]), _to_float(r.get(column))) for r in rows]
    points = [(x, y) for x, y in points if y is not None]
    return _line_at(points, target) if len({x for x, _ in points}) >= 2 else None


def compute_fits(rows: list[dict[str, Any]], s_by_name: Mapping[str, Scenario]) -> None:
    """Peak memory per GPU vs layer count: a least-squares line through the measured points of each series
    (rows with ``extrapolate_layers`` of the same model shape but depth, stack, GPUs and workload; groups may
    differ, e.g. one group per layer count), evaluated at the target layer count. ``fit_verdict``: ``fits`` when
    the extrapolated peak is within 95 % of the GPU's memory. Where the rows measured the peak of loading +
    preparing and the training steps' own peak apart (``prepare_peak_alloc_gib``, ``train_peak_alloc_gib``), each
    gets its own line and the extrapolated peak is the larger of the two at the target (``fit_train_*`` keeps the
    training line)."""
    series: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        for key in FIT_KEYS:
            row[key] = ""
        s = s_by_name.get(row["scenario"])
        if s is None or s.extrapolate_layers <= 0:
            continue
        row["fit_target_layers"] = s.extrapolate_layers
        shape = re.sub(r" L\d+", "", str(row.get("model", "")).split(" (", 1)[-1])  # the model but its depth
        key = (shape, row["peft"], row["plugins"], row["prep"], row["peer"], row.get("distributed"),
               str(row["num_gpus"]), str(row["batch_size"]), str(row["seq_len"]), s.extrapolate_layers)  # fmt: skip
        series.setdefault(key, []).append(row)
    for members in series.values():
        measured_rows = [r for r in members if r.get("status") == "ok" and r.get("num_layers") not in (None, "")]
        points = [(float(r["num_layers"]), memory_metric(r)) for r in measured_rows if memory_metric(r) is not None]
        if len({x for x, _ in points}) < 2:
            for r in members:
                r["fit_verdict"] = f"not extrapolated: {len(points)} measured layer count(s), need 2"
            continue
        target = float(members[0]["fit_target_layers"])
        train = _phase_line(measured_rows, "train_peak_alloc_gib", target)
        prepare = _phase_line(measured_rows, "prepare_peak_alloc_gib", target)
        if train is not None and prepare is not None:
            # the run's peak is the larger of two phases that grow at different rates per layer (loading +
            # preparing holds more per layer, training starts higher): a line through the maxima would mix the
            # two where the dominant phase changes within the series, so each phase gets its own line
            slope, value = max(train, prepare, key=lambda line: line[1])
            how = "the larger of the load + prepare and the training lines"
        else:
            slope, value = _line_at(points, target)
            how = "one line through the peaks"
        train = train if train is not None else ("", "")
        capacity = next((_to_float(r.get("gpu_mem_gib")) for r in members if _to_float(r.get("gpu_mem_gib"))), None)
        capacity = capacity or DEFAULT_GPU_MEM_GIB
        verdict = "fits" if value <= FIT_HEADROOM * capacity else "does not fit"
        measured = ", ".join(f"{int(x)}L {y:.1f}" for x, y in sorted(points))
        for r in members:
            r["fit_gib_per_layer"] = slope
            r["fit_peak_alloc_gib_extrapolated"] = value
            r["fit_train_gib_per_layer"], r["fit_train_peak_alloc_gib_extrapolated"] = train
            r["fit_verdict"] = (
                f"{verdict} (extrapolated from measured {measured} GiB, {how}: {value:.1f} GiB at {int(target)} "
                f"layers vs {capacity:.0f} GiB per GPU)"
            )


DIGITS = {
    "train_tokens_per_s": 1, "train_tokens_per_s_per_gpu": 1, "step_time_s": 4, "step_time_p50_s": 4,
    "padding_fraction": 4, "peak_alloc_gib": 3, "peak_reserved_gib": 3, "peak_rss_gib": 3, "gpu_mem_gib": 1,
    "device_allocs_per_step": 2, "state_alloc_gib": 3, "forward_alloc_gib": 3, "prepare_peak_alloc_gib": 3, "train_peak_alloc_gib": 3,
    "fit_train_gib_per_layer": 3, "fit_train_peak_alloc_gib_extrapolated": 2,
    "throughput_ratio": 3, "memory_ratio": 3, "reserved_ratio": 3, "loss_first": 4, "loss_final": 4,
    "loss_max_rel_diff": 5, "wall_s": 1, "scaling_efficiency": 3, "loss_vs_1gpu_max_rel_diff": 5,
    "fit_gib_per_layer": 3, "fit_peak_alloc_gib_extrapolated": 2,
}  # fmt: skip


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c), DIGITS.get(c, 6)) for c in CSV_COLUMNS})


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------------------- output
def _num(row: Mapping[str, Any], key: str, digits: int, suffix: str = "") -> str:
    value = _to_float(row.get(key))
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def _inline_summary(body: Mapping[str, Any]) -> str:
    """``bitsandbytes(nf4) + fused_ops_and_kernels(fused_lora, fast_loss=fused_linear)`` for an inline stack:
    each plugin section (a mapping of scalars) by its last key, true flags by name, other values as k=v."""
    parts = []
    for key, value in body.items():
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            parts.append(_inline_summary(value))
        elif isinstance(value, Mapping):
            shown = [k if v is True else f"{k}={v}" for k, v in value.items() if v is not False]
            parts.append(f"{key}({', '.join(shown)})")
        else:
            parts.append(f"{key}={value}")
    return " + ".join(parts)


def stack_label(row: Mapping[str, Any]) -> str:
    """``HF``, ``HF lean``, ``HF + liger``, ``HF grouped_mm`` (an MoE model's experts backend), or the plugin
    stack's name (``+ peer`` when one is applied)."""
    stack = str(row.get("plugins", ""))
    if stack.startswith("inline:"):
        stack = "inline: " + _inline_summary(json.loads(stack[len("inline:") :]))
    if stack == "none":
        stack = "HF" + (" lean" if row.get("prep") == "lean" and row.get("peft") == "qlora" else "")
        if row.get("experts_implementation"):
            stack += f" {row['experts_implementation']}"
    if row.get("peer") not in (None, "", "none"):
        stack += f" + {row['peer']}"
    return stack


def by_group(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows ordered by group (groups in order of first appearance), run order within a group: a scenarios file
    may run its most important rows first (for ``--time-budget``) and still print one block per group."""
    order = {g: i for i, g in enumerate(dict.fromkeys(str(r.get("group", "")) for r in rows))}
    return sorted(rows, key=lambda r: order[str(r.get("group", ""))])


def is_multi_gpu(row: Mapping[str, Any]) -> bool:
    return str(row.get("num_gpus", "1")) not in ("", "1") or row.get("distributed") in (
        "fsdp1", "fsdp2", *benchlib.DEEPSPEED_STAGES,
    )  # fmt: skip


def _mib(row: Mapping[str, Any], key: str) -> str:
    value = _to_float(row.get(key))
    if value is None:
        return ""
    mib = value / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.3f}"


def multigpu_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Multi-GPU rows with their scaling efficiency against the matching 1-GPU row ("" when none ran)."""
    multi = [r for r in by_group(rows) if is_multi_gpu(r)]
    if not multi:
        return ""
    cpu = all(not r.get("peak_alloc_gib") for r in rows)
    header = [
        "scenario", "stack", "dist", "GPUs", "tok/s", "tok/s/GPU", "1-GPU row", "scaling eff",
        "peak RSS GiB" if cpu else "peak alloc GiB/GPU", "reserved GiB/GPU", "all-gather MiB/step",
        "reduce-scatter MiB/step", "loss vs 1 GPU", "status",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in multi:
        status = r.get("status", "")
        if status != "ok" and r.get("note"):
            status = f"{status}: {r['note']}"
        eff = _to_float(r.get("scaling_efficiency"))
        loss = r.get("loss_vs_1gpu_match", "")
        if loss and _to_float(r.get("loss_vs_1gpu_max_rel_diff")) is not None:
            loss = f"{loss} ({float(r['loss_vs_1gpu_max_rel_diff']):.4f})"
        cells = [
            str(r.get("scenario", "")), stack_label(r), str(r.get("distributed", "")), str(r.get("num_gpus", "")),
            _num(r, "train_tokens_per_s", 0), _num(r, "train_tokens_per_s_per_gpu", 0),
            str(r.get("scaling_reference", "")), "" if eff is None else f"{100 * eff:.0f}%",
            _num(r, "peak_rss_gib" if cpu else "peak_alloc_gib", 2), _num(r, "peak_reserved_gib", 2),
            _mib(r, "allgather_bytes_per_step"), _mib(r, "reduce_scatter_bytes_per_step"), loss,
            status.replace("|", "/").replace("\n", " ")[:160],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    data = "replicated on every rank" if all(r.get("rank_data") == "replicate" for r in multi) else "as in rank_data"
    lines += [
        "",
        "Scaling efficiency = tokens/s per GPU / tokens/s of the 1-GPU row (same stack, model, per-GPU batch). "
        f"Memory: max over ranks. Data: {data}; loss vs 1 GPU compares the loss curves step by step "
        "(replicated data) or the mean of the second half (loose, split data).",
    ]
    if any(r.get("distributed") in benchlib.DEEPSPEED_STAGES and str(r.get("num_gpus")) in ("", "1") for r in multi):
        lines[-1] += (
            " A 1-GPU DeepSpeed row's 1-GPU row is the same stack without DeepSpeed (its scaling efficiency: tokens/s"
            " with DeepSpeed / without; loss compared step by step)."
        )
    return "\n".join(lines)


def fit_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Measured points and the extrapolated peak memory of every layer-count series ("" when none)."""
    series = [r for r in by_group(rows) if str(r.get("fit_target_layers", "")) not in ("", "0")]
    if not series:
        return ""
    lines = [
        "| scenario | stack | dist | GPUs | layers | peak alloc GiB/GPU (measured) | load + prepare peak | "
        "training peak | after prepare | after 1st forward | GiB per layer (fit) | extrapolated | "
        "training peak extrapolated | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in series:
        status = r.get("status", "")
        measured = _num(r, "peak_alloc_gib", 2) or _num(r, "peak_rss_gib", 2)
        if status != "ok":
            measured = f"{status}: {str(r.get('note', ''))[:80]}"
        target = r.get("fit_target_layers", "")
        value = _num(r, "fit_peak_alloc_gib_extrapolated", 1)
        train_value = _num(r, "fit_train_peak_alloc_gib_extrapolated", 1)
        lines.append(
            "| " + " | ".join([
                str(r.get("scenario", "")), stack_label(r), str(r.get("distributed", "")), str(r.get("num_gpus", "")),
                str(r.get("num_layers", "")), measured.replace("|", "/"), _num(r, "prepare_peak_alloc_gib", 2),
                _num(r, "train_peak_alloc_gib", 2), _num(r, "state_alloc_gib", 2), _num(r, "forward_alloc_gib", 2),
                _num(r, "fit_gib_per_layer", 3), f"{value} GiB at {target} layers" if value else "",
                f"{train_value} GiB ({_num(r, 'fit_train_gib_per_layer', 3)} per layer)" if train_value else "",
                str(r.get("fit_verdict", "")).split(" (")[0],
            ]) + " |"
        )  # fmt: skip
    lines += [
        "",
        "EXTRAPOLATION, not a measurement: least-squares lines through the measured peak memory per GPU at the "
        "layer counts above, evaluated at the target layer count; where the load + prepare peak and the training "
        "peak were measured apart, each phase has its own line and 'extrapolated' (with its 'GiB per layer') is "
        "the larger of the two at the target; 'fits' = within 95% of the GPU's memory. "
        "'load + prepare peak' / 'training peak': the peak before and after the first training step (the peak "
        "column is the larger). 'after prepare' / 'after 1st forward': CUDA memory allocated per GPU (max over "
        "ranks) once the model is prepared (what its state holds) and after the first timed forward (state + "
        "saved activations).",
    ]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Full results as Markdown (what the runner prints): one table of every row, then the multi-GPU table and
    the memory extrapolations when the run has such rows."""
    sections = [single_table(rows)]
    multi, fits = multigpu_table(rows), fit_table(rows)
    if multi:
        sections += ["", "### Multi-GPU", "", multi]
    if fits:
        sections += ["", "### Memory extrapolation (layer-count series)", "", fits]
    return "\n".join(sections)


def single_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every row: throughput and memory against the group's baseline, loss agreement, status."""
    rows = by_group(rows)
    cpu = all(not r.get("peak_alloc_gib") for r in rows)
    mem_label = "peak RSS GiB" if cpu else "peak alloc GiB"
    header = [
        "scenario", "group", "stack", "tok/s", "× base", "step s", mem_label, "× base",
        "peak reserved GiB", "final loss", "loss Δ max", "status",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = r.get("status", "")
        if status != "ok" and r.get("note"):
            status = f"{status}: {r['note']}"
        cells = [
            str(r.get("scenario", "")) + (" (baseline)" if r.get("is_baseline") == "yes" else ""),
            str(r.get("group", "")),
            stack_label(r),
            _num(r, "train_tokens_per_s", 0),
            _num(r, "throughput_ratio", 2, "×"),
            _num(r, "step_time_s", 3),
            _num(r, "peak_rss_gib" if cpu else "peak_alloc_gib", 2),
            _num(r, "memory_ratio", 2, "×"),
            _num(r, "peak_reserved_gib", 2),
            _num(r, "loss_final", 4),
            _num(r, "loss_max_rel_diff", 4),
            status.replace("|", "/").replace("\n", " ")[:160],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(rows: Sequence[Mapping[str, Any]], source: str) -> str:
    """The compact performance table for README files, generated from a results CSV (one block per group)."""
    ok = [r for r in by_group(rows) if r.get("status") == "ok"]
    if not ok:
        return f"_No successful rows in {source}._"
    first = ok[0]
    cpu = not first.get("peak_alloc_gib")
    device = first.get("gpu_name") or "CPU"
    by_workload: dict[str, list[str]] = {}  # each group's first row's "model; batch B × S tokens" -> the groups
    for r in ok:
        group = str(r.get("group", ""))
        if not any(group in groups for groups in by_workload.values()):
            workload = f"{r.get('model', '')}; batch {r.get('batch_size')} × {r.get('seq_len')} tokens"
            by_workload.setdefault(workload, []).append(group)
    if len(by_workload) == 1:
        workload = f"Model: {next(iter(by_workload))}"
    else:  # e.g. one model per group
        workload = "Models: " + "; ".join(
            f"{w.replace('; batch', ', batch')} (groups {', '.join(groups)})" for w, groups in by_workload.items()
        )
    lines = [
        f"Measured on **{device}** ({first.get('date', '')[:10]}; torch {first.get('torch', '')}, transformers "
        f"{first.get('transformers', '')}, peft {first.get('peft_version', '')}, bitsandbytes "
        f"{first.get('bitsandbytes', '') or '-'}, liger-kernel {first.get('liger_kernel', '') or '-'}). "
        f"{workload}; ratios are against the HF baseline of the same group in the same run. Source: `{source}` "
        "(generated by `python benchmarks/run_benchmarks.py readme`).",
        "",
        "| group | scenario | stack | train tok/s | speed-up | peak memory GiB | memory vs baseline | loss matches |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in ok:
        stack = stack_label(r)
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r.get("group", "")),
                    str(r.get("scenario", "")),
                    stack,
                    _num(r, "train_tokens_per_s", 0),
                    _num(r, "throughput_ratio", 2, "×"),
                    _num(r, "peak_rss_gib" if cpu else "peak_alloc_gib", 1),
                    _num(r, "memory_ratio", 2, "×"),
                    str(r.get("loss_match", "")),
                ]
            )
            + " |"
        )
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        lines += [
            "",
            "Not run: " + "; ".join(f"{r['scenario']} ({r.get('status')}: {r.get('note', '')})" for r in skipped),
        ]
    return "\n".join(lines)


def write_charts(
    rows: Sequence[Mapping[str, Any]], out_dir: Path, losses: Mapping[str, list[float]] | None = None
) -> list[Path]:
    """PNG bar charts of throughput and memory ratios vs each group's baseline (+ loss curves when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    groups = list(dict.fromkeys(str(r.get("group", "")) for r in rows))
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    device = next((r.get("gpu_name") for r in rows if r.get("gpu_name")), "") or "CPU"
    charts = [
        ("throughput_ratio", "Train tokens/s vs group baseline (higher is better)", "throughput_ratio.png"),
        ("memory_ratio", "Peak memory vs group baseline (lower is better)", "memory_ratio.png"),
    ]
    if any(_to_float(r.get("scaling_efficiency")) is not None for r in rows):
        charts.append(
            (
                "scaling_efficiency",
                "Tokens/s per GPU vs the same stack on 1 GPU (1.0 = linear)",
                "scaling_efficiency.png",
            )
        )
    for key, title, fname in charts:
        data = [(f"{r['group']} / {r['scenario']}", _to_float(r.get(key)), str(r["group"])) for r in rows]
        data = [d for d in data if d[1] is not None]
        fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(data), 1) + 1.6))
        if data:
            labels, values, grp = zip(*data)
            ypos = range(len(values))
            ax.barh(list(ypos), values, color=[colors[g] for g in grp])
            ax.set_yticks(list(ypos), labels=labels, fontsize=8)
            ax.invert_yaxis()
            for y, v in zip(ypos, values):
                ax.text(v, y, f" {v:.2f}×", va="center", fontsize=8)
            ax.set_xlim(0, max(values) * 1.2)
        else:
            ax.text(0.5, 0.5, "no successful rows", ha="center", va="center", transform=ax.transAxes)
        ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_title(f"{title}\n{device}", fontsize=10)
        ax.set_xlabel("ratio")
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if losses:
        ncols = min(3, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
        for ax in axes.flat[len(groups) :]:
            ax.set_visible(False)
        for ax, g in zip(axes.flat, groups):
            for r in rows:
                curve = losses.get(str(r["scenario"]))
                if r["group"] == g and curve:
                    ax.plot(range(len(curve)), curve, label=str(r["scenario"]), linewidth=1)
            ax.set_title(f"loss: {g}", fontsize=10)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "loss_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------- run
def link_truncated_checkpoint(parent: Path, target: Path, num_layers: int) -> None:
    """A checkpoint folder whose ``config.json`` keeps the first ``num_layers`` decoder layers of ``parent``;
    every other file is a symlink to the parent's (``from_pretrained`` then skips the unused layers' weights)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in parent.iterdir():
        link = target / item.name
        if item.name == "config.json":
            config = json.loads(item.read_text(encoding="utf-8"))
            if int(config.get("num_hidden_layers", 0)) < num_layers:
                raise ScenarioError(
                    f"cannot take the first {num_layers} decoder layers of {parent}: its config.json has "
                    f"num_hidden_layers={config.get('num_hidden_layers')} (a --model-set num_hidden_layers smaller "
                    "than a layers_of slice?)"
                )
            config["num_hidden_layers"] = num_layers
            for key in ("layer_types",):  # per-layer lists (newer configs) must match the layer count
                if isinstance(config.get(key), list):
                    config[key] = config[key][:num_layers]
            link.write_text(json.dumps(config, indent=2), encoding="utf-8")
        elif not link.exists():
            link.symlink_to(item.resolve())


def detect_device(requested: str) -> tuple[bool, int]:
    """``(on_cpu, number of GPUs)`` without creating a CUDA context in this process."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cpu":
        return True, 0
    if requested == "cuda" and count == 0:
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    return count == 0, count


def gpu_name_without_context() -> str:
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "gpu"


GPU_RELEASED_MARGIN_MIB = 256.0
"""A GPU counts as released when it uses at most this much more memory than before the first row."""
GPU_RELEASE_WAIT_S = 10.0


@dataclass
class RowProcess:
    """One scenario's ``accelerate launch`` process tree: planned, then started (at its turn, or earlier while the
    previous row runs), given its go, waited for. Times: ``time.time()`` (compared with the workers' own
    timestamps) and ``time.monotonic()`` (durations)."""

    s: Scenario
    row: dict[str, Any]
    argv: list[str]
    env: dict[str, str]
    log: Path
    result_path: Path
    go_file: Path | None
    proc: subprocess.Popen | None = None
    prestarted: bool = False
    launched_at: float = 0.0
    launched_mono: float = 0.0
    go_at: float | None = None
    go_mono: float | None = None
    timeout: float = 0.0
    events: dict[str, Any] | None = None

    @property
    def tag(self) -> str:
        return self.env[benchlib.ROW_ENV]


class Runner:
    """Runs the selected scenarios of one file and keeps the CSV/losses up to date after each.

    With overlap on (default on CUDA, ``--overlap`` / ``--no-overlap``), row i+1's ``accelerate launch`` starts
    right after row i got its go, at a lower priority; its workers do their imports (and tokenize the instruction
    data) and wait for a go file, which the runner creates once every process of row i has exited (and, on CUDA,
    the GPUs' memory is back to what it was before the first row). Any model the row needs is built before its go.
    ``logs/timeline.json`` keeps every row's launch, go, exit and its workers' own timestamps.
    """

    def __init__(self, sfile: ScenarioFile, scenarios: list[Scenario], args: argparse.Namespace) -> None:
        self.sfile = sfile
        self.scenarios = scenarios
        self.args = args
        self.on_cpu, self.num_gpus = detect_device(args.device)
        if args.out:
            self.out_dir = Path(args.out)
        else:
            date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
            gpus = max((s.num_gpus for s in scenarios), default=1)
            name = benchlib.results_folder_name(
                "cpu" if self.on_cpu else gpu_name_without_context(), gpus, Path(sfile.path).stem, date
            )
            self.out_dir = REPO_ROOT / "benchmarks" / "results" / name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "logs").mkdir(exist_ok=True)
        self.work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fms_bench_"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.entry = args.entry if args.entry != "auto" else (ENTRY_SECTION if integration_available() else ENTRY_ENV)
        self.launcher = pick_launcher(args.launcher)
        self.model_dirs: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.losses: dict[str, list[float]] = {}
        self.started = time.monotonic()
        requested = getattr(args, "overlap", None)
        self.overlap = not self.on_cpu if requested is None else bool(requested)
        self.timeline: list[dict[str, Any]] = []
        self.gpu_idle_mib: list[float] | None = None  # GPU memory in use at the first go (no row running yet)
        self.gos_given = 0

    # -- models
    def model_dir(self, s: Scenario) -> str:
        return self.model_dir_for(s.model, s.dtype)

    def planned_model_dir(self, s: Scenario) -> str:
        """The folder :meth:`model_dir` gives for ``s``, without building anything (a row may be launched before
        its model is built; it loads the model only after its go, which comes after the build)."""
        spec = self.sfile.models.get(s.model)
        if spec is None:
            return s.model
        if "path" in spec:
            return str(spec["path"])
        return self.model_dirs.get(s.model) or str(self.work_dir / "models" / s.model)

    def needs_build(self, name: str) -> bool:
        """True when model ``name`` (or the model it takes its layers from) has not been built yet; a GPTQ
        model not yet quantized counts as a build too."""
        spec = self.sfile.models.get(name)
        if spec is None or "path" in spec or name in self.model_dirs:
            return False
        return self.needs_build(spec["derived_from"]) if "derived_from" in spec else True

    def is_gptq_model(self, name: str) -> bool:
        return "gptq" in self.sfile.models.get(name, {})

    def model_dir_for(self, name: str, dtype: str) -> str:
        """The checkpoint folder of model ``name``: built once per run (random init, ``save_pretrained`` as
        safetensors), or linked from its parent's files for a ``layers_of`` model."""
        spec = self.sfile.models.get(name)
        if spec is None:
            return name
        if "path" in spec:
            return str(spec["path"])
        if name in self.model_dirs:
            return self.model_dirs[name]
        target = self.work_dir / "models" / name
        config = {**spec["config"], **_parse_overrides(self.args.model_set)}
        if "gptq" in spec:
            self.quantize_model(name, spec, Path(self.model_dir_for(spec["quantized_from"], dtype)), target)
        elif "derived_from" in spec:
            parent = Path(self.model_dir_for(spec["derived_from"], dtype))
            link_truncated_checkpoint(parent, target, int(spec["config"]["num_hidden_layers"]))
            print(f"[bench] model {name}: first {spec['config']['num_hidden_layers']} layers of {parent}", flush=True)
        elif not (target / "config.json").is_file():
            device = "cpu" if self.on_cpu else "cuda"
            cmd = [
                sys.executable, str(Path(__file__).with_name("benchlib.py")), "build-model",
                "--config", json.dumps(config), "--out", str(target), "--device", device,
                "--dtype", "float32" if self.on_cpu else dtype, "--seed", "0",
            ]  # fmt: skip
            summary = benchlib.model_spec_summary({"config": config})
            print(f"[bench] building model {name} ({summary}) on {device}", flush=True)
            t0 = time.monotonic()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.scenario_timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"building model {name!r} took over {self.args.scenario_timeout:.0f}s") from None
            if done.returncode != 0:
                raise RuntimeError(f"building model {name!r} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            print(f"[bench] model {name} ready in {time.monotonic() - t0:.0f}s: {target}", flush=True)
        self.model_dirs[name] = str(target)
        return self.model_dirs[name]

    def quantize_model(self, name: str, spec: Mapping[str, Any], parent: Path, target: Path) -> None:
        """Write the GPTQ checkpoint of model ``name`` from ``parent`` with ``fms-accelerate quantize`` (on the
        GPU when there is one), unless ``target`` already holds one (``--work-dir`` keeps it between runs). The
        quantizer's output goes to ``logs/quantize-<name>.log``."""
        gptq = spec["gptq"]
        config_file = target / "config.json"
        if config_file.is_file():
            written = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config") or {}
            same = all(
                written.get(k) == gptq[k] for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format")
            )
            if same and (written.get("meta") or {}).get("method") == gptq["method"]:
                print(f"[bench] model {name}: GPTQ checkpoint already in {target}", flush=True)
                return
            print(f"[bench] model {name}: {target} holds another or no GPTQ checkpoint; writing it again", flush=True)
        device = "cpu" if self.on_cpu else "cuda"
        cmd = [
            sys.executable, "-m", "fms_acceleration_accelerate.cli", "quantize", str(parent), str(target),
            "--bits", str(gptq["bits"]), "--group-size", str(gptq["group_size"]), "--method", gptq["method"],
            "--sym" if gptq["sym"] else "--no-sym", "--checkpoint-format", gptq["checkpoint_format"],
            "--dtype", gptq["dtype"], "--num-samples", str(gptq["num_samples"]), "--seq-len", str(gptq["seq_len"]),
            "--device", device, "--overwrite",
            *(["--desc-act"] if gptq["desc_act"] else []),
        ]  # fmt: skip
        log = self.out_dir / "logs" / f"quantize-{name}.log"
        timeout = self.args.scenario_timeout
        if self.args.time_budget:  # within what is left of --time-budget, as a row is
            left = self.args.time_budget - (time.monotonic() - self.started)
            timeout = min(timeout, max(left, self.args.min_scenario_time))
        shown = "fms-accelerate " + display_command(cmd[3:])  # as a user types it (the same module runs)
        print(f"[bench] quantizing model {name} ({benchlib.gptq_label(gptq)}) on {device}: {shown}", flush=True)
        t0 = time.monotonic()
        with log.open("w", encoding="utf-8") as handle:
            handle.write(shown + "\n\n")
            handle.flush()
            try:
                done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                      env={**os.environ, "PYTHONSAFEPATH": "1"},  # not the repo's kernels/ folder
                                      timeout=timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"quantizing model {name!r} took over {timeout:.0f}s") from None
        if done.returncode != 0:
            why = _last_error_line(log) or _tail(log, 3)
            raise RuntimeError(f"quantizing model {name!r} failed (exit {done.returncode}, logs/{log.name}): {why}")
        print(f"[bench] model {name} ready in {time.monotonic() - t0:.0f}s: {target}", flush=True)

    # -- one scenario
    def prepare(self, s: Scenario) -> tuple[list[str], dict[str, str], Stack, list[str]]:
        """The command, environment, stack and activating plugins of ``s``; builds no model (see :meth:`begin`).

        Raises:
            SkipScenario: the row cannot run here. ScenarioError (and ValueError etc.): it cannot run as written.
        """
        if s.peer == "liger":
            if self.on_cpu:
                raise SkipScenario("Liger-Kernel needs a CUDA GPU")
            if not benchlib.has_module("liger_kernel"):
                raise SkipScenario(
                    "liger-kernel is not installed (carry its wheel in wheels/; see benchmarks/README.md)"
                )
        gptq_model = self.is_gptq_model(s.model)
        if s.peft == "qlora" and not gptq_model and not benchlib.has_module("bitsandbytes"):
            raise SkipScenario("bitsandbytes is not installed (carry its wheel in wheels/)")
        if not self.on_cpu and s.num_gpus > self.num_gpus:
            raise SkipScenario(f"needs {s.num_gpus} GPUs, {self.num_gpus} visible")
        if s.distributed in benchlib.DEEPSPEED_STAGES and not benchlib.has_module("deepspeed"):
            raise SkipScenario(
                f"distributed: {s.distributed} needs deepspeed, which is not installed (carry its wheel and its "
                "dependencies' in wheels/deepspeed/; see benchmarks/README.md)"
            )
        stack = resolve_stack(s.plugins, s.plugins_label)
        active = check_stack_activates(stack)
        if gptq_model != (GPTQ_PLUGIN in active):
            raise ScenarioError(
                f"{s.name}: model {s.model!r} is a GPTQ checkpoint but the stack has no peft.quantization.auto_gptq "
                "section (nothing would load it); add the section"
                if gptq_model
                else f"{s.name}: the stack loads GPTQ checkpoints (peft.quantization.auto_gptq) but model {s.model!r} "
                "is not one; use a model with gptq_of: {model: NAME, ...} in the scenarios file's models"
            )
        extra_base = None
        if s.accelerate_config:
            extra_base = yaml.safe_load(Path(s.accelerate_config).read_text(encoding="utf-8")) or {}
        cfg_path = self.work_dir / "configs" / f"{s.name}.yaml"
        cfg_path.parent.mkdir(exist_ok=True)
        write_accelerate_config(s, stack, cfg_path, on_cpu=self.on_cpu, entry=self.entry, extra_base=extra_base)
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env[benchlib.ROW_ENV] = f"{os.getpid()}:{s.name}"
        if s.distributed in benchlib.DEEPSPEED_STAGES:
            env.update(DEEPSPEED_ENV)
            env["DS_ACCELERATOR"] = "cpu" if self.on_cpu else "cuda"
        argv = [*launch_argv(self.launcher), "--config_file", str(cfg_path), str(TRAIN_SCRIPT), *train_args_for(s)]
        argv += ["--model-dir", self.planned_model_dir(s), "--result-json", str(self.work_dir / f"{s.name}.json")]
        if stack.body is not None:
            if self.entry == ENTRY_SECTION:
                accel_file = cfg_path  # the Accelerate config itself; its acceleration: section is read
            else:
                accel_file = self.work_dir / "configs" / f"{s.name}.acceleration.yaml"
                accel_file.write_text(yaml.safe_dump({"plugins": dict(stack.body)}, sort_keys=False), encoding="utf-8")
                env["ACCELERATION_FRAMEWORK_CONFIG_FILE"] = str(accel_file)
            argv += ["--acceleration-config", str(accel_file), "--entry", self.entry]
        return argv, env, stack, active

    # -- one scenario: planned, launched (maybe before its turn), given its go, waited for
    def budget_left(self) -> float | None:
        return self.args.time_budget - (time.monotonic() - self.started) if self.args.time_budget else None

    def plan(self, s: Scenario) -> RowProcess | dict[str, Any]:
        """The process of ``s`` ready to launch, or its finished row when it cannot run (skipped / failed)."""
        row = base_row(s, self.sfile, _parse_overrides(self.args.model_set))
        try:
            argv, env, stack, active = self.prepare(s)
        except SkipScenario as exc:
            row.update(status="skipped", note=str(exc))
            return row
        except (ScenarioError, ValueError, RuntimeError, OSError) as exc:
            row.update(status="failed", note=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500])
            return row
        row["command"] = display_command(argv)
        row["active_plugins"] = "+".join(active)
        row["entry"] = self.entry if stack.body is not None else ""
        go_file = None
        if self.overlap:
            go_file = self.work_dir / "go" / s.name
            go_file.parent.mkdir(exist_ok=True)
            go_file.unlink(missing_ok=True)
            env[benchlib.GO_FILE_ENV] = str(go_file)
            env[benchlib.RUNNER_PID_ENV] = str(os.getpid())
            env[benchlib.BASE_NICE_ENV] = str(os.getpriority(os.PRIO_PROCESS, 0))
        log = self.out_dir / "logs" / f"{s.name}.log"
        return RowProcess(s, row, argv, env, log, self.work_dir / f"{s.name}.json", go_file, events={})

    def launch(self, rp: RowProcess, prestarted: bool) -> None:
        """Start the row's ``accelerate launch`` (with overlap on: at a lower priority, see ``_lower_priority``)."""
        rp.result_path.unlink(missing_ok=True)
        rp.prestarted = prestarted
        shown = "prestarted, waits for its go: " if prestarted else ""
        print(f"[bench] {rp.s.name}: {shown}{rp.row['command']}", flush=True)
        rp.launched_mono = time.monotonic()
        rp.launched_at = time.time()  # wall clock: compared with the worker's timestamps (same machine)
        with rp.log.open("w", encoding="utf-8") as handle:
            handle.write(rp.row["command"] + "\n\n")
            handle.flush()
            rp.proc = subprocess.Popen(
                rp.argv, stdout=handle, stderr=subprocess.STDOUT, env=rp.env, cwd=str(REPO_ROOT),
                start_new_session=True, preexec_fn=_lower_priority if self.overlap else None,
            )  # fmt: skip

    def cancel(self, rp: RowProcess, status: str, note: str) -> dict[str, Any]:
        """Stop a launched row that will not get its go (every process of it, by id); its row says why."""
        if rp.proc is not None:
            if rp.proc.poll() is None:
                _kill_tree(rp.proc)
            rp.events["leftovers_killed"] = reap_row(rp.tag, grace=5.0)
            rp.events["cancelled_at"] = time.time()
        row = base_row(rp.s, self.sfile, _parse_overrides(self.args.model_set)) if status == "skipped" else rp.row
        row.update(status=status, note=note)
        self.record(rp, row, {})
        return row

    def give_go(self, rp: RowProcess) -> None:
        """The row may start using the GPUs: every process of the previous row has exited (:meth:`finish`), and
        on CUDA the GPUs' memory is back to what it was at the first go (up to 10 s of waiting for that)."""
        if self.overlap and not self.on_cpu and self.gos_given == 0:
            self.gpu_idle_mib = gpu_memory_used_mib()  # no row has run yet (model builds have exited)
        elif self.gpu_idle_mib is not None:
            deadline = time.monotonic() + GPU_RELEASE_WAIT_S
            used = gpu_memory_used_mib()
            while (
                used is not None
                and time.monotonic() < deadline
                and any(u - b > GPU_RELEASED_MARGIN_MIB for u, b in zip(used, self.gpu_idle_mib))
            ):
                time.sleep(0.2)
                used = gpu_memory_used_mib()
            rp.events["gpu_mem_used_mib_at_go"] = used
            if used is not None and any(u - b > GPU_RELEASED_MARGIN_MIB for u, b in zip(used, self.gpu_idle_mib)):
                print(f"[bench] {rp.s.name}: WARNING: GPU memory in use at the go: {used} MiB (before the first "
                      f"row: {self.gpu_idle_mib} MiB)", flush=True)  # fmt: skip
        self.gos_given += 1
        if rp.go_file is not None:
            rp.go_file.touch()
        rp.go_mono = time.monotonic()
        rp.go_at = time.time()

    def begin(self, s: Scenario, pending: RowProcess | dict[str, Any] | None) -> RowProcess | dict[str, Any]:
        """Row ``s``'s turn: the time-budget check, its model build, then its go (a row not launched yet is launched
        now). ``pending``: what :meth:`prestart` left for ``s``. Returns the running row, or its finished row."""
        budget_left = self.budget_left()
        # a row that must first build its model (random init + save, tens of seconds for billions of
        # parameters) needs twice the minimum, so the build cannot overrun the budget
        needed = self.args.min_scenario_time * (2 if self.needs_build(s.model) else 1)
        if budget_left is not None and budget_left < needed:
            note = f"time budget ({self.args.time_budget:.0f}s) used up"
            if isinstance(pending, RowProcess):
                return self.cancel(pending, "skipped", note)
            return dict(base_row(s, self.sfile, _parse_overrides(self.args.model_set)), status="skipped", note=note)
        rp = self.plan(s) if pending is None else pending
        if not isinstance(rp, RowProcess):
            return rp
        rp.events["built_model"] = self.needs_build(s.model)
        try:
            self.model_dir(s)  # build (GPU) now: the previous row has exited and this one has no go yet
        except (ScenarioError, ValueError, RuntimeError, OSError) as exc:
            note = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
            if rp.proc is not None:
                return self.cancel(rp, "failed", note)
            rp.row.update(status="failed", note=note)
            return rp.row
        rp.events["model_ready_at"] = time.time()
        rp.timeout = self.args.scenario_timeout
        budget_left = self.budget_left()
        if budget_left is not None:
            rp.timeout = min(rp.timeout, max(budget_left, self.args.min_scenario_time))
        if rp.proc is not None and rp.proc.poll() is None:
            self.give_go(rp)
        elif rp.proc is None:
            self.give_go(rp)  # before the launch: its workers find the go file at once
            self.launch(rp, prestarted=False)
        else:  # prestarted and already ended (failed while importing): its go changes nothing
            rp.go_mono, rp.go_at = time.monotonic(), time.time()
        return rp

    def prestart(self, s: Scenario) -> RowProcess | dict[str, Any] | None:
        """Launch row ``s`` now, while the current row runs: it waits for its go after its imports. None (nothing
        launched) when the time budget could not let it run anyway; a finished row when it cannot run at all."""
        budget_left = self.budget_left()
        if budget_left is not None and budget_left < self.args.min_scenario_time:
            return None
        rp = self.plan(s)
        if isinstance(rp, RowProcess):
            self.launch(rp, prestarted=True)
        return rp

    def finish(self, rp: RowProcess) -> dict[str, Any]:
        """Wait for the row (its timeout counts from its go), make sure every process of it has ended, read its
        result."""
        row = rp.row
        started = max(rp.go_mono or rp.launched_mono, rp.launched_mono)
        try:
            code = rp.proc.wait(timeout=max(rp.timeout - (time.monotonic() - started), 0.0))
        except subprocess.TimeoutExpired:
            _kill_tree(rp.proc)
            code = None
        ended = time.time()
        row["wall_s"] = time.monotonic() - rp.launched_mono
        # the next row's go needs the GPU memory of this one released: none of its processes may be left
        leftovers = reap_row(rp.tag)
        rp.events["exited_at"] = time.time()
        if leftovers:
            rp.events["leftovers_killed"] = leftovers
            print(f"[bench] {rp.s.name}: killed processes left after its launcher exited: {leftovers}", flush=True)
        result = json.loads(rp.result_path.read_text(encoding="utf-8")) if rp.result_path.is_file() else {}
        row["wall_breakdown"] = wall_breakdown(result, rp.launched_at, ended)
        if code is None:
            row.update(status="failed", note=f"timed out after {rp.timeout:.0f}s")
        elif code != 0 or result.get("status") != "ok":
            note = result.get("error") or _last_error_line(rp.log) or f"exit code {code}"
            row.update(status="failed", note=str(note).replace("\n", " ")[:500])
        else:
            fill_result(row, result)
            self.losses[rp.s.name] = list(result.get("losses") or [])
        start_up = result.get("start_up") or {}
        early = ["CUDA initialised"] if start_up.get("cuda_initialized_at_wait") else []
        early += [f"{m} imported" for m in start_up.get("deferred_modules_loaded_at_wait") or []]
        if early:  # the waiting process did what it must leave for after its go
            warning = f"before its go: {', '.join(early)}"
            print(f"[bench] {rp.s.name}: WARNING: {warning}", flush=True)
            row["note"] = f"{row.get('note', '')}; {warning}".strip("; ")
        self.record(rp, row, result)
        return row

    def record(self, rp: RowProcess, row: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """One entry of ``logs/timeline.json``: the runner's times of the row and its workers' own."""
        entry: dict[str, Any] = {
            "scenario": rp.s.name, "row": rp.tag, "status": row.get("status"), "prestarted": rp.prestarted,
            "launched_at": rp.launched_at if rp.proc is not None else None, "go_at": rp.go_at,
            **(rp.events or {}),
        }  # fmt: skip
        entry.update({f"worker_{k}": v for k, v in (result.get("timestamps") or {}).items()})
        entry.update({f"worker_{k}": v for k, v in (result.get("start_up") or {}).items()})
        self.timeline.append(entry)

    def save(self) -> None:
        s_by_name = {s.name: s for s in self.scenarios}
        compute_relative(self.rows, self.losses, s_by_name)
        compute_scaling(self.rows, self.losses, s_by_name)
        compute_fits(self.rows, s_by_name)
        write_csv(self.rows, self.out_dir / "results.csv")
        (self.out_dir / "losses.json").write_text(json.dumps(self.losses, indent=1), encoding="utf-8")
        (self.out_dir / "logs" / "timeline.json").write_text(json.dumps(self.timeline, indent=1), encoding="utf-8")

    def run(self) -> Path:
        invocation = display_command([sys.executable, *sys.argv])
        (self.out_dir / "command.txt").write_text(
            f"{invocation}\n# launcher: {self.launcher}; entry: {self.entry}; cwd: repository root; started {benchlib.environment_info()['date']}\n",
            encoding="utf-8",
        )
        pending: RowProcess | dict[str, Any] | None = None  # what prestart() left for the next row
        current: RowProcess | dict[str, Any] | None = None
        try:
            for index, s in enumerate(self.scenarios):
                current, pending = self.begin(s, pending), None
                if self.overlap and isinstance(current, RowProcess) and index + 1 < len(self.scenarios):
                    pending = self.prestart(self.scenarios[index + 1])  # its start-up overlaps this row
                row = self.finish(current) if isinstance(current, RowProcess) else current
                row.setdefault("command", "")
                took = f" in {row['wall_s']:.0f}s" if row.get("wall_s") else ""
                if isinstance(current, RowProcess) and current.prestarted and current.go_at is not None:
                    took += (f" ({current.events['exited_at'] - current.go_at:.0f}s after its go; its start-up "
                             "overlapped the previous row)")  # fmt: skip
                print(f"[bench] {s.name}: {row['status']}{took} {row.get('note', '')}".rstrip(), flush=True)
                if row.get("wall_breakdown"):
                    print(f"[bench] {s.name}: wall seconds: {row['wall_breakdown']}", flush=True)
                self.rows.append(row)
                self.save()
        finally:
            for left in (current, pending):  # interrupted: stop the running row and the one waiting for its go
                if isinstance(left, RowProcess) and left.proc is not None and left.proc.poll() is None:
                    _kill_tree(left.proc)
                    reap_row(left.tag, grace=5.0)
            # the built models can be many GB
            if not self.args.keep_models and not self.args.work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
        charts = write_charts(self.rows, self.out_dir, self.losses)
        table = markdown_table(self.rows)
        (self.out_dir / "summary.md").write_text(table + "\n", encoding="utf-8")
        print(table)
        print(f"\n[bench] results: {self.out_dir / 'results.csv'}; charts: {', '.join(p.name for p in charts)}")
        return self.out_dir / "results.csv"


def merge_results(csvs: Sequence[Path], out_dir: Path, refit: str | None = None) -> int:
    """Concatenate result CSVs (ratios stay as measured: they are within a group, and a group must come from
    one call); refuses a scenario present twice or a group split over several files. ``refit``: a scenarios
    file whose ``extrapolate_layers`` rows get their memory extrapolation recomputed (:func:`compute_fits`),
    e.g. after the fit itself changed; the measured columns are kept as they are."""
    rows: list[dict[str, str]] = []
    losses: dict[str, list[float]] = {}
    group_source: dict[str, Path] = {}
    for path in csvs:
        for row in read_csv(path):
            if any(r["scenario"] == row["scenario"] for r in rows):
                print(f"error: scenario {row['scenario']!r} appears in more than one CSV", file=sys.stderr)
                return 2
            first = group_source.setdefault(row["group"], path)
            if first != path:
                print(f"error: group {row['group']!r} is split over {first} and {path}: its ratios would "
                      "compare runs of different calls", file=sys.stderr)  # fmt: skip
                return 2
            rows.append(row)
        loss_file = path.with_name("losses.json")
        if loss_file.is_file():
            losses.update(json.loads(loss_file.read_text(encoding="utf-8")))
    if refit:
        compute_fits(rows, {sc.name: sc for sc in benchlib.load_scenarios(refit).scenarios})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "results.csv")
    (out_dir / "losses.json").write_text(json.dumps(losses, indent=1), encoding="utf-8")
    write_charts(rows, out_dir, losses)
    table = markdown_table(rows)
    (out_dir / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


# ----------------------------------------------------------------------------------------------- readme
def render_readme_block(csv_path: str, repo_root: Path = REPO_ROOT) -> str:
    path = Path(csv_path)
    full = path if path.is_absolute() else repo_root / path
    rows = read_csv(full)
    try:
        shown = full.resolve().relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        shown = str(full)
    return f"{README_BEGIN} source={shown} -->\n{readme_table(rows, shown)}\n{README_END}"


def _marked_blocks(text: str) -> list[tuple[int, int, str | None]]:
    """``(start, end, source CSV or None)`` of every benchmark-table block of ``text``, in order."""
    blocks: list[tuple[int, int, str | None]] = []
    start = text.find(README_BEGIN)
    while start >= 0:
        end = text.find(README_END, start + 1)
        if end < 0:
            break
        header = text[start : text.find("-->", start)]
        source = header.split("source=", 1)[1].strip() if "source=" in header else None
        blocks.append((start, end + len(README_END), source))
        start = text.find(README_BEGIN, end)
    return blocks


def update_readme(readme: Path, csv_path: str | None, check: bool) -> int:
    """Regenerate the tables between the markers of ``readme`` (``--check``: only verify they are current).

    Without ``csv_path`` every marked block is regenerated from the CSV its marker names (a README may carry
    several, e.g. the core matrix and the GPTQ-LoRA rows); with ``csv_path`` the first block (or a new one at the
    end) is generated from that CSV.
    """
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    blocks = _marked_blocks(text)
    if csv_path is None:
        if not blocks:
            print(f"error: {readme} has no '{README_BEGIN} source=... -->' marker; pass --csv", file=sys.stderr)
            return 2
        if any(source is None for _, _, source in blocks):
            print(f"error: a marker in {readme} names no source=CSV; pass --csv", file=sys.stderr)
            return 2
        new = text
        for start, end, source in reversed(blocks):  # from the end, so earlier offsets stay valid
            new = new[:start] + render_readme_block(str(source)) + new[end:]
        sources = ", ".join(str(source) for _, _, source in blocks)
    else:
        block = render_readme_block(csv_path)
        if blocks:
            start, end, _ = blocks[0]
            new = text[:start] + block + text[end:]
        else:
            new = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
        sources = csv_path
    if check:
        if new != text:
            print(
                f"{readme}: the benchmark table is out of date; run: python benchmarks/run_benchmarks.py readme {readme}"
            )
            return 1
        print(f"{readme}: the benchmark tables match {sources}")
        return 0
    readme.write_text(new, encoding="utf-8")
    print(f"{readme}: tables regenerated from {sources}")
    return 0


# ----------------------------------------------------------------------------------------------- CLI
def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_benchmarks.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the scenarios of a file")
    r.add_argument("scenarios", help="scenarios YAML (e.g. benchmarks/scenarios.yaml)")
    r.add_argument("--out", help="results folder (default benchmarks/results/<date>-<gpu>-x<count>-<file>)")
    r.add_argument("--only", nargs="+", default=[], help="scenario names to run")
    r.add_argument("--group", nargs="+", default=[], help="scenario groups to run")
    r.add_argument(
        "--extended",
        action="store_true",
        help="also run the rows marked `extended: true` (default: the core matrix only)",
    )
    r.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override a scenario key everywhere")
    r.add_argument("--model-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key of every random-init model (e.g. a shrunken dry run of the GPU "
                   "matrix on CPU: num_hidden_layers=1 hidden_size=64 ...)")  # fmt: skip
    r.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    r.add_argument("--entry", choices=["auto", ENTRY_SECTION, ENTRY_ENV], default="auto",
                   help="how the stack reaches the workers: the acceleration: section of the Accelerate config "
                   "(needs the Accelerate integration) or ACCELERATION_FRAMEWORK_CONFIG_FILE; auto picks section "
                   "when the integration is installed")  # fmt: skip
    r.add_argument("--launcher", choices=["auto", *LAUNCHERS], default="auto",
                   help="auto: stock 'accelerate launch' when this package's start-up hook is installed, "
                   "else 'fms-accelerate launch' (same arguments)")  # fmt: skip
    r.add_argument("--work-dir", help="where models/configs go (kept); default: a temp folder, removed at the end")
    r.add_argument("--keep-models", action="store_true", help="keep the temp folder with the built models")
    r.add_argument(
        "--time-budget", type=float, default=0.0, help="seconds for the whole run; later scenarios are skipped"
    )
    r.add_argument(
        "--min-scenario-time", type=float, default=45.0, help="do not start a scenario with less budget left"
    )
    r.add_argument(
        "--scenario-timeout",
        type=float,
        default=600.0,
        help="seconds a row may take from its go (with overlap: its start-up before the go not counted)",
    )
    r.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="start each row's accelerate launch while the previous row runs; its workers import, then "
                   "wait for a go given once the previous row's processes have exited (default: on with CUDA, "
                   "off on CPU)")  # fmt: skip
    r.add_argument("--compare", nargs="?", const="auto", default=None, metavar="REFERENCE_CSV",
                   help="compare with reference results after the run (non-zero exit on regression)")  # fmt: skip
    r.add_argument("--threshold", type=float, default=0.05, help="regression threshold for --compare")
    t = sub.add_parser("table", help="print the Markdown table of a results CSV")
    t.add_argument("csv")
    t.add_argument("--style", choices=["full", "readme"], default="full")
    c = sub.add_parser("charts", help="render the PNG charts of a results CSV")
    c.add_argument("csv")
    c.add_argument("--out", help="folder (default: next to the CSV)")
    g = sub.add_parser("merge", help="join results CSVs of several calls (e.g. one per group) into one folder")
    g.add_argument("csvs", nargs="+")
    g.add_argument("--out", required=True, help="folder for the merged results.csv, losses.json, charts, summary.md")
    g.add_argument("--refit", metavar="SCENARIOS", help="recompute the memory extrapolation with this scenarios file")
    m = sub.add_parser("readme", help="regenerate the performance table between the markers of a Markdown file")
    m.add_argument("markdown", help="e.g. README.md")
    m.add_argument("--csv", help="results CSV (default: the source= named in the file's marker)")
    m.add_argument("--check", action="store_true", help="exit 1 if the table differs from what the CSV gives")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "table":
        rows = read_csv(args.csv)
        print(markdown_table(rows) if args.style == "full" else readme_table(rows, args.csv))
        return 0
    if args.command == "charts":
        rows = read_csv(args.csv)
        out = Path(args.out) if args.out else Path(args.csv).parent
        out.mkdir(parents=True, exist_ok=True)
        losses_path = Path(args.csv).with_name("losses.json")
        losses = json.loads(losses_path.read_text(encoding="utf-8")) if losses_path.is_file() else None
        for path in write_charts(rows, out, losses):
            print(path)
        return 0
    if args.command == "readme":
        return update_readme(Path(args.markdown), args.csv, args.check)
    if args.command == "merge":
        return merge_results([Path(p) for p in args.csvs], Path(args.out), args.refit)
    try:
        sfile = benchlib.load_scenarios(args.scenarios, _parse_overrides(args.set))
        scenarios = sfile.select(args.only, args.group, args.extended)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not scenarios:
        print("error: no scenario selected", file=sys.stderr)
        return 2
    csv_path = Runner(sfile, scenarios, args).run()
    if args.compare is not None:
        import compare

        reference = None if args.compare == "auto" else args.compare
        return compare.main(
            [str(csv_path), *(["--reference", reference] if reference else []), "--threshold", str(args.threshold)]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
