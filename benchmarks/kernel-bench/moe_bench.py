"""GPU check and timing of the MoE expert kernels (kernels/.../moe.py) against transformers' experts backends.

One MoE layer's experts at two shapes, bf16, the same weights for every implementation:

* ``granitemoe_3b``: H=1536, I=512, E=40, top-8, T=8192 tokens (many small experts: routing and scatter weigh);
* ``mixtral``: H=4096, I=14336, E=8, top-2, T=4096 tokens (few large experts: GEMM-bound).

Implementations: ``triton`` (``moe_experts_triton``, default tiles: on Hopper the TMA settings), ``triton_no_tma``
(the same with the pointer-only defaults older GPUs get), ``triton_sweep_best`` (with ``--sweep``: each kernel's
fastest setting of the sweep), ``grouped_mm`` (transformers'
``grouped_mm_experts_forward``, imported from ``transformers.integrations.moe`` and called on a small stand-in
module that carries the attributes it reads; the model's own experts module dispatching to "grouped_mm" when the
stand-in does not fit the installed transformers) and ``eager`` (a ``MixtralExperts`` module of the installed
transformers on the same parameters; its forward is the eager per-expert loop every listed architecture shares).

Routing comes from a random router (softmax over experts, top-k, renormalised), so experts are about evenly loaded.
Per shape and implementation: forward time (grad mode on, what a training step runs) and forward + backward time
(gradients of the hidden states, both weight stacks and the routing weights, via ``torch.autograd.grad``), from
``triton.testing.do_bench`` (median, L2 flushed); tokens/s and TFLOP/s (``6 S H I`` forward flops with ``S = T k``,
3x that forward + backward); memory held between forward and backward (what a training step keeps per layer) and
peak extra memory of forward + backward; errors of the output and every gradient against an fp32 reference
(``moe_experts_ref`` on fp32 copies), relative to the largest reference value. ``ok`` per row: the error is at most
twice grouped_mm's (or a 2e-2 floor).

``--breakdown`` times each kernel (piece) of the forward and the backward on its own, with the default tiles and
the pointer-only defaults (route, up, down, combine; down_bwd, wgrad_down, wgrad_gate_up, dx, dx_combine), in ms
and TFLOP/s. ``--sweep`` times the pieces of each kernel with every candidate setting of ``SWEEP`` (one kernel varied
at a time), checks each against the default setting's output, keeps the fastest per kernel and measures the full
forward + backward with those (row ``triton_sweep_best``). ``--precompile-jobs N`` compiles the sweep's kernels in
N worker processes first (Triton's on-disk cache), so the timing loop does not wait on the compiler.

Usage (repository root, one CUDA GPU; about a minute without ``--sweep``)::

    PYTHONPATH=kernels/src python benchmarks/kernel-bench/moe_bench.py --out benchmarks/results/<date>-<gpu>-x1-kernels-moe

``--out`` defaults to ``$OUT``. Writes ``moe_bench.json`` (environment, rows, sweep, ``all_checks_ok``) and prints
one line per measurement. ``--smoke`` runs the script on tiny shapes on CPU in Triton's interpreter (timings
meaningless), to check the script itself without a GPU.

``--codegen`` needs no GPU: it compiles each kernel with its default tile setting (``--sweep`` too: every setting of
the sweep) for sm_90 (Triton ships ``ptxas`` and ``cuobjdump``) and prints registers per thread, spill stack bytes,
shared memory and whether the dots lower to Hopper's ``wgmma`` (one JSON object per line with ``--json``);
``--dtype fp32 --precision tf32|ieee`` compiles the settings fp32 operands get.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# name: (hidden H, intermediate I, experts E, top-k, tokens T)
SHAPES = {"granitemoe_3b": (1536, 512, 40, 8, 8192), "mixtral": (4096, 14336, 8, 2, 4096)}
SMOKE_SHAPES = {"granitemoe_3b": (48, 40, 10, 8, 37), "mixtral": (64, 48, 5, 2, 33)}
IMPLS = ("triton", "grouped_mm", "eager", "triton_no_tma")
# --sweep candidates per kernel: (block_m, block_n, block_k, num_warps, num_stages[, tma[, n_split]]), the default
# first. The earlier sweep (benchmarks/results/2026-12-06-h100-x1-kernels-moe) also tried: up 128x64 tiles (3 and 4
# stages, TMA and pointers); down/dx 128x128 tiles; down_bwd with its activation backward fused into the GEMM
# epilogue (128x64 tiles, 3 and 4 stages, TMA and pointers: 1.6-2x slower than two passes), two passes with 128x128
# tiles; weight gradients 64x128x128 (3 and 5 stages), 128x128x128, 64x128x256 and 64x256x128 with 3 stages.
SWEEP = {
    "up": [(128, 128, 64, 8, 3, True), (128, 128, 64, 8, 4, True)],
    "down": [(128, 256, 64, 8, 4, True), (128, 256, 64, 8, 3, True)],
    "down_bwd": [(128, 256, 64, 8, 4, True, 0), (128, 256, 64, 8, 3, True, 0)],
    "dx": [(128, 256, 64, 8, 4, True), (128, 256, 64, 8, 3, True)],
    "wgrad_down": [(64, 128, 256, 8, 5, True), (64, 128, 256, 8, 6, True), (128, 128, 256, 8, 4, True),
                   (64, 256, 128, 8, 5, True)],
    "wgrad_gate_up": [(64, 256, 128, 8, 5, True), (64, 256, 128, 8, 6, True), (128, 256, 128, 8, 4, True),
                      (64, 128, 256, 8, 5, True)],
}  # fmt: skip
# the pieces each kernel's setting changes
SWEEP_PIECES = {"up": ("up",), "down": ("down",), "down_bwd": ("down_bwd",), "dx": ("dx",),
                "wgrad_down": ("wgrad_down",), "wgrad_gate_up": ("wgrad_gate_up",)}  # fmt: skip
# forward flops of each piece in units of S*H*I (S = T k): 2 per multiply-add
PIECE_FLOPS = {"up": 4, "down": 2, "down_bwd": 2, "wgrad_down": 2, "wgrad_gate_up": 4, "dx": 4}
ERROR_FLOOR = 2e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement (ms)")
    parser.add_argument("--breakdown", action="store_true", help="time each kernel of the Triton path on its own")
    parser.add_argument("--sweep", action="store_true", help="also sweep the Triton kernels' tile settings")
    parser.add_argument("--piece-rep-ms", type=int, default=100, help="do_bench time per kernel (--breakdown/--sweep)")
    parser.add_argument(
        "--precompile-jobs", type=int, default=0, help="--sweep: compile its settings first in this many processes"
    )
    parser.add_argument("--precompile-only", action="store_true",
                        help="only compile the sweep's settings (--precompile-jobs processes) and exit")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    parser.add_argument("--codegen", action="store_true", help="compile the kernels for sm_90 offline (no GPU)")
    parser.add_argument("--json", action="store_true", help="--codegen: one JSON object per line")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="--codegen: operand dtype (fp32: the defaults with their reduction step halved)",
    )
    parser.add_argument("--precision", choices=("native", "tf32", "ieee"), default="native",
                        help="--codegen: the dots' precision (fp32 operands: tf32 or ieee)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.out and not args.codegen:
        parser.error("--out (or $OUT) is required")
    return args


# ------------------------------------------------------------------------------------------ measurement


def make_timer(smoke: bool, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    """``timer(fn)``: median ms of one call (``triton.testing.do_bench``; one wall-clock call with --smoke)."""

    def gpu_ms(fn: Callable[[], object]) -> float:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))

    if smoke:
        from benchtiming import wall_ms_once  # imported here: tests load this file by path for compile_stats

        return wall_ms_once
    return gpu_ms


def environment(device) -> dict:
    from benchtiming import run_environment  # imported here: tests load this file by path for compile_stats

    return run_environment(device, ("torch", "triton", "transformers", "fms-acceleration-accelerate-kernels"))


def rel_err(got, truth) -> float:
    """max |got - truth| / max |truth| in fp32."""
    return ((got.float() - truth.float()).abs().max() / truth.float().abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ problem


def make_problem(shape, dtype, device, seed: int = 0) -> dict:
    """Hidden states, router-produced routing (softmax, top-k, renormalised), weights and an upstream gradient."""
    import torch

    hidden, inter, n_experts, top_k, n_tokens = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32) * scale

    x = randn(n_tokens, hidden)
    router = randn(n_experts, hidden, scale=hidden**-0.5)
    probs = (x @ router.t()).softmax(-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return {
        "hidden": x.to(dtype),
        "top_k_index": index,
        "top_k_weights": weights.to(dtype),
        "gate_up": randn(n_experts, 2 * inter, hidden, scale=hidden**-0.5).to(dtype),
        "down": randn(n_experts, hidden, inter, scale=inter**-0.5).to(dtype),
        "upstream": randn(n_tokens, hidden).to(dtype),
    }


class _StandIn:
    """What ``grouped_mm_experts_forward`` reads from an experts module (a Mixtral-style layout)."""

    def __init__(self, gate_up, down, act_fn):
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up, down, act_fn
        self.num_experts = gate_up.shape[0]
        self.hidden_dim = gate_up.shape[2]
        self.intermediate_dim = down.shape[2]
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm = False
        self._is_expert_parallel = False

    def _apply_gate(self, gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def make_impls(names, params: dict, shape, device, best_launch=None) -> tuple[dict, dict]:
    """name -> fn(hidden, top_k_index, top_k_weights) on the shared parameters; plus notes per name."""
    import torch
    from fms_acceleration_accelerate_kernels.moe import _LAUNCH_NO_TMA, moe_experts_triton
    from transformers import MixtralConfig
    from transformers.activations import ACT2FN
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    hidden, inter, n_experts, top_k, _ = shape
    gate_up, down = params["gate_up"], params["down"]
    impls, notes = {}, {}

    def hf_module(implementation):
        config = MixtralConfig(
            hidden_size=hidden, intermediate_size=inter, num_local_experts=n_experts, num_experts_per_tok=top_k
        )
        with torch.device("meta"):
            module = MixtralExperts(config)
        module.gate_up_proj, module.down_proj = gate_up, down  # the shared Parameters
        module.config._experts_implementation = implementation
        return module

    if "triton" in names:
        impls["triton"] = lambda x, i, w: moe_experts_triton(x, i, w, gate_up, down, act="silu")
        notes["triton"] = "moe_experts_triton (default tiles)"
    if "grouped_mm" in names:
        from transformers.integrations.moe import grouped_mm_experts_forward

        stand_in = _StandIn(gate_up, down, ACT2FN["silu"])
        try:
            with torch.no_grad():
                probe = params["hidden"][:4]
                grouped_mm_experts_forward(stand_in, probe, params["top_k_index"][:4], params["top_k_weights"][:4])
            impls["grouped_mm"] = lambda x, i, w: grouped_mm_experts_forward(stand_in, x, i, w)
            notes["grouped_mm"] = "transformers.integrations.moe.grouped_mm_experts_forward on a stand-in module"
        except AttributeError as exc:  # a transformers version reading other attributes: its own module dispatches
            module = hf_module("grouped_mm")
            impls["grouped_mm"] = lambda x, i, w: module(x, i, w)
            notes["grouped_mm"] = f"MixtralExperts dispatching to grouped_mm (stand-in unusable: {exc})"
    if "eager" in names:
        module_eager = hf_module("eager")
        impls["eager"] = lambda x, i, w: module_eager(x, i, w)
        notes["eager"] = "MixtralExperts eager forward"
    if "triton_no_tma" in names:
        no_tma = dict(_LAUNCH_NO_TMA)
        impls["triton_no_tma"] = lambda x, i, w: moe_experts_triton(x, i, w, gate_up, down, act="silu", launch=no_tma)
        notes["triton_no_tma"] = "moe_experts_triton with the pointer-only defaults of GPUs without TMA"
    if best_launch is not None:
        impls["triton_sweep_best"] = lambda x, i, w: moe_experts_triton(
            x, i, w, gate_up, down, act="silu", launch=best_launch
        )
        notes["triton_sweep_best"] = (
            "moe_experts_triton with the sweep's fastest setting of each kernel: "
            + json.dumps({k: list(v) for k, v in best_launch.items()})
        )
    return impls, notes


def reference(problem: dict) -> dict:
    """fp32 output and gradients from ``moe_experts_ref``."""
    import torch
    from fms_acceleration_accelerate_kernels.moe import moe_experts_ref

    leaves = {n: problem[n].float().requires_grad_(True) for n in ("hidden", "top_k_weights", "gate_up", "down")}
    out = moe_experts_ref(leaves["hidden"], problem["top_k_index"], leaves["top_k_weights"], leaves["gate_up"],
                          leaves["down"])  # fmt: skip
    grads = torch.autograd.grad(out, list(leaves.values()), problem["upstream"].float())
    result = {"out": out.detach()} | {n: g for n, g in zip(leaves, grads)}
    del leaves, out, grads
    return result


def measure(name, fn, problem, params, truth, timer, device) -> dict:
    import torch

    x = problem["hidden"].clone().requires_grad_(True)
    w = problem["top_k_weights"].clone().requires_grad_(True)
    index, upstream = problem["top_k_index"], problem["upstream"]
    inputs = [x, w, params["gate_up"], params["down"]]
    row = {"impl": name}

    def forward():
        return fn(x, index, w)

    def forward_backward():
        out = fn(x, index, w)
        return torch.autograd.grad(out, inputs, upstream)

    # correctness
    out = forward()
    grads = torch.autograd.grad(out, inputs, upstream)
    row["errors"] = {"out": rel_err(out, truth["out"])}
    for key, grad in zip(("hidden", "top_k_weights", "gate_up", "down"), grads):
        row["errors"][key] = rel_err(grad, truth[key])
    del out, grads
    # memory: held between forward and backward, and the peak of forward + backward
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = forward()
        torch.cuda.synchronize()
        row["held_mib"] = (torch.cuda.memory_allocated() - base - out.numel() * out.element_size()) / 2**20
        grads = torch.autograd.grad(out, inputs, upstream)
        torch.cuda.synchronize()
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out, grads
    row["fwd_ms"] = timer(forward)
    row["fwd_bwd_ms"] = timer(forward_backward)
    return row


def summarise(rows: list[dict], shape) -> None:
    hidden, inter, _, top_k, n_tokens = shape
    flops_fwd = 6 * n_tokens * top_k * hidden * inter
    by_impl = {r["impl"]: r for r in rows if "fwd_ms" in r}
    for r in by_impl.values():
        r["fwd_bwd_tokens_per_s"] = n_tokens / (r["fwd_bwd_ms"] * 1e-3)
        r["fwd_tflops"] = flops_fwd / (r["fwd_ms"] * 1e-3) / 1e12
        r["fwd_bwd_tflops"] = 3 * flops_fwd / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        for base in ("grouped_mm", "eager"):
            if base in by_impl and base != r["impl"]:
                r[f"fwd_speedup_vs_{base}"] = by_impl[base]["fwd_ms"] / r["fwd_ms"]
                r[f"fwd_bwd_speedup_vs_{base}"] = by_impl[base]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    limit = by_impl.get("grouped_mm", {}).get("errors")
    for r in rows:
        if "errors" in r:
            r["ok"] = all(e <= max(2 * (limit[k] if limit else 0.0), ERROR_FLOOR) for k, e in r["errors"].items())


def make_pieces(problem: dict, params: dict, shape) -> tuple[dict, dict]:
    """(name -> fn(launch) running one kernel of the Triton path on this problem and returning its output, outputs
    of the default setting). Inputs of the backward pieces come from one default forward/backward run."""
    import torch
    from fms_acceleration_accelerate_kernels import moe

    hidden_dim = shape[0]
    x, index, upstream = problem["hidden"], problem["top_k_index"], problem["upstream"]
    gate_up, down = params["gate_up"].detach(), params["down"].detach()
    weights = problem["top_k_weights"].reshape(-1)
    layout = moe._Layout(moe.ACTIVATIONS["silu"], True, False, False)
    routing = moe.moe_route(index, gate_up.shape[0])
    stride_h, stride_i = layout.down_strides(down)
    stride_r, stride_hk = layout.gate_up_strides(gate_up)
    h, a = moe.moe_up_triton(x, gate_up, None, routing, layout, True)
    y = moe.moe_grouped_mm_triton(a, down, stride_h, stride_i, hidden_dim, routing, None, "down")
    dh, aw, _ = moe.moe_down_backward_triton(upstream, down, h, weights, routing, layout)
    dx_rows = moe.moe_grouped_mm_triton(dh, gate_up, stride_hk, stride_r, hidden_dim, routing, None, "dx")
    d_down, d_gate_up = torch.empty_like(down), torch.empty_like(gate_up)

    def wgrad_down(launch):
        moe.moe_weight_grad_triton(upstream, True, aw, False, routing, d_down, layout.down_strides(d_down),
                                   launch=launch, launch_name="wgrad_down")  # fmt: skip
        return d_down

    def wgrad_gate_up(launch):
        moe.moe_weight_grad_triton(dh, False, x, True, routing, d_gate_up, layout.gate_up_strides(d_gate_up),
                                   launch=launch, launch_name="wgrad_gate_up")  # fmt: skip
        return d_gate_up

    pieces = {
        "route": lambda launch: moe.moe_route(index, gate_up.shape[0]).perm,
        "up": lambda launch: moe.moe_up_triton(x, gate_up, None, routing, layout, True, launch)[1],
        "down": lambda launch: moe.moe_grouped_mm_triton(a, down, stride_h, stride_i, hidden_dim, routing, None,
                                                         "down", launch),
        "combine": lambda launch: moe.moe_combine_triton(y, routing, weights, x.dtype),
        "down_bwd": lambda launch: moe.moe_down_backward_triton(upstream, down, h, weights, routing, layout,
                                                                launch=launch)[0],
        "wgrad_down": wgrad_down,
        "wgrad_gate_up": wgrad_gate_up,
        "dx": lambda launch: moe.moe_grouped_mm_triton(dh, gate_up, stride_hk, stride_r, hidden_dim, routing, None,
                                                       "dx", launch),
        "dx_combine": lambda launch: moe.moe_combine_triton(dx_rows, routing, None, x.dtype),
    }  # fmt: skip
    n_valid = int(routing.offsets[-1])
    baseline = {}
    for name, fn in pieces.items():
        out = fn(None)
        baseline[name] = (out[:n_valid] if out.dim() == 2 and out.shape[0] == routing.perm.numel() else out).clone()
    return pieces, {"baseline": baseline, "n_valid": n_valid, "n_slots": routing.perm.numel()}


def _piece_row(name, fn, launch, info, shape, timer) -> dict:
    """Time one piece with one launch setting, check its output against the default setting's."""
    hidden, inter, _, top_k, n_tokens = shape
    out = fn(launch)
    base = info["baseline"][name]
    if out.dim() == 2 and out.shape[0] == info["n_slots"] and base.shape[0] == info["n_valid"]:
        out = out[: info["n_valid"]]
    row = {
        "piece": name,
        "err_vs_default": rel_err(out, base) if out.is_floating_point() else float(not out.equal(base)),
    }
    row["ms"] = timer(lambda: fn(launch))
    if name in PIECE_FLOPS:
        row["tflops"] = PIECE_FLOPS[name] * n_tokens * top_k * hidden * inter / (row["ms"] * 1e-3) / 1e12
    return row


