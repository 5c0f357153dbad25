"""Training script of one benchmark scenario; the runner starts it with ``accelerate launch``.

The same loop serves every row of a scenario group, so only the model preparation differs:

* **HF baseline** (no plugins, ``--prep hf``): exactly the Hugging Face docs recipe. Full FT / LoRA:
  ``from_pretrained`` (+ ``get_peft_model``). QLoRA: ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training``
  + ``get_peft_model``.
* **Lean baseline** (``--prep lean``): QLoRA without ``prepare_model_for_kbit_training``'s fp32 upcast of the
  frozen non-4-bit parameters (embeddings, lm_head, norms); base frozen, same checkpointing.
* **Peer** (``--peer liger``): Liger-Kernel's ``apply_liger_kernel_to_<model_type>()`` before loading (its
  documented use), on top of either baseline recipe.
* **Accelerated** (``--acceleration-config FILE``): the framework API of this project:
  ``AccelerationFramework(FILE)``, ``model_loader`` when a plugin owns loading, ``augmentation(model,
  train_args, modifiable_args=(peft_config,))``; the ``Accelerator()`` created below picks the same
  section up at ``prepare`` (the launcher's config carries it as an ``acceleration:`` section).

The loop: ``model.train()``, AdamW, ``accelerator.prepare(model, optimizer)``, ``steps`` optimizer steps,
the first ``warmup_steps`` untimed. Rank 0 writes one JSON result (``--result-json``): train tokens/s over
the timed steps counting only non-padding tokens, step times, peak allocated / reserved CUDA memory (max over
ranks; peak RSS on CPU; the peak of loading + ``prepare`` and of the training steps also apart), the CUDA
memory allocated after ``prepare`` (model state) and after the first timed forward (state + saved activations),
and the loss of every step (mean over ranks).

Several processes (``--num-gpus N``): ``--distributed fsdp1|fsdp2`` runs under the FSDP settings of the
Accelerate config (on CPU through :func:`cpu_fsdp_seam`); the HF QLoRA recipe then stores the packed 4-bit
bytes in the training dtype (``bnb_4bit_quant_storage``, as the HF FSDP-QLoRA docs do). During the timed steps
a :class:`CollectiveCounter` counts all-gather / reduce-scatter bytes. ``--rank-data replicate`` gives every
rank the 1-GPU run's batches (loss parity with 1 GPU). The result also carries the seconds of every phase and
wall-clock timestamps, from which the runner prints where the row's wall time went.

Overlapped start-up (``$FMS_BENCH_GO_FILE`` set; the runner's default on CUDA): the runner starts this script while
the previous row still trains. It does its imports (:func:`import_before_go`: nothing that initialises CUDA) and
tokenizes the instruction data, then sleeps until that file exists, which the runner creates once every process of
the previous row has exited; only then come peft / bitsandbytes (:data:`DEFERRED_MODULES`), the ``Accelerator``,
the model and the steps. The result's ``start_up`` says whether CUDA was initialised or a deferred module imported
when the wait began (neither may be), the nice values while waiting and training, and every rank's go and start of
training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Scenario

SCRIPT_START = time.time()  # after the stdlib/yaml imports (milliseconds): the runner's per-row breakdown
PARENT_PID = os.getppid()  # the launcher (or torchrun's agent): a process waiting for its go stops when it is gone
GO_POLL_S = 0.05
"""Seconds between two looks for the go file while waiting (the process sleeps in between)."""
DEFERRED_MODULES = ("peft", "bitsandbytes", "transformers.training_args")
"""Imported only after the go: bitsandbytes reads the GPUs' compute capability through torch when it is imported,
which initialises CUDA in the importing process, and ``import peft`` and transformers' ``TrainingArguments``
import bitsandbytes when it is installed."""
GIB = 1024**3
MEMORY_TRACE_ENV = "FMS_BENCH_MEMORY_TRACE"
"""Set to 1 (CUDA only): record every allocation's Python stack and print, on rank 0, the live CUDA bytes grouped
by allocation site after the first timed forward and after its backward (``[memtrace]`` lines). Slower; for
finding what a stack keeps alive, not for timing."""
KERNEL_PROFILE_ENV = "FMS_BENCH_KERNEL_PROFILE"
"""Set to a folder (CUDA only): profile the timed steps' GPU kernels with ``torch.profiler`` on every rank and
write ``<folder>/<scenario>.rank<R>.json``: kernel time per category per step (GEMM, attention, NCCL, FSDP
copy/cast, Triton, other), the time the GPU ran at least one non-NCCL kernel, and the step wall time. Compares
where an N-GPU row's extra time goes against its 1-GPU row (slower compute under communication, or exposed
waits). Profiling slows the steps: use a separate call, not the timed rows."""
_KERNEL_CATEGORIES = (
    ("nccl", ("nccl",)),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("copy_cast", ("chunk_cat", "split_with_sizes_copy", "foreach_copy", "copy_kernel", "direct_copy")),
)


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel name in :data:`KERNEL_PROFILE_ENV` summaries (first match wins; a plain
    identifier that matched nothing is a Triton kernel: ATen and library kernels carry C++ signatures)."""
    low = name.lower()
    for category, needles in _KERNEL_CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "triton" if name.isidentifier() else "other"


def summarize_kernels(events: list[tuple[str, float, float]], steps: int, wall_s: float) -> dict[str, Any]:
    """Per-step kernel time by category and the non-NCCL busy time (union of intervals), in ms.

    Args:
        events: ``(kernel name, start us, duration us)`` of every CUDA kernel in the profiled window.
        steps: timed steps in the window.
        wall_s: wall seconds of the window.
    """
    by_category: dict[str, float] = {}
    top: dict[str, float] = {}
    busy = 0.0
    end = float("-inf")
    for name, start, duration in sorted(events, key=lambda e: e[1]):
        category = kernel_category(name)
        by_category[category] = by_category.get(category, 0.0) + duration
        top[name[:90]] = top.get(name[:90], 0.0) + duration
        if category == "nccl":
            continue
        stop = start + duration
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    per_step = 1e-3 / steps
    return {
        "steps": steps,
        "step_wall_ms": wall_s * 1e3 / steps,
        "compute_busy_ms": busy * per_step,
        "kernel_ms": {k: v * per_step for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: v * per_step for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:25]},
    }


