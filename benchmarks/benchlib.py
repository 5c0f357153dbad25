"""Shared pieces of the benchmark harness: scenario schema, model building, data, environment, CSV columns.

Used by ``run_benchmarks.py`` (the runner, one process for the whole matrix) and ``train_bench.py`` (the
training script each scenario runs under ``accelerate launch``). Both are scripts in this folder, so they
import this module as a sibling (``sys.path[0]`` is this folder when they run).

Also a small command line for the runner's model building step::

    python benchmarks/benchlib.py build-model --config '{"model_type": "llama", ...}' --out DIR --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import platform
import random
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / "data"
INSTRUCTIONS_JSONL = DATA_DIR / "instructions.jsonl"
TOKENIZER_JSON = DATA_DIR / "tokenizer.json"

PEFT_METHODS = ("full", "lora", "qlora")
PREP_MODES = ("hf", "lean")
PEERS = ("none", "liger")
DATASETS = ("synthetic", "instructions")
COLLATE_MODES = ("pad", "pack", "flatten")
DTYPES = ("bfloat16", "float16", "float32")
DISTRIBUTED = ("ddp", "fsdp1", "fsdp2", "zero2", "zero3")
DEEPSPEED_STAGES = {"zero2": 2, "zero3": 3}
"""``distributed`` values that run under DeepSpeed, and their ZeRO stage."""
RANK_DATA = ("split", "replicate")
MASTER_WEIGHTS = ("dtype", "float32")
"""``master_weights`` values: the weights in the row's ``dtype``, or in float32 under ``dtype`` autocast (AMP)."""
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
"""transformers' own experts backends of MoE models (``from_pretrained(..., experts_implementation=...)``)."""

PAD_ID = 0
EOS_ID = 1

# overlapped start-up (run_benchmarks.py starts a row's `accelerate launch` while the previous row runs;
# train_bench.py waits after its imports): the variables the runner gives every process of a row
GO_FILE_ENV = "FMS_BENCH_GO_FILE"
"""A file the runner creates once the previous row's processes have exited; train_bench.py waits for it after its
imports (before anything initialises CUDA) when this is set."""
RUNNER_PID_ENV = "FMS_BENCH_RUNNER_PID"
"""The runner's process id: a process waiting for its go stops when the runner is gone."""
BASE_NICE_ENV = "FMS_BENCH_BASE_NICE"
"""The runner's nice value, which a row's processes go back to at their go."""
ROW_ENV = "FMS_BENCH_ROW"
"""Names the row (runner pid and scenario): the runner finds every process of a row by it, whatever its session."""
START_NICE = 10
"""How much lower the priority of a row's launcher (and so of its workers until their go) is, with overlap on."""

VERSION_PACKAGES = (
    "torch", "transformers", "accelerate", "peft", "bitsandbytes", "triton", "liger-kernel", "deepspeed",
)  # fmt: skip


class ScenarioError(ValueError):
    """A scenarios file that cannot be run as written (the message names the scenario, the key and the fix)."""


