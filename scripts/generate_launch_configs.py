#!/usr/bin/env python
"""Generate the annotated sample configurations in ``launch_configs/`` from per-plugin templates.

Each plugin package keeps YAML templates of its config section under ``plugins/<dir>/configs/`` (comments
included). This script combines them into

* acceleration-only files in fms-acceleration's sample-configuration layout (a ``plugins:`` body), and
* full Accelerate configs (single GPU, FSDP1, FSDP2, DeepSpeed ZeRO-2/3, two machines, CPU) with an
  ``acceleration:`` section,

keeping every comment of the templates, and writes ``launch_configs/CONTENTS.yaml`` (read by
``fms-accelerate configs``). The output is a pure function of the templates and the tables below.

Usage::

    python scripts/generate_launch_configs.py            # (re)write launch_configs/
    python scripts/generate_launch_configs.py --check    # exit 1 if launch_configs/ is not up to date

Templates are block-style YAML mappings (2-space indentation recommended): keys, scalar or flow values,
block lists and block scalars under a key, comment lines and blank lines. A template may hold its body
directly (``peft: ...``) or under a single top-level ``plugins:`` key. Every generated file is parsed back
with ``yaml.safe_load`` and compared with a plain dictionary merge of the templates, so a layout the line
merger does not understand fails loudly instead of producing a wrong file.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = "launch_configs"
CONTENTS = "CONTENTS.yaml"
INDENT = 2

# ------------------------------------------------------------------------------------------------------
# What to generate


@dataclass(frozen=True)
class Template:
    """One plugin template with optional value overrides (dotted path -> value)."""

    path: str
    overrides: tuple[tuple[str, Any], ...] = ()


TEMPLATES: dict[str, Template] = {
    "bnb-nf4": Template(
        "plugins/accelerated-peft/configs/bnb.yaml",
        overrides=(("peft.quantization.bitsandbytes.quant_type", "nf4"),),
    ),
    # FSDP1 flat parameters hold one dtype, and under mixed precision Accelerate upcasts every trainable one to
    # fp32; fused LoRA keeps the adapters in the decoder-layer unit next to the packed 4-bit storage, so FSDP1
    # runs that unit in one dtype: adapters in the storage dtype and no mixed-precision upcast (see "fsdp1")
    "bnb-nf4-fsdp1": Template(
        "plugins/accelerated-peft/configs/bnb.yaml",
        overrides=(
            ("peft.quantization.bitsandbytes.quant_type", "nf4"),
            ("peft.quantization.bitsandbytes.fp32_lora_params", False),
        ),
    ),
    "gptq": Template("plugins/accelerated-peft/configs/autogptq.yaml"),
    "foak-peft": Template("plugins/fused-ops-and-kernels/configs/fast_quantized_peft.yaml"),
    "foak-peft-gptq": Template(
        "plugins/fused-ops-and-kernels/configs/fast_quantized_peft.yaml",
        overrides=(("peft.quantization.fused_ops_and_kernels.base_layer", "auto_gptq"),),
    ),
    "foak-kernels": Template("plugins/fused-ops-and-kernels/configs/fast_kernels.yaml"),
    "foak-lora": Template("plugins/fused-ops-and-kernels/configs/fast_lora.yaml"),
    "padding-free": Template("plugins/attention-and-distributed-packing/configs/padding_free.yaml"),
    # with the fused LoRA kernels: rows rounded up to a multiple of 128 tokens (measured faster with them)
    "padding-free-fused-lora": Template(
        "plugins/attention-and-distributed-packing/configs/padding_free.yaml",
        overrides=(("training.attention.padding_free.pad_to_multiple_of", 128),),
    ),
    "multipack": Template("plugins/attention-and-distributed-packing/configs/multipack.yaml"),
    "scattermoe": Template("plugins/accelerated-moe/configs/scattermoe.yaml"),
}


@dataclass(frozen=True)
class Output:
    """One generated file.

    Attributes:
        shortname: name shown by ``fms-accelerate configs``.
        templates: keys of :data:`TEMPLATES`, merged in this order.
        description: one line for CONTENTS.yaml.
        accelerate_base: key of :data:`ACCELERATE_BASES`, or ``None`` for an acceleration-only file.
    """

    shortname: str
    templates: tuple[str, ...]
    description: str
    accelerate_base: str | None = None

    @property
    def filename(self) -> str:
        if self.accelerate_base is None:
            return f"{self.shortname}-sample-configuration.yaml"
        return f"{self.shortname}.yaml"


OUTPUTS: tuple[Output, ...] = (
    Output(
        "accelerated-peft-bnb-nf4",
        ("bnb-nf4",),
        "QLoRA: bitsandbytes nf4 base weights under LoRA (acceleration-only, upstream layout)",
    ),
    Output(
        "accelerated-peft-bnb-nf4-foak",
        ("bnb-nf4", "foak-peft"),
        "QLoRA nf4 + fused LoRA/dequant, RMSNorm, RoPE and loss kernels (acceleration-only, upstream layout)",
    ),
    Output(
        "accelerated-peft-autogptq",
        ("gptq",),
        "GPTQ-LoRA: LoRA on a Hugging Face GPTQ checkpoint, read natively (acceleration-only, upstream layout)",
    ),
    Output(
        "accelerated-peft-autogptq-foak",
        ("gptq", "foak-peft-gptq"),
        "GPTQ-LoRA + fused LoRA/dequant over GPTQ bases, RMSNorm, RoPE and loss kernels (acceleration-only, "
        "upstream layout)",
    ),
    Output(
        "foak-fast-kernels",
        ("foak-kernels",),
        "full fine-tuning / LoRA: fused RMSNorm, RoPE and loss kernels (acceleration-only, upstream layout)",
    ),
    Output(
        "foak-fast-lora",
        ("foak-lora",),
        "LoRA on 16-bit weights: fused LoRA, fused linear cross-entropy, RMSNorm, RoPE, SwiGLU kernels "
        "(acceleration-only, upstream layout)",
    ),
    Output(
        "aadp-padding-free",
        ("padding-free",),
        "padding-free: flattened batches, attention within each example (acceleration-only, upstream layout)",
    ),
    Output(
        "accelerated-peft-bnb-nf4-padding-free",
        ("bnb-nf4", "padding-free"),
        "QLoRA nf4 + padding-free (acceleration-only, upstream layout)",
    ),
    Output(
        "accelerated-peft-bnb-nf4-foak-padding-free",
        ("bnb-nf4", "foak-peft", "padding-free-fused-lora"),
        "QLoRA nf4 + fused kernels + padding-free (acceleration-only, upstream layout)",
    ),
    Output(
        "accelerated-peft-autogptq-padding-free",
        ("gptq", "padding-free"),
        "GPTQ-LoRA + padding-free (acceleration-only, upstream layout)",
    ),
    Output(
        "accelerated-peft-autogptq-foak-padding-free",
        ("gptq", "foak-peft-gptq", "padding-free-fused-lora"),
        "GPTQ-LoRA + fused kernels + padding-free (acceleration-only, upstream layout)",
    ),
    Output(
        "foak-fast-lora-padding-free",
        ("foak-lora", "padding-free-fused-lora"),
        "LoRA on 16-bit weights: fused kernels + padding-free (acceleration-only)",
    ),
    Output(
        "aadp-padding-free-multipack",
        ("padding-free", "multipack"),
        "padding-free + multipack: per-process token-budget batches balanced across processes (acceleration-only, "
        "upstream layout)",
    ),
    Output(
        "aadp-padding-free-multipack-foak",
        ("padding-free", "multipack", "foak-kernels"),
        "padding-free + multipack + fused RMSNorm, RoPE, SwiGLU and loss kernels (acceleration-only, upstream layout)",
    ),
    Output(
        "moe-scattermoe-granite-ep1",
        ("scattermoe",),
        "mixture-of-experts: grouped Triton expert kernels on the model's own expert weights, ep_degree 1 "
        "(acceleration-only, upstream layout)",
    ),
    Output(
        "accelerate-single-gpu-qlora-foak",
        ("bnb-nf4", "foak-peft"),
        "Accelerate config, 1 GPU, bf16: QLoRA nf4 + fused kernels",
        accelerate_base="single-gpu",
    ),
    Output(
        "accelerate-single-gpu-gptq-lora",
        ("gptq",),
        "Accelerate config, 1 GPU, bf16: GPTQ-LoRA on a GPTQ checkpoint",
        accelerate_base="single-gpu",
    ),
    Output(
        "accelerate-single-gpu-gptq-lora-foak",
        ("gptq", "foak-peft-gptq"),
        "Accelerate config, 1 GPU, bf16: GPTQ-LoRA + fused kernels",
        accelerate_base="single-gpu",
    ),
    Output(
        "accelerate-fsdp1-qlora-foak",
        ("bnb-nf4-fsdp1", "foak-peft"),
        "Accelerate config, FSDP1 on 8 GPUs of one machine: QLoRA nf4 + fused kernels",
        accelerate_base="fsdp1",
    ),
    Output(
        "accelerate-fsdp2-qlora-foak",
        ("bnb-nf4", "foak-peft"),
        "Accelerate config, FSDP2 on 8 GPUs of one machine: QLoRA nf4 + fused kernels",
        accelerate_base="fsdp2",
    ),
    Output(
        "accelerate-fsdp2-gptq-lora-foak",
        ("gptq", "foak-peft-gptq"),
        "Accelerate config, FSDP2 on 8 GPUs of one machine: GPTQ-LoRA + fused kernels",
        accelerate_base="fsdp2-gptq",
    ),
    Output(
        "accelerate-fsdp2-fast-kernels",
        ("foak-kernels",),
        "Accelerate config, FSDP2 on 8 GPUs of one machine: full fine-tuning with fused kernels",
        accelerate_base="fsdp2-rank0-load",
    ),
    Output(
        "accelerate-multinode-fsdp2-qlora-foak",
        ("bnb-nf4", "foak-peft"),
        "Accelerate config, FSDP2 on 2 machines x 8 GPUs: QLoRA nf4 + fused kernels",
        accelerate_base="multinode-fsdp2",
    ),
    Output(
        "accelerate-deepspeed-zero2-qlora-foak",
        ("bnb-nf4", "foak-peft"),
        "Accelerate config, DeepSpeed ZeRO-2 on 8 GPUs of one machine: QLoRA nf4 + fused kernels",
        accelerate_base="deepspeed-zero2",
    ),
    Output(
        "accelerate-deepspeed-zero3-qlora-foak",
        ("bnb-nf4", "foak-peft"),
        "Accelerate config, DeepSpeed ZeRO-3 on 8 GPUs of one machine: QLoRA nf4 + fused kernels",
        accelerate_base="deepspeed-zero3",
    ),
    Output(
        "accelerate-deepspeed-zero2-fast-kernels",
        ("foak-kernels",),
        "Accelerate config, DeepSpeed ZeRO-2 on 8 GPUs of one machine: full fine-tuning with fused kernels",
        accelerate_base="deepspeed-zero2",
    ),
    Output(
        "accelerate-deepspeed-zero3-fast-kernels",
        ("foak-kernels",),
        "Accelerate config, DeepSpeed ZeRO-3 on 8 GPUs of one machine: full fine-tuning with fused kernels",
        accelerate_base="deepspeed-zero3",
    ),
    Output(
        "accelerate-single-gpu-padding-free",
        ("padding-free",),
        "Accelerate config, 1 GPU, bf16: padding-free (full fine-tuning or LoRA on 16-bit weights)",
        accelerate_base="single-gpu",
    ),
    Output(
        "accelerate-single-gpu-qlora-foak-padding-free",
        ("bnb-nf4", "foak-peft", "padding-free-fused-lora"),
        "Accelerate config, 1 GPU, bf16: QLoRA nf4 + fused kernels + padding-free",
        accelerate_base="single-gpu",
    ),
    Output(
        "accelerate-cpu-padding-free",
        ("padding-free",),
        "Accelerate config, CPU, 1 process: padding-free (SDPA / eager attention with a block-diagonal mask)",
        accelerate_base="cpu",
    ),
    Output(
        "accelerate-cpu-qlora-foak",
        ("bnb-nf4", "foak-peft"),
        "Accelerate config, CPU, 1 process: QLoRA nf4 + kernels' CPU paths (the README's main job)",
        accelerate_base="cpu",
    ),
    Output(
        "accelerate-cpu-gptq-lora-foak",
        ("gptq", "foak-peft-gptq"),
        "Accelerate config, CPU, 1 process: GPTQ-LoRA + kernels' CPU paths",
        accelerate_base="cpu",
    ),
    Output(
        "accelerate-cpu-2proc-qlora-foak",
        ("bnb-nf4", "foak-peft"),
        "Accelerate config, CPU, 2 processes (gloo): QLoRA nf4 + kernels' CPU paths",
        accelerate_base="cpu-2proc",
    ),
)

_ACCELERATE_COMMON_TAIL = """\
# Rank of this machine (0 .. num_machines-1); `accelerate launch --machine_rank N` overrides it.
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
"""


def accelerate_base(
    intro: str,
    distributed_type: str,
    *,
    before: str = "",
    after: str = "",
    mixed_precision: str = "bf16",
    num_machines: int = 1,
    num_processes: int = 8,
    processes_note: str | None = "Total number of processes (one per GPU).",
    use_cpu: bool = False,
) -> str:
    """An Accelerate config file's text, keys in the order Accelerate writes them (sorted).

    ``intro``: the leading comment lines; ``before``: the keys sorted before ``distributed_type``
    (``deepspeed_config``); ``after``: the keys sorted between ``enable_cpu_affinity`` and ``mixed_precision``
    (``fsdp_config``, ``gpu_ids``, ``main_process_*``) with any comment on ``mixed_precision``; the other
    arguments are the values of their keys (``processes_note``: a comment on ``num_processes``, or none)."""
    note = f"# {processes_note}\n" if processes_note else ""
    return (
        f"{intro}compute_environment: LOCAL_MACHINE\ndebug: false\n{before}"
        f"distributed_type: {distributed_type}\ndowncast_bf16: 'no'\nenable_cpu_affinity: false\n{after}"
        f"mixed_precision: {mixed_precision}\nnum_machines: {num_machines}\n{note}num_processes: {num_processes}\n"
        f"use_cpu: {str(use_cpu).lower()}\n" + _ACCELERATE_COMMON_TAIL
    )


def _deepspeed_config(stage: int, extra: str = "") -> str:
    """The ``deepspeed_config`` block of ZeRO stage ``stage`` (bf16 comes from ``mixed_precision``), ``extra``
    lines at its end."""
    return (
        f"deepspeed_config:\n  zero_stage: {stage}\n  gradient_accumulation_steps: 1\n  gradient_clipping: 1.0\n"
        f"  offload_optimizer_device: none\n  offload_param_device: none\n{extra}"
    )


def _fsdp2_config(wrap_note: str = "", loading_note: str = "", reshard_note: str = "") -> str:
    """The ``fsdp_config`` block of the FSDP2 bases; each note (comment lines) stands above its key."""
    return (
        f"fsdp_config:\n  fsdp_version: 2\n{wrap_note}  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        f"{loading_note}  fsdp_cpu_ram_efficient_loading: false\n  fsdp_offload_params: false\n"
        f"{reshard_note}  fsdp_reshard_after_forward: true\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
        "  fsdp_activation_checkpointing: false\n"
    )


ACCELERATE_BASES: dict[str, str] = {
    "single-gpu": accelerate_base(
        "# One process on one GPU; no sharding.\n",
        "'NO'",
        after="gpu_ids: '0'\n# bf16 autocast for the trainable (LoRA) parameters; 4-bit base weights stay packed.\n",
        num_processes=1,
        processes_note=None,
    ),
    "fsdp1": accelerate_base(
        "# FSDP1 (FullyShardedDataParallel) over every GPU of one machine.\n",
        "FSDP",
        after="""\
