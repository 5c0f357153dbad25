"""One GPU microbenchmark of the training kernels at Llama-8B shapes (bf16): ours vs PyTorch eager vs Liger.

Ops: RMSNorm, RoPE (q and k), SwiGLU, GeGLU (tanh), cross-entropy, fused linear cross-entropy (trainable and
frozen lm_head). For every implementation: correctness (max abs error of the output and every gradient
against an fp32 reference computed from the same bf16 inputs, and a pass/fail check against eager's own
error), forward and forward+backward wall time (``triton.testing.do_bench`` median), the summed GPU time of
every kernel launched by one forward+backward (CUDA profiler), the op's minimum HBM traffic over that kernel
time as a fraction of the measured device-to-device copy bandwidth, and the peak extra memory. A launch
sweep then times alternative launch settings of our kernels alone and names the fastest, so defaults can
be updated from one run.

Byte model (minimum HBM traffic of forward+backward, bf16 elements):
  RMSNorm 5 x N*H (read x, write y; read dy, x, write dx), RoPE 4 x (q+k) (+ cos/sin), GLU 8 x N*I
  (read gate, up, write out; read dout, gate, up, write dgate, dup), cross-entropy 2 x N*V (read the logits
  once, write the gradient once).
The RoPE upstream gradients arrive in HF's projection layout ((B, S, H, D) memory), as SDPA's backward
produces them.

Usage (repository root, CUDA machine; about 3 minutes on an H100)::

    PYTHONPATH=kernels/src python benchmarks/kernel-bench/bench_kernels.py --out OUT_DIR

Writes ``OUT_DIR/kernels.json`` (environment, copy bandwidth, rows, sweep), ``OUT_DIR/kernels.csv`` and
``OUT_DIR/kernels.md`` (tables). Liger-Kernel columns read ``n/a`` when it is not importable.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# 8B reference shape (the end-to-end benchmarks' shape)
BATCH, SEQ, HIDDEN, INTERMEDIATE = 4, 2048, 4096, 14336
N_HEADS, N_KV_HEADS, HEAD_DIM, VOCAB = 32, 8, 128, 128256
TOKENS = BATCH * SEQ
DTYPE = torch.bfloat16


@dataclass
class Case:
    """One op at one shape: inputs factory, implementations, traffic/FLOP model."""

    op: str
    make_inputs: Callable[[], dict[str, torch.Tensor]]
    grad_names: tuple[str, ...]
    impls: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]]
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    bytes_fwd: int = 0  # minimum HBM bytes of the forward
    bytes_fwd_bwd: int = 0  # minimum HBM bytes of forward + backward
    flops_fwd_bwd: int = 0  # for compute-bound ops (reported as TFLOP/s)
    notes: str = ""
    # upstream gradient of output i from a contiguous random tensor (e.g. to give it a model's layout)
    upstream_layout: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Row:
    op: str
    impl: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_gbps: float | None = None
    fwd_bwd_gbps: float | None = None
    fwd_bwd_pct_copy_bw: float | None = None
    fwd_bwd_tflops: float | None = None
    fwd_bwd_kernel_ms: float | None = None  # sum of GPU kernel times (profiler), free of CPU launch overhead
    kernel_pct_copy_bw: float | None = None
    peak_extra_mib: float | None = None
    max_abs_err: dict = field(default_factory=dict)
    speedup_vs_eager: float | None = None
    speedup_vs_liger: float | None = None
    error: str = ""
    notes: str = ""
    correct: bool | None = None  # errors within max(2 x eager's error, dtype floor); None without eager


def _bench(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _kernel_ms(fn: Callable[[], object], iters: int = 10) -> float:
    """Mean GPU time of the kernels (and copies/memsets) ``fn`` launches, from the CUDA profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / iters / 1e3


def copy_bandwidth_gbps(rep_ms: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), rep_ms)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _load_liger():
    try:
        from liger_kernel.transformers import functional as liger
    except ImportError as exc:  # reported in the JSON, the liger columns stay empty
        return None, f"liger-kernel not importable: {exc}"
    return liger, importlib.metadata.version("liger-kernel")