_TRACE_SITES = (
    "fms_acceleration", "train_bench", "transformers/", "peft/", "bitsandbytes/", "torch/distributed/",
    "torch/utils/checkpoint", "torch/optim/",
)  # fmt: skip


def live_cuda_bytes_by_site(torch: Any, top: int = 25) -> list[tuple[str, int]]:
    """The live CUDA blocks of this process, summed per allocation site: the three innermost stack frames in
    ``_TRACE_SITES`` (needs ``torch.cuda.memory._record_memory_history`` to have been on when they were made)."""
    totals: dict[str, int] = {}
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            traced = [  # innermost first
                f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in block.get("frames") or []
                if any(key in f["filename"] for key in _TRACE_SITES)
            ]  # fmt: skip
            site = " <- ".join(traced[:3]) or "no traced frame (made before tracing, or outside the traced libraries)"
            totals[site] = totals.get(site, 0) + block["size"]
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def trace_backward_memory(torch: Any, model: Any, armed: list[bool]) -> None:
    """While ``armed[0]``, print the allocated CUDA memory each time the backward pass reaches the output of a
    decoder layer (one line per layer), and the by-site breakdown when it reaches the first layer's output."""
    layers = next((m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)),
                  None)  # fmt: skip
    if layers is None:
        print("[memtrace] no decoder-layer list found: backward trace off", flush=True)
        return

    def on_forward(index: int) -> Callable[..., None]:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if armed[0] and isinstance(out, torch.Tensor) and out.requires_grad:

                def on_grad(_grad: Any) -> None:
                    total = torch.cuda.memory_allocated() / GIB
                    print(f"[memtrace] backward reached the output of layer {index}: allocated {total:.3f} GiB",
                          flush=True)  # fmt: skip
                    if index == 0:
                        print_memory_trace(torch, "backward at the output of layer 0")

                out.register_hook(on_grad)

        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_hook(on_forward(index))


def print_memory_trace(torch: Any, label: str) -> None:
    total = torch.cuda.memory_allocated()
    print(f"[memtrace] {label}: allocated {total / GIB:.3f} GiB, by site:", flush=True)
    for site, nbytes in live_cuda_bytes_by_site(torch):
        print(f"[memtrace]   {nbytes / GIB:8.3f} GiB  {site}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    """One option per :class:`~benchlib.Scenario` field (``--batch-size``, ``--peft`` ...), plus the run's files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Scenario):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "plugins":
            parser.add_argument(flag, default="none", help="label of the plugin stack (for the result only)")
        elif f.name == "baseline":
            continue
        elif f.name in ("lora_target_modules", "lora_target_parameters"):
            parser.add_argument(flag, nargs="+", default=list(f.default))
        elif isinstance(f.default, bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=f.default)
        elif f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        else:
            kind = type(f.default) if f.default is not None else str
            parser.add_argument(flag, type=kind, default=f.default)
    parser.add_argument("--model-dir", required=True, help="folder with a save_pretrained checkpoint")
    parser.add_argument("--acceleration-config", default=None, help="YAML with the acceleration section")
    parser.add_argument("--entry", default="", help="how the section reached this process (recorded only)")
    parser.add_argument("--result-json", required=True)
    return parser


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    values = {}
    for f in dataclasses.fields(Scenario):
        if f.name == "baseline":
            continue
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if f.name in ("lora_target_modules", "lora_target_parameters") else value
    return Scenario(**values)


# ----------------------------------------------------------------------------------------------- model prep
def apply_liger(model_dir: str) -> str:
    """Apply Liger-Kernel's patches for the checkpoint's architecture (class level, before loading)."""
    import liger_kernel.transformers as liger
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        raise ValueError(f"liger_kernel {benchlib.package_version('liger-kernel')} has no patch for {model_type!r}")
    apply()
    return f"apply_liger_kernel_to_{model_type}"


def enable_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing of the decoder layers, non-reentrant, unless already on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = (
        "is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing") else "is_gradient_checkpointing"
    )
    if getattr(base, flag, False):
        return
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x (the old name warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def experts_implementation_of(model: Any) -> str:
    """The experts backend an MoE model dispatches to (transformers' ``eager`` / ``grouped_mm`` / ``batched_mm``, or
    ``fms_scattermoe`` for the MoE plugin's per-model key ``fms_scattermoe_<id>``); ``""`` for a model whose class
    cannot switch experts backends (dense models)."""
    base = model
    for _ in range(4):  # DDP / PEFT wrappers
        inner = base.get_base_model() if hasattr(base, "get_base_model") else getattr(base, "module", base)
        if inner is base:
            break
        base = inner
    can_set = getattr(type(base), "_can_set_experts_implementation", None)
    if can_set is not None and not can_set():
        return ""
    value = str(getattr(base.config, "_experts_implementation", "") or "")
    return "fms_scattermoe" if value.startswith("fms_scattermoe_") else value


def experts_lora_route(framework: Any) -> str:
    """``"+lora_factors"`` when the MoE plugin computed PEFT's expert adapters from their factors in its kernels (no
    merged expert weights) during the run, else ``""``."""
    for plugin in getattr(framework, "plugins", ()) if framework is not None else ():
        adapters = getattr(plugin, "expert_adapters", None)
        if adapters is not None and adapters.factored_calls:
            return "+lora_factors"
    return ""


def allocator_counts(torch: Any, device: Any) -> list[int]:
    """The CUDA caching allocator's device allocations (``cudaMalloc`` calls) and its retries (an allocation that
    failed, freed the cache and tried again: a synchronising ``cudaFree`` of every cached block) so far."""
    stats = torch.cuda.memory_stats(device)
    return [int(stats.get("num_device_alloc", 0)), int(stats.get("num_alloc_retries", 0))]


def bucket_flat_rows(batches: list[dict[str, Any]], framework: Any) -> list[dict[str, Any]]:
    """The padding-free plugin's ``pad_to_multiple_of`` applied to the flattened rows this script feeds the model
    directly (no DataLoader, so the plugin's collate wrapper never sees them): each row gets the filler example the
    wrapper would append. ``num_tokens`` keeps counting the real tokens only (tokens/s), while the padded-token count
    (``padding_fraction``) includes the filler."""
    plugin = next((p for p in getattr(framework, "plugins", ()) if getattr(p, "name", "") == "padding_free"), None)
    multiple = getattr(getattr(plugin, "config", None), "bucket", 1)
    if multiple <= 1:
        return batches
    from fms_acceleration_accelerate_aadp.collate import append_filler

    out = []
    for batch in batches:
        if "position_ids" not in batch or batch["input_ids"].shape[0] != 1:  # padded rows (collate: pad)
            out.append(batch)
            continue
        body = append_filler({k: v for k, v in batch.items() if k != "num_tokens"}, multiple, benchlib.PAD_ID)
        out.append({**body, "num_tokens": batch["num_tokens"]})
    return out


def make_train_args(s: Scenario, out_dir: str) -> Any:
    """``transformers.TrainingArguments`` describing this run, for plugins' ``augmentation(model, train_args)``.

    Created before the ``Accelerator`` (as the HF Trainer does): building it resets Accelerate's shared state.
    """
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=s.batch_size,
        max_steps=s.steps,
        learning_rate=s.learning_rate,
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # the autocast the row trains under (run_benchmarks.mixed_precision_for): on CPU only for float32 master
        # weights in bf16
        bf16=s.dtype == "bfloat16" and (on_gpu or s.master_weights == "float32"),
        fp16=on_gpu and s.dtype == "float16",
        use_cpu=not on_gpu,
        report_to="none",
        seed=s.seed,
    )