fsdp_config:
  fsdp_version: 1
  # Wrap each decoder layer (the model's _no_split_modules) as one FSDP unit; the acceleration plugins
  # add their own units (e.g. LoRA adapters together with their base layer) before wrapping.
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_forward_prefetch: false
  # Rank 0 reads the checkpoint, the others start from empty weights and receive theirs by broadcast.
  fsdp_cpu_ram_efficient_loading: true
  fsdp_sync_module_states: true
  fsdp_offload_params: false
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: SHARDED_STATE_DICT
  # Needed for LoRA: frozen base weights and trainable adapters share FSDP units.
  fsdp_use_orig_params: true
# No autocast / FSDP1 mixed precision: the model is loaded in bf16 and trains in bf16 (LoRA adapters too,
# fp32_lora_params: false below). Under mixed precision Accelerate upcasts every trainable FSDP1 flat
# parameter to fp32, which would include the packed 4-bit storage that fused LoRA keeps in the same unit.
# Gradients are still reduced in fp32 (the bitsandbytes plugin asks for it). FSDP2 has no such limit.
""",
        mixed_precision="'no'",
    ),
    "fsdp2": accelerate_base(
        "# FSDP2 (per-parameter sharding with fully_shard) over every GPU of one machine.\n",
        "FSDP",
        after=_fsdp2_config(
            wrap_note="""\
  # Shard each decoder layer (the model's _no_split_modules); the acceleration plugins shard their own
  # units (e.g. LoRA adapters with their base layer) before Accelerate's prepare.