def build_cases() -> list[Case]:
    import fms_acceleration_accelerate_kernels as K
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_rope

    liger, _ = _load_liger()
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(DTYPE)

    def hf_rms(x, weight):  # LlamaRMSNorm.forward
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
        return weight * xf.to(x.dtype)

    def rope_inputs():
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
        pos = torch.arange(SEQ, device="cuda").float()[None].expand(BATCH, SEQ)
        emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
        # HF layout: projections (B, S, H, D) viewed as (B, H, S, D)
        q = randn(BATCH, SEQ, N_HEADS, HEAD_DIM).transpose(1, 2)
        k = randn(BATCH, SEQ, N_KV_HEADS, HEAD_DIM).transpose(1, 2)
        return dict(q=q, k=k, cos=emb.cos().to(DTYPE), sin=emb.sin().to(DTYPE))

    def targets():
        t = torch.randint(0, VOCAB, (TOKENS,), generator=g, device="cuda")
        t[::16] = -100
        return t

    el = 2  # bytes per bf16 element
    cases: list[Case] = []

    nh = TOKENS * HIDDEN
    impls = {"ours": lambda x, weight: K.rms_norm(x, weight, 1e-5), "eager": hf_rms}
    if liger:
        impls["liger"] = lambda x, weight: liger.liger_rms_norm(x, weight, 1e-5)
    cases.append(
        Case(
            "rms_norm", lambda: dict(x=randn(BATCH, SEQ, HIDDEN), weight=randn(HIDDEN, scale=0.1) + 1),
            ("x", "weight"), impls, lambda x, weight: K.rms_norm_ref(x, weight, 1e-5),
            bytes_fwd=2 * nh * el, bytes_fwd_bwd=5 * nh * el,
        )
    )  # fmt: skip

    qk = TOKENS * (N_HEADS + N_KV_HEADS) * HEAD_DIM
    cs = 2 * TOKENS * HEAD_DIM * el  # cos + sin (B, S, D) read once per pass
    impls = {"ours": K.apply_rotary_pos_emb, "eager": hf_rope}
    if liger:
        impls["liger"] = liger.liger_rope
    cases.append(
        Case(
            "rope", rope_inputs, ("q", "k"), impls, K.rope_ref,
            bytes_fwd=2 * qk * el + cs, bytes_fwd_bwd=4 * qk * el + 2 * cs,
            notes="q,k and their upstream grads in HF projection layout (B,S,H,D memory); Liger rotates in place",
            upstream_layout=lambda u: u.transpose(1, 2).contiguous().transpose(1, 2),
        )
    )  # fmt: skip

    ni = TOKENS * INTERMEDIATE
    for name, ours, eager, liger_fn, ref in (
        ("swiglu", K.swiglu, lambda gate, up: F.silu(gate) * up, "liger_swiglu", K.swiglu_ref),
        ("geglu_tanh", K.geglu, lambda gate, up: F.gelu(gate, approximate="tanh") * up, "liger_geglu", K.geglu_ref),
    ):
        impls = {"ours": ours, "eager": eager}
        if liger:
            liger_impl = getattr(liger, liger_fn)  # takes positional (a, b)
            impls["liger"] = lambda gate, up, _f=liger_impl: _f(gate, up)
        cases.append(
            Case(
                name, lambda: dict(gate=randn(BATCH, SEQ, INTERMEDIATE), up=randn(BATCH, SEQ, INTERMEDIATE)),
                ("gate", "up"), impls, ref, bytes_fwd=3 * ni * el, bytes_fwd_bwd=8 * ni * el,
            )
        )  # fmt: skip

    nv = TOKENS * VOCAB
    impls = {
        "ours": lambda logits, target: K.cross_entropy(logits, target),
        "ours_inplace": lambda logits, target: K.cross_entropy(logits, target, inplace_backward=True),
        "eager": lambda logits, target: F.cross_entropy(logits.float(), target, ignore_index=-100),
    }
    if liger:
        impls["liger"] = lambda logits, target: liger.liger_cross_entropy(logits, target)
    cases.append(
        Case(
            "cross_entropy", lambda: dict(logits=randn(TOKENS, VOCAB, scale=2.0), target=targets()), ("logits",),
            impls, K.cross_entropy_ref, bytes_fwd=nv * el, bytes_fwd_bwd=2 * nv * el,
            notes="eager = HF loss (logits upcast to fp32); ours and Liger write the gradient during forward "
            "(Liger and ours_inplace over the logits)",
        )
    )  # fmt: skip

    for frozen in (False, True):
        impls = {
            "ours": lambda hidden, weight, target: K.fused_linear_cross_entropy(hidden, weight, target),
            "eager": lambda hidden, weight, target: F.cross_entropy(
                (hidden @ weight.t()).float(), target, ignore_index=-100
            ),
        }
        if liger:
            impls["liger"] = lambda hidden, weight, target: liger.liger_fused_linear_cross_entropy(
                hidden, weight, target
            )
        cases.append(
            Case(
                "fused_linear_ce" + ("_frozen_weight" if frozen else ""),
                lambda: dict(hidden=randn(TOKENS, HIDDEN), weight=randn(VOCAB, HIDDEN, scale=HIDDEN**-0.5),
                             target=targets()),
                ("hidden",) if frozen else ("hidden", "weight"), impls, K.fused_linear_cross_entropy_ref,
                flops_fwd_bwd=(4 if frozen else 6) * TOKENS * VOCAB * HIDDEN,
                notes="weight frozen (LoRA): no weight-gradient GEMM" if frozen else "",
            )
        )  # fmt: skip
    return cases