def hf_peft_fsdp_recipe(model: Any, accelerator: Any) -> None:
    """The HF Trainer's FSDP set-up for a PEFT model (``update_fsdp_plugin_peft``, before ``prepare``)."""
    try:
        from transformers.distributed.fsdp import update_fsdp_plugin_peft
    except ImportError:  # transformers < 5 kept it in the trainer's integrations
        from transformers.integrations.fsdp import update_fsdp_plugin_peft  # type: ignore[no-redef]
    update_fsdp_plugin_peft(model, accelerator)


def compile_decoder_layers(model: Any) -> int:
    """``compile_layers``: ``torch.compile(dynamic=True)`` on every module whose class is a decoder layer (the
    ``*DecoderLayer`` classes of transformers' models); returns how many. No layer found is an error: a row that
    asks to compile must not run uncompiled."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise RuntimeError("compile_layers: the model has no *DecoderLayer module to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def load_and_prepare(
    s: Scenario, model_dir: str, framework: Any, accelerator: Any, train_args: Any
) -> tuple[Any, dict]:
    """Load the model and make it trainable the way the scenario says; returns ``(model, info)``."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    info: dict[str, Any] = {"loader": "transformers", "augmented_by_plugins": False, "peer_patch": ""}
    # the dtype the weights load (and train) in: the row's dtype, or float32 master weights trained under the
    # row's dtype as autocast (the AMP recipe, ``master_weights: float32``)
    dtype = torch.float32 if s.master_weights == "float32" else getattr(torch, s.dtype)
    device = accelerator.device
    is_fsdp = str(accelerator.distributed_type).endswith("FSDP")
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None) if is_deepspeed(accelerator) else None
    zero3 = ds_plugin is not None and ds_plugin.zero_stage == 3
    if s.peer == "liger":
        info["peer_patch"] = apply_liger(model_dir)

    if framework is not None and framework.requires_custom_loading:
        if s.experts_implementation is not None:
            raise ValueError(f"experts_implementation ({s.experts_implementation}) with a plugin that loads the model")
        model = framework.model_loader(model_dir, torch_dtype=dtype, attn_implementation=s.attn_implementation)
        info["loader"] = "plugin"
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": s.attn_implementation}
        if s.experts_implementation is not None:  # transformers' experts backend of an MoE model
            kwargs["experts_implementation"] = s.experts_implementation
        # each process loads onto its own GPU (an index: what bitsandbytes expects); not under FSDP, nor under
        # ZeRO-3, where transformers refuses a device_map (16/32-bit weights load partitioned under zero.Init)
        if not is_fsdp and not zero3:
            kwargs["device_map"] = {"": accelerator.local_process_index if device.type == "cuda" else "cpu"}
        if s.peft == "qlora":
            quant: dict[str, Any] = {}
            if is_fsdp or ds_plugin is not None:
                # the HF docs' FSDP-QLoRA / DeepSpeed ZeRO-3 QLoRA recipe: packed 4-bit bytes stored in the
                # training dtype (so sharding / DeepSpeed's bf16 cast treat them like the other parameters; the
                # bitsandbytes plugin's `auto` storage does the same under ZeRO-2, kept alike here)
                quant["bnb_4bit_quant_storage"] = dtype
                info["bnb_4bit_quant_storage"] = str(dtype)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=s.bnb_quant_type,
                bnb_4bit_use_double_quant=s.bnb_double_quant,
                bnb_4bit_compute_dtype=dtype,
                **quant,
            )
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        if s.experts_implementation is not None and experts_implementation_of(model) != s.experts_implementation:
            raise ValueError(
                f"experts_implementation {s.experts_implementation!r} was asked for but the model runs "
                f"{experts_implementation_of(model) or 'no experts backend (not an MoE model of transformers 5)'}"
            )
    model.config.use_cache = False

    peft_config = None
    if s.peft != "full":
        peft_config = LoraConfig(
            r=s.lora_r,
            lora_alpha=s.lora_alpha,
            lora_dropout=s.lora_dropout,
            target_modules=list(s.lora_target_modules),
            bias="none",
            **({"target_parameters": list(s.lora_target_parameters)} if s.lora_target_parameters else {}),
            task_type="CAUSAL_LM",
        )
    if framework is not None and framework.requires_augmentation:
        model, (peft_config,) = framework.augmentation(model, train_args, modifiable_args=(peft_config,))
        info["augmented_by_plugins"] = True
    if peft_config is not None:  # not consumed by a plugin: plain PEFT
        if s.peft == "qlora" and s.prep == "hf" and framework is None:
            # the HF docs recipe: freezes the base, upcasts frozen non-4-bit params to fp32, enables checkpointing
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=s.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        fsdp1 = is_fsdp and getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 1) == 1
        if fsdp1 and framework is not None:
            # FSDP1 flat parameters hold one dtype, and a plugin's fused scopes keep each adapter in its decoder
            # layer's unit next to the bf16 base: adapters in the model dtype (PEFT's default upcasts to fp32)
            model = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
            info["lora_dtype"] = "model dtype (FSDP1 + plugin fused scopes)"
        else:
            model = get_peft_model(model, peft_config)
        if fsdp1 and framework is None:
            # what the HF Trainer does for PEFT under FSDP (update_fsdp_plugin_peft): the fp32 LoRA layers get
            # FSDP units of their own (peft's fsdp_auto_wrap_policy), and bnb QLoRA computes in its quant
            # storage dtype. Applied to FSDP1 rows only: FSDP1 needs it (one dtype per flat parameter); the FSDP2
            # rows keep the per-decoder-layer policy of the committed 2-GPU runs.
            hf_peft_fsdp_recipe(model, accelerator)
            info["fsdp_peft_wrap"] = "transformers update_fsdp_plugin_peft (HF Trainer's PEFT + FSDP recipe)"
    if s.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()  # from_pretrained returns eval mode, and HF checkpoints only in train mode
    # a ZeRO-3 partitioned parameter (loaded under zero.Init) is empty here; ds_numel is its full size
    info["trainable_params"] = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    info["total_params"] = sum(_numel(p) for p in model.parameters())
    info["fp32_params"] = sum(_numel(p) for p in model.parameters() if p.dtype == torch.float32)
    if s.master_weights == "float32" and info["fp32_params"] != info["total_params"]:
        raise ValueError(
            f"master_weights: float32 but {info['total_params'] - info['fp32_params']} of {info['total_params']} "
            "parameters are not float32 after loading and augmentation"
        )
    return model, info