""",
            loading_note="""\
  # false: the acceleration plugins shard their own units before Accelerate's prepare, which Accelerate's
  # meta-device reload cannot follow (refused when on); the bitsandbytes plugin loads on rank 0 and
  # broadcasts by itself (low_cpu_mem_usage=True).
""",
            reshard_note="  # FSDP2 takes a bool here: free the gathered parameters after each unit's forward.\n",
        ),
    ),
    "multinode-fsdp2": accelerate_base(
        """\
# FSDP2 over 2 machines with 8 GPUs each. Run the same command on every machine, e.g.
#   accelerate launch --config_file THIS.yaml --machine_rank 0 train.py   # on the main machine
#   accelerate launch --config_file THIS.yaml --machine_rank 1 \\
#       --main_process_ip <address of machine 0> train.py                  # on the other one
# Each process reads the acceleration section below from the environment Accelerate sets up.
""",
        "FSDP",
        after=_fsdp2_config(
            loading_note="  # false: plugins shard their own units (see the single-machine FSDP2 config)\n"
        )
        + """\
# Address and port of machine 0, reachable from every machine (replace, or pass --main_process_ip).
main_process_ip: 127.0.0.1
main_process_port: 29500
""",
        num_machines=2,
        num_processes=16,
        processes_note="Total number of processes over all machines (2 x 8 GPUs).",
    ),
    "deepspeed-zero2": accelerate_base(
        """\