def _prepare(inputs: dict[str, torch.Tensor], grad_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in inputs.items():
        v = value.detach().clone() if value.is_contiguous() else value.detach().transpose(1, 2).clone().transpose(1, 2)
        out[name] = v.requires_grad_(name in grad_names)
    return out


def _run_fwd_bwd(fn, inputs, grad_names, upstream):
    outs = _as_tuple(fn(**inputs))
    torch.autograd.backward(outs, upstream if upstream is not None else None)
    grads = {n: inputs[n].grad for n in grad_names}
    return outs, grads


def _measure(row, fn, case, base_inputs, upstream, ref_outs, ref_grads, rep_ms, copy_bw) -> None:
    """Fill ``row`` with errors vs the fp32 reference, timings, bandwidth and peak memory of ``fn``."""
    impl_upstream = None
    if upstream is not None:
        probe = _as_tuple(fn(**_prepare(base_inputs, case.grad_names)))
        impl_upstream = [u.to(o.dtype) for u, o in zip(upstream, probe)]
        del probe
    inputs = _prepare(base_inputs, case.grad_names)
    outs, grads = _run_fwd_bwd(fn, inputs, case.grad_names, impl_upstream)
    errs = {f"out{i}": (o.float() - r.float()).abs().max().item() for i, (o, r) in enumerate(zip(outs, ref_outs))}
    errs.update({f"d_{n}": (grads[n].float() - ref_grads[n].float()).abs().max().item() for n in case.grad_names})
    row.max_abs_err = errs
    del outs, grads

    inputs = _prepare(base_inputs, case.grad_names)
    row.fwd_ms = _bench(lambda: fn(**inputs), rep_ms)

    def fwd_bwd():
        for n in case.grad_names:
            inputs[n].grad = None
        torch.autograd.backward(_as_tuple(fn(**inputs)), impl_upstream)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    row.peak_extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    row.fwd_bwd_ms = _bench(fwd_bwd, rep_ms)
    if case.bytes_fwd:
        row.fwd_gbps = case.bytes_fwd / (row.fwd_ms * 1e-3) / 1e9
        row.fwd_bwd_gbps = case.bytes_fwd_bwd / (row.fwd_bwd_ms * 1e-3) / 1e9
        row.fwd_bwd_pct_copy_bw = 100.0 * row.fwd_bwd_gbps / copy_bw
    row.fwd_bwd_kernel_ms = _kernel_ms(fwd_bwd)
    if case.bytes_fwd:
        row.kernel_pct_copy_bw = 100.0 * case.bytes_fwd_bwd / (row.fwd_bwd_kernel_ms * 1e-3) / 1e9 / copy_bw
    if case.flops_fwd_bwd:
        row.fwd_bwd_tflops = case.flops_fwd_bwd / (row.fwd_bwd_ms * 1e-3) / 1e12


def run_case(case: Case, rep_ms: int, copy_bw: float) -> list[Row]:
    rows = []
    base_inputs = case.make_inputs()
    # fp32 truth from the same bf16 inputs
    ref_inputs = {n: (v.detach().float() if v.is_floating_point() else v).requires_grad_(n in case.grad_names)
                  for n, v in base_inputs.items()}  # fmt: skip
    ref_outs = _as_tuple(case.reference(**ref_inputs))
    gen = torch.Generator(device="cuda").manual_seed(1)
    upstream = [torch.randn(o.shape, generator=gen, device="cuda") if o.dim() else None for o in ref_outs]
    if case.upstream_layout is not None:
        upstream = [case.upstream_layout(u) if u is not None else None for u in upstream]
    upstream = None if all(u is None for u in upstream) else upstream
    torch.autograd.backward(ref_outs, upstream)
    ref_grads = {n: ref_inputs[n].grad for n in case.grad_names}
    ref_outs = [o.detach() for o in ref_outs]
    del ref_inputs

    for impl_name, fn in case.impls.items():
        row = Row(case.op, impl_name, notes=case.notes)
        try:
            _measure(row, fn, case, base_inputs, upstream, ref_outs, ref_grads, rep_ms, copy_bw)
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.empty_cache()
        rows.append(row)

    eager = next((r for r in rows if r.impl == "eager" and r.max_abs_err), None)
    for r in rows:
        if eager is not None and r.max_abs_err:
            # absolute floors: bf16 resolution of O(1) outputs; CE gradients are O(1 / tokens)
            def floor(key: str) -> float:
                return 1e-6 if case.op == "cross_entropy" and key.startswith("d_") else 2e-2

            r.correct = all(v <= max(2.0 * eager.max_abs_err.get(k, 0.0), floor(k)) for k, v in r.max_abs_err.items())
    times = {r.impl: r.fwd_bwd_ms for r in rows if r.fwd_bwd_ms}
    for r in rows:
        if r.fwd_bwd_ms and times.get("eager"):
            r.speedup_vs_eager = times["eager"] / r.fwd_bwd_ms
        if r.fwd_bwd_ms and times.get("liger"):
            r.speedup_vs_liger = times["liger"] / r.fwd_bwd_ms
    return rows


def sweep_launch_configs(copy_bw: float) -> list[dict]:
    """Kernel time of alternative launch settings of our kernels (each kernel alone, same inputs).

    The first entry of every kernel is the current default (``default: True``).
    """
    import importlib
    from functools import partial

    ce = importlib.import_module("fms_acceleration_accelerate_kernels.cross_entropy")
    rms = importlib.import_module("fms_acceleration_accelerate_kernels.rms_norm")
    glu = importlib.import_module("fms_acceleration_accelerate_kernels.glu")
    out = []

    def record(kernel, fn, traffic_bytes, default=False, **config):
        try:
            ms = _kernel_ms(fn)
        except Exception as exc:  # a launch setting that does not compile is a sweep result, not a crash
            out.append(dict(kernel=kernel, **config, default=default, error=f"{type(exc).__name__}: {exc}"[:200]))
            return
        pct = 100 * traffic_bytes / (ms * 1e-3) / 1e9 / copy_bw
        out.append(dict(kernel=kernel, **config, default=default, ms=ms, pct_copy_bw=pct))

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(TOKENS, VOCAB, generator=g, device="cuda") * 2).to(DTYPE)
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g, device="cuda")
    grad = torch.empty_like(logits)
    scale = torch.ones(1, device="cuda")
    nv_bytes = logits.numel() * logits.element_size()
    ce_args = (logits, target, -100, None, 1.0, 0.0)
    # (BLOCK, num_warps, programs per SM (0: one per row), per-lane statistics, L2 eviction hints, reverse pass 2,
    #  target column written after pass 2)
    record("ce_fwd_grad", partial(ce.ce_forward_rows, *ce_args, grad_out=grad, grad_scale=scale), 2 * nv_bytes,
           default=True, launch=str(ce.launch_defaults("fwd_grad", logits.device)))  # fmt: skip
    shapes = [(32768, 32, 0, False), (16384, 16, 0, False), (8192, 8, 0, False), (4096, 8, 0, False),
              (4096, 4, 0, False), (2048, 4, 0, False), (8192, 16, 1, False)]  # fmt: skip
    flags = [(hints, reverse, fixup) for hints in (True, False) for reverse in (True, False) for fixup in (True, False)]
    variants = [(*shape, *f) for shape in shapes for f in flags]
    for launch in variants:
        fn = partial(ce.ce_forward_rows, *ce_args, grad_out=grad, grad_scale=scale, launch=launch)
        record("ce_fwd_grad", fn, 2 * nv_bytes, launch=str(launch))
    # in place (the gradient over the logits, as inplace_backward=True and the fused linear CE do)
    work = logits.clone()
    default_launch = ce.launch_defaults("fwd_grad", logits.device)
    for launch in [default_launch, *(v for v in variants if v[:4] in shapes[:5] and v[6] and v != default_launch)]:
        fn = partial(ce.ce_forward_rows, work, *ce_args[1:], grad_out=work, grad_scale=scale, launch=launch)
        record("ce_fwd_grad_inplace", fn, 2 * nv_bytes, default=launch == default_launch,
               launch=str(tuple(launch)))  # fmt: skip
    del work
    record("ce_fwd_loss_only", partial(ce.ce_forward_rows, *ce_args), nv_bytes, default=True,
           launch=str(ce.launch_defaults("fwd", logits.device)))  # fmt: skip
    for launch in [(4096, 4, 0, True), (8192, 8, 0, True), (2048, 4, 0, False)]:
        record("ce_fwd_loss_only", partial(ce.ce_forward_rows, *ce_args, launch=launch), nv_bytes, launch=str(launch))
    record("copy_same_bytes_as_ce_fwd_grad", partial(torch.clone, logits), 2 * nv_bytes, default=True)
    record("ce_backward_scale_is_1", partial(ce.scale_rows_, grad, scale), 0, default=True)
    record("ce_backward_scale_not_1", partial(ce.scale_rows_, grad, scale * 0.5), 2 * nv_bytes, default=True)
    del logits, grad, ce_args

    x = torch.randn(TOKENS, HIDDEN, generator=g, device="cuda").to(DTYPE)
    w = torch.ones(HIDDEN, device="cuda", dtype=DTYPE)
    dy = torch.randn_like(x)
    _y, rstd = rms._forward(x, w, 1e-5, 0.0)
    x_bytes = x.numel() * x.element_size()
    # what a plain device copy of the same bytes reaches: the attainable bandwidth at this size (the 1 GiB copy
    # reference of the "% copy BW" column is larger than any tensor here)
    record("copy_same_bytes_as_rms_fwd", partial(torch.clone, x), 2 * x_bytes, default=True)
    record("rms_fwd", partial(rms._forward, x, w, 1e-5, 0.0), 2 * x_bytes, default=True)
    record("rms_bwd_dx_dw", partial(rms._backward, dy, x, w, rstd, 0.0, True, True), 3 * x_bytes, default=True)
    for per_sm, warps, prefetch in [(2, 8, False), (1, 8, False), (2, 4, False), (2, 16, False), (3, 8, False),
                                    (2, 8, True), (1, 16, False), (1, 8, True), (2, 16, True), (4, 4, True),
                                    (4, 8, True)]:  # fmt: skip
        bwd = partial(rms._backward, dy, x, w, rstd, 0.0, True, True, per_sm, warps, prefetch)
        record("rms_bwd_dx_dw", bwd, 3 * x_bytes, programs_per_sm=per_sm, warps=warps, prefetch=prefetch)
    record("rms_bwd_dx_only", partial(rms._backward, dy, x, w, rstd, 0.0, True, False), 3 * x_bytes, default=True)
    del x, dy, _y, rstd

    gate = torch.randn(TOKENS, INTERMEDIATE, generator=g, device="cuda").to(DTYPE)
    up, dout = torch.randn_like(gate), torch.randn_like(gate)
    i_bytes = gate.numel() * gate.element_size()
    record("glu_fwd", partial(glu._forward, gate, up, glu._ACT_SILU), 3 * i_bytes, default=True,
           launch=str(glu._launch_config(INTERMEDIATE)))  # fmt: skip
    record("glu_bwd", partial(glu._backward, dout, gate, up, glu._ACT_SILU, True, True), 5 * i_bytes, default=True,
           launch=str(glu._launch_config(INTERMEDIATE)))  # fmt: skip
    for launch in [(1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (16384, 16)]:
        record("glu_fwd", partial(glu._forward, gate, up, glu._ACT_SILU, launch), 3 * i_bytes, launch=str(launch))
        bwd = partial(glu._backward, dout, gate, up, glu._ACT_SILU, True, True, launch)
        record("glu_bwd", bwd, 5 * i_bytes, launch=str(launch))
    return out


def best_of_sweep(sweep: list[dict]) -> list[dict]:
    """Per kernel: the default's time and the fastest setting's time and settings."""
    result = []
    for kernel in dict.fromkeys(e["kernel"] for e in sweep):
        entries = [e for e in sweep if e["kernel"] == kernel and "ms" in e]
        if not entries:
            continue
        default = next((e for e in entries if e.get("default")), entries[0])
        best = min(entries, key=lambda e: e["ms"])
        settings = {k: v for k, v in best.items() if k not in ("kernel", "ms", "pct_copy_bw", "default")}
        result.append(dict(kernel=kernel, default_ms=default["ms"], best_ms=best["ms"],
                           best_pct_copy_bw=best["pct_copy_bw"], best_is_default=best is default,
                           best_settings=settings))  # fmt: skip
    return result


def _fmt(value, spec=".3f", na="n/a"):
    return na if value is None else format(value, spec)


def markdown_report(env: dict, rows: list[Row], best: list[dict]) -> str:
    """Markdown tables: one row per op (ours / Liger / eager kernel times, ratios, % copy BW, correctness)."""
    lines = [
        "# Kernel microbenchmark",
        "",
        f"- GPU: {env['gpu']}, CUDA {env['cuda']}; copy bandwidth {env['copy_bandwidth_gbps']} GB/s "
        f"(1 GiB device-to-device copy).",
        f"- Versions: {json.dumps(env['versions'])}; liger: {env['liger_status']}.",
        f"- Date (UTC): {env['date_utc']}; wall time of this script: {env.get('script_seconds', 0):.0f} s.",
        "- Shapes: tokens 4x2048, hidden 4096, intermediate 14336, 32/8 heads x 128, vocab 128256, bf16.",
        "",
        "Kernel time = summed GPU time of every kernel one forward+backward launches (CUDA profiler); "
        "wall = `do_bench` median of forward+backward (includes Python/launch overhead). "
        "`x Liger` = Liger kernel time / ours (> 1: ours faster). `% copy BW` = minimum HBM bytes / kernel "
        "time / copy bandwidth (bandwidth-bound ops). `ok` = every output/gradient error within max(2 x eager's "
        "error, floor) against an fp32 reference.",
        "",
        "| op | impl | kernel ms | wall ms | x Liger (kernel) | x eager (kernel) | % copy BW | TFLOP/s | "
        "peak extra MiB | ok | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_op: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_op.setdefault(r.op, {})[r.impl] = r
    for op, impls in by_op.items():
        liger = impls.get("liger")
        eager = impls.get("eager")
        for name, r in impls.items():
            if r.error:
                lines.append(f"| {op} | {name} | error | | | | | | | | {r.error[:120]} |")
                continue
            vs_liger = (liger.fwd_bwd_kernel_ms / r.fwd_bwd_kernel_ms
                        if liger and liger.fwd_bwd_kernel_ms and r.fwd_bwd_kernel_ms else None)  # fmt: skip
            vs_eager = (eager.fwd_bwd_kernel_ms / r.fwd_bwd_kernel_ms
                        if eager and eager.fwd_bwd_kernel_ms and r.fwd_bwd_kernel_ms else None)  # fmt: skip
            errs = ", ".join(f"{k} {v:.1e}" for k, v in r.max_abs_err.items())
            ok = "n/a" if r.correct is None else ("yes" if r.correct else "NO")
            lines.append(
                f"| {op} | {name} | {_fmt(r.fwd_bwd_kernel_ms)} | {_fmt(r.fwd_bwd_ms)} | {_fmt(vs_liger, '.2f')} | "
                f"{_fmt(vs_eager, '.2f')} | {_fmt(r.kernel_pct_copy_bw, '.0f', '')} | "
                f"{_fmt(r.fwd_bwd_tflops, '.0f', '')} | {_fmt(r.peak_extra_mib, '.0f')} | {ok} | {errs} |"
            )
        if "liger" not in impls:
            lines.append(f"| {op} | liger | n/a | n/a | | | | | | | liger-kernel not importable |")
    if best:
        lines += [
            "",
            "## Launch sweep: default vs fastest setting (each kernel alone)",
            "",
            "| kernel | default ms | best ms | best % copy BW | best settings |",
            "|---|---|---|---|---|",
        ]
        for b in best:
            tag = " (default)" if b["best_is_default"] else ""
            lines.append(
                f"| {b['kernel']} | {b['default_ms']:.4f} | {b['best_ms']:.4f} | {b['best_pct_copy_bw']:.0f} | "
                f"{json.dumps(b['best_settings'])}{tag} |"
            )
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    versions = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "liger-kernel", "fms-acceleration-accelerate-kernels"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "versions": versions,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": dict(
            batch=BATCH,
            seq=SEQ,
            hidden=HIDDEN,
            intermediate=INTERMEDIATE,
            heads=N_HEADS,
            kv_heads=N_KV_HEADS,
            head_dim=HEAD_DIM,
            vocab=VOCAB,
            dtype=str(DTYPE),
        ),
    }