def check_master_weights(s: Scenario, accelerator: Any) -> dict[str, Any]:
    """What a ``master_weights: float32`` row trains under: the ``Accelerator`` must autocast to the row's dtype
    (Accelerate ``mixed_precision``), else the row would train plain float32 (``ValueError``). Returns the result's
    ``autocast`` entry (``"none"`` for other rows and for ``dtype: float32``)."""
    if s.master_weights != "float32" or s.dtype == "float32":
        return {"autocast": "none"}
    wanted = {"bfloat16": "bf16", "float16": "fp16"}[s.dtype]
    if accelerator.mixed_precision != wanted or not accelerator.native_amp:
        raise ValueError(
            f"master_weights: float32 with dtype: {s.dtype} needs Accelerate mixed_precision: {wanted} (autocast); "
            f"this Accelerator has mixed_precision: {accelerator.mixed_precision}, native_amp: "
            f"{accelerator.native_amp}"
        )
    return {"autocast": f"{wanted} ({accelerator.device.type})"}


def _numel(p: Any) -> int:
    return int(getattr(p, "ds_numel", None) or p.numel())


def tensor_bytes(tensor: Any) -> int:
    """Bytes this process stores for ``tensor``: DeepSpeed ZeRO-3's partition (``ds_tensor``) for a partitioned
    parameter; for a tensor subclass (FSDP2's ``DTensor``, a packed quantized weight whose shape and dtype are the
    logical ones) the bytes of the inner tensors it flattens to (``__tensor_flatten__``), recursively; else
    ``numel * element_size``."""
    import torch

    partition = getattr(tensor, "ds_tensor", None)
    if partition is not None:
        return tensor_bytes(partition)
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in names)
        return sum(tensor_bytes(value) for value in inner if isinstance(value, torch.Tensor))
    return tensor.numel() * tensor.element_size()


def held_bytes(model: Any) -> tuple[int, int]:
    """``(parameter bytes, buffer bytes)`` this process holds of ``model`` after prepare (:func:`tensor_bytes`:
    local shards, packed storage; under FSDP1 with ``use_orig_params`` the views into this rank's flat shard),
    every distinct tensor counted once."""
    seen: set[int] = set()
    totals = [0, 0]
    for index, tensors in ((0, model.parameters()), (1, model.buffers())):
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                totals[index] += tensor_bytes(tensor)
    return totals[0], totals[1]