# DeepSpeed ZeRO-2 over every GPU of one machine: optimizer states and gradients partitioned, parameters
# whole on every GPU. Accelerate builds the DeepSpeed engine in prepare; the acceleration plugins do their
# part before that (see 'fms-accelerate check' on this file).
""",
        "DEEPSPEED",
        before=_deepspeed_config(2),
        after="""\
# DeepSpeed's bf16 mode: the engine casts every floating parameter to bf16 (load the model in bf16: the
# bitsandbytes plugin keeps its packed 4-bit storage in the training dtype, so the cast leaves it alone) and
# keeps fp32 master weights of the trainable parameters in its optimizer.
""",
    ),
    "deepspeed-zero3": accelerate_base(
        """\
# DeepSpeed ZeRO-3 over every GPU of one machine: parameters, gradients and optimizer states partitioned.
# Accelerate builds the DeepSpeed engine in prepare; the acceleration plugins do their part before that: the
# weights fused kernels read inside attention / MLP modules are gathered by DeepSpeed at those modules' forward
# and backward (see 'fms-accelerate check' on this file).
""",
        "DEEPSPEED",
        before=_deepspeed_config(
            3,
            """\
  # 16/32-bit models are loaded partitioned (deepspeed.zero.Init); a 4-bit model is loaded whole on each GPU
  # and partitioned when the engine is built.
  zero3_init_flag: true
  # Saving gathers a whole 16-bit model (save_model / save_pretrained write a loadable checkpoint).
  zero3_save_16bit_model: true
