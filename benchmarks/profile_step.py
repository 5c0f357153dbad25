"""Where one training step's GPU time goes, per plugin stack (torch.profiler), at the reference shape.

Each stack runs in its own process (plugins patch classes; Accelerate keeps per-process state):

    python benchmarks/profile_step.py --out OUT                       # all stacks below, one process each
    python benchmarks/profile_step.py --out OUT --stacks qlora-foak-flce lora-foak-flce

Per stack it writes ``OUT/<stack>.txt``: the mean step time over a few untimed-by-profiler steps, the CUDA
time per kernel category (GEMM, attention, Triton kernels of this project, other) per step, and the top
kernels by CUDA time.

``--host`` adds where the step's host (CPU) time goes, per stack (``OUT/<stack>.host.txt``): the host time of
forward, backward and optimizer step and the wait for the GPU at the step's end; per step, from a CPU+CUDA
torch.profiler run, the kernel launches (``cudaLaunchKernel`` for torch ops, ``cuLaunchKernel(Ex)`` for Triton
kernels), the device-to-host syncs, the CPU time of this project's autograd functions and custom ops, and the top
ops by self CPU time; and a cProfile of a few steps (``OUT/<stack>.pyprof.txt``: Python functions by own and
cumulative time; cProfile slows Python down, so read it for shares, not absolute times).
``--cpu-proxy`` needs no GPU: each stack's host work, on CPU, with a model of the reference depth at width 64 and
the flattened row cut to ``--seq`` (default 16) tokens per example; ``TRITON_INTERPRET=1`` sends every op down
its Triton path and every Triton launch is replaced by a no-op that counts it (``OUT/<stack>.proxy.txt``: step
time, Triton launches per step, cProfile). It leaves out what only a GPU costs (kernel launches, the Triton
launcher, device queries) and the padding-free plugin uses its CPU backend, so compare stacks and versions of
the code with it, not absolute times.
``--launch-bench`` times the host cost of one launch (``OUT/launch_bench.md``): a torch op, a bare Triton
``kernel[grid] call``, the same compiled kernel launched directly, and the RMSNorm kernel's Python entry points;
and the host cost of ``F.linear`` (8B shapes) and the Triton RMSNorm, forward + backward, with the row count fixed,
new every call, changing among seen values, or rounded up to 128 (:func:`shape_change_bench`).
With ``--layout flatten``, ``--batches K`` cycles through K different batches (a new row length every step, as in
training; the default 1 repeats one batch), ``--pad-to-multiple-of N`` rounds each row up with the padding-free
plugin's filler example, and ``--variants 1:1 16:1 16:128`` measures several such (K, N) input variants in each
stack's process (outputs ``<stack>[-pad<N>][-vary<K>].*``). The model is the reference Llama (8B layer shapes, 8 layers), random init, written once to
``--model-dir`` (created on the GPU, then ``save_pretrained``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip

_KERNELS = dict(
    fused_lora=True, fast_loss="fused_linear", fast_rms_layernorm=True, fast_rope_embeddings=True, fast_swiglu=True
)
STACKS: dict[str, tuple[str, dict | None]] = {
    # name: (peft, acceleration section or None for the plain HF-lean recipe)
    "qlora-foak-flce": (
        "qlora",
        {
            "peft": {
                "quantization": {
                    "bitsandbytes": {"quant_type": "nf4", "bnb_4bit_use_double_quant": True},
                    "fused_ops_and_kernels": {"base_layer": "bitsandbytes", "fused_dequant": True, **_KERNELS},
                }
            }
        },
    ),
    "lora-foak-flce": ("lora", {"training": {"fused_ops_and_kernels": dict(_KERNELS)}}),
    "full-foak-flce": (
        "full",
        {"training": {"fused_ops_and_kernels": {k: v for k, v in _KERNELS.items() if k != "fused_lora"}}},
    ),
    "lora-hf": ("lora", None),
    # flattened rows (--layout flatten): HF's own padding-free path, the padding_free plugin alone, with fused ops
    "lora-hf-flex": ("lora", None),
    "lora-pf": ("lora", {"training": {"attention": {"padding_free": {"method": "huggingface"}}}}),
    "lora-pf-foak": (
        "lora",
        {"training": {"attention": {"padding_free": {"method": "huggingface"}}, "fused_ops_and_kernels": _KERNELS}},
    ),
    # the same LoRA step with attention replaced by an elementwise sum of q, k and v (no mask, no boundaries): what
    # the step would take if attention cost nothing, the bound of any attention backend's gain on this shape
    "lora-attention-free": ("lora", None),
    "lora-pf-foak-hfloss": (
        "lora",
        {
            "training": {
                "attention": {"padding_free": {"method": "huggingface"}},
                "fused_ops_and_kernels": {**_KERNELS, "fast_loss": False},
            }
        },
    ),
}
ATTENTION = {"lora-hf-flex": "flex_attention", "lora-attention-free": "attention_free"}
# (attn_implementation of the stacks without plugins, default sdpa; "attention_free" is registered by
# register_attention_free below)


def register_attention_free() -> None:
    """Register ``attention_free`` in transformers' attention and mask registries: the attention output is
    ``q + k + v`` (key/value heads repeated to the query heads), so every projection still gets its gradient; no
    mask is built. Only :func:`build_stack` of the ``lora-attention-free`` stack calls it (one process per stack)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    def attention_free(module, query, key, value, attention_mask, **kwargs):
        groups = query.shape[1] // key.shape[1]
        out = query + (key + value).repeat_interleave(groups, dim=1)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("attention_free", attention_free)
    AttentionMaskInterface.register("attention_free", lambda *args, **kwargs: None)