def is_deepspeed(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def deepspeed_info(model: Any) -> dict[str, Any]:
    """What the DeepSpeed engine trained with (read from the prepared model, a ``DeepSpeedEngine``)."""
    import deepspeed

    optimizer = getattr(model, "optimizer", None)
    client = getattr(model, "client_optimizer", None)
    return {
        "deepspeed_version": deepspeed.__version__,
        "deepspeed_zero_stage": model.zero_optimization_stage(),
        "deepspeed_bf16": bool(model.bfloat16_enabled()),
        "deepspeed_gradient_clipping": model.gradient_clipping(),
        "deepspeed_optimizer": f"{type(optimizer).__name__} over {type(client).__name__}",
        "deepspeed_ds_build_ops": os.environ.get("DS_BUILD_OPS", ""),
    }


# ----------------------------------------------------------------------------------------------- loop
def make_accelerator(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(accelerator, framework or None, entry)``: the stock ``Accelerator()`` and the framework it carries.

    Under ``accelerate launch`` with an ``acceleration:`` section, the launcher exports the section to every
    worker and the ``Accelerator`` builds the framework itself (through the start-up hook; :func:`install` is
    called here too, idempotently, in case the hook is switched off). This script then uses *that* framework
    for ``model_loader`` / ``augmentation``, so loading, augmentation and the prepare hooks share one set of
    plugin instances. Without the integration, the framework is built from ``--acceleration-config`` and
    attached (``entry`` says which happened; it goes into the CSV).
    """
    from accelerate import Accelerator

    try:
        from fms_acceleration_accelerate import accelerate_integration as integration
    except ImportError:
        integration = None
    if integration is not None and (os.environ.get(integration.ENV_SECTION) or args.acceleration_config):
        integration.install()
    handlers = []
    if args.distributed in benchlib.DEEPSPEED_STAGES and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if not torch.cuda.is_available():
            # DeepSpeed needs Accelerate's cpu=False, where Accelerate 1.x picks no backend without a GPU: ask
            # for gloo explicitly, else each process thinks it is alone
            from accelerate.utils import InitProcessGroupKwargs

            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(kwargs_handlers=handlers)
    seam = ""
    if args.distributed in ("fsdp1", "fsdp2") and accelerator.device.type == "cpu":
        seam = cpu_fsdp_seam(accelerator, int(args.distributed[-1]))
    framework = integration.get_framework(accelerator) if integration is not None else None
    entry = "accelerate launch: acceleration section" if framework is not None else ""
    if framework is None and args.acceleration_config:
        from fms_acceleration_accelerate import AccelerationFramework

        framework = AccelerationFramework(args.acceleration_config)
        entry = f"framework from --acceleration-config ({args.entry or 'file'})"
        if integration is not None:
            integration.attach_framework(accelerator, framework)
    if framework is not None and framework.passthrough:
        raise SystemExit(
            "acceleration sections without an installed plugin (the run would not be accelerated): "
            + "; ".join(f"{p.path}: {p.reason}" for p in framework.passthrough)
        )
    if args.acceleration_config and framework is None:
        raise SystemExit("--acceleration-config given but no acceleration framework could be built")
    if seam:
        entry = f"{entry}; {seam}" if entry else seam
    return accelerator, framework, entry


def cpu_fsdp_seam(accelerator: Any, version: int) -> str:
    """Switch a CPU (gloo) ``Accelerator`` to FSDP ``version``: Accelerate refuses FSDP without a GPU.

    The CPU tier's way to run the real ``Accelerator.prepare`` FSDP path (the same settings the runner writes
    for GPUs: one unit per decoder layer; FSDP1 with ``use_orig_params``). Needs >= 2 processes (a process
    group). Returns the label recorded in the result's ``entry``.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2:
        raise SystemExit("FSDP on CPU runs through a gloo process group: use num_gpus >= 2 on CPU")
    kwargs: dict[str, Any] = {
        "fsdp_version": version,
        "auto_wrap_policy": "transformer_based_wrap",
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    if version == 1:
        kwargs["use_orig_params"] = True
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**kwargs)
    accelerator.state.distributed_type = DistributedType.FSDP
    if version == 1 and accelerator.device.index is not None:
        # Accelerate's multi-CPU device is "cpu:0" (its index), which FSDP1 passes on as device_id; torch's FSDP1
        # takes the compute device of a CPU module as plain "cpu" and refuses the two as inconsistent
        import torch
        from accelerate import PartialState

        PartialState().device = accelerator.state.device = torch.device("cpu")
    return f"cpu seam: FSDP{version} over gloo"


class CollectiveCounter:
    """Counts the bytes of the all-gathers and reduce-scatters this process issues (e.g. FSDP's).

    Wraps the ``torch.distributed`` functions that FSDP1/FSDP2 call (whichever exist in this torch:
    ``all_gather_into_tensor`` / ``all_gather_single`` / ``all_gather`` / ``_all_gather_base`` and the
    ``reduce_scatter`` equivalents) through a :class:`~fms_acceleration_accelerate.patching.PatchRecorder`, so
    every wrapper is recorded and :meth:`counting` reverts them on exit. All-gather bytes: the gathered output
    (every rank's shard, this rank's included); reduce-scatter bytes: the full input. Under DeepSpeed, whose
    communication backend keeps the torch all-gather / reduce-scatter functions it found at start-up, those two
    attributes of the backend are wrapped too (ZeRO-3's parameter gathers and gradient reduce-scatters, ZeRO-2's
    parameter all-gather after the step). Not seen: all-reduces and reduces (DDP's bucketed all-reduce inside
    torch's C++, ZeRO-2's gradient reduction).
    """

    DEEPSPEED = (("allgather", "all_gather_function", 0), ("reduce_scatter", "reduce_scatter_function", 1))

    GATHER = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather")
    SCATTER = ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "reduce_scatter")

    def __init__(self) -> None:
        self.bytes = {"allgather": 0, "reduce_scatter": 0}
        self.calls = {"allgather": 0, "reduce_scatter": 0}

    @staticmethod
    def _nbytes(value: Any) -> int:
        if isinstance(value, (list, tuple)):
            return sum(CollectiveCounter._nbytes(v) for v in value)
        return value.numel() * value.element_size() if hasattr(value, "element_size") else 0

    def _wrap(self, kind: str, position: int, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if len(args) > position:
                tensor = args[position]
            else:  # keyword call: the output (gather) / input (scatter) under any of torch's names
                names = (
                    ("output_tensor", "output", "tensor_list")
                    if kind == "allgather"
                    else ("input", "input_tensor", "input_list")
                )
                tensor = next((kwargs[n] for n in names if n in kwargs), None)
            self.bytes[kind] += self._nbytes(tensor) if tensor is not None else 0
            self.calls[kind] += 1
            return original(*args, **kwargs)

        counted.__wrapped__ = original  # type: ignore[attr-defined]
        return counted

    @contextlib.contextmanager
    def counting(self) -> Iterator[CollectiveCounter]:
        import torch.distributed as dist

        from fms_acceleration_accelerate.patching import PatchRecorder

        recorder = PatchRecorder()
        with recorder.reverting():
            for kind, names, position in (("allgather", self.GATHER, 0), ("reduce_scatter", self.SCATTER, 1)):
                for name in names:
                    original = getattr(dist, name, None)
                    if original is None:
                        continue
                    recorder.patch(
                        dist, name, self._wrap(kind, position, original), plugin="train_bench",
                        description=f"byte counter ({kind})",
                    )  # fmt: skip
            deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
            backend = getattr(deepspeed_comm, "cdb", None)
            for kind, name, position in self.DEEPSPEED if backend is not None else ():
                original = getattr(backend, name, None)
                if original is not None:
                    recorder.patch(
                        backend, name, self._wrap(kind, position, original), plugin="train_bench",
                        description=f"byte counter ({kind}, DeepSpeed backend)",
                    )  # fmt: skip
            yield self


def import_before_go() -> None:
    """The imports a process may do while it waits for its go: torch, transformers (its modeling module and the
    auto class this script loads with) and accelerate. None of them initialises CUDA (with this package's start-up
    hook active, the ``import accelerate`` also installs the integration, which imports neither peft nor
    bitsandbytes); :data:`DEFERRED_MODULES` come after the go."""
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from accelerate import Accelerator  # noqa: F401
    from accelerate.utils import set_seed  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def restore_priority(target: int | None) -> int:
    """Set every thread of this process to nice ``target`` (the runner's own): the runner starts each row's
    launcher at a lower priority (``benchlib.START_NICE``) so that a start-up that overlaps the running row yields
    to it, and the training must not run at that priority. Raising a priority again needs CAP_SYS_NICE (root
    usually has it); without it the value stays, and the runner started every row the same way, so all rows
    still train alike. Returns the nice value this thread trains at."""
    current = os.getpriority(os.PRIO_PROCESS, 0)  # Linux: the calling thread
    if target is None or current <= target:
        return current
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    try:
        for tid in tasks:  # on Linux a nice value belongs to a thread; threads made while importing have it too
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), target)
            except ProcessLookupError:  # the thread ended meanwhile
                continue
    except PermissionError:
        pass  # no CAP_SYS_NICE: trains at the start-up priority (reported in the result's start_up.nice_at_train)
    return os.getpriority(os.PRIO_PROCESS, 0)