""",
        ),
        after="""\
# DeepSpeed's bf16 mode: the engine casts every floating parameter to bf16 (load the model in bf16: the
# bitsandbytes plugin keeps its packed 4-bit storage in the training dtype, so the cast leaves it alone and
# ZeRO-3 partitions it like any other bf16 parameter) and keeps fp32 master weights of the trainable
# parameters in its optimizer.
""",
    ),
    "cpu": accelerate_base(
        """\
# CPU only, one process (Accelerate starts one process when use_cpu is true). Runs anywhere; the
# kernels take their CPU paths (Triton interpreter or PyTorch reference).
""",
        "'NO'",
        mixed_precision="'no'",
        num_processes=1,
        processes_note=None,
        use_cpu=True,
    ),
    "cpu-2proc": accelerate_base(
        """\
# Two processes on a machine without a GPU: Accelerate starts them through torchrun, and a script that
# creates Accelerator(cpu=True) (as examples/train_tiny.py does without CUDA) joins them into one gloo
# process group (data parallel on CPU). On a machine with 2 GPUs the same file runs on the GPUs.
""",
        "MULTI_GPU",
        after="gpu_ids: all\n",
        mixed_precision="'no'",
        num_processes=2,
        processes_note=None,
    ),
}

# Full fine-tuning with the kernels plugin: no plugin shards units of its own (that needs fused_lora /
# fused_dequant), so Accelerate's rank-0 load + meta-device reload applies, and nothing but the shards stays on
# the GPUs (tests/framework/test_launch_configs.py checks each FSDP2 file against its plugins).
_PLUGIN_SHARDING_LOADING = """\
  # false: the acceleration plugins shard their own units before Accelerate's prepare, which Accelerate's
  # meta-device reload cannot follow (refused when on); the bitsandbytes plugin loads on rank 0 and
  # broadcasts by itself (low_cpu_mem_usage=True).
  fsdp_cpu_ram_efficient_loading: false
"""
_RANK0_LOADING = """\
  # true: rank 0 reads the checkpoint, the other ranks build the model on the meta device, and Accelerate
  # sends every rank its shards after sharding (the plugins below shard no units of their own).
  fsdp_cpu_ram_efficient_loading: true
"""
_PLUGIN_UNITS_WRAP = """\
  # Shard each decoder layer (the model's _no_split_modules); the acceleration plugins shard their own
  # units (e.g. LoRA adapters with their base layer) before Accelerate's prepare.
"""
_DECODER_LAYER_WRAP = """\
  # Shard each decoder layer (the model's _no_split_modules).