# ----------------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """One benchmark run: a model, a fine-tuning method, a plugin stack and a workload.

    Attributes:
        name: unique row name in the CSV.
        group: scenarios compared with each other; ratios and loss agreement are against the group's baseline.
        model: key of the scenarios file's ``models:`` section, or a local model folder.
        peft: ``full`` (all parameters), ``lora`` (bf16 base) or ``qlora`` (4-bit base).
        plugins: acceleration stack: ``"none"``, the short name of a shipped configuration in
            ``launch_configs/`` (``fms-accelerate configs`` lists them), a YAML path (acceleration-only file or
            Accelerate config with an ``acceleration:`` section), or the acceleration body inline (a mapping).
        prep: how a run *without* plugins prepares a 4-bit model: ``hf`` = the Hugging Face docs recipe
            (``prepare_model_for_kbit_training``, which upcasts frozen non-4-bit params to fp32), ``lean`` =
            the same without that upcast. Identical for ``full`` / ``lora``.
        peer: another library applied to the same model: ``none`` or ``liger`` (Liger-Kernel).
        baseline: this row is its group's baseline (default: the group's first row with no plugins, no peer,
            ``prep: hf``).
        accelerate_config: optional base Accelerate config (path) to start from, e.g. an FSDP config;
            default: a single-node config written by the runner.
        inject_delay_ms: sleep this long after every optimizer step (test hook: simulates a slowdown).
        loss_rtol: largest relative per-step loss difference from the baseline that still counts as agreeing.
        distributed: how ``num_gpus`` processes share the work: ``ddp`` (plain data parallel; nothing on one
            GPU), ``fsdp1`` or ``fsdp2`` (Accelerate's FSDP with the runner's ``fsdp_config``, also on one GPU),
            ``zero2`` or ``zero3`` (Accelerate's DeepSpeed ZeRO stage 2 / 3 with the runner's ``deepspeed_config``,
            also on one GPU; needs the ``deepspeed`` package).
        max_grad_norm: clip the gradient norm at this value before every optimizer step (0: no clipping). Under
            DeepSpeed it is the engine's ``gradient_clipping``; elsewhere ``accelerator.clip_grad_norm_``.
        rank_data: ``split`` (rank ``r`` trains on global batch ``i * world + r``) or ``replicate`` (every rank
            trains on the batches a 1-GPU run sees, so the averaged gradient, hence the loss curve, equals the
            1-GPU run's: a tight loss-parity check of the sharding; throughput is unaffected).
        extrapolate_layers: > 0: rows of the same group and stack that differ only in the model's layer count
            form a series; the runner fits peak memory per GPU linearly in the layer count and extrapolates to
            this many layers (reported as an extrapolation, next to the measured points).
        extended: not part of the file's default selection (the core matrix): run only when named with
            ``--only`` / ``--group`` or when the runner is given ``--extended``.
        experts_implementation: MoE models only: transformers' experts backend (``eager``, ``grouped_mm``,
            ``batched_mm``) passed to ``from_pretrained``; unset: transformers' default (``grouped_mm`` where it
            can dispatch). A plugin that replaces the experts forward (``training.moe.scattermoe``) overrides it.
        lora_target_parameters: PEFT ``target_parameters`` (LoRA on parameters rather than modules, e.g. the
            3-D expert weights ``experts.gate_up_proj``, ``experts.down_proj`` of MoE models), next to
            ``lora_target_modules``.
        master_weights: ``dtype`` (default): the weights are loaded and trained in ``dtype``. ``float32``: the
            standard mixed-precision (AMP) recipe: the weights are loaded in float32 (from the same checkpoint as
            the other rows) and the optimizer updates them in float32, while forward and backward run under
            ``dtype`` autocast (Accelerate ``mixed_precision`` bf16 / fp16; on CPU bf16 only). With ``dtype:
            float32`` it is plain float32. ``peft: full`` or ``lora`` without DeepSpeed (whose bf16 mode keeps
            float32 master weights of its own); the reference of a full fine-tuning row under DeepSpeed.
        compile_layers: after ``accelerator.prepare``, compile every decoder layer with ``torch.compile(dynamic=True)``
            (``nn.Module.compile``; the layers share one compiled graph, the row length stays symbolic). The same
            for HF and plugin rows, so that a compiled stack is compared with a compiled baseline. The first steps
            pay the compilation: give the row enough ``warmup_steps``.
    """

    name: str
    group: str
    model: str
    peft: str = "lora"
    plugins: str | Mapping[str, Any] = "none"
    prep: str = "hf"
    peer: str = "none"
    baseline: bool | None = None
    batch_size: int = 4
    seq_len: int = 2048
    steps: int = 30
    warmup_steps: int = 10
    gradient_checkpointing: bool = True
    num_gpus: int = 1
    dataset: str = "synthetic"
    collate: str = "pad"
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    learning_rate: float = 1e-4
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    bnb_quant_type: str = "nf4"
    bnb_double_quant: bool = True
    accelerate_config: str | None = None
    seed: int = 42
    inject_delay_ms: float = 0.0
    loss_rtol: float = 0.03
    distributed: str = "ddp"
    max_grad_norm: float = 0.0
    rank_data: str = "split"
    extrapolate_layers: int = 0
    extended: bool = False
    experts_implementation: str | None = None
    lora_target_parameters: tuple[str, ...] = ()
    master_weights: str = "dtype"
    compile_layers: bool = False

    @property
    def uses_plugins(self) -> bool:
        return not (isinstance(self.plugins, str) and self.plugins == "none")

    @property
    def plugins_label(self) -> str:
        """How the stack is written in the CSV: the config name/path, or ``inline`` for a mapping."""
        if isinstance(self.plugins, Mapping):
            return "inline:" + json.dumps(self.plugins, sort_keys=True, separators=(",", ":"))
        return self.plugins

    def is_default_baseline_candidate(self) -> bool:
        return not self.uses_plugins and self.peer == "none" and self.prep == "hf"


SCENARIO_FIELDS = {f.name: f for f in dataclasses.fields(Scenario)}


def _check_choice(where: str, key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ScenarioError(f"{where}: {key}={value!r} is not one of {', '.join(choices)}")


def _coerce(where: str, key: str, value: Any) -> Any:
    f = SCENARIO_FIELDS[key]
    default = f.default
    if key in ("lora_target_modules", "lora_target_parameters"):
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, Sequence):
            raise ScenarioError(f"{where}: {key} must be a list of names, got {value!r}")
        return tuple(str(v) for v in value)
    if key == "plugins":
        if value is None:
            return "none"
        if not isinstance(value, (str, Mapping)):
            raise ScenarioError(f"{where}: plugins must be 'none', a config name, a path or a mapping, got {value!r}")
        return value
    if key == "baseline":
        if value is not None and not isinstance(value, bool):
            raise ScenarioError(f"{where}: baseline must be true or false, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ScenarioError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScenarioError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if value is not None and not isinstance(value, str):
        raise ScenarioError(f"{where}: {key} must be a string, got {value!r}")
    return value


def make_scenario(raw: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> Scenario:
    """Build and validate one :class:`Scenario` from its mapping merged over ``defaults``."""
    merged = {**defaults, **raw}
    unknown = sorted(set(merged) - set(SCENARIO_FIELDS))
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SCENARIO_FIELDS)}")
    for required in ("name", "group", "model"):
        if required not in merged:
            raise ScenarioError(f"{where}: missing required key {required!r}")
    kwargs = {k: _coerce(where, k, v) for k, v in merged.items()}
    s = Scenario(**kwargs)
    where = f"{where} ({s.name})"
    _check_choice(where, "peft", s.peft, PEFT_METHODS)
    _check_choice(where, "prep", s.prep, PREP_MODES)
    _check_choice(where, "peer", s.peer, PEERS)
    _check_choice(where, "dataset", s.dataset, DATASETS)
    _check_choice(where, "collate", s.collate, COLLATE_MODES)
    _check_choice(where, "dtype", s.dtype, DTYPES)
    _check_choice(where, "distributed", s.distributed, DISTRIBUTED)
    _check_choice(where, "rank_data", s.rank_data, RANK_DATA)
    if s.experts_implementation is not None:
        _check_choice(where, "experts_implementation", s.experts_implementation, EXPERTS_IMPLEMENTATIONS)
    _check_choice(where, "master_weights", s.master_weights, MASTER_WEIGHTS)
    if s.master_weights == "float32" and s.peft == "qlora":
        raise ScenarioError(
            f"{where}: master_weights: float32 needs peft: full or lora (a 4-bit base has no float32 weights, and "
            "PEFT keeps the LoRA adapters in float32 already); remove master_weights from this row"
        )
    if s.master_weights == "float32" and s.distributed in DEEPSPEED_STAGES:
        raise ScenarioError(
            f"{where}: master_weights: float32 with distributed: {s.distributed}: DeepSpeed's bf16 mode keeps float32 "
            "master weights itself; remove master_weights from this row (use it on the reference row without "
            "DeepSpeed)"
        )
    if s.lora_target_parameters and s.peft == "full":
        raise ScenarioError(f"{where}: lora_target_parameters needs peft: lora or qlora (peft is full)")
    if s.extrapolate_layers < 0:
        raise ScenarioError(f"{where}: extrapolate_layers must be >= 0 (0: no extrapolation)")
    if s.max_grad_norm < 0:
        raise ScenarioError(f"{where}: max_grad_norm must be >= 0 (0: no clipping), got {s.max_grad_norm}")
    if s.steps <= s.warmup_steps:
        raise ScenarioError(f"{where}: steps ({s.steps}) must exceed warmup_steps ({s.warmup_steps})")
    if s.batch_size < 1 or s.seq_len < 2 or s.num_gpus < 1:
        raise ScenarioError(f"{where}: batch_size, num_gpus must be >= 1 and seq_len >= 2")
    if s.dataset == "synthetic" and s.collate != "pad":
        raise ScenarioError(f"{where}: synthetic data is full-length already; collate must be 'pad' (no padding)")
    return s


@dataclass(frozen=True)
class ScenarioFile:
    """A parsed scenarios file.

    Attributes:
        models: name -> model spec (``{"config": {...}}`` random init, or ``{"path": DIR}``).
        scenarios: in file order.
        baselines: group -> name of its baseline scenario.
    """

    path: str
    models: Mapping[str, Mapping[str, Any]]
    scenarios: tuple[Scenario, ...]
    baselines: Mapping[str, str] = field(default_factory=dict)

    def select(
        self, names: Sequence[str] | None, groups: Sequence[str] | None, extended: bool = False
    ) -> list[Scenario]:
        """Scenarios whose name is in ``names`` or group in ``groups``; with both empty, the core matrix (every
        row not marked ``extended``), or every row when ``extended``. A row named in ``names`` always runs; a
        group selects its ``extended`` rows only with ``extended``."""
        known = {s.name for s in self.scenarios}
        for n in names or ():
            if n not in known:
                raise ScenarioError(f"no scenario named {n!r} in {self.path}; known: {', '.join(sorted(known))}")
        known_groups = {s.group for s in self.scenarios}
        for g in groups or ():
            if g not in known_groups:
                raise ScenarioError(f"no group {g!r} in {self.path}; known: {', '.join(sorted(known_groups))}")
        every = not names and not groups
        return [
            s
            for s in self.scenarios
            if s.name in (names or ()) or ((every or s.group in (groups or ())) and (extended or not s.extended))
        ]


def load_scenarios(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ScenarioFile:
    """Read and validate a scenarios YAML file.

    Args:
        path: the file. Layout: ``models:`` (name -> spec), ``defaults:`` (scenario keys), ``scenarios:`` (list).
        overrides: scenario keys forced on every scenario (the runner's ``--set KEY=VALUE``).

    Raises:
        ScenarioError: any problem, naming the scenario and key.
    """
    with open(path, encoding="utf-8") as handle:
        doc = yaml.safe_load(handle) or {}
    if not isinstance(doc, Mapping):
        raise ScenarioError(f"{path}: top level must be a mapping with models/defaults/scenarios")
    unknown = sorted(set(doc) - {"models", "defaults", "scenarios", "description", "anchors"})
    if unknown:  # `anchors:` holds YAML anchors the scenarios reuse (e.g. one inline stack for several rows)
        raise ScenarioError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)} (valid: models, defaults, scenarios, "
            "description, anchors)"
        )
    models = resolve_model_specs(doc.get("models") or {}, str(path))
    defaults = {**(doc.get("defaults") or {}), **(overrides or {})}
    raw_list = doc.get("scenarios") or []
    if not isinstance(raw_list, list) or not raw_list:
        raise ScenarioError(f"{path}: 'scenarios' must be a non-empty list")
    scenarios = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_list):
        where = f"{path}: scenarios[{i}]"
        if not isinstance(raw, Mapping):
            raise ScenarioError(f"{where}: must be a mapping")
        s = make_scenario({**raw, **(overrides or {})}, defaults, where)
        if s.name in seen:
            raise ScenarioError(f"{where}: duplicate scenario name {s.name!r}")
        seen.add(s.name)
        if s.model not in models and not Path(s.model).exists():
            raise ScenarioError(f"{where}: model {s.model!r} is neither in 'models:' nor an existing folder")
        if "gptq" in models.get(s.model, {}) and (s.peft != "qlora" or not s.uses_plugins or s.peer != "none"):
            raise ScenarioError(
                f"{where} ({s.name}): model {s.model!r} is a GPTQ checkpoint, which only a plugin stack loads: set "
                "peft: qlora and a plugins stack with peft.quantization.auto_gptq (no peer); baselines use the "
                "model it is quantized from"
            )
        scenarios.append(s)
    baselines: dict[str, str] = {}
    for s in scenarios:
        if s.baseline:
            if s.group in baselines:
                raise ScenarioError(f"{path}: group {s.group!r} has two baselines: {baselines[s.group]}, {s.name}")
            baselines[s.group] = s.name
    for s in scenarios:
        if s.group not in baselines and s.baseline is not False and s.is_default_baseline_candidate():
            baselines[s.group] = s.name
    return ScenarioFile(path=str(path), models=models, scenarios=tuple(scenarios), baselines=baselines)


# ----------------------------------------------------------------------------------------------- models
def resolve_model_specs(raw: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Validate the ``models:`` section; a ``layers_of`` entry becomes a ``config`` spec with ``derived_from``, a
    ``gptq_of`` entry one with ``quantized_from`` and ``gptq`` (:func:`resolve_gptq_spec`).

    Each model needs exactly one of ``config`` (random init, built once per run), ``path`` (a local checkpoint),
    ``layers_of: {model: NAME, num_hidden_layers: N}``: the first ``N`` decoder layers of another random-init
    model of the file, served from *its* checkpoint (the runner links its weight files; the layers beyond ``N``
    are not loaded), so a layer-count series costs one build; or ``gptq_of: {model: NAME, bits: 4, ...}``: a
    GPTQ checkpoint that the runner writes once per run from another random-init model of the file with this
    project's quantizer (``fms-accelerate quantize``; settings in :data:`GPTQ_DEFAULTS`), for rows whose stack
    loads GPTQ checkpoints (``peft.quantization.auto_gptq``).

    Raises:
        ScenarioError: a malformed entry (the message names it and the fix).
    """
    out: dict[str, dict[str, Any]] = {}
    kinds = {"config", "path", "layers_of", "gptq_of"}
    for name, spec in raw.items():
        if not isinstance(spec, Mapping) or len(set(spec) & kinds) != 1 or set(spec) - kinds:
            raise ScenarioError(
                f"{where}: model {name!r} needs exactly one of 'config' (random init), 'path', "
                "'layers_of: {model: NAME, num_hidden_layers: N}' or 'gptq_of: {model: NAME, bits: 4, ...}'"
            )
        out[name] = dict(spec)
    for name, spec in list(out.items()):
        if "layers_of" not in spec:
            continue
        ref = spec["layers_of"]
        parent = out.get(ref.get("model")) if isinstance(ref, Mapping) else None
        layers = ref.get("num_hidden_layers") if isinstance(ref, Mapping) else None
        if parent is None or "config" not in parent or "derived_from" in parent or "gptq_of" in parent:
            raise ScenarioError(
                f"{where}: model {name!r}: layers_of.model must name a random-init ('config') model of this file"
            )
        if not isinstance(layers, int) or not 1 <= layers <= int(parent["config"].get("num_hidden_layers", 0)):
            raise ScenarioError(
                f"{where}: model {name!r}: layers_of.num_hidden_layers must be an integer from 1 to the layers of "
                f"{ref['model']!r} ({parent['config'].get('num_hidden_layers')})"
            )
        out[name] = {"config": {**parent["config"], "num_hidden_layers": layers}, "derived_from": ref["model"]}
    for name, spec in list(out.items()):
        if "gptq_of" in spec:
            out[name] = resolve_gptq_spec(name, spec["gptq_of"], out, where)
    return out


GPTQ_DEFAULTS: Mapping[str, Any] = {
    "bits": 4,
    "group_size": 128,
    "desc_act": False,
    "sym": True,
    "method": "rtn",
    "checkpoint_format": "gptq",
    "dtype": "float16",
    "num_samples": 8,
    "seq_len": 256,
}
"""Settings of a ``gptq_of`` model (``fms-accelerate quantize`` flags of the same names). ``method: rtn``
(round-to-nearest) writes the same format as ``gptq`` and the kernels read it the same way, so it is enough
for speed and memory; ``num_samples`` x ``seq_len`` calibration tokens then only measure each layer's output
error. ``dtype``: the unquantized tensors (embeddings, norms, lm_head) as stored; the loader casts them to each
row's training dtype."""
GPTQ_CHOICES: Mapping[str, tuple[Any, ...]] = {
    "bits": (2, 4, 8),
    "method": ("rtn", "gptq"),
    "checkpoint_format": ("gptq", "gptq_v2"),
    "dtype": DTYPES,
}


def resolve_gptq_spec(name: str, raw: Any, models: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, Any]:
    """The resolved spec of a ``gptq_of`` model: its parent's ``config`` (so summaries and layer counts work),
    ``quantized_from`` (the parent's name) and ``gptq`` (:data:`GPTQ_DEFAULTS` updated with the settings given).

    Raises:
        ScenarioError: no such random-init parent, an unknown setting, or a value of the wrong type or range.
    """
    at = f"{where}: model {name!r}: gptq_of"
    ref = raw.get("model") if isinstance(raw, Mapping) else None
    parent = models.get(ref) if isinstance(ref, str) else None
    if parent is None or "config" not in parent or "gptq_of" in parent or "quantized_from" in parent:
        raise ScenarioError(
            f"{at}.model must name a random-init ('config' or 'layers_of') model of this file, got {ref!r}"
        )
    settings = {k: v for k, v in raw.items() if k != "model"}
    unknown = sorted(set(settings) - set(GPTQ_DEFAULTS))
    if unknown:
        raise ScenarioError(f"{at}: unknown setting(s) {', '.join(unknown)}; valid: model, {', '.join(GPTQ_DEFAULTS)}")
    gptq = {**GPTQ_DEFAULTS, **settings}
    for key, value in gptq.items():
        default = GPTQ_DEFAULTS[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ScenarioError(f"{at}.{key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ScenarioError(f"{at}.{key} must be an integer, got {value!r}")
        if key in GPTQ_CHOICES and value not in GPTQ_CHOICES[key]:
            raise ScenarioError(f"{at}.{key}={value!r} is not one of {', '.join(map(str, GPTQ_CHOICES[key]))}")
    if gptq["group_size"] != -1 and gptq["group_size"] < 1:
        raise ScenarioError(f"{at}.group_size must be a positive divisor of the layers' input sizes, or -1")
    if gptq["num_samples"] < 1 or gptq["seq_len"] < 2:
        raise ScenarioError(f"{at}: num_samples must be >= 1 and seq_len >= 2")
    if gptq["desc_act"] and gptq["method"] == "rtn":
        raise ScenarioError(f"{at}: desc_act (act-order) needs method: gptq; round-to-nearest has no column order")
    return {"config": dict(parent["config"]), "quantized_from": ref, "gptq": gptq}


def gptq_label(gptq: Mapping[str, Any]) -> str:
    """Short description of GPTQ settings: ``gptq 4b g128 sym rtn`` (+ ``act-order``, ``v2``)."""
    group = "g-1" if gptq["group_size"] == -1 else f"g{gptq['group_size']}"
    parts = ["gptq", f"{gptq['bits']}b", group, "sym" if gptq["sym"] else "asym", str(gptq["method"])]
    if gptq["desc_act"]:
        parts.append("act-order")
    if gptq["checkpoint_format"] == "gptq_v2":
        parts.append("v2")
    return " ".join(parts)


def model_layers(spec: Mapping[str, Any] | None) -> int | None:
    """Decoder layers of a random-init model spec (``None`` for a local path)."""
    if not spec or "config" not in spec:
        return None
    value = spec["config"].get("num_hidden_layers")
    return int(value) if value is not None else None


def model_spec_summary(spec: Mapping[str, Any]) -> str:
    """Short description of a model spec for the CSV (e.g. ``llama h4096 i14336 L8 v128256``)."""
    if "path" in spec:
        return str(spec["path"])
    c = spec["config"]
    parts = [str(c.get("model_type", "?"))]
    tags = (
        ("hidden_size", "h"), ("intermediate_size", "i"), ("num_hidden_layers", "L"), ("vocab_size", "v"),
        ("num_local_experts", "E"), ("num_experts", "E"), ("num_experts_per_tok", "top"),  # MoE: experts, top-k
    )  # fmt: skip
    for key, tag in tags:
        if key in c:
            parts.append(f"{tag}{c[key]}")
    if "gptq" in spec:
        parts.append(gptq_label(spec["gptq"]))
    return " ".join(parts)


def build_random_model(
    config: Mapping[str, Any], out_dir: str | os.PathLike, device: str, dtype: str, seed: int
) -> None:
    """Create a random-init causal LM from a config mapping and ``save_pretrained`` it to ``out_dir``.

    Args:
        config: ``AutoConfig.for_model`` keywords; must contain ``model_type``.
        out_dir: destination folder (created).
        device: where to initialise (``cuda`` is much faster for billions of parameters).
        dtype: storage dtype of the saved weights.
        seed: torch seed for the initialisation (same seed -> same weights).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    model_type = config.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(str(out_dir))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- data
def load_instruction_token_lists(seq_len: int, tokenizer_path: Path = TOKENIZER_JSON) -> list[list[int]]:
    """Tokenise the shipped instruction dataset; each example ends in ``<eos>`` and is cut to ``seq_len``."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(DATA_DIR))
    try:
        from make_dataset import format_example
    finally:
        sys.path.remove(str(DATA_DIR))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    texts = []
    with INSTRUCTIONS_JSONL.open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            texts.append(format_example(record["instruction"], record["response"]))
    encoded = tokenizer.encode_batch(texts)
    return [([*e.ids, EOS_ID])[:seq_len] for e in encoded]


def make_batches(
    scenario: Scenario, vocab_size: int, num_batches: int, rank: int, world: int,
    examples: list[list[int]] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The batches one rank trains on, identical for every scenario with the same data settings.

    ``examples``: the instruction data already tokenized (:func:`load_instruction_token_lists` at the scenario's
    ``seq_len``); tokenized here when not given.

    Returns a list of dicts of CPU tensors: ``input_ids``, ``labels`` and ``attention_mask`` (pad) or
    ``position_ids`` (flatten), plus ``num_tokens`` (int: non-padding tokens in the batch).
    Global batch ``i`` of rank ``r`` is the ``i * world + r``-th batch of one fixed sequence.
    """
    import torch

    bs, seq = scenario.batch_size, scenario.seq_len
    total = num_batches * world
    out: list[dict[str, Any]] = []
    if scenario.dataset == "synthetic":
        gen = torch.Generator().manual_seed(scenario.seed)
        for i in range(total):
            ids = torch.randint(2, vocab_size, (bs, seq), generator=gen)
            if i % world == rank:
                out.append(
                    {
                        "input_ids": ids,
                        "labels": ids.clone(),
                        "attention_mask": torch.ones_like(ids),
                        "num_tokens": bs * seq,
                    }
                )
        return out

    if examples is None:
        examples = load_instruction_token_lists(seq)
    max_id = max(max(e) for e in examples)
    if max_id >= vocab_size:
        raise ScenarioError(
            f"{scenario.name}: the shipped tokenizer emits ids up to {max_id} but the model's vocab is {vocab_size}"
        )
    rng = random.Random(scenario.seed)
    if scenario.collate == "pack":
        stream: list[int] = []
        order = list(range(len(examples)))
        while len(stream) < total * bs * seq:
            rng.shuffle(order)
            for j in order:
                stream.extend(examples[j])
        for i in range(total):
            chunk = torch.tensor(stream[i * bs * seq : (i + 1) * bs * seq]).view(bs, seq)
            if i % world == rank:
                out.append(
                    {"input_ids": chunk, "labels": chunk.clone(), "attention_mask": torch.ones_like(chunk),
                     "num_tokens": bs * seq}
                )  # fmt: skip
        return out

    order: list[int] = []
    while len(order) < total * bs:
        perm = list(range(len(examples)))
        rng.shuffle(perm)
        order.extend(perm)
    for i in range(total):
        rows = [examples[j] for j in order[i * bs : (i + 1) * bs]]
        if i % world != rank:
            continue
        n_tokens = sum(len(r) for r in rows)
        if scenario.collate == "pad":
            width = max(len(r) for r in rows)
            ids = torch.full((bs, width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((bs, width), dtype=torch.long)
            for k, r in enumerate(rows):
                ids[k, : len(r)] = torch.tensor(r)
                mask[k, : len(r)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            out.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "num_tokens": n_tokens})
        else:  # flatten: one row, positions restart per example, no cross-example targets
            ids = torch.tensor([t for r in rows for t in r]).unsqueeze(0)
            pos = torch.tensor([p for r in rows for p in range(len(r))]).unsqueeze(0)
            labels = ids.clone()
            labels[pos == 0] = -100
            out.append({"input_ids": ids, "labels": labels, "position_ids": pos, "num_tokens": n_tokens})
    return out


# ----------------------------------------------------------------------------------------------- environment
def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def environment_info() -> dict[str, str]:
    """Versions and device, for every CSV row."""
    info = {
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    for pkg in VERSION_PACKAGES:
        key = "peft_version" if pkg == "peft" else pkg.replace("-", "_")  # "peft" is the method column
        info[key] = package_version(pkg)
    try:
        import torch

        if torch.cuda.is_available():
            info["device"] = "cuda"
            info["gpu_name"] = torch.cuda.get_device_name(0)
        else:
            info["device"] = "cpu"
            info["gpu_name"] = ""
    except ImportError:  # pragma: no cover - torch is required
        info["device"], info["gpu_name"] = "cpu", ""
    return info


def device_slug(gpu_name: str) -> str:
    """Folder-friendly name of the device (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    text = (gpu_name or "cpu").lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def results_folder_name(gpu_name: str, num_gpus: int, stem: str, date: str) -> str:
    """Name of a committed result folder: ``<date>-<gpu>-x<count>-<stem>``, ``<date>-cpu-<stem>`` on CPU.

    ``gpu`` is the model number from the device name (``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA H200`` ->
    ``h200``), or the whole name as a slug when it has none.
    """
    text = (gpu_name or "cpu").lower()
    if text == "cpu":
        return f"{date}-cpu-{stem}"
    vendor = {"nvidia", "amd", "intel", "tesla", "geforce"}
    tokens = [t for t in re.split(r"[^a-z0-9]+", text) if t and t not in vendor]
    short = next((t for t in tokens if any(c.isdigit() for c in t)), device_slug(gpu_name))
    return f"{date}-{short}-x{max(1, int(num_gpus))}-{stem}"


# ----------------------------------------------------------------------------------------------- CSV
CSV_COLUMNS = (
    "scenario", "group", "is_baseline", "status", "note",
    "peft", "plugins", "active_plugins", "patches", "prep", "peer", "model", "entry", "experts_implementation",
    "batch_size", "seq_len", "steps", "warmup_steps", "gradient_checkpointing", "num_gpus",
    "distributed", "rank_data", "num_layers", "dataset", "collate", "dtype", "master_weights", "compile_layers",
    "train_tokens_per_s", "train_tokens_per_s_per_gpu", "step_time_s", "step_time_p50_s", "padding_fraction",
    "measured_tokens", "peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib", "gpu_mem_gib",
    "state_alloc_gib", "forward_alloc_gib", "prepare_peak_alloc_gib", "train_peak_alloc_gib",
    "device_allocs_per_step", "alloc_retries", "allgather_bytes_per_step", "reduce_scatter_bytes_per_step",
    "param_bytes_per_rank", "buffer_bytes_per_rank", "throughput_ratio", "memory_ratio", "reserved_ratio",
    "scaling_reference", "scaling_efficiency", "loss_vs_1gpu_max_rel_diff", "loss_vs_1gpu_match",
    "fit_target_layers", "fit_gib_per_layer", "fit_peak_alloc_gib_extrapolated", "fit_verdict",
    "fit_train_gib_per_layer", "fit_train_peak_alloc_gib_extrapolated",
    "loss_first", "loss_final", "loss_max_rel_diff", "loss_match",
    "wall_s", "wall_breakdown", "device", "gpu_name", "torch", "transformers", "accelerate", "peft_version",
    "bitsandbytes", "triton", "liger_kernel", "deepspeed", "python", "date", "command",
)  # fmt: skip
"""One row per scenario. Units: tokens/s, seconds, GiB, bytes. Memory is per GPU (max over ranks):
``state_alloc_gib`` = allocated after ``prepare``, ``forward_alloc_gib`` = after the first timed forward;
``peak_alloc_gib`` is the larger of ``prepare_peak_alloc_gib`` (loading + prepare) and ``train_peak_alloc_gib``
(the training steps). ``experts_implementation``: the experts backend an MoE model trained with
(transformers' ``eager`` / ``grouped_mm`` / ``batched_mm``, or the plugin's ``fms_scattermoe``; ``+lora_factors``: the
plugin computed PEFT's expert adapters from their factors, without merged expert weights). Ratios are
against the group's baseline; ``scaling_efficiency`` = tokens/s per GPU / tokens/s of the matching 1-GPU row
(``scaling_reference``); ``fit_*`` are linear extrapolations of measured peak memory in the layer count."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchlib.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="random-init a model from a config and save_pretrained it")
    b.add_argument("--config", required=True, help="JSON mapping for AutoConfig.for_model (with model_type)")
    b.add_argument("--out", required=True)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    b.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_random_model(json.loads(args.config), args.out, args.device, args.dtype, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