def breakdown(pieces, info, shape, timer) -> list[dict]:
    """Each piece with the default tiles and with the pointer-only defaults (GPUs without TMA)."""
    from fms_acceleration_accelerate_kernels.moe import _LAUNCH_NO_TMA

    rows = []
    for label, launch in (("default", None), ("no_tma", dict(_LAUNCH_NO_TMA))):
        for name, fn in pieces.items():
            if label == "no_tma" and name in ("route", "combine", "dx_combine"):
                continue
            row = _piece_row(name, fn, launch, info, shape, timer) | {"launch": label}
            rows.append(row)
            tflops = f"{row['tflops']:6.0f} TFLOP/s" if "tflops" in row else ""
            print(f"  breakdown {label:8s} {name:14s} {row['ms']:8.3f} ms {tflops}", flush=True)
    return rows


def sweep(pieces, info, shape, timer, device) -> tuple[list[dict], dict]:
    """Each kernel's pieces with every candidate setting of SWEEP (others at their defaults): (jobs, best per
    kernel as GemmLaunch)."""
    import torch
    from fms_acceleration_accelerate_kernels.moe import GemmLaunch

    jobs, best = [], {}
    for kernel, candidates in SWEEP.items():
        for cand in candidates:
            launch = {kernel: GemmLaunch(*cand)}
            job = {"kernel": kernel, "launch": list(launch[kernel]), "pieces": {}}
            try:
                for name in SWEEP_PIECES[kernel]:
                    job["pieces"][name] = _piece_row(name, pieces[name], launch, info, shape, timer)
                job["ms"] = sum(r["ms"] for r in job["pieces"].values())
                job["ok"] = all(r["err_vs_default"] <= ERROR_FLOOR for r in job["pieces"].values())
            except Exception as exc:  # a setting that does not compile or fit (shared memory) is reported, not fatal
                job["error"] = f"{type(exc).__name__}: {exc}"[:300]
            jobs.append(job)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if "ms" in job:
                detail = " ".join(f"{n} {r['ms']:.3f}" for n, r in job["pieces"].items())
                timing = f"{job['ms']:.3f} ms ({detail}) ok={job['ok']}"
            else:
                timing = job["error"]
            print(f"  sweep {kernel:8s} {tuple(job['launch'])}: {timing}", flush=True)
            if job.get("ok") and job["ms"] < best.get(kernel, (None, float("inf")))[1]:
                best[kernel] = (launch[kernel], job["ms"])
    return jobs, {k: v[0] for k, v in best.items()}