"""


def _rank0_load_variant(base: str) -> str:
    """The FSDP2 base for stacks whose plugins shard no units of their own."""
    for old in (_PLUGIN_SHARDING_LOADING, _PLUGIN_UNITS_WRAP):
        if old not in base:  # pragma: no cover - edited template
            raise RuntimeError(f"the fsdp2 Accelerate base no longer has the lines {old!r}")
    return base.replace(_PLUGIN_SHARDING_LOADING, _RANK0_LOADING).replace(_PLUGIN_UNITS_WRAP, _DECODER_LAYER_WRAP)


_BNB_LOADING = """\
  # meta-device reload cannot follow (refused when on); the bitsandbytes plugin loads on rank 0 and
  # broadcasts by itself (low_cpu_mem_usage=True).
"""
_GPTQ_LOADING = """\
  # meta-device reload cannot follow (refused when on); the GPTQ plugin reads the packed checkpoint
  # itself.
"""


def _gptq_variant(base: str) -> str:
    """The FSDP2 base for GPTQ-LoRA stacks: the loading note names the GPTQ plugin."""
    if _BNB_LOADING not in base:  # pragma: no cover - edited template
        raise RuntimeError(f"the fsdp2 Accelerate base no longer has the lines {_BNB_LOADING!r}")
    return base.replace(_BNB_LOADING, _GPTQ_LOADING)


ACCELERATE_BASES = {
    **ACCELERATE_BASES,
    "fsdp2-rank0-load": _rank0_load_variant(ACCELERATE_BASES["fsdp2"]),
    "fsdp2-gptq": _gptq_variant(ACCELERATE_BASES["fsdp2"]),
}

# ------------------------------------------------------------------------------------------------------
# A comment-preserving line merger for block-style YAML mappings

_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)\s*:(?:\s+(?P<value>.*?))?\s*$")


class TemplateError(ValueError):
    """A template the merger cannot handle, or a plan that does not fit the templates."""


@dataclass
class Node:
    """One mapping key with its comments and nested content.

    Attributes:
        key: the key ("" for the root).
        value: text after ``key:`` on the key line (scalar, flow collection, ``|``, plus inline comment).
        leading: comment/blank lines above the key line (comment text without its indentation).
        children: nested mapping keys.
        extra: nested non-mapping lines (block list items, block scalar text) as ``(relative indent, text)``.
        trailing: comment lines after the last child, still inside this node.
    """

    key: str
    value: str = ""
    leading: list[str] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    extra: list[tuple[int, str]] = field(default_factory=list)
    trailing: list[str] = field(default_factory=list)

    def child(self, key: str) -> Node | None:
        for c in self.children:
            if c.key == key:
                return c
        return None


def parse_template(text: str, origin: str) -> Node:
    """Parse a block-style YAML mapping into a :class:`Node` tree that keeps comments."""
    root = Node("")
    stack: list[tuple[int, Node]] = [(-1, root)]
    pending: list[tuple[int | None, str]] = []  # (indent or None for blank, comment text)
    raw_mode: tuple[int, Node] | None = None  # inside a block list / block scalar of this node

    def flush_trailing(before_indent: int) -> None:
        """Give pending comments indented deeper than ``before_indent`` to the open node they sit in."""
        nonlocal pending
        last = max((i for i, (ind, _) in enumerate(pending) if ind is not None and ind > before_indent), default=-1)
        owner = None
        for ind, text in pending[: last + 1]:
            if ind is not None:
                owner = next(n for level, n in reversed(stack) if level < ind)
            (owner or stack[-1][1]).trailing.append(text)
        pending = pending[last + 1 :]

    for lineno, line in enumerate(text.splitlines(), start=1):
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise TemplateError(f"{origin}:{lineno}: tab in indentation")
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if raw_mode is not None:
            level, node = raw_mode
            if stripped and (indent > level or (indent == level and stripped.startswith("- "))):
                node.extra.append((indent - level, stripped))
                continue
            if not stripped and node.value.startswith(("|", ">")):
                node.extra.append((0, ""))
                continue
            raw_mode = None
        if not stripped:
            pending.append((None, ""))
            continue
        if stripped.startswith("#"):
            pending.append((indent, stripped))
            continue
        if stripped == "---" and indent == 0 and root.children == []:
            continue
        match = _KEY_LINE.match(stripped)
        if stripped.startswith("- ") or stripped == "-":
            level, node = stack[-1]
            if node is root or node.children or indent < level:
                raise TemplateError(f"{origin}:{lineno}: a list item must sit under a key: {line!r}")
            flush_trailing(indent)
            node.extra.append((indent - level, stripped))
            raw_mode = (level, node)
            continue
        if match is None:
            raise TemplateError(f"{origin}:{lineno}: not a 'key: value' line: {line!r}")
        flush_trailing(indent)
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if parent.value and not parent.value.startswith("#"):
            raise TemplateError(f"{origin}:{lineno}: key {match['key']!r} under a key that already has a value")
        node = Node(match["key"], value=match["value"] or "")
        node.leading = [t for _, t in pending]
        pending = []
        if parent.child(node.key) is not None:
            raise TemplateError(f"{origin}:{lineno}: duplicate key {node.key!r}")
        parent.children.append(node)
        stack.append((indent, node))
        if node.value.startswith(("|", ">")):
            raw_mode = (indent, node)
    flush_trailing(-1)
    while root.trailing and root.trailing[-1] == "":
        root.trailing.pop()
    return root


def _value_text(value: str) -> tuple[str, str]:
    """Split the text after ``key:`` into (value, inline comment)."""
    match = re.match(r"^(?P<v>.*?)(?P<c>\s+#.*)?$", value)
    assert match is not None
    return match["v"], match["c"] or ""


def set_value(root: Node, dotted: str, value: Any, origin: str) -> None:
    """Replace the value of the leaf at ``dotted`` (keeping its inline comment)."""
    node = root
    for part in dotted.split("."):
        found = node.child(part)
        if found is None:
            raise TemplateError(f"{origin}: override {dotted!r}: no key {part!r} there")
        node = found
    if node.children or node.extra:
        raise TemplateError(f"{origin}: override {dotted!r} must name a scalar leaf")
    rendered = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if rendered.endswith("\n..."):
        rendered = rendered[: -len("\n...")]
    rendered = rendered.removesuffix("...").strip()
    _, comment = _value_text(node.value)
    node.value = rendered + comment


def merge_into(target: Node, source: Node, where: str) -> None:
    """Merge ``source``'s keys into ``target`` (keys of ``target`` first; comments of the first kept)."""
    for child in source.children:
        mine = target.child(child.key)
        here = f"{where}.{child.key}" if where else child.key
        if mine is None:
            target.children.append(copy.deepcopy(child))
            continue
        if child.children and mine.children:
            merge_into(mine, child, here)
            for line in child.trailing:
                if line not in mine.trailing:
                    mine.trailing.append(line)
            continue
        if (_value_text(mine.value)[0], mine.extra, [c.key for c in mine.children]) != (
            _value_text(child.value)[0],
            child.extra,
            [c.key for c in child.children],
        ):
            raise TemplateError(f"two templates set {here!r} differently")