def category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")):
        return "gemm"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if "_kernel" in low and "at::" not in low and "void " not in low:
        return "triton"
    if "nccl" in low:
        return "nccl"
    return "other"


def build_model(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (model_dir / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()


def flattened_batch(batch: int, seq: int, vocab_size: int = SHAPE["vocab_size"]) -> dict:
    """The first batch of the padding-free benchmark (benchmarks/scenarios-padding-free.yaml): ``batch`` examples of
    the shipped instruction data in one row, ``position_ids`` restarting per example, each first label ignored."""
    return flattened_batches(batch, seq, 1, vocab_size)[0]


def flattened_batches(batch: int, seq: int, count: int, vocab_size: int = SHAPE["vocab_size"], multiple: int = 1):
    """The first ``count`` batches of the padding-free benchmark (each row a new length, as in training); with
    ``multiple`` > 1 each row is rounded up by the padding-free plugin's filler example (``pad_to_multiple_of``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import Scenario, make_batches

    scenario = Scenario(
        name="profile",
        group="profile",
        model="reference",
        dataset="instructions",
        collate="flatten",
        batch_size=batch,
        seq_len=seq,
    )
    rows = [
        {k: v for k, v in b.items() if k in ("input_ids", "labels", "position_ids")}
        for b in make_batches(scenario, vocab_size, count, 0, 1)
    ]
    if multiple > 1:
        from fms_acceleration_accelerate_aadp.collate import append_filler

        rows = [append_filler(row, multiple) for row in rows]
    return rows


def run_label(name: str, batches: int = 1, pad: int = 1) -> str:
    """Output file stem of a stack run: ``<stack>[-pad<N>][-vary<K>]``."""
    return name + (f"-pad{pad}" if pad > 1 else "") + (f"-vary{batches}" if batches > 1 else "")


def build_stack(name: str, model_dir: str, cpu: bool = False):
    """``(accelerator, model, optimizer)`` of one stack, prepared; on the GPU, or on CPU for ``--cpu-proxy``."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fms_acceleration_accelerate import AccelerationKwargs, get_framework

    peft_kind, section = STACKS[name]
    if ATTENTION.get(name) == "attention_free":
        register_attention_free()
    handlers = [AccelerationKwargs(config={"plugins": section})] if section else []
    accelerator = Accelerator(mixed_precision="bf16", kwargs_handlers=handlers, cpu=cpu)
    framework = get_framework(accelerator)
    dtype = torch.bfloat16
    lora = LoraConfig(
        r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    if framework is not None and framework.requires_custom_loading:
        model = framework.model_loader(model_dir, torch_dtype=dtype)
    else:
        kw: dict = {"dtype": dtype, "attn_implementation": ATTENTION.get(name, "sdpa")}
        if not cpu:
            kw["device_map"] = {"": 0}
        if peft_kind == "qlora":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    model.config.use_cache = False
    peft_config = lora if peft_kind != "full" else None
    if framework is not None and framework.requires_augmentation:
        model, (peft_config,) = framework.augmentation(model, None, modifiable_args=(peft_config,))
    if peft_config is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, peft_config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def run_stack(
    name: str, model_dir: str, out: Path, steps: int, batch: int, seq: int, layout: str = "pad", host: bool = False,
    variants: list[tuple[int, int]] | None = None,
) -> None:  # fmt: skip
    """Build the stack once, then measure each ``(batches, pad_to_multiple_of)`` variant of its input rows."""
    accelerator, model, optimizer = build_stack(name, model_dir)
    for batches, pad in variants or [(1, 1)]:
        measure_stack(name, accelerator, model, optimizer, out, steps, batch, seq, layout, host, batches, pad)


def measure_stack(
    name: str, accelerator, model, optimizer, out: Path, steps: int, batch: int, seq: int, layout: str, host: bool,
    batches: int, pad: int,
) -> None:  # fmt: skip
    import torch
    from torch.profiler import ProfilerActivity, profile

    label = run_label(name, batches, pad)
    if layout == "flatten":
        rows = [{k: v.cuda() for k, v in b.items()} for b in flattened_batches(batch, seq, batches, multiple=pad)]
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=g).cuda()
        rows = [{"input_ids": ids, "labels": ids}]
    # scored tokens (real ones: the filler's labels are -100) per step, averaged over the rows
    tokens = sum(int((r["labels"] != -100).sum()) for r in rows) / len(rows) if layout == "flatten" else batch * seq
    row_lengths = sorted({int(r["input_ids"].shape[1]) for r in rows})
    fed = [0]

    def next_inputs() -> dict:
        """The next row (cycling): with --batches K the row length changes every step, as in training."""
        fed[0] += 1
        return rows[(fed[0] - 1) % len(rows)]

    def step() -> float:
        loss = model(**next_inputs()).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    per_cat: dict[str, float] = collections.defaultdict(float)
    top = []
    for evt in prof.key_averages():
        t = evt.self_device_time_total / 1000.0 / 2  # ms per step
        if t <= 0:
            continue
        per_cat[category(evt.key)] += t
        top.append((t, evt.count // 2, evt.key))
    top.sort(reverse=True)
    total = sum(per_cat.values())
    lines = [
        f"stack {label} ({layout}): step {step_s * 1000:.1f} ms (mean of {steps}), {tokens / step_s:.0f} tok/s, "
        f"GPU busy {total:.1f} ms/step, peak alloc {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
        f"rows: {len(rows)} different batches (row lengths {row_lengths[:8]}{' ...' if len(row_lengths) > 8 else ''}), "
        f"pad_to_multiple_of {pad}",
        "per category (ms/step): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "",
        f"{'ms/step':>8} {'calls':>6}  kernel",
    ]
    lines += [f"{t:8.2f} {c:6d}  {k[:150]}" for t, c, k in top[:45]]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / f"{label}.txt").write_text(text + "\n", encoding="utf-8")
    (out / f"{label}.json").write_text(
        json.dumps({"step_ms": step_s * 1000, "per_category_ms": per_cat, "top": top[:60], "row_lengths": row_lengths,
                    "pad_to_multiple_of": pad}),
        encoding="utf-8",
    )  # fmt: skip
    if host:
        host_profile(label, model, next_inputs, accelerator, optimizer, out, steps, step_s * 1000, total)


LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
               "cudaLaunchCooperativeKernel", "cudaGraphLaunch")  # fmt: skip
SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
             "cudaMemcpyAsync", "cudaMemGetInfo", "aten::_local_scalar_dense", "aten::item")  # fmt: skip


def _ours(key: str) -> bool:
    """Events of this project's kernels: its autograd functions (forward ``_XFunction``, backward
    ``..._XFunctionBackward``) and custom ops (``fms_accel_kernels::``)."""
    if key.startswith("fms_accel_kernels::"):
        return True
    tail = key.rsplit(" ", 1)[-1]
    return tail.startswith("_") and (tail.endswith("Function") or tail.endswith("FunctionBackward"))


def host_profile(name, model, inputs, accelerator, optimizer, out: Path, steps: int, wall_ms: float, gpu_ms: float):
    """Where the host time of one training step goes (see the module docstring, ``--host``). ``inputs``: the batch,
    or a function returning the next one."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    feed = inputs if callable(inputs) else (lambda: inputs)

    # 1. host time per phase (no sync inside the step: while the host is the bottleneck, the phases' host times
    # add up to the wall time and the final loss.item() waits only for the GPU's tail)
    phases = collections.defaultdict(float)
    torch.cuda.synchronize()
    t_start = time.perf_counter()
    for _ in range(steps):
        batch = feed()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        accelerator.backward(loss)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        loss.item()
        t4 = time.perf_counter()
        for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("wait", t4 - t3)):
            phases[key] += value * 1000 / steps
    phased_wall = (time.perf_counter() - t_start) * 1000 / steps

    def step() -> None:
        loss = model(**feed()).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    # 2. CPU + CUDA profile of 2 steps
    n_prof = 2
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_prof):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    per = {evt.key: evt for evt in events}

    def calls(keys) -> list[tuple[str, float, float]]:
        return [(k, per[k].count / n_prof, per[k].self_cpu_time_total / 1000 / n_prof) for k in keys if k in per]

    launches = calls(LAUNCH_APIS)
    syncs = calls(SYNC_APIS)
    ours = sorted(
        ((e.key, e.count / n_prof, e.cpu_time_total / 1000 / n_prof, e.self_cpu_time_total / 1000 / n_prof)
         for e in events if _ours(e.key)),
        key=lambda r: -r[2],
    )  # fmt: skip
    by_self = sorted(events, key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in events) / 1000 / n_prof
    n_launch = sum(c for _k, c, _t in launches)
    import fms_acceleration_accelerate_kernels as kernels_package

    lines = [
        f"stack {name}: wall {wall_ms:.1f} ms/step, GPU busy {gpu_ms:.1f} ms/step (from {name}.txt); kernels package "
        f"from {Path(kernels_package.__file__).parent}",
        f"host time per phase (ms/step, mean of {steps}, no sync inside the step; wall {phased_wall:.1f}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
        f"profiled ({n_prof} steps, CPU+CUDA activity): {total_self:.1f} ms/step of self CPU time in profiled events",
        f"kernel launches per step: {n_launch:.0f} ("
        + ", ".join(f"{k} {c:.0f} = {t:.2f} ms" for k, c, t in launches)
        + ")",
        "syncs / device-to-host reads per step: "
        + (", ".join(f"{k} {c:.0f} = {t:.2f} ms" for k, c, t in syncs) or "none"),
        "",
        "this project's autograd functions and custom ops (per step: calls, CPU ms inclusive, self):",
    ]
    lines += [f"  {c:6.0f} {t:8.2f} {st:8.2f}  {k}" for k, c, t, st in ours] or ["  none"]
    lines += ["", "top ops by self CPU time (per step: calls, self CPU ms, CPU ms inclusive):"]
    lines += [
        f"  {e.count / n_prof:6.0f} {e.self_cpu_time_total / 1000 / n_prof:8.2f} "
        f"{e.cpu_time_total / 1000 / n_prof:8.2f}  {e.key[:120]}"
        for e in by_self[:45]
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / f"{name}.host.txt").write_text(text + "\n", encoding="utf-8")

    # 3. Python functions (cProfile)
    n_py = 3
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n_py):
        step()
    profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    buffer.write(f"cProfile of {n_py} steps of {name} (times are for all {n_py} steps, inflated by cProfile)\n")
    stats.sort_stats("tottime").print_stats(50)
    stats.sort_stats("cumulative").print_stats(90)
    (out / f"{name}.pyprof.txt").write_text(buffer.getvalue(), encoding="utf-8")


PROXY_SHAPE = dict(
    SHAPE, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
    max_position_embeddings=4096,
)  # fmt: skip
"""``--cpu-proxy``'s model: the reference depth and layer structure at a width where CPU compute is negligible."""


def stub_triton_launches() -> collections.Counter:
    """Replace every Triton kernel of the kernels package by a launcher that only counts its launches (the
    outputs stay uninitialised: ``--cpu-proxy`` measures host work, never values). Returns the counts."""
    import importlib
    import pkgutil

    import fms_acceleration_accelerate_kernels as package
    import triton

    counts: collections.Counter = collections.Counter()

    class NoLaunch:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs) -> None:
                counts[self.name] += 1

            return launch

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for attr, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.KernelInterface):
                setattr(module, attr, NoLaunch(attr))
    return counts