def _precompile_worker(shape_name: str, cands: list) -> list[str]:
    """Run each (kernel, setting) of the sweep once at one shape (fills Triton's on-disk cache); the failures."""
    import torch
    from fms_acceleration_accelerate_kernels.moe import GemmLaunch

    device = torch.device("cuda")
    shape = SHAPES[shape_name]
    problem = make_problem(shape, torch.bfloat16, device)
    torch.cuda.empty_cache()  # the fp32 draws: several processes share the GPU
    params = {n: problem[n] for n in ("gate_up", "down")}
    pieces, _ = make_pieces(problem, params, shape)
    failed = []
    for kernel, cand in cands:
        try:
            for name in SWEEP_PIECES[kernel]:
                pieces[name]({kernel: GemmLaunch(*cand)})
        except Exception as exc:  # the timing loop meets it again and records it with the setting
            failed.append(f"{shape_name} {kernel} {cand}: {type(exc).__name__}")
    torch.cuda.synchronize()
    return failed


def precompile(shape_names, jobs: int) -> float:
    """Compile every sweep setting (and the pointer-only defaults) at the given shapes in ``jobs`` spawned
    processes; returns the seconds taken."""
    import concurrent.futures
    import multiprocessing

    from fms_acceleration_accelerate_kernels.moe import _LAUNCH_NO_TMA

    start = time.perf_counter()
    settings = {k: [*cands, tuple(_LAUNCH_NO_TMA[k])] for k, cands in SWEEP.items()}  # + --breakdown's
    work = [(shape, [(k, c)]) for shape in shape_names for k, cands in settings.items() for c in cands]
    # one task per worker and shape: cands dealt round-robin
    tasks = {}
    for i, (shape, cand) in enumerate(work):
        tasks.setdefault((shape, i % jobs), []).extend(cand)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_precompile_worker, shape, cands) for (shape, _), cands in tasks.items()]
        failed = [msg for f in futures for msg in f.result()]
    elapsed = time.perf_counter() - start
    print(f"precompiled {len(work) - len(failed)}/{len(work)} settings in {elapsed:.0f} s with {jobs} processes"
          + (f"; failed: {failed}" if failed else ""), flush=True)  # fmt: skip
    return elapsed


