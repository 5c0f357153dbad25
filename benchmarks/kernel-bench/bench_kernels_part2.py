"""GPU microbenchmark of the 4-bit dequant kernel and the fused LoRA functions at Llama-8B layer shapes.

Measures, on one CUDA GPU, in one process:

* nf4 dequantisation (double quant, bf16 output): our Triton kernel vs ``bitsandbytes.functional.dequantize_4bit``
  (time, achieved bandwidth, fraction of the measured device copy bandwidth) and the ulp difference between the
  two outputs;
* fused LoRA forward + backward time and peak extra memory for QKV, O and the SwiGLU MLP (LoRA on gate/up/down,
  and frozen without LoRA), over bitsandbytes nf4 ``Linear4bit`` and over bf16 ``nn.Linear`` bases, against PEFT
  LoRA layers on the same bases (the adapters are PEFT's own, read through the fused-ops plugin's
  ``peft_lora_projection`` with its dequant backends); plus the
  relative error of outputs and gradients against PEFT.

Writes ``<out>/bench_kernels_part2.csv`` and ``<out>/bench_kernels_part2.json`` (environment: GPU, versions,
date, command line). Usage::

    python benchmarks/kernel-bench/bench_kernels_part2.py --out benchmarks/results/<date>-<gpu>-x1-kernels-nf4-lora
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import shlex
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from benchtiming import cuda_median_ms
from fms_acceleration_accelerate_foak.dequant_backends import FOAK_DEQUANT_BACKENDS
from fms_acceleration_accelerate_foak.fused_lora import base_projection
from fms_acceleration_accelerate_foak.fused_lora import peft_lora_projection as _peft_lora_projection
from fms_acceleration_accelerate_kernels.dequant import bnb_four_bit_state
from fms_acceleration_accelerate_kernels.lora import lora_linear, lora_mlp_swiglu, lora_qkv
from fms_acceleration_accelerate_kernels.nf4 import dequantize_4bit_triton
from torch import nn

from fms_acceleration_accelerate.dequant import DequantBackendRegistry

SHAPES_8B = dict(hidden=4096, q=4096, kv=1024, inter=14336)
# the backends the fused-ops plugin contributes (bitsandbytes Linear4bit, float nn.Linear)
REGISTRY = DequantBackendRegistry.of(*FOAK_DEQUANT_BACKENDS, contributor="fused_ops_and_kernels")


def peft_lora_projection(module: nn.Module):
    return _peft_lora_projection(module, REGISTRY)


DEVICE = "cuda"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "bitsandbytes", "peft", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = str(torch.version.cuda)
    return out


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated during ``fn`` above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------ dequant


def copy_bandwidth_gbs(warmup: int, reps: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 1 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), warmup, reps)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_dequant(bnb, rows: list[dict], warmup: int, reps: int, copy_gbs: float) -> None:
    for out_f, in_f in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        for nested in (True, False):
            rows += _bench_dequant_case(bnb, out_f, in_f, nested, warmup, reps, copy_gbs)
            torch.cuda.empty_cache()


def _bench_dequant_case(bnb, out_f: int, in_f: int, nested: bool, warmup: int, reps: int, copy_gbs: float):
    w = torch.randn(out_f, in_f, device=DEVICE, dtype=torch.bfloat16) * 0.02
    packed, qs = bnb.functional.quantize_4bit(
        w, blocksize=64, compress_statistics=nested, quant_type="nf4", quant_storage=torch.bfloat16
    )
    state = bnb_four_bit_state(qs)
    ours = dequantize_4bit_triton(packed, state)
    theirs = bnb.functional.dequantize_4bit(packed, qs)
    ulp = (ours.view(torch.int16).int() - theirs.view(torch.int16).int()).abs().max().item()
    value_equal = torch.equal(ours, theirs)
    n = out_f * in_f
    absmax_bytes = state.absmax.numel() * state.absmax.element_size()
    bytes_moved = n // 2 + absmax_bytes + 2 * n
    out_buf = torch.empty_like(ours)
    t_ours = cuda_median_ms(lambda: dequantize_4bit_triton(packed, state, out=out_buf), warmup, reps, inner=20)
    t_bnb = cuda_median_ms(lambda: bnb.functional.dequantize_4bit(packed, qs, out=out_buf), warmup, reps, inner=20)
    t_ours_1 = cuda_median_ms(lambda: dequantize_4bit_triton(packed, state, out=out_buf), warmup, reps)
    t_bnb_1 = cuda_median_ms(lambda: bnb.functional.dequantize_4bit(packed, qs, out=out_buf), warmup, reps)
    rows = []
    for impl, ms, ms_1 in (("ours_triton", t_ours, t_ours_1), ("bitsandbytes", t_bnb, t_bnb_1)):
        gbs = bytes_moved / (ms * 1e-3) / 1e9
        rows.append(
            dict(
                bench="dequant_nf4",
                case=f"{out_f}x{in_f}{'-dq' if nested else ''}",
                impl=impl,
                time_ms=round(ms, 4),
                single_call_ms=round(ms_1, 4),
                gbs=round(gbs, 1),
                frac_of_copy_bw=round(gbs / copy_gbs, 3),
                speedup_vs_bnb=round(t_bnb / ms, 3),
                max_ulp_vs_bnb=ulp,
                value_equal_vs_bnb=value_equal,
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------- fused LoRA


class _Block(nn.Module):
    """The linear layers of one Llama decoder layer (no attention math: only what the kernels replace)."""

    def __init__(self, make_linear: Callable[[int, int], nn.Module]):
        super().__init__()
        s = SHAPES_8B
        self.q_proj = make_linear(s["hidden"], s["q"])
        self.k_proj = make_linear(s["hidden"], s["kv"])
        self.v_proj = make_linear(s["hidden"], s["kv"])
        self.o_proj = make_linear(s["q"], s["hidden"])
        self.gate_proj = make_linear(s["hidden"], s["inter"])
        self.up_proj = make_linear(s["hidden"], s["inter"])
        self.down_proj = make_linear(s["inter"], s["hidden"])


def _make_block(bnb, base: str) -> nn.Module:
    def make_linear(in_f: int, out_f: int) -> nn.Module:
        if base == "bf16":
            layer = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=DEVICE)
            nn.init.normal_(layer.weight, std=0.02)
            return layer
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
            quant_storage=torch.bfloat16,
        )  # fmt: skip
        weight = torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16,
            module=layer,
        )  # fmt: skip
        return layer.to(DEVICE)

    return _Block(make_linear).requires_grad_(False)


def _peft_block(peft, block: nn.Module, targets: list[str], r: int) -> nn.Module:
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(block, config)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)  # adapters in the compute dtype (as the plugin trains them)
    return model.base_model.model


def _fwd_bwd(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor, grads: list[torch.Tensor]):
    def step():
        outs = fn(x)
        torch.autograd.backward(outs, grads)

    return step


def _grads_of(block: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"x": x.grad.detach().clone()}
    for name, p in block.named_parameters():
        if p.grad is not None:
            out[name] = p.grad.detach().clone()
    return out


def bench_lora(bnb, peft, rows: list[dict], tokens: int, r: int, warmup: int, reps: int) -> None:
    for base in ("nf4", "bf16"):
        _bench_lora_base(bnb, peft, base, rows, tokens, r, warmup, reps)
        torch.cuda.empty_cache()


def _bench_lora_base(bnb, peft, base: str, rows: list[dict], tokens: int, r: int, warmup: int, reps: int) -> None:
    s = SHAPES_8B
    block = _make_block(bnb, base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    blk = _peft_block(peft, block, targets, r)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x_attn = torch.randn(tokens, s["hidden"], device=DEVICE, dtype=torch.bfloat16, generator=gen)
    x_attn.requires_grad_(True)
    x_o = torch.randn(tokens, s["q"], device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_(True)

    def g(n: int) -> torch.Tensor:
        return torch.randn(tokens, n, device=DEVICE, dtype=torch.bfloat16, generator=gen)

    g_q, g_kv1, g_kv2, g_h = g(s["q"]), g(s["kv"]), g(s["kv"]), g(s["hidden"])

    def peft_qkv(x):
        return blk.q_proj(x), blk.k_proj(x), blk.v_proj(x)

    def ours_qkv(x):
        return lora_qkv(
            x, peft_lora_projection(blk.q_proj), peft_lora_projection(blk.k_proj), peft_lora_projection(blk.v_proj)
        )

    def peft_o(x):
        return (blk.o_proj(x),)

    def ours_o(x):
        spec = peft_lora_projection(blk.o_proj)
        return (lora_linear(x, spec.base, spec.lora_A, spec.lora_B, spec.scaling),)

    def peft_mlp(x):
        return (blk.down_proj(F.silu(blk.gate_proj(x)) * blk.up_proj(x)),)

    def ours_mlp(x):
        return (
            lora_mlp_swiglu(
                x,
                peft_lora_projection(blk.gate_proj),
                peft_lora_projection(blk.up_proj),
                peft_lora_projection(blk.down_proj),
            ),
        )

    def frozen_mlp_hf(x):  # HF MLP on the frozen base layers (LoRA only on attention)
        b = blk
        return (b.down_proj.base_layer(F.silu(b.gate_proj.base_layer(x)) * b.up_proj.base_layer(x)),)

    def ours_frozen_mlp(x):
        b = blk
        return (
            lora_mlp_swiglu(
                x,
                base_projection(b.gate_proj.base_layer, REGISTRY),
                base_projection(b.up_proj.base_layer, REGISTRY),
                base_projection(b.down_proj.base_layer, REGISTRY),
            ),
        )

    cases = [
        ("qkv", x_attn, [g_q, g_kv1, g_kv2], peft_qkv, ours_qkv),
        ("o", x_o, [g_h], peft_o, ours_o),
        ("mlp_lora", x_attn, [g_h], peft_mlp, ours_mlp),
        ("mlp_frozen", x_attn, [g_h], frozen_mlp_hf, ours_frozen_mlp),
    ]
    for case, x, grads, ref_fn, our_fn in cases:
        # correctness at this shape against PEFT (same adapters, same base)
        blk.zero_grad(set_to_none=True)
        x.grad = None
        ref_outs = ref_fn(x)
        torch.autograd.backward(ref_outs, grads)
        ref_grads = _grads_of(blk, x)
        ref_outs = [o.detach() for o in ref_outs]
        blk.zero_grad(set_to_none=True)
        x.grad = None
        outs = our_fn(x)
        torch.autograd.backward(outs, grads)
        our_grads = _grads_of(blk, x)
        errs = {"out": max(rel_err(o, r_) for o, r_ in zip(outs, ref_outs))}
        errs.update({k: rel_err(our_grads[k], v) for k, v in ref_grads.items()})
        missing = sorted(set(ref_grads) - set(our_grads))
        del outs, ref_outs, our_grads, ref_grads
        blk.zero_grad(set_to_none=True)
        x.grad = None
        timings = {}
        for impl, fn in (("peft", ref_fn), ("ours_fused", our_fn)):
            step = _fwd_bwd(fn, x, grads)
            ms = cuda_median_ms(step, warmup, reps)
            blk.zero_grad(set_to_none=True)
            x.grad = None
            mem = peak_extra_mib(step)
            blk.zero_grad(set_to_none=True)
            x.grad = None
            timings[impl] = ms
            rows.append(
                dict(
                    bench="lora_fwd_bwd",
                    case=f"{case}-{base}",
                    impl=impl,
                    time_ms=round(ms, 3),
                    peak_extra_mib=round(mem, 1),
                    speedup_vs_peft=round(timings["peft"] / ms, 3),
                    max_rel_err_vs_peft=f"{max(errs.values()):.2e}" if impl != "peft" else "",
                    grads_missing=",".join(missing) if impl != "peft" else "",
                )
            )
        print(f"{case}-{base}: peft {timings['peft']:.2f} ms, ours {timings['ours_fused']:.2f} ms; errs {errs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder for the CSV and JSON")
    parser.add_argument("--tokens", type=int, default=4 * 2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-lora", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    import bitsandbytes as bnb
    import peft

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        gpu=torch.cuda.get_device_name(0),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        versions=_versions(),
        tokens=args.tokens,
        rank=args.rank,
    )
    print(json.dumps(env, indent=1))
    rows: list[dict] = []
    copy_gbs = copy_bandwidth_gbs(args.warmup, args.reps)
    env["copy_bandwidth_gbs"] = round(copy_gbs, 1)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    bench_dequant(bnb, rows, args.warmup, args.reps, copy_gbs)
    for row in rows:
        print(row)
    if not args.skip_lora:
        bench_lora(bnb, peft, rows, args.tokens, args.rank, args.warmup, args.reps)
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("bench", "case", "impl"), k))
    with open(out / "bench_kernels_part2.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench_kernels_part2.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(f"wrote {out}/bench_kernels_part2.csv and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