def main() -> None:
    import time

    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory for JSON, CSV and Markdown")
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    parser.add_argument("--ops", nargs="*", default=None, help="subset of ops to run (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-setting sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)

    env = environment()
    _liger, liger_status = _load_liger()
    env["liger_status"] = liger_status
    copy_bw = copy_bandwidth_gbps(args.rep_ms)
    env["copy_bandwidth_gbps"] = round(copy_bw, 1)
    print(f"{env['gpu']}: copy bandwidth {copy_bw:.0f} GB/s; liger: {liger_status}", flush=True)

    rows: list[Row] = []
    for case in build_cases():
        if args.ops and case.op not in args.ops:
            continue
        case_rows = run_case(case, args.rep_ms, copy_bw)
        rows.extend(case_rows)
        for r in case_rows:
            print(
                f"{r.op:30s} {r.impl:12s} kernel {r.fwd_bwd_kernel_ms or float('nan'):8.3f} ms"
                f"  wall {r.fwd_bwd_ms or float('nan'):8.3f} ms  %copyBW {r.kernel_pct_copy_bw or float('nan'):5.1f}"
                f"  TFLOP/s {r.fwd_bwd_tflops or float('nan'):6.1f}  peak+ {r.peak_extra_mib or float('nan'):8.1f} MiB"
                f"  ok {r.correct}  err {json.dumps({k: float(f'{v:.2e}') for k, v in r.max_abs_err.items()})}"
                f" {r.error}",
                flush=True,
            )

    sweep: list[dict] = []
    if not args.no_sweep:
        sweep = sweep_launch_configs(copy_bw)
        for entry in sweep:
            print("sweep", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}))
    best = best_of_sweep(sweep)
    env["script_seconds"] = time.perf_counter() - started

    fields = [f for f in Row.__dataclass_fields__ if f != "max_abs_err"] + ["max_abs_err"]
    with open(args.out / "kernels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            d = asdict(r)
            d["max_abs_err"] = json.dumps(d["max_abs_err"])
            writer.writerow(d)
    with open(args.out / "kernels.json", "w") as fh:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows], "sweep": sweep, "sweep_best": best}, fh,
                  indent=2)  # fmt: skip
    report = markdown_report(env, rows, best)
    (args.out / "kernels.md").write_text(report)
    print(report, flush=True)
    print(f"done in {env['script_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
