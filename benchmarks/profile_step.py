"""Where one training step's GPU time goes, per plugin stack (torch.profiler), at the reference shape.

Each stack runs in its own process (plugins patch classes; Accelerate keeps per-process state):

    python benchmarks/profile_step.py --out OUT                       # all stacks below, one process each
    python benchmarks/profile_step.py --out OUT --stacks qlora-foak-flce lora-foak-flce

Per stack it writes ``OUT/<stack>.txt``: the mean step time over a few untimed-by-profiler steps, the CUDA
time per kernel category (GEMM, attention, Triton kernels of this project, other) per step, and the top
kernels by CUDA time. The model is the reference Llama (8B layer shapes, 8 layers), random init, written once to
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
ATTENTION = {"lora-hf-flex": "flex_attention"}  # attn_implementation of the stacks without plugins (default sdpa)


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


def flattened_batch(batch: int, seq: int) -> dict:
    """The first batch of the padding-free benchmark (benchmarks/scenarios-padding-free.yaml): ``batch`` examples of
    the shipped instruction data in one row, ``position_ids`` restarting per example, each first label ignored."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import Scenario, make_batches

    scenario = Scenario(name="profile", group="profile", model="reference", dataset="instructions", collate="flatten",
                        batch_size=batch, seq_len=seq)
    first = make_batches(scenario, SHAPE["vocab_size"], 1, 0, 1)[0]
    return {k: v for k, v in first.items() if k in ("input_ids", "labels", "position_ids")}


def run_stack(name: str, model_dir: str, out: Path, steps: int, batch: int, seq: int, layout: str = "pad") -> None:
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fms_acceleration_accelerate import AccelerationKwargs, get_framework

    peft_kind, section = STACKS[name]
    handlers = [AccelerationKwargs(config={"plugins": section})] if section else []
    accelerator = Accelerator(mixed_precision="bf16", kwargs_handlers=handlers)
    framework = get_framework(accelerator)
    dtype = torch.bfloat16
    lora = LoraConfig(
        r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    if framework is not None and framework.requires_custom_loading:
        model = framework.model_loader(model_dir, torch_dtype=dtype)
    else:
        kw: dict = {"dtype": dtype, "device_map": {"": 0}, "attn_implementation": ATTENTION.get(name, "sdpa")}
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

    if layout == "flatten":
        inputs = {k: v.cuda() for k, v in flattened_batch(batch, seq).items()}
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=g).cuda()
        inputs = {"input_ids": ids, "labels": ids}
    tokens = int((inputs["labels"] != -100).sum()) if layout == "flatten" else batch * seq

    def step() -> float:
        loss = model(**inputs).loss
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
    rows = []
    for evt in prof.key_averages():
        t = evt.self_device_time_total / 1000.0 / 2  # ms per step
        if t <= 0:
            continue
        per_cat[category(evt.key)] += t
        rows.append((t, evt.count // 2, evt.key))
    rows.sort(reverse=True)
    total = sum(per_cat.values())
    lines = [
        f"stack {name} ({layout}): step {step_s * 1000:.1f} ms (mean of {steps}), {tokens / step_s:.0f} tok/s, "
        f"GPU busy {total:.1f} ms/step, peak alloc {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
        "per category (ms/step): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "",
        f"{'ms/step':>8} {'calls':>6}  kernel",
    ]
    lines += [f"{t:8.2f} {c:6d}  {k[:150]}" for t, c, k in rows[:45]]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    (out / f"{name}.json").write_text(
        json.dumps({"step_ms": step_s * 1000, "per_category_ms": per_cat, "top": rows[:60]}), encoding="utf-8"
    )


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
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--layout", choices=["pad", "flatten"], default="pad",
                        help="flatten: one row of --batch instruction examples (the padding-free layout)")
    parser.add_argument("--no-gemm-experiment", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run this stack in-process
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_stack(args.one, args.model_dir, out, args.steps, args.batch, args.seq, args.layout)
        return 0
    if not args.no_gemm_experiment:
        gemm_experiment(out)
    build_model(Path(args.model_dir))
    status = 0
    for name in args.stacks:
        cmd = [sys.executable, __file__, "--out", str(out), "--model-dir", args.model_dir, "--one", name,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               "--layout", args.layout]  # fmt: skip
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=dict(os.environ), timeout=300).returncode
        print(f"[profile_step] {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