# ------------------------------------------------------------------------------------------ offline codegen

# pointer/int arguments Triton specialises as divisible by 16 at these shapes (pointers, feature sizes, row strides)
_DIVISIBLE = ("X", "W", "Y", "HOUT", "AOUT", "DOUT", "HBUF", "DH", "AW", "G", "DW", "PERM", "OFFSETS", "K", "N",
              "n_inter", "stride_xt", "stride_x", "stride_y", "stride_dt", "stride_g", "stride_we", "stride_wr",
              "stride_wn", "stride_wk", "stride_dwe", "stride_dwn", "gate_off", "up_off", "n_slots")  # fmt: skip


def _kernel_variants(moe, n_split: int = 1, dtype: str = "bf16", precision: int = 0) -> dict:
    """kernel name -> [(variant, jit function, pointer dtypes, constexprs without the tile settings, TMA
    descriptors: argument -> (block dims from the launch, W_K_INNER or None, the constexpr that enables it))] as
    the forward and backward of a bf16 top-8 layer with the default layouts (W_gu (E, 2I, H), W_d (E, H, I))
    launch them (``n_split``: the down-projection backward's setting; ``dtype``: the operands', "bf16" or "fp32",
    ``precision``: the dots', 0 native, 1 tf32, 2 IEEE fp32)."""
    bf16 = f"*{dtype}"
    tiles = dict(PRECISION=precision, BLOCK_E=64)
    glu = dict(STEP=1, TOPK=8, ACT=0, EVEN_K=True, GROUP_M=8, **tiles)
    wgrad = dict(
        TOPK=8,
        HAS_DB=False,
        HAS_SCALE=False,
        NEED_SLOTS=True,
        EVEN_N=True,
        EVEN_K=True,
        PRECISION=precision,
        GROUP_M=8,
        stride_dwk=1,
    )
    # strides equal to 1 at run time are specialised to the constant 1 by Triton: K is W's unit-stride dim in up and
    # down, N in down_bwd and dx
    wgrad_ptrs = {n: bf16 for n in ("G", "X", "DW", "DB", "SCALE")}
    mm = dict(TOPK=8, HAS_BIAS=False, EVEN_K=True, GROUP_M=8, **tiles)
    mm_ptrs = {n: bf16 for n in ("X", "W", "BIAS", "Y")}
    w_nk, w_kn = {"W_DESC": ("1nk", True, "USE_TMA")}, {"W_DESC": ("1kn", False, "USE_TMA")}
    rows_x = {"X_DESC": ("mk", None, "X_TMA")}
    if n_split:
        down_bwd = (
            "",
            moe._moe_down_bwd_kernel,
            {n: bf16 for n in ("DOUT", "W", "HBUF", "DH", "AW", "TKW")}
            | {"DWP": "*fp32", "alpha": "fp32", "limit": "fp32"},
            dict(STORE_DH=True, STORE_AW=True, STORE_DWP=True, stride_wn=1, HALVES=n_split, **glu),
            w_kn,
        )
    else:  # two passes: the GEMM on gathered rows (the activation backward is an untiled elementwise kernel)
        down_bwd = (
            "two_pass",
            moe._moe_grouped_mm_kernel,
            mm_ptrs,
            dict(X_GATHER=True, X_TMA=False, stride_wn=1, **mm),
            w_kn,
        )
    return {
        "up": [("", moe._moe_up_kernel, {n: bf16 for n in ("X", "W", "BIAS", "HOUT", "AOUT")}
                | {"alpha": "fp32", "limit": "fp32"}, dict(HAS_BIAS=False, STORE_H=True, stride_wk=1, **glu), w_nk)],
        "down": [("", moe._moe_grouped_mm_kernel, mm_ptrs, dict(X_GATHER=False, stride_wk=1, **mm), w_nk | rows_x)],
        "down_bwd": [down_bwd],
        "dx": [("", moe._moe_grouped_mm_kernel, mm_ptrs, dict(X_GATHER=False, stride_wn=1, **mm), w_kn | rows_x)],
        "wgrad_gate_up": [("", moe._moe_weight_grad_kernel, wgrad_ptrs,
                           dict(G_GATHER=False, X_GATHER=True, X_TMA=False, **wgrad), {"G_DESC": ("mn", None, "G_TMA")})],
        "wgrad_down": [("", moe._moe_weight_grad_kernel, wgrad_ptrs,
                        dict(G_GATHER=True, X_GATHER=False, G_TMA=False, **wgrad), {"X_DESC": ("mk", None, "X_TMA")})],
    }  # fmt: skip