def unwrap_plugins(root: Node, origin: str) -> Node:
    """Accept a template whose only top-level key is ``plugins:``."""
    if len(root.children) == 1 and root.children[0].key == "plugins":
        inner = root.children[0]
        body = Node("", children=inner.children, trailing=inner.trailing + root.trailing)
        body.leading = root.children[0].leading
        return body
    if any(c.key in ("plugins", "acceleration") for c in root.children):
        raise TemplateError(f"{origin}: 'plugins:' must be the only top-level key of a template")
    return root


def render(node: Node, depth: int, out: list[str]) -> None:
    """Append the lines of ``node``'s children at indentation ``depth``."""
    pad = " " * (INDENT * depth)
    for child in node.children:
        out.extend(f"{pad}{line}".rstrip() for line in child.leading)
        out.append(f"{pad}{child.key}:" + (f" {child.value}" if child.value else ""))
        for rel, text in child.extra:
            out.append((" " * (INDENT * depth + rel) + text).rstrip())
        render(child, depth + 1, out)
    out.extend(f"{pad}{line}".rstrip() for line in node.trailing)


# ------------------------------------------------------------------------------------------------------
# Building the files


def deep_merge(a: dict, b: Mapping, where: str = "") -> dict:
    for key, value in b.items():
        if key in a and isinstance(a[key], dict) and isinstance(value, Mapping):
            deep_merge(a[key], value, f"{where}.{key}")
        elif key in a and a[key] != value:
            raise TemplateError(f"two templates set {where}.{key} differently")
        else:
            a[key] = copy.deepcopy(value)
    return a