def wait_for_go(go_file: str) -> dict[str, Any]:
    """Block until the runner creates ``go_file`` (it does once the previous row's processes have exited), looking
    every :data:`GO_POLL_S` seconds and sleeping in between; then give this process its normal priority back.

    Gives up (``SystemExit``) when the process that launched this one, or the runner
    (``$FMS_BENCH_RUNNER_PID``), is gone: a row the runner no longer waits for must not linger.
    Returns what the result records about the start-up: whether CUDA was initialised (it must not be) and which
    :data:`DEFERRED_MODULES` were already imported (none must be) when the wait began, the wait's timestamps and
    the nice values.
    """
    import torch

    info: dict[str, Any] = {
        "waiting_from": time.time(),
        "cuda_initialized_at_wait": torch.cuda.is_initialized(),
        "deferred_modules_loaded_at_wait": [m for m in DEFERRED_MODULES if m in sys.modules],
        "nice_while_waiting": os.getpriority(os.PRIO_PROCESS, 0),
    }
    runner = int(os.environ.get(benchlib.RUNNER_PID_ENV) or 0)
    while not os.path.exists(go_file):
        if os.getppid() != PARENT_PID:
            raise SystemExit("the launcher of this process is gone: no go will come")
        if runner and not _alive(runner):
            raise SystemExit(f"the benchmark runner (pid {runner}) is gone: no go will come")
        time.sleep(GO_POLL_S)
    info["go_seen"] = time.time()
    base = os.environ.get(benchlib.BASE_NICE_ENV)
    info["nice_at_train"] = restore_priority(int(base) if base not in (None, "") else None)
    return info


class PhaseClock:
    """Seconds per phase of the run (rank 0 prints them; the runner turns them into a wall-time breakdown)."""

    def __init__(self, start: float) -> None:
        self.phases: dict[str, float] = {}
        self._last = start

    def done(self, name: str) -> None:
        now = time.time()
        self.phases[name] = round(now - self._last, 3)
        self._last = now