def compile_stats(kernel: str, launch, arch: int = 90, dtype: str = "bf16", precision: int = 0) -> list[dict]:
    """Compile one kernel (each of its variants) with one tile setting for ``sm_<arch>``: registers, spill stack,
    shared memory, wgmma (operands of ``dtype``, dots of ``precision``: see ``_kernel_variants``)."""
    import triton
    from fms_acceleration_accelerate_kernels import moe
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n, block_k, warps, stages, tma, n_split = moe.GemmLaunch(*launch)
    if kernel == "down_bwd" and n_split:  # n_split accumulators of block_n / n_split columns
        block_n //= n_split
    dims = {"m": block_m, "n": block_n, "k": block_k, "1": 1}
    results = []
    for variant, fn, pointers, constexprs, descriptors in _kernel_variants(moe, n_split, dtype, precision)[kernel]:
        constexprs = constexprs | dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        for name, (block, k_inner, flag) in descriptors.items():
            constexprs[flag] = tma
            if tma:
                pointers = pointers | {name: f"tensordesc<{dtype}{[dims[c] for c in block]}>"}
            else:
                constexprs[name] = None
            if k_inner is not None:
                constexprs["W_K_INNER"] = k_inner
        for name, flag in (("W_DESC", "USE_TMA"), ("X_DESC", "X_TMA"), ("G_DESC", None)):
            if name in fn.arg_names and name not in pointers:
                constexprs[name] = None
                if flag in fn.arg_names:
                    constexprs.setdefault(flag, False)
        names = fn.arg_names
        signature = {}
        for name in names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = pointers[name]
            else:
                signature[name] = "*i32" if name in ("PERM", "OFFSETS", "INV") else "i32"
        source = ASTSource(
            fn=fn,
            signature=signature,
            constexprs={(names.index(k),): v for k, v in constexprs.items()},
            attrs={(names.index(k),): [["tt.divisibility", 16]] for k in _DIVISIBLE if k in names},
        )
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
        )
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as fh:
                fh.write(compiled.asm["cubin"])
            usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
        found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
        results.append({
            "kernel": kernel,
            "variant": variant,
            "launch": list(moe.GemmLaunch(*launch)),
            "registers": int(found.group(1)) if found else -1,
            "stack_bytes": int(found.group(2)) if found else -1,
            "shared_bytes": compiled.metadata.shared,
            "wgmma": "wgmma" in compiled.asm["ptx"],
        })  # fmt: skip
    return results