def count_aten_ops(fn) -> collections.Counter:
    """The aten ops ``fn`` dispatches below autograd (each one a kernel launch or a view on a GPU), by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


def run_stack_cpu_proxy(
    name: str, model_dir: str, out: Path, steps: int, batch: int, seq: int, batches: int = 1, pad: int = 1
) -> None:
    """The host work of one stack's training step without a GPU (see ``--cpu-proxy``)."""
    import cProfile
    import io
    import pstats

    label = run_label(name, batches, pad)
    launches = stub_triton_launches()
    accelerator, model, optimizer = build_stack(name, model_dir, cpu=True)
    rows = flattened_batches(batch, seq, batches, PROXY_SHAPE["vocab_size"], multiple=pad)
    fed = [0]

    def step() -> None:
        fed[0] += 1
        inputs = rows[(fed[0] - 1) % len(rows)]
        loss = model(**inputs).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(3):
        step()
    launches.clear()
    ops = count_aten_ops(step)
    per_step = dict(launches)
    best = float("inf")
    for _ in range(3):  # best of 3 means: the CPU may be shared
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) * 1000 / steps)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        step()
    profiler.disable()
    buffer = io.StringIO()
    buffer.write(
        f"cpu proxy {label}: step {best:.1f} ms (best of 3 means of {steps}), "
        f"rows of {sorted({int(r['position_ids'].numel()) for r in rows})} tokens, Triton launches per step {sum(per_step.values())} "
        f"(no-ops here): {per_step}\naten ops per step (after autograd, as a GPU would run them): "
        f"{sum(ops.values())}; top: "
        + ", ".join(f"{k} {v}" for k, v in ops.most_common(15))
        + "\ncProfile of 3 steps (times for all 3, inflated by cProfile):\n"
    )
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(80)
    text = buffer.getvalue()
    print("\n".join(text.split("\n", 2)[:2]), flush=True)
    (out / f"{label}.proxy.txt").write_text(text, encoding="utf-8")