def set_in(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree[part]
    tree[parts[-1]] = value


def build_body(keys: Sequence[str], root: Path) -> tuple[Node, dict]:
    """Merge the templates ``keys``; return the comment-keeping tree and the expected plain dict."""
    merged = Node("")
    expected: dict = {}
    for key in keys:
        template = TEMPLATES[key]
        path = root / template.path
        if not path.is_file():
            raise TemplateError(f"template {template.path} (for {key!r}) does not exist")
        text = path.read_text(encoding="utf-8")
        tree = unwrap_plugins(parse_template(text, template.path), template.path)
        plain = yaml.safe_load(text) or {}
        if set(plain) == {"plugins"}:
            plain = plain["plugins"] or {}
        for dotted, value in template.overrides:
            set_value(tree, dotted, value, template.path)
            set_in(plain, dotted, value)
        merge_into(merged, tree, "")
        merged.leading += [line for line in tree.leading if line not in merged.leading]
        deep_merge(expected, plain)
    return merged, expected


def header(output: Output) -> list[str]:
    sources = ", ".join(TEMPLATES[k].path for k in output.templates)
    lines = [
        "# Generated by scripts/generate_launch_configs.py -- do not edit; change the templates and rerun it.",
        f"# Templates: {sources}",
        f"# {output.description}",
        "#",
    ]
    if output.accelerate_base is None:
        lines += [
            "# Acceleration-only configuration (fms-acceleration sample-configuration layout). Use it with",
            "#   AccelerationFramework('<this file>'), the ACCELERATION_FRAMEWORK_CONFIG_FILE environment",
            "#   variable, or 'acceleration: <this file>' in an Accelerate config.",
            "# Check it: fms-accelerate check <this file>",
        ]
    else:
        lines += [
            "# Accelerate config with an 'acceleration:' section. Run:",
            "#   accelerate launch --config_file <this file> train.py",
            "# Check it: fms-accelerate check <this file>",
        ]
    return lines


def render_output(output: Output, root: Path) -> str:
    body, expected = build_body(output.templates, root)
    lines = header(output)
    if output.accelerate_base is None:
        lines += [*body.leading, "plugins:"]
        render(body, 1, lines)
        text = "\n".join(lines) + "\n"
        parsed = yaml.safe_load(text)
        want = {"plugins": expected}
    else:
        base = ACCELERATE_BASES[output.accelerate_base]
        lines += ["", base.rstrip("\n"), ""]
        lines += [
            "# ----------------------------------------------------------------------------------------------",
            "# fms-acceleration-accelerate: the plugin configuration (same body as 'plugins:' in an",
            "# acceleration-only file). Accelerate's own keys above are unchanged.",
            *body.leading,
            "acceleration:",
        ]
        render(body, 1, lines)
        text = "\n".join(lines) + "\n"
        parsed = yaml.safe_load(text)
        want = {**yaml.safe_load(base), "acceleration": expected}
    if parsed != want:
        raise TemplateError(
            f"internal error: {output.filename} does not parse back to the merged templates "
            f"(got {parsed!r}, expected {want!r}); simplify the template layout"
        )
    return text


def render_contents() -> str:
    items = [
        {
            "shortname": o.shortname,
            "filename": o.filename,
            "description": o.description,
            "kind": "acceleration" if o.accelerate_base is None else "accelerate",
            "templates": [TEMPLATES[k].path for k in o.templates],
        }
        for o in OUTPUTS
    ]
    return (
        "# Generated by scripts/generate_launch_configs.py -- do not edit.\n"
        "# The shipped sample configurations; `fms-accelerate configs` lists them, `configs show NAME` prints one.\n"
        "# kind: 'acceleration' = acceleration-only file (plugins: body); 'accelerate' = Accelerate config with\n"
        "# an acceleration: section.\n" + yaml.safe_dump({"framework_configs": items}, sort_keys=False, width=120)
    )


def generate(root: Path = ROOT) -> dict[str, str]:
    """File name -> content of everything ``launch_configs/`` should hold (YAML files only)."""
    files = {o.filename: render_output(o, root) for o in OUTPUTS}
    if len(files) != len(OUTPUTS):
        raise TemplateError("two outputs share a file name")
    files[CONTENTS] = render_contents()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files on disk differ")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (templates are read from here)")
    parser.add_argument("--output-dir", type=Path, default=None, help=f"default: <root>/{OUTPUT_DIR}")
    args = parser.parse_args(argv)
    out_dir = args.output_dir or args.root / OUTPUT_DIR
    try:
        files = generate(args.root)
    except TemplateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    on_disk = {p.name for p in out_dir.glob("*.yaml")} if out_dir.is_dir() else set()
    if args.check:
        problems = []
        for name in sorted(on_disk - set(files)):
            problems.append(f"{out_dir / name}: not generated by this script (stale?)")
        for name, text in files.items():
            path = out_dir / name
            current = path.read_text(encoding="utf-8") if path.is_file() else None
            if current != text:
                diff = difflib.unified_diff(
                    (current or "").splitlines(keepends=True), text.splitlines(keepends=True), str(path), "generated"
                )
                problems.append(f"{path}: out of date\n" + "".join(list(diff)[:40]))
        if problems:
            print("\n".join(problems), file=sys.stderr)
            print("run: python scripts/generate_launch_configs.py", file=sys.stderr)
            return 1
        print(f"{out_dir}: {len(files)} files up to date")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(on_disk - set(files)):
        (out_dir / name).unlink()
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