def codegen(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU target")
    from fms_acceleration_accelerate_kernels.moe import _LAUNCH, _LAUNCH_NO_TMA, GemmLaunch, _for_element_size

    size = 4 if args.dtype == "fp32" else 2
    precision = {"native": 0, "tf32": 1, "ieee": 2}[args.precision]
    # IEEE fp32 dots get the pointer-only defaults only
    tables = (_LAUNCH_NO_TMA,) if args.precision == "ieee" else (_LAUNCH, _LAUNCH_NO_TMA)
    jobs = [
        (kernel, tuple(_for_element_size(kernel, launch, size))) for table in tables for kernel, launch in table.items()
    ]
    if args.sweep:
        jobs += [(kernel, tuple(GemmLaunch(*cand))) for kernel, cands in SWEEP.items() for cand in cands]
    seen = set()
    for kernel, launch in jobs:
        if (kernel, launch) in seen:
            continue
        seen.add((kernel, launch))
        for stats in compile_stats(kernel, launch, dtype=args.dtype, precision=precision):
            if args.json:
                print(json.dumps(stats), flush=True)
            else:
                name = f"{kernel}:{stats['variant']}" if stats["variant"] else kernel
                print(f"{name:14s} {launch!s:30s} regs {stats['registers']:3d} stack {stats['stack_bytes']:5d} "
                      f"smem {stats['shared_bytes']:6d} wgmma {stats['wgmma']}", flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.codegen:
        return codegen(args)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    import torch

    if args.smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --smoke for a CPU check of the script)")
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, SHAPES
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = make_timer(args.smoke, args.rep_ms)
    piece_timer = make_timer(args.smoke, args.piece_rep_ms)
    started = time.perf_counter()
    result = {"environment": environment(device), "dtype": str(dtype), "rows": [], "breakdown": {}, "sweeps": {},
              "all_checks_ok": None}  # fmt: skip

    def write() -> None:
        result["environment"]["script_seconds"] = time.perf_counter() - started
        (out_dir / "moe_bench.json").write_text(json.dumps(result, indent=2, default=str))

    if args.precompile_only:
        result["environment"]["precompile_seconds"] = precompile(args.shapes, max(1, args.precompile_jobs))
        write()
        return 0
    if args.sweep and args.precompile_jobs > 0 and not args.smoke:
        result["environment"]["precompile_seconds"] = precompile(args.shapes, args.precompile_jobs)

    for shape_name in args.shapes:
        shape = shapes[shape_name]
        hidden, inter, n_experts, top_k, n_tokens = shape
        problem = make_problem(shape, dtype, device)
        best_launch = None
        if args.breakdown or args.sweep:
            pieces, info = make_pieces(problem, {n: problem[n] for n in ("gate_up", "down")}, shape)
            if args.breakdown:
                result["breakdown"][shape_name] = breakdown(pieces, info, shape, piece_timer)
                write()
            if args.sweep:
                jobs, best_launch = sweep(pieces, info, shape, piece_timer, device)
                result["sweeps"][shape_name] = {"jobs": jobs, "best": {k: list(v) for k, v in best_launch.items()}}
                for kernel, launch in best_launch.items():
                    print(f"best {shape_name} {kernel}: {tuple(launch)}", flush=True)
                write()
            del pieces, info
            if device.type == "cuda":
                torch.cuda.empty_cache()
        truth = reference(problem)
        params = {n: torch.nn.Parameter(problem[n]) for n in ("gate_up", "down")}
        impls, notes = make_impls(args.impls, {**problem, **params}, shape, device, best_launch)
        rows = []
        for name, fn in impls.items():
            try:
                row = measure(name, fn, problem, params, truth, timer, device)
            except torch.OutOfMemoryError as exc:
                row = {"impl": name, "error": f"out of memory: {str(exc)[:200]}"}
            row.update(shape=shape_name, H=hidden, I=inter, E=n_experts, top_k=top_k, T=n_tokens, notes=notes[name])
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        summarise(rows, shape)
        for r in rows:
            if "error" in r:
                print(f"{shape_name:14s} {r['impl']:17s} {r['error']}", flush=True)
                continue
            speed = "".join(f" x{r[k]:.2f} vs {k.split('_vs_')[1]}" for k in r if k.startswith("fwd_bwd_speedup_vs"))
            print(f"{shape_name:14s} {r['impl']:17s} fwd {r['fwd_ms']:.3f} ms  fwd+bwd {r['fwd_bwd_ms']:.3f} ms "
                  f"({r['fwd_bwd_tokens_per_s'] / 1e3:.1f}k tok/s, {r['fwd_bwd_tflops']:.0f} TFLOP/s){speed}  "
                  f"held {r.get('held_mib', float('nan')):.0f} MiB peak+ {r.get('peak_extra_mib', float('nan')):.0f} MiB  "
                  f"max err {max(r['errors'].values()):.1e} ok={r['ok']}", flush=True)  # fmt: skip
        result["rows"].extend(rows)
        write()
        del problem, truth, params, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result["all_checks_ok"] = all(r.get("ok", False) for r in result["rows"] if r["impl"].startswith("triton")) and all(
        job.get("ok", True) for sw in result["sweeps"].values() for job in sw["jobs"] if "error" not in job
    )
    write()
    print(f"all checks ok: {result['all_checks_ok']}; wrote {out_dir / 'moe_bench.json'} in "
          f"{result['environment']['script_seconds']:.0f} s", flush=True)  # fmt: skip
    return 0 if result["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