def build_proxy_model(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (model_dir / "config.json").exists():
        return
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**PROXY_SHAPE), dtype=torch.bfloat16).save_pretrained(model_dir)


def launch_bench(out: Path) -> None:
    """Host cost (µs) of one launch: a torch op, the RMSNorm Triton kernel bare, directly through its compiled
    kernel, through the package's launcher and its autograd function / custom op / public entry."""
    import importlib

    import torch
    import triton

    rms = importlib.import_module("fms_acceleration_accelerate_kernels.rms_norm")  # the package exports a function

    n_rows, n_cols = 970, SHAPE["hidden_size"]
    x = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(n_cols, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, device="cuda", dtype=torch.float32)
    block = rms.row_block(n_cols)
    warps = rms.num_warps_for(block)

    def bare():
        return rms._rms_norm_fwd_kernel[(n_rows,)](
            x, w, y, rstd, x.stride(0), y.stride(0), n_cols, 1e-5, 0.0, BLOCK=block, num_warps=warps
        )

    compiled = bare()
    torch.cuda.synchronize()
    cases = {
        "torch x.add_(0.0) (one aten op)": lambda: x.add_(0.0),
        "triton kernel[grid] call bare": bare,
        "_forward (launcher: reshape, empty x2, launch)": lambda: rms._forward(x, w, 1e-5, 0.0),
        "custom op rms_norm_fwd (eager dispatch)": lambda: torch.ops.fms_accel_kernels.rms_norm_fwd(x, w, 1e-5, 0.0),
        "torch.cuda.mem_get_info() (fused linear CE sizes its chunks with it)": torch.cuda.mem_get_info,
        "torch.cuda.get_device_properties(0)": lambda: torch.cuda.get_device_properties(0),
    }
    xg = x.clone().requires_grad_(True)
    grad_cases = {
        "_RMSNormFunction.apply (grad)": lambda: rms._RMSNormFunction.apply(xg, w, 1e-5, 0.0),
        "rms_norm() public entry (grad)": lambda: rms.rms_norm(xg, w, 1e-5, 0.0),
    }
    try:  # the compiled kernel's own launcher (no binding / specialisation / cache lookup); API of triton 3.x
        runner = compiled[(n_rows, 1, 1)]
        args = (x, w, y, rstd, x.stride(0), y.stride(0), n_cols, 1e-5, 0.0, block)  # constexprs included
        expected = y.clone()
        y.zero_()
        runner(*args)
        torch.cuda.synchronize()
        if not torch.equal(y, expected):
            raise RuntimeError("the direct launch wrote a different result")
        cases["triton CompiledKernel[grid] call direct"] = lambda: runner(*args)
    except (AttributeError, TypeError, RuntimeError, ValueError) as exc:  # reported; the rest still runs
        print(f"[launch_bench] direct launch not measured: {type(exc).__name__}: {exc}", flush=True)
    lines = [f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}", "",
             "| launch | host µs per call |", "|---|---|"]  # fmt: skip
    for label, fn in [*cases.items(), *grad_cases.items()]:
        with torch.no_grad() if label in cases else torch.enable_grad():
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            reps = max(10, min(2000, int(0.1 / max((time.perf_counter() - t0) / 20, 1e-7))))  # ~0.1 s a round
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                best = min(best, (time.perf_counter() - t0) / reps * 1e6)
                torch.cuda.synchronize()
        lines.append(f"| {label} | {best:.1f} |")
    lines += ["", *shape_change_bench()]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "launch_bench.md").write_text(text + "\n", encoding="utf-8")