def run(args: argparse.Namespace, clock: PhaseClock, stamps: dict[str, float]) -> dict[str, Any]:
    """One scenario; fills ``stamps`` (wall-clock times: the wait for the go, the training loop) as it goes."""
    import_before_go()  # the imports phase: what every row pays before its first CUDA call
    import torch
    from accelerate.utils import set_seed

    clock.done("imports")
    s = scenario_from_args(args)
    examples = None
    if s.dataset == "instructions":  # tokenizing is no part of any measurement: done before the go
        examples = benchlib.load_instruction_token_lists(s.seq_len)
        clock.done("tokenize")
    go_file = os.environ.get(benchlib.GO_FILE_ENV)
    start_up: dict[str, Any] = {"waited_for_go": bool(go_file)}
    if go_file:  # overlapped start-up: the runner says when the previous row's processes have exited
        start_up.update(wait_for_go(go_file))
        stamps["waiting_from"], stamps["go_seen"] = start_up.pop("waiting_from"), start_up.pop("go_seen")
        clock.done("waited")
    import peft  # noqa: F401  (DEFERRED_MODULES: imports bitsandbytes, which initialises CUDA)
    from transformers import TrainingArguments  # noqa: F401

    clock.done("late_imports")
    work_dir = tempfile.mkdtemp(prefix="train_bench_")
    train_args = make_train_args(s, os.path.join(work_dir, "trainer"))
    accelerator, framework, entry = make_accelerator(args)
    set_seed(s.seed)
    device = accelerator.device
    on_cuda = device.type == "cuda"
    trace_memory = on_cuda and os.environ.get(MEMORY_TRACE_ENV) == "1" and accelerator.is_main_process
    if trace_memory:
        torch.cuda.memory._record_memory_history(max_entries=100000, stacks="python")
    clock.done("accelerator")

    autocast = check_master_weights(s, accelerator)
    model, info = load_and_prepare(s, args.model_dir, framework, accelerator, train_args)
    info.update(autocast)
    if s.master_weights == "float32" and accelerator.is_main_process:
        print(f"master weights: float32 ({info['fp32_params']} parameters), autocast {info['autocast']}", flush=True)
    clock.done("load_and_augment")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, fused=True if on_cuda else None)
    if is_deepspeed(accelerator):  # no DataLoader goes through prepare: DeepSpeed learns the batch size here
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = s.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_deepspeed(accelerator):
        info.update(deepspeed_info(model))
        if accelerator.is_main_process:
            print("deepspeed: " + ", ".join(f"{k[len('deepspeed_') :]} {v}" for k, v in deepspeed_info(model).items()))
    if s.compile_layers:
        info["compile_layers"] = compile_decoder_layers(model)  # the CSV column: how many layers were compiled
        if accelerator.is_main_process:
            print(f"compiled {info['compile_layers']} decoder layers (torch.compile, dynamic=True)", flush=True)
    clip_here = s.max_grad_norm > 0 and not is_deepspeed(accelerator)
    if framework is not None:
        framework.get_callbacks_and_ready_for_train(model, accelerator)
    # what the prepared model holds on this GPU before any step (sharded parameters and what plugins keep), the
    # peak of loading + preparing (a loader may hold more than the sharded state for a while), then the peak
    # counters restart so that the training steps get their own peak
    state_alloc = torch.cuda.memory_allocated(device) if on_cuda else 0
    held = held_bytes(model)  # the model state of this rank (its shards), whatever the device
    prepare_peak = torch.cuda.max_memory_allocated(device) if on_cuda else 0
    prepare_peak_reserved = torch.cuda.max_memory_reserved(device) if on_cuda else 0
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    forward_alloc = 0  # allocated after the first timed step's forward: state + saved activations + loss
    clock.done("prepare")

    # the model's config (a DeepSpeedEngine's own `config` is DeepSpeed's settings)
    vocab = accelerator.unwrap_model(model).config.vocab_size
    if s.rank_data == "replicate":  # every rank trains on the 1-GPU run's batches (see Scenario.rank_data)
        batches = benchlib.make_batches(s, vocab, s.steps, 0, 1, examples=examples)
    else:
        batches = benchlib.make_batches(
            s, vocab, s.steps, accelerator.process_index, accelerator.num_processes, examples=examples
        )
    batches = bucket_flat_rows(batches, framework)
    clock.done("data")
    stamps["train_start"] = time.time()
    losses: list[float] = []
    step_times: list[float] = []
    measured_tokens = 0
    padded_tokens = 0
    t_start = 0.0
    counter = CollectiveCounter()
    allocator_start = [0, 0]
    armed = [False]  # the backward trace of the first timed step only
    if trace_memory:
        trace_backward_memory(torch, model, armed)
    profile_dir = os.environ.get(KERNEL_PROFILE_ENV) if on_cuda else None
    profiler = None
    with contextlib.ExitStack() as timed:
        for step in range(s.steps):
            batch = batches[step]
            if step == s.warmup_steps:
                if on_cuda:
                    torch.cuda.synchronize()
                if accelerator.num_processes > 1:
                    timed.enter_context(counter.counting())  # reverted when the loop ends
                if on_cuda:  # the caching allocator's counters: new device allocations in the timed steps
                    allocator_start = allocator_counts(torch, device)
                if profile_dir:
                    from torch.profiler import ProfilerActivity, profile

                    profiler = timed.enter_context(profile(activities=[ProfilerActivity.CUDA]))
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            armed[0] = step == s.warmup_steps
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "num_tokens"}
            loss = model(**inputs).loss
            if step == s.warmup_steps and on_cuda:
                forward_alloc = torch.cuda.memory_allocated(device)
                if trace_memory:
                    print_memory_trace(torch, f"step {step} after forward")
            accelerator.backward(loss)
            if clip_here:  # under DeepSpeed the engine clips (gradient_clipping in its config)
                accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            if step == s.warmup_steps and trace_memory:
                print_memory_trace(torch, f"step {step} after backward (training peak so far "
                                          f"{torch.cuda.max_memory_allocated() / GIB:.3f} GiB)")  # fmt: skip
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()  # syncs the step
            if s.inject_delay_ms > 0:
                time.sleep(s.inject_delay_ms / 1000.0)
            losses.append(loss_value)
            if step >= s.warmup_steps:
                step_times.append(time.perf_counter() - t0)
                measured_tokens += batch["num_tokens"]
                padded_tokens += batch["input_ids"].numel()
            if accelerator.is_main_process:
                print(f"step {step:4d} loss {loss_value:.4f} time {time.perf_counter() - t0:.3f}s", flush=True)
        if on_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t_start
    allocator = (
        [end - start for end, start in zip(allocator_counts(torch, device), allocator_start)] if on_cuda else [0, 0]
    )
    stamps["train_end"] = time.time()
    clock.done("train")
    if profiler is not None:  # the kernels of the Chrome trace (its documented export: name, ts / dur in us)
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        stem = f"{s.name}.rank{accelerator.process_index}"
        trace = Path(profile_dir) / f"{stem}.trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text(encoding="utf-8")).get("traceEvents", [])
        trace.unlink()
        kernels = [(e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") == "kernel"]
        summary = summarize_kernels(kernels, s.steps - s.warmup_steps, elapsed)
        (Path(profile_dir) / f"{stem}.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")

    timed_steps = len(step_times)
    counts = torch.tensor(
        [measured_tokens, padded_tokens, counter.bytes["allgather"] / timed_steps,
         counter.bytes["reduce_scatter"] / timed_steps],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    tokens = accelerator.reduce(counts[:2].clone(), reduction="sum")
    comm = accelerator.gather(counts[2:].clone()).view(-1, 2).max(dim=0).values
    if on_cuda:
        train_peak = torch.cuda.max_memory_allocated(device)
        peaks = torch.tensor(
            [max(prepare_peak, train_peak), max(prepare_peak_reserved, torch.cuda.max_memory_reserved(device)),
             state_alloc, forward_alloc, prepare_peak, train_peak], device=device,
        ).float()  # fmt: skip
    else:
        peaks = torch.zeros(6, device=device)
    allocator = accelerator.gather(torch.tensor(allocator, dtype=torch.float64, device=device)).view(-1, 2)
    allocator = allocator.max(dim=0).values.tolist()
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0], device=device)
    peaks = accelerator.gather(peaks).view(-1, 6).max(dim=0).values
    rss = accelerator.gather(rss).max()
    held = accelerator.gather(torch.tensor([held], dtype=torch.float64, device=device)).view(-1, 2).max(dim=0).values
    # every rank's go and start of training (wall clock): the runner checks that none began before the previous
    # row's processes had exited
    moments = torch.tensor([stamps.get("go_seen", 0.0), stamps["train_start"]], dtype=torch.float64, device=device)
    moments = accelerator.gather(moments).view(-1, 2).tolist()
    total_tokens, total_slots = tokens.tolist()
    result = {
        "status": "ok",
        "train_tokens_per_s": total_tokens / elapsed,
        "train_tokens_per_s_per_gpu": total_tokens / elapsed / accelerator.num_processes,
        "step_time_s": statistics.fmean(step_times),
        "step_time_p50_s": statistics.median(step_times),
        "padding_fraction": 1.0 - total_tokens / total_slots if total_slots else 0.0,
        "measured_tokens": int(total_tokens),
        "peak_alloc_gib": peaks[0].item() / GIB if on_cuda else None,
        "peak_reserved_gib": peaks[1].item() / GIB if on_cuda else None,
        "state_alloc_gib": peaks[2].item() / GIB if on_cuda else None,
        "forward_alloc_gib": peaks[3].item() / GIB if on_cuda else None,
        "prepare_peak_alloc_gib": peaks[4].item() / GIB if on_cuda else None,
        "train_peak_alloc_gib": peaks[5].item() / GIB if on_cuda else None,
        "peak_rss_gib": rss.item() / GIB,
        "param_bytes_per_rank": int(held[0].item()),
        "buffer_bytes_per_rank": int(held[1].item()),
        "gpu_mem_gib": torch.cuda.get_device_properties(device).total_memory / GIB if on_cuda else None,
        "device_allocs_per_step": allocator[0] / timed_steps if on_cuda else None,
        "alloc_retries": int(allocator[1]) if on_cuda else None,
        "allgather_bytes_per_step": int(comm[0].item()) if accelerator.num_processes > 1 else None,
        "reduce_scatter_bytes_per_step": int(comm[1].item()) if accelerator.num_processes > 1 else None,
        "collective_calls": dict(counter.calls),
        "losses": losses,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "active_plugins": list(framework.active_plugin_names) if framework is not None else [],
        "patches": len(framework.patches) if framework is not None else None,
        "entry": entry,
        "start_up": {
            **start_up,
            "ranks_go_seen": [m[0] for m in moments] if go_file else None,
            "ranks_train_start": [m[1] for m in moments],
        },
        # after prepare: a plugin may have switched it; "+lora_factors": expert adapters computed from their factors
        "experts_implementation": experts_implementation_of(model) + experts_lora_route(framework),
        **info,
        **benchlib.environment_info(),
    }
    accelerator.wait_for_everyone()
    shutil.rmtree(work_dir, ignore_errors=True)
    clock.done("finish")
    if accelerator.is_main_process:
        print("phases (s): " + ", ".join(f"{k} {v}" for k, v in clock.phases.items()), flush=True)
    accelerator.end_training()  # destroys the process group: a clean, prompt exit of every rank
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    clock = PhaseClock(SCRIPT_START)
    stamps = {"script_start": SCRIPT_START}
    try:
        result = run(args, clock, stamps)
    except BaseException as exc:  # record why, then fail the process (the runner reads the log and the code)
        if rank == 0 and not isinstance(exc, KeyboardInterrupt):
            failed = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "phase_seconds": clock.phases,
                "timestamps": {**stamps, "result_written": time.time()},
            }
            Path(args.result_json).write_text(json.dumps(failed), encoding="utf-8")
        traceback.print_exc()
        return 1
    if rank == 0:
        result["phase_seconds"] = clock.phases
        result["timestamps"] = {**stamps, "result_written": time.time()}
        Path(args.result_json).write_text(json.dumps(result), encoding="utf-8")
    return 0


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown (measured at 1-3 s per process with torch/CUDA loaded, paid by
    every row): the result is written, the process group destroyed, so only output needs flushing."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