def _compiled_variants(kernel) -> int | str:
    """How many compiled versions a Triton kernel holds (its per-device caches; triton 3.x), or '?'."""
    try:
        return sum(len(cache[0]) for cache in kernel.device_caches.values())
    except (AttributeError, TypeError, IndexError, KeyError):
        return "?"


def shape_change_bench(calls: int = 120, burst: int = 8) -> list[str]:
    """Host µs per call of a forward + backward whose row count M is fixed, changes every call to a value never seen
    before (M in 1500..2000, as the padding-free row's token count changes every step), changes among values seen
    before, or is rounded up to a multiple of 128 (``pad_to_multiple_of``): for ``F.linear`` at the 8B shapes
    (frozen bf16 weight, the input needing its gradient: LoRA's base layers) and for this project's Triton RMSNorm.
    Calls run in bursts of ``burst`` with a sync between bursts, so the GPU queue never fills and the time is the
    host's own (the GPU work of a burst is far below the host's launch budget of a queue)."""
    import importlib
    import random

    import torch
    import torch.nn.functional as F

    rms = importlib.import_module("fms_acceleration_accelerate_kernels.rms_norm")
    hidden = SHAPE["hidden_size"]
    rng = random.Random(0)
    pool = list(range(1500, 2001))
    rng.shuffle(pool)
    fixed = 1700
    x_base = torch.randn(2048, hidden, device="cuda", dtype=torch.bfloat16)
    widths = (hidden, SHAPE["intermediate_size"])
    g_base = {n: torch.randn(2048, n, device="cuda", dtype=torch.bfloat16) for n in widths}

    def linear_case(n_out: int):
        weight = torch.randn(n_out, hidden, device="cuda", dtype=torch.bfloat16) * 0.02

        def call(m: int) -> None:
            x = x_base[:m].detach().requires_grad_(True)
            F.linear(x, weight).backward(g_base[n_out][:m])

        return call

    rms_weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)

    def rms_call(m: int) -> None:
        x = x_base[:m].detach().requires_grad_(True)
        rms.rms_norm(x, rms_weight, 1e-5, 0.0).backward(g_base[hidden][:m])

    lora = importlib.import_module("fms_acceleration_accelerate_kernels.lora")
    lora_a = torch.randn(16, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    lora_b = torch.randn(hidden, 16, device="cuda", dtype=torch.bfloat16) * 0.02
    square = torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16) * 0.02

    def addmm_call(m: int) -> None:  # the fused LoRA's epilogue: out += (x A^T) B^T, through cuBLASLt
        out = x_base[:m] @ square.t()
        out.addmm_(x_base[:m, :16], lora_b.t())

    def fused_lora_call(m: int) -> None:  # the fused-ops stack's projection: frozen base + LoRA, fwd + bwd
        x = x_base[:m].detach().requires_grad_(True)
        lora.lora_linear(x, square, lora_a, lora_b, 1.0).backward(g_base[hidden][:m])

    cases = {
        f"mm + addmm_ {hidden}->{hidden} (LoRA epilogue) fwd": addmm_call,
        f"fused lora_linear {hidden}->{hidden} r16 fwd+bwd": fused_lora_call,
        f"F.linear {hidden}->{hidden} fwd+bwd": linear_case(hidden),
        f"F.linear {hidden}->{SHAPE['intermediate_size']} fwd+bwd": linear_case(SHAPE["intermediate_size"]),
        f"rms_norm (Triton) {hidden} fwd+bwd": rms_call,
    }

    def host_us(fn, ms: list[int]) -> tuple[float, float]:
        """(mean, median) host µs per call over ``ms``."""
        times = []
        torch.cuda.synchronize()
        for start in range(0, len(ms), burst):
            for m in ms[start : start + burst]:
                t0 = time.perf_counter()
                fn(m)
                times.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
        times.sort()
        return sum(times) / len(times), times[len(times) // 2]

    lines = [
        f"host µs per call, mean / median of {calls} calls (bursts of {burst}, sync between bursts); M = rows",
        "",
        "| op | M fixed (1700) | M new every call (1500..2000) | M changing, seen before | M rounded up to 128 |",
        "|---|---|---|---|---|",
    ]
    rms_before = (_compiled_variants(rms._rms_norm_fwd_kernel), _compiled_variants(rms._rms_norm_bwd_kernel))
    for index, (label, fn) in enumerate(cases.items()):
        new_ms = pool[index * calls : (index + 1) * calls]  # unseen by this op (each case has its own GEMM shapes)
        for m in (fixed, fixed + 12, 1792):  # warm: cuBLAS handles, both Triton divisibility variants, a bucket
            fn(m)
        torch.cuda.synchronize()
        fixed_t = host_us(fn, [fixed] * calls)
        new_t = host_us(fn, new_ms)
        seen = list(new_ms)
        rng.shuffle(seen)
        seen_t = host_us(fn, seen)
        bucket_t = host_us(fn, [-(-m // 128) * 128 for m in seen])
        cells = [f"{a:.1f} / {b:.1f}" for a, b in (fixed_t, new_t, seen_t, bucket_t)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rms_after = (_compiled_variants(rms._rms_norm_fwd_kernel), _compiled_variants(rms._rms_norm_bwd_kernel))
    lines += [
        "",
        f"Triton RMSNorm compiled variants (forward, backward): {rms_before} before the first rms_norm case (other "
        f"launches above compiled the forward), {rms_after} after {4 * calls} calls over {calls} new row counts "
        "and the buckets (row counts are runtime arguments: Triton specialises an integer argument only on == 1 and "
        "divisibility by 16)",
    ]
    return lines


def gemm_experiment(out: Path) -> None:
    """Separate vs merged projection GEMMs at the reference shape (T=8192 tokens): is one wide GEMM faster?"""
    import torch
    import triton.testing

    t, h, i, kv = 8192, SHAPE["hidden_size"], SHAPE["intermediate_size"], 1024
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    wq, wk, wv = (torch.randn(n, h, device="cuda", dtype=torch.bfloat16) for n in (h, kv, kv))
    wqkv = torch.cat([wq, wk, wv])
    wg, wu = (torch.randn(i, h, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    wgu = torch.cat([wg, wu])
    gq, gk, gv = (torch.randn(t, n, device="cuda", dtype=torch.bfloat16) for n in (h, kv, kv))
    gqkv = torch.cat([gq, gk, gv], dim=1)
    gg, gu = (torch.randn(t, i, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ggu = torch.cat([gg, gu], dim=1)

    def bwd_sep(gs, ws):
        dx = gs[0] @ ws[0]
        for g, w in zip(gs[1:], ws[1:]):
            dx.addmm_(g, w)
        return dx

    cases = {
        "qkv fwd 3 GEMMs": lambda: [x @ w.t() for w in (wq, wk, wv)],
        "qkv fwd 1 GEMM": lambda: x @ wqkv.t(),
        "qkv bwd-dx 3 GEMMs": lambda: bwd_sep((gq, gk, gv), (wq, wk, wv)),
        "qkv bwd-dx 1 GEMM": lambda: gqkv @ wqkv,
        "gate/up fwd 2 GEMMs": lambda: [x @ w.t() for w in (wg, wu)],
        "gate/up fwd 1 GEMM": lambda: x @ wgu.t(),
        "gate/up bwd-dx 2 GEMMs": lambda: bwd_sep((gg, gu), (wg, wu)),
        "gate/up bwd-dx 1 GEMM": lambda: ggu @ wgu,
        "down fwd": lambda: gg @ wg,
    }
    lines = ["| case | ms | TFLOP/s |", "|---|---|---|"]
    flops = {"qkv": 2 * t * h * (h + 2 * kv), "gate/up": 2 * t * h * 2 * i, "down": 2 * t * h * i}
    for name, fn in cases.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        f = flops[name.split()[0]]
        lines.append(f"| {name} | {ms:.3f} | {f / ms / 1e9:.0f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "gemm_experiment.md").write_text(text + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    parser.add_argument("--model-dir", default="/tmp/fms_profile_model")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="tokens per example (default 2048; --cpu-proxy: 16)")
    parser.add_argument(
        "--layout",
        choices=["pad", "flatten"],
        default="pad",
        help="flatten: one row of --batch instruction examples (the padding-free layout)",
    )
    parser.add_argument("--no-gemm-experiment", action="store_true")
    parser.add_argument(
        "--host", action="store_true", help="also profile the host side per stack (<stack>.host.txt, .pyprof.txt)"
    )
    parser.add_argument("--launch-bench", action="store_true", help="time the host cost of one kernel launch")
    parser.add_argument(
        "--cpu-proxy",
        action="store_true",
        help="no GPU: each stack's host work on CPU (tiny model, flattened rows, Triton launches stubbed out)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=1,
        help="--layout flatten: cycle through this many different batches, so the row length changes every step as "
        "in training (default 1: the same batch every step); outputs are named <stack>-vary<K>",
    )
    parser.add_argument(
        "--pad-to-multiple-of",
        type=int,
        default=1,
        help="--layout flatten: round each row up to a multiple of N tokens with the padding-free plugin's filler "
        "example (its pad_to_multiple_of option; tokens/s still counts real tokens); outputs are named <stack>-pad<N>",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="K:N",
        help="--layout flatten: measure several input variants in each stack's process (the model is loaded once), "
        "each K batches (--batches) rounded up to a multiple of N (--pad-to-multiple-of), e.g. 1:1 16:1 16:128; "
        "overrides --batches / --pad-to-multiple-of (GPU runs; --cpu-proxy takes --batches / --pad-to-multiple-of)",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run this stack in-process
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.seq is None:
        args.seq = 16 if args.cpu_proxy else 2048
    if args.cpu_proxy:
        return cpu_proxy_main(args, out)
    try:
        variants = [tuple(int(x) for x in v.split(":")) for v in args.variants] if args.variants else None
    except ValueError:
        parser.error(f"--variants expects K:N pairs of integers, got {args.variants}")
    variants = variants or [(args.batches, args.pad_to_multiple_of)]
    if any(len(v) != 2 or min(v) < 1 for v in variants):
        parser.error("--batches, --pad-to-multiple-of and each --variants K:N must be >= 1")
    if any(v != (1, 1) for v in variants) and args.layout != "flatten" and not args.cpu_proxy:
        parser.error("--batches / --pad-to-multiple-of / --variants apply to flattened rows: add --layout flatten")
    if args.one:
        run_stack(args.one, args.model_dir, out, args.steps, args.batch, args.seq, args.layout, args.host, variants)
        return 0
    if args.launch_bench:
        launch_bench(out)
    if not args.no_gemm_experiment:
        gemm_experiment(out)
    build_model(Path(args.model_dir))
    status = 0
    for name in args.stacks:
        cmd = [sys.executable, __file__, "--out", str(out), "--model-dir", args.model_dir, "--one", name,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               "--layout", args.layout, "--variants", *(f"{k}:{n}" for k, n in variants)]  # fmt: skip
        cmd += ["--host"] if args.host else []
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=dict(os.environ), timeout=300).returncode
        print(f"[profile_step] {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        status = status or rc
    return status


def cpu_proxy_main(args: argparse.Namespace, out: Path) -> int:
    """``--cpu-proxy``: one process per stack (``TRITON_INTERPRET=1`` routes every op to its Triton path)."""
    model_dir = Path(args.model_dir + "-cpu-proxy")
    if args.one:
        run_stack_cpu_proxy(args.one, str(model_dir), out, args.steps, args.batch, args.seq, args.batches,
                            args.pad_to_multiple_of)  # fmt: skip
        return 0
    build_proxy_model(model_dir)
    status = 0
    for name in args.stacks:
        cmd = [sys.executable, __file__, "--out", str(out), "--model-dir", args.model_dir, "--one", name, "--steps",
               str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--cpu-proxy",
               "--batches", str(args.batches), "--pad-to-multiple-of", str(args.pad_to_multiple_of)]  # fmt: skip
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        rc = subprocess.run(cmd, env=env, timeout=900).returncode
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
