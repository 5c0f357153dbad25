"""GPU check and timing of the GPTQ kernels (kernels/.../gptq.py) at Llama-8B layer shapes.

For each weight shape (out, in) = q/o (4096, 4096), k/v (1024, 4096), gate/up (14336, 4096), down (4096, 14336),
4-bit, group size 128, v1 zeros, act-order (``desc_act``, a permuted ``g_idx``) off and on, bf16 and fp16.
Sections (``--sections``, default ``checks crossover``):

* ``checks``: the Triton dequant equals ``gptq_dequantize_ref`` bit for bit; ``gptq_linear`` forward and the
  gradient of ``x`` against an fp32 product with the reference weight, for every row count measured, next to the
  error of a dense GEMM in the same dtype (a path is ok when its error is at most twice the dense GEMM's); dequant
  time (eager calls, launch overhead included, and kernel time from CUDA-graph replays; GB/s of packed reads +
  dense writes, % of the measured device copy bandwidth), the pure-torch reference dequant, and ``gptq_linear``
  forward and forward+backward at each row count (default 8192 = 4 x 2048 training tokens, and 16) against a
  dense ``F.linear`` in the same dtype;
* ``crossover``: the fused dequant-matmul kernel against dequant + cuBLAS over row counts 1 ... 256 (kernel and
  eager times), which sets ``_FUSED_MAX_ROWS``;
* ``sweep``: launch settings of both kernels, each checked (dequant bit-exact, matmul error) and timed from
  CUDA-graph replays, with the best per shape: dequant (``_DEQUANT_LAUNCH_SEQUENTIAL`` for groups computed from k,
  ``_DEQUANT_LAUNCH`` for g_idx read; sorted and act-order g_idx) and the fused kernel per row count
  (``_MATMUL_LAUNCHES``: tensor cores or a multiply-sum, block sizes, warps, programs per multiprocessor of the K
  split). ``--apply-sweep`` sets those from the sweep (best mean of time over best time per case) before the
  crossover, and ``_FUSED_MAX_ROWS`` from the crossover (the largest row count up to which the fused kernel wins
  at every shape) before the checks; ``settings`` in the JSON records what each section ran with.

Timed data rotates over copies of the weights (and outputs) so that small shapes are not timed from L2.
``--baseline FILE`` also times another version of gptq.py (e.g. the previous commit's, with the custom-op
namespace renamed) in the same run. ``--precompile N`` first runs the sweep's configurations once in N processes
so that Triton's disk cache holds every kernel before timing.

Usage (repository root, one CUDA GPU; a few minutes)::

    PYTHONPATH=kernels/src python benchmarks/kernel-bench/gptq_bench.py --out benchmarks/results/<date>-<gpu>-x1-kernels-gptq

``--out`` defaults to ``$OUT``. Writes ``gptq_bench.json`` (environment, rows, crossover, sweeps,
``all_checks_ok``) and prints one line per measurement. ``--smoke`` runs the whole script on tiny shapes on CPU in
Triton's interpreter (timings meaningless), to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchtiming import cuda_median_ms, run_environment, wall_ms_once  # this folder's sibling module

SHAPES_8B = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}
SHAPES_SMOKE = {"q_o": (64, 128), "k_v": (32, 128), "gate_up": (96, 128), "down": (64, 256)}
# (BLOCK_N, BLOCK_K, num_warps) of the dequant kernel; (BLOCK_N, BLOCK_K, num_warps) of the fused kernel with
# tensor cores and with the multiply-sum for few rows; target programs per multiprocessor of its K split
DEQUANT_LAUNCHES = [(64, 128, 8), (64, 64, 4), (128, 64, 4), (32, 128, 4), (128, 128, 8), (128, 32, 4), (32, 64, 2),
                    (256, 64, 8), (64, 32, 2), (256, 32, 4)]  # fmt: skip
MATMUL_LAUNCHES = [(64, 128, 4), (32, 128, 4), (128, 128, 8), (64, 64, 4), (128, 64, 4), (32, 64, 4), (64, 128, 8),
                   (16, 128, 4)]  # fmt: skip
FMA_LAUNCHES = [(32, 128, 4), (64, 64, 4), (32, 64, 4), (16, 128, 4), (64, 128, 8), (32, 128, 2)]
PROGRAMS_PER_SM = [2, 4, 8, 16]
SWEEP_ROWS = [1, 4, 16, 64]
CROSSOVER_ROWS = [1, 4, 16, 32, 64, 128, 256]
# relative error below which a GEMM result is rounding noise of its output dtype (a few ulps of the largest output)
ERROR_FLOOR = {"bfloat16": 1e-2, "float16": 2e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--rows", type=int, nargs="+", default=[8192, 16], help="token counts M of gptq_linear")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES_8B), choices=list(SHAPES_8B))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--sections", nargs="+", default=["checks", "crossover"], choices=["checks", "crossover", "sweep"]
    )
    parser.add_argument("--baseline", help="another version of gptq.py to time in the same run (custom ops renamed)")
    parser.add_argument("--precompile", type=int, default=0, help="processes that build the sweep's kernels first")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds after which sweep jobs are skipped")
    parser.add_argument("--apply-sweep", action="store_true",
                        help="set the kernels' launch settings from the sweep before the crossover and checks, and "
                        "_FUSED_MAX_ROWS from the crossover before the checks")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give --out DIR or set $OUT")
    return args


# ------------------------------------------------------------------------------------------ measurement


def make_timer(smoke: bool, warmup: int, reps: int) -> Callable[[Callable[[], object], int], float]:
    """``timer(fn, inner)``: median ms of one ``fn`` call (CUDA events around ``inner`` back-to-back calls; one
    wall-clock call with --smoke)."""

    def cuda_ms(fn: Callable[[], object], inner: int = 10) -> float:
        return cuda_median_ms(fn, warmup, reps, inner)

    def cpu_ms(fn: Callable[[], object], inner: int = 1) -> float:
        return wall_ms_once(fn)

    return cpu_ms if smoke else cuda_ms


def max_err(got, truth) -> float:
    """max |got - truth| / max |truth| (fp32)."""
    return ((got.float() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def environment(args: argparse.Namespace, device) -> dict:
    return run_environment(
        device,
        ("torch", "triton", "fms-acceleration-accelerate-kernels"),
        bits=args.bits,
        group_size=args.group_size,
        checkpoint_format="gptq",
    )


def copy_bandwidth_gbs(timer, device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) over a 1 GiB buffer."""
    import torch

    src = torch.empty(2**30 if device.type == "cuda" else 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timer(lambda: dst.copy_(src), 5) * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------ cases


def make_weight(gptq, n: int, k: int, bits: int, group_size: int, desc_act: bool, dtype, device, seed: int = 0):
    """A random GPTQ weight (asymmetric v1 zeros, fp16 scales) of logical shape (n, k), packed on ``device``;
    without act-order flagged ``sequential_g_idx`` as a loader does after ``gptq_sequential_g_idx``."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, device=device, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (groups, n), generator=gen, device=device, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen, device=device) * 2e-3 + 5e-4).to(torch.float16)
    channel_group = torch.arange(k, device=device, dtype=torch.int32) // group_size
    if desc_act:
        g_idx = torch.empty_like(channel_group)
        g_idx[torch.randperm(k, generator=gen, device=device)] = channel_group
    else:
        g_idx = channel_group
    qweight, qzeros = gptq.pack_gptq(codes, zeros, bits, checkpoint_format="gptq")
    sequential = gptq.gptq_sequential_g_idx(g_idx, group_size)
    return gptq.GPTQWeight(qweight, qzeros, scales, g_idx, bits, group_size, "gptq", n, k, dtype, sequential)


def packed_bytes(weight) -> int:
    return sum(t.numel() * t.element_size() for t in (weight.qweight, weight.qzeros, weight.scales, weight.g_idx))


def run_case(gptq, base, name, n, k, desc_act, dtype, args, timer, gtimer, copy_gbs, device) -> dict:
    import torch
    import torch.nn.functional as F

    weight = make_weight(gptq, n, k, args.bits, args.group_size, desc_act, dtype, device)
    row = {"shape": name, "out_features": n, "in_features": k, "desc_act": desc_act, "dtype": str(dtype)[6:]}

    # dequant: exactness and bandwidth (eager calls and CUDA-graph kernel time, rotating over weight copies)
    ref = weight.dequantize_ref(dtype)
    tri = weight.dequantize(dtype)
    row["dequant_mismatches"] = int((tri.view(torch.int16) != ref.view(torch.int16)).sum().item())
    row["dequant_exact"] = row["dequant_mismatches"] == 0
    del tri
    moved = packed_bytes(weight) + ref.numel() * ref.element_size()
    cases = Cases(gptq, base, args, device, dtype)
    # the weight's own path (groups computed for the flagged sequential layout), the per-tile checked path on the
    # same sorted g_idx (an unflagged weight), and the baseline module
    variants = [("", {"kind": "dequant"})]
    variants += [] if desc_act else [("checked_", {"kind": "dequant", "sequential": False})]
    variants += [("before_", {"kind": "dequant_before"})] if base else []
    for prefix, job in variants:
        job = {**job, "shape": name, "desc_act": desc_act}
        row[f"{prefix}dequant_exact"] = exact = job_check(job, cases, {name: (n, k)})["exact"]
        row["dequant_exact"] = row["dequant_exact"] and exact
        fns = job_fns(job, cases, {name: (n, k)})
        row[f"{prefix}dequant_ms"] = ms = timer(rotating(fns), max(20, len(fns)))
        row[f"{prefix}dequant_gbs"] = moved / (ms * 1e-3) / 1e9
        row[f"{prefix}dequant_pct_copy_bw"] = 100 * row[f"{prefix}dequant_gbs"] / copy_gbs
        row[f"{prefix}dequant_kernel_ms"] = ms = gtimer(fns)
        row[f"{prefix}dequant_kernel_gbs"] = moved / (ms * 1e-3) / 1e9
        row[f"{prefix}dequant_kernel_pct_copy_bw"] = 100 * row[f"{prefix}dequant_kernel_gbs"] / copy_gbs
    del cases
    row["dequant_ref_ms"] = timer(lambda: weight.dequantize_ref(dtype), 2)

    truth_w = ref.float()
    dense_w = ref.clone()  # a dense weight of the same shape and dtype for the baseline GEMM
    gen = torch.Generator(device=device).manual_seed(1)
    row["linear"] = []
    checks_ok = row["dequant_exact"]
    for m in args.rows:
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        gy = torch.randn(m, n, generator=gen, device=device).to(dtype)
        fused = gptq._use_fused(x, weight)
        entry = {"rows": m, "path": "fused dequant-matmul" if fused else "dequant + cuBLAS"}

        # forward and grad of x against fp32 truth, next to a dense GEMM in the same dtype
        xr = x.clone().requires_grad_(True)
        y = gptq.gptq_linear(xr, weight)
        y.backward(gy)
        y_truth = x.float() @ truth_w.t()
        dx_truth = gy.float() @ truth_w
        entry["fwd_err"] = max_err(y, y_truth)
        entry["dx_err"] = max_err(xr.grad, dx_truth)
        entry["dense_fwd_err"] = max_err(F.linear(x, dense_w), y_truth)
        entry["dense_dx_err"] = max_err(gy @ dense_w, dx_truth)
        # a path is ok when its error is at most twice a dense GEMM's, or below the dtype's rounding noise
        floor = ERROR_FLOOR[row["dtype"]]
        entry["ok"] = entry["fwd_err"] <= max(2 * entry["dense_fwd_err"], floor) and entry["dx_err"] <= max(
            2 * entry["dense_dx_err"], floor
        )
        checks_ok = checks_ok and entry["ok"]
        del y, y_truth, dx_truth

        inner = 10 if m <= 64 else 3
        with torch.no_grad():
            entry["gptq_fwd_ms"] = timer(lambda x=x: gptq.gptq_linear(x, weight), inner)
            entry["dense_fwd_ms"] = timer(lambda x=x: F.linear(x, dense_w), inner)
            if fused:
                entry["unfused_fwd_ms"] = timer(lambda x=x: F.linear(x, weight.dequantize(dtype)), inner)
        entry["gptq_fwd_bwd_ms"] = timer(lambda xr=xr, gy=gy: gptq.gptq_linear(xr, weight).backward(gy), inner)
        entry["dense_fwd_bwd_ms"] = timer(lambda xr=xr, gy=gy: F.linear(xr, dense_w).backward(gy), inner)
        entry["fwd_vs_dense"] = entry["dense_fwd_ms"] / entry["gptq_fwd_ms"]
        entry["fwd_bwd_vs_dense"] = entry["dense_fwd_bwd_ms"] / entry["gptq_fwd_bwd_ms"]
        flops = 2 * m * n * k
        entry["gptq_fwd_tflops"] = flops / (entry["gptq_fwd_ms"] * 1e-3) / 1e12
        entry["dense_fwd_tflops"] = flops / (entry["dense_fwd_ms"] * 1e-3) / 1e12
        row["linear"].append(entry)
    row["checks_ok"] = checks_ok
    return row


def graph_timer(smoke: bool, reps: int):
    """``gtimer(fns)``: median ms of one call, from CUDA-graph replays of one call of each of ``fns``.

    Launch overhead is left out (the kernel time a busy training step sees); ``fns`` rotate over copies of
    the data so that small shapes are not timed from L2. On CPU (``--smoke``): host time of one pass.
    """
    import torch

    def gpu_ms(fns: list[Callable[[], object]]) -> float:
        fns = list(fns)
        while len(fns) < 8:
            fns = fns * 2
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(fns))
        del graph
        return sorted(times)[len(times) // 2]

    def cpu_ms(fns: list[Callable[[], object]]) -> float:
        start = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - start) * 1e3 / len(fns)

    return cpu_ms if smoke else gpu_ms


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that calls ``fns`` in turn (eager timing over rotating data)."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def copies_for(bytes_per_call: int, smoke: bool, cap: int = 48) -> int:
    """Copies of the data to rotate over so that one pass moves well over the 50 MB L2 of an H100."""
    return 1 if smoke else max(1, min(cap, -(-(160 << 20) // max(bytes_per_call, 1))))


def load_baseline(path: str | None):
    """The module at ``path`` (another version of gptq.py, custom-op names changed) or None."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("gptq_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Cases:
    """Weights (with rotation copies), dequant buffers and inputs per (shape, act-order), built once."""

    def __init__(self, gptq, base, args, device, dtype):
        self.gptq, self.base, self.args, self.device, self.dtype = gptq, base, args, device, dtype
        self._weights: dict = {}
        self._inputs: dict = {}

    def weights(self, shape: str, n: int, k: int, desc_act: bool, purpose: str):
        """(new-module weights, baseline weights or None, dequant buffers) with rotation copies for ``purpose``
        ("dequant": packed + dense bytes per call; "matmul": packed bytes)."""
        key = (shape, desc_act, purpose)
        if key not in self._weights:
            w0 = make_weight(self.gptq, n, k, self.args.bits, self.args.group_size, desc_act, self.dtype, self.device)
            per_call = packed_bytes(w0) + (n * k * 2 if purpose == "dequant" else 0)
            count = copies_for(per_call, self.args.smoke)
            ws = [w0] + [clone_weight(self.gptq, w0) for _ in range(count - 1)]
            bases = [clone_weight(self.base, w) for w in ws] if self.base else None
            bufs = [torch_empty(n, k, self.dtype, self.device) for _ in ws] if purpose == "dequant" else None
            self._weights[key] = (ws, bases, bufs)
        return self._weights[key]

    def truth(self, shape: str, n: int, k: int, desc_act: bool, rows: int):
        """fp32 product of the first input and the first weight (reference dequant in fp32)."""
        key = ("truth", shape, desc_act, rows)
        if key not in self._inputs:
            ws, _, _ = self.weights(shape, n, k, desc_act, "matmul")
            x = self.inputs(rows, k, 1)[0]
            import torch

            self._inputs[key] = x.float() @ ws[0].dequantize_ref(torch.float32).t()
        return self._inputs[key]

    def inputs(self, rows: int, k: int, count: int):
        key = (rows, k)
        if key not in self._inputs or len(self._inputs[key]) < count:
            import torch

            gen = torch.Generator(device=self.device).manual_seed(rows)
            self._inputs[key] = [torch.randn(rows, k, generator=gen, device=self.device).to(self.dtype)
                                 for _ in range(count)]  # fmt: skip
        return self._inputs[key][:count]


def torch_empty(n, k, dtype, device):
    import torch

    return torch.empty((n, k), dtype=dtype, device=device)


def clone_weight(module, weight):
    """The same GPTQ weight in fresh memory, as ``module``'s GPTQWeight (the new or the baseline class)."""
    w = weight
    extra = (
        {"sequential_g_idx": w.sequential_g_idx} if "sequential_g_idx" in module.GPTQWeight.__dataclass_fields__ else {}
    )
    return module.GPTQWeight(w.qweight.clone(), w.qzeros.clone(), w.scales.clone(), w.g_idx.clone(), w.bits,
                             w.group_size, w.checkpoint_format, w.out_features, w.in_features, w.dtype,
                             **extra)  # fmt: skip


def job_fns(job: dict, cases: Cases, shapes: dict) -> list[Callable[[], object]]:
    """Callables (one per rotation copy) for one measured configuration."""
    import torch.nn.functional as F

    gptq, base, dtype = cases.gptq, cases.base, cases.dtype
    n, k = shapes[job["shape"]]
    kind = job["kind"]
    if kind.startswith("dequant"):
        ws, bases, bufs = cases.weights(job["shape"], n, k, job["desc_act"], "dequant")
        if kind == "dequant_before":
            return [lambda w=w, b=b: base._dequantize_triton(w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, "gptq",
                                                             dtype, out=b) for w, b in zip(ws, bufs)]  # fmt: skip
        launch = tuple(job["launch"]) if job.get("launch") else None
        # "sequential": groups computed from k (a flagged weight); else g_idx read and checked per tile
        seq = ws[0].group_size if job.get("sequential", ws[0].sequential_g_idx) else 0
        return [lambda w=w, b=b: gptq._dequantize_triton(w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, "gptq",
                                                         dtype, out=b, sequential_group_size=seq, launch=launch)
                for w, b in zip(ws, bufs)]  # fmt: skip
    ws, bases, _ = cases.weights(job["shape"], n, k, job["desc_act"], "matmul")
    xs = cases.inputs(job["rows"], k, len(ws))
    if kind == "fused":
        launch = tuple(job["launch"]) if job.get("launch") else None
        return [lambda x=x, w=w: gptq._matmul_fused(x, w, None, launch, job.get("split_k")) for x, w in zip(xs, ws)]
    if kind == "fused_before":
        return [lambda x=x, w=w: base._matmul_fused(x, w, None) for x, w in zip(xs, bases)]
    if kind == "unfused":
        return [lambda x=x, w=w: F.linear(x, w.dequantize(dtype)) for x, w in zip(xs, ws)]
    if kind == "unfused_before":
        return [lambda x=x, w=w: F.linear(x, w.dequantize(dtype)) for x, w in zip(xs, bases)]
    raise ValueError(kind)


def job_check(job: dict, cases: Cases, shapes: dict) -> dict:
    """Exactness (dequant) or error against an fp32 product with the reference weight (matmul) of one job."""
    import torch

    n, k = shapes[job["shape"]]
    fns = job_fns(job, cases, shapes)
    if job["kind"].startswith("dequant"):
        ws, _, bufs = cases.weights(job["shape"], n, k, job["desc_act"], "dequant")
        bufs[0].fill_(float("nan"))
        fns[0]()
        ref = ws[0].dequantize_ref(cases.dtype)
        return {"exact": bool(torch.equal(bufs[0].view(torch.int16), ref.view(torch.int16)))}
    y = fns[0]()
    err = max_err(y, cases.truth(job["shape"], n, k, job["desc_act"], job["rows"]))
    return {"err": err, "ok": err <= ERROR_FLOOR[str(cases.dtype)[6:]]}


def sweep_jobs(args, shapes: dict, smoke: bool, has_base: bool) -> list[dict]:
    """Every configuration the sweep measures: dequant launch settings for the sequential layout (groups computed)
    and for g_idx read and checked per tile (sorted and act-order); fused-kernel launch settings (tensor cores or
    multiply-sum; target programs per multiprocessor of the K split) per row count; dequant + cuBLAS; and the
    baseline module's dequant, fused kernel and dequant + cuBLAS."""
    jobs = []
    dq_launches = DEQUANT_LAUNCHES[:2] if smoke else DEQUANT_LAUNCHES
    mm_launches = MATMUL_LAUNCHES[:2] if smoke else MATMUL_LAUNCHES
    fma_launches = FMA_LAUNCHES[:1] if smoke else FMA_LAUNCHES
    per_sm = PROGRAMS_PER_SM[:1] if smoke else PROGRAMS_PER_SM
    for shape in shapes:
        for desc_act, sequential in ((False, True), (False, False), (True, False)):
            if has_base and sequential:
                jobs.append({"kind": "dequant_before", "shape": shape, "desc_act": False})
            if has_base and desc_act:
                jobs.append({"kind": "dequant_before", "shape": shape, "desc_act": True})
            for launch in dq_launches:
                jobs.append({"kind": "dequant", "shape": shape, "desc_act": desc_act, "sequential": sequential,
                             "launch": launch})  # fmt: skip
        for rows in SWEEP_ROWS:
            for desc_act in (False, True):
                jobs.append({"kind": "unfused", "shape": shape, "desc_act": desc_act, "rows": rows})
                if has_base:
                    jobs.append({"kind": "fused_before", "shape": shape, "desc_act": desc_act, "rows": rows})
                    jobs.append({"kind": "unfused_before", "shape": shape, "desc_act": desc_act, "rows": rows})
            candidates = [(True, *launch) for launch in mm_launches]
            if rows <= 4:
                candidates += [(False, *launch) for launch in fma_launches]
            for candidate in candidates:
                for pps in per_sm:
                    jobs.append({"kind": "fused", "shape": shape, "desc_act": False, "rows": rows,
                                 "launch": (*candidate, pps)})  # fmt: skip
    for i, job in enumerate(jobs):
        job["id"] = i
    return jobs


def compile_key(job: dict) -> str:
    """Jobs that compile the same kernels share a key (so one precompile worker builds them)."""
    launch = job.get("launch")
    job = {**job, "launch": launch[:-1] if launch and job["kind"] == "fused" else launch}  # K splits share kernels
    keep = ("kind", "launch", "sequential", "rows")
    return json.dumps({name: job.get(name) for name in keep if not (job["kind"].startswith("dequant") and name == "rows")},
                      sort_keys=True, default=str)  # fmt: skip


def precompile(args, workers: int) -> float:
    """Runs the sweep's jobs once in ``workers`` processes (Triton's disk cache then holds every kernel)."""
    started = time.perf_counter()
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    procs = [subprocess.Popen([*argv, "--worker", f"{i}/{workers}"]) for i in range(workers)]
    for proc in procs:
        proc.wait()
    return time.perf_counter() - started


def run_worker(gptq, base, args, shapes, device, dtype, spec: str) -> int:
    import torch

    index, count = (int(v) for v in spec.split("/"))
    cases = Cases(gptq, base, args, device, dtype)
    args.smoke = True  # one copy of each weight is enough to compile
    jobs = sweep_jobs(args, shapes, False, base is not None)
    keys = sorted({compile_key(job) for job in jobs})
    mine = set(keys[index::count])
    for job in jobs:
        if compile_key(job) not in mine:
            continue
        try:
            job_fns(job, cases, shapes)[0]()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # recorded by the main process, which runs the job again
            print(f"worker {index}: job {job['id']} failed: {type(exc).__name__}: {exc}"[:300], flush=True)
    return 0


def sweep(gptq, base, args, shapes, device, dtype, gtimer, copy_gbs, deadline: float) -> dict:
    """Times (CUDA graphs) and checks every sweep job; then the best settings per shape and row count."""
    cases = Cases(gptq, base, args, device, dtype)
    results = []
    skipped = 0
    for job in sweep_jobs(args, shapes, args.smoke, base is not None):
        if time.perf_counter() > deadline:
            skipped += 1
            continue
        entry = dict(job)
        try:
            entry.update(job_check(job, cases, shapes))
            entry["ms"] = gtimer(job_fns(job, cases, shapes))
        except Exception as exc:  # a variant that fails to compile or run is recorded, not fatal
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            results.append(entry)
            print(f"sweep job {job['id']} {job['kind']} failed: {entry['error'][:200]}", flush=True)
            continue
        n, k = shapes[job["shape"]]
        if job["kind"].startswith("dequant"):
            ws, _, _ = cases.weights(job["shape"], n, k, job["desc_act"], "dequant")
            moved = packed_bytes(ws[0]) + n * k * 2
            entry["gbs"] = moved / (entry["ms"] * 1e-3) / 1e9
            entry["pct_copy_bw"] = 100 * entry["gbs"] / copy_gbs
        results.append(entry)
    best = {}
    for e in results:
        if "ms" not in e or not e.get("exact", e.get("ok", False)):
            continue
        group = e["kind"] + ("|sequential" if e.get("sequential") else "")
        key = f"{group}|{e['shape']}|act={int(e['desc_act'])}" + (f"|rows={e['rows']}" if "rows" in e else "")
        if key not in best or e["ms"] < best[key]["ms"]:
            best[key] = e
    return {"jobs": results, "skipped_for_time": skipped, "best": best}


def _pick(entries: list[dict], config) -> tuple:
    """The configuration (``config(entry)``) with the least mean of time / best time per case over the cases
    every configuration covers; cases are (shape, act-order, rows)."""
    case = lambda e: (e["shape"], e["desc_act"], e.get("rows"))  # noqa: E731
    best = {}
    for e in entries:
        best[case(e)] = min(best.get(case(e), float("inf")), e["ms"])
    scores: dict = {}
    for e in entries:
        scores.setdefault(config(e), {})[case(e)] = e["ms"] / best[case(e)]
    full = {c: v for c, v in scores.items() if len(v) == len(best)}
    chosen = min(full, key=lambda c: sum(full[c].values()))
    return chosen, sum(full[chosen].values()) / len(best)


def apply_sweep(gptq, sweeps: dict) -> dict:
    """Sets the kernels' launch settings from the sweep (one rule per layout / row count, as gptq.py has them)."""
    ok = [e for e in sweeps["jobs"] if "ms" in e and e.get("exact", e.get("ok", False))]
    dq = [e for e in ok if e["kind"] == "dequant"]
    seq, seq_score = _pick([e for e in dq if e["sequential"]], lambda e: tuple(e["launch"]))
    checked, checked_score = _pick([e for e in dq if not e["sequential"]], lambda e: tuple(e["launch"]))
    gptq._DEQUANT_LAUNCH_SEQUENTIAL, gptq._DEQUANT_LAUNCH = seq, checked
    table = []
    for rows in SWEEP_ROWS:
        fused = [e for e in ok if e["kind"] == "fused" and e["rows"] == rows]
        launch, _ = _pick(fused, lambda e: tuple(e["launch"]))
        entry = (launch[0], tuple(launch[1:]))
        if table and table[-1][1:] == entry:
            table[-1] = (rows, *entry)
        else:
            table.append((rows, *entry))
    gptq._MATMUL_LAUNCHES = tuple(table)
    applied = {"dequant_launch_sequential": seq, "dequant_launch_sequential_mean_of_time_over_best": seq_score,
               "dequant_launch": checked, "dequant_launch_mean_of_time_over_best": checked_score,
               "matmul_launches": gptq._MATMUL_LAUNCHES}  # fmt: skip
    print(f"applied: {json.dumps(applied, default=str)}", flush=True)
    return applied


def fused_max_rows(entries: list[dict]) -> int:
    """Largest row count up to which the fused kernel beats dequant + cuBLAS (kernel time) at every shape."""
    best = 0
    for rows in sorted({e["rows"] for e in entries}):
        cases = [e for e in entries if e["rows"] == rows and "fused_ms" in e]
        if not cases or any(e["fused_ms"] >= e["unfused_ms"] for e in cases):
            break
        best = rows
    return best


def crossover(gptq, base, args, shapes, device, dtype, gtimer, etimer, row_counts) -> list[dict]:
    """gptq_linear's small-row forward (fused kernel where it is used) vs dequant + cuBLAS, and the baseline
    module's fused kernel: kernel time (CUDA graphs) and eager time per call (launch overhead included)."""
    cases = Cases(gptq, base, args, device, dtype)
    out = []
    for shape in shapes:
        n, k = shapes[shape]
        for desc_act in (False, True):
            for rows in row_counts:
                entry = {"shape": shape, "desc_act": desc_act, "rows": rows}
                ws, _, _ = cases.weights(shape, n, k, desc_act, "matmul")
                xs = cases.inputs(rows, k, len(ws))
                fused = gptq._use_fused(xs[0], ws[0])
                entry["path"] = "fused dequant-matmul" if fused else "dequant + cuBLAS"
                # the fused kernel runs the sequential layout (no act-order); the baseline's for both
                kinds = (
                    ([] if desc_act else ["fused"]) + ["unfused"] + (["fused_before", "unfused_before"] if base else [])
                )
                for kind in kinds:
                    job = {"kind": kind, "shape": shape, "desc_act": desc_act, "rows": rows}
                    check = job_check(job, cases, shapes)
                    fns = job_fns(job, cases, shapes)
                    entry[f"{kind}_err"] = check["err"]
                    entry[f"{kind}_ms"] = gtimer(fns)
                    entry[f"{kind}_eager_ms"] = etimer(rotating(fns), len(fns))
                kernel = "fused" if not desc_act else "unfused"
                if not desc_act:
                    entry["fused_speedup"] = entry["unfused_ms"] / entry["fused_ms"]
                    entry["fused_speedup_eager"] = entry["unfused_eager_ms"] / entry["fused_eager_ms"]
                out.append(entry)
                line = (f"crossover {shape:8s} act={int(desc_act)} M={rows:<4d} unfused {entry['unfused_ms']:.4f} ms "
                        f"(eager {entry['unfused_eager_ms']:.4f})")  # fmt: skip
                if not desc_act:
                    line += (f"  fused {entry['fused_ms']:.4f} ms (eager {entry['fused_eager_ms']:.4f}) "
                             f"x{entry['fused_speedup']:.2f} (eager x{entry['fused_speedup_eager']:.2f})")  # fmt: skip
                if base:
                    line += (f"  before: fused {entry['fused_before_ms']:.4f} ms, unfused "
                             f"{entry['unfused_before_ms']:.4f} ms; best new {entry[f'{kernel}_ms']:.4f}")  # fmt: skip
                print(line, flush=True)
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    import fms_acceleration_accelerate_kernels.gptq as gptq
    import torch

    base = load_baseline(args.baseline)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if args.smoke:
        device = torch.device("cpu")
        shapes = {name: SHAPES_SMOKE[name] for name in args.shapes}
        args.group_size = min(args.group_size, 32)
        args.rows = [r if r <= gptq._FUSED_MAX_ROWS else gptq._FUSED_MAX_ROWS + 16 for r in args.rows]
        row_counts = [1, 16]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --smoke for a CPU check of the script)")
        device = torch.device("cuda")
        shapes = {name: SHAPES_8B[name] for name in args.shapes}
        row_counts = CROSSOVER_ROWS
    if args.worker:
        return run_worker(gptq, base, args, shapes, device, dtypes[args.dtypes[0]], args.worker)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = make_timer(args.smoke, args.warmup, args.reps)
    gtimer = graph_timer(args.smoke, args.reps)
    started = time.perf_counter()
    env = environment(args, device)
    env["copy_bandwidth_gbs"] = copy_gbs = copy_bandwidth_gbs(timer, device)
    env["baseline"] = args.baseline
    print(f"{env['device']}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    result = {"environment": env, "all_checks_ok": None, "settings": {}, "sweeps": {}, "crossover": [], "rows": []}

    def settings() -> dict:
        return {"dequant_launch_sequential": gptq._DEQUANT_LAUNCH_SEQUENTIAL, "dequant_launch": gptq._DEQUANT_LAUNCH,
                "matmul_launches": gptq._MATMUL_LAUNCHES, "fused_max_rows": gptq._FUSED_MAX_ROWS}  # fmt: skip

    def write() -> None:
        env["script_seconds"] = time.perf_counter() - started
        (out_dir / "gptq_bench.json").write_text(json.dumps(result, indent=2, default=str))

    result["settings"]["defaults"] = settings()
    dtype = dtypes[args.dtypes[0]]
    if "sweep" in args.sections:
        if args.precompile and not args.smoke:
            env["precompile_seconds"] = precompile(args, args.precompile)
            print(f"precompiled in {env['precompile_seconds']:.0f} s", flush=True)
        deadline = started + args.deadline
        result["sweeps"] = sweeps = sweep(gptq, base, args, shapes, device, dtype, gtimer, copy_gbs, deadline)
        for key, e in sorted(sweeps["best"].items()):
            what = {name: e[name] for name in ("launch", "split_k") if e.get(name) is not None}
            speed = f" {e['gbs']:.0f} GB/s" if "gbs" in e else ""
            print(f"best {key:48s} {e['ms']:.4f} ms{speed} {json.dumps(what)}", flush=True)
        print(f"sweep: {len(sweeps['jobs'])} jobs, {sweeps['skipped_for_time']} skipped for time", flush=True)
        if args.apply_sweep:
            result["settings"]["applied_from_sweep"] = apply_sweep(gptq, sweeps)
        write()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "crossover" in args.sections:
        result["crossover"] = crossover(gptq, base, args, shapes, device, dtype, gtimer, timer, row_counts)
        if args.apply_sweep:
            gptq._FUSED_MAX_ROWS = fused_max_rows([e for e in result["crossover"] if not e["desc_act"]])
            print(f"applied: fused_max_rows {gptq._FUSED_MAX_ROWS}", flush=True)
        write()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["settings"]["used_by_checks"] = settings()

    rows = result["rows"]
    if "checks" in args.sections:
        for name, (n, k) in shapes.items():
            for desc_act in (False, True):
                for dtype_name in args.dtypes:
                    row = run_case(gptq, base, name, n, k, desc_act, dtypes[dtype_name], args, timer, gtimer,
                                   copy_gbs, device)  # fmt: skip
                    rows.append(row)
                    extra = ""
                    for prefix in ("checked_", "before_"):
                        if f"{prefix}dequant_kernel_gbs" in row:
                            extra += (f"  {prefix[:-1]} {row[f'{prefix}dequant_kernel_gbs']:.0f} GB/s kernel, "
                                      f"{row[f'{prefix}dequant_gbs']:.0f} eager")  # fmt: skip
                    print(f"{name:8s} {n:5d}x{k:<5d} act={int(desc_act)} {dtype_name}  dequant exact="
                          f"{row['dequant_exact']} kernel {row['dequant_kernel_ms']:.4f} ms "
                          f"{row['dequant_kernel_gbs']:.0f} GB/s ({row['dequant_kernel_pct_copy_bw']:.0f}% of copy), "
                          f"eager {row['dequant_ms']:.4f} ms {row['dequant_gbs']:.0f} GB/s{extra}", flush=True)  # fmt: skip
                    for e in row["linear"]:
                        unfused = f" unfused fwd {e['unfused_fwd_ms']:.4f}" if "unfused_fwd_ms" in e else ""
                        print(f"    M={e['rows']:<5d} {e['path']:21s} fwd {e['gptq_fwd_ms']:.4f} ms (dense "
                              f"{e['dense_fwd_ms']:.4f}, x{e['fwd_vs_dense']:.2f}){unfused}  fwd+bwd "
                              f"{e['gptq_fwd_bwd_ms']:.4f} ms (dense {e['dense_fwd_bwd_ms']:.4f}, "
                              f"x{e['fwd_bwd_vs_dense']:.2f})  err fwd {e['fwd_err']:.1e} (dense "
                              f"{e['dense_fwd_err']:.1e}) dx {e['dx_err']:.1e} (dense {e['dense_dx_err']:.1e}) "
                              f"ok={e['ok']}", flush=True)  # fmt: skip
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            write()

    sweep_ok = all(e.get("exact", e.get("ok", False)) for e in result["sweeps"].get("jobs", []) if "error" not in e)
    floor = ERROR_FLOOR[str(dtype)[6:]]
    cross_ok = all(e[key] <= floor for e in result["crossover"] for key in e if key.endswith("_err"))
    result["all_checks_ok"] = all(r["checks_ok"] for r in rows) and sweep_ok and cross_ok
    write()
    print(f"settings: {json.dumps(result['settings'], default=str)}", flush=True)
    print(f"all checks ok: {result['all_checks_ok']}; wrote {out_dir / 'gptq_bench.json'} in "
          f"{env['script_seconds']:.0f} s", flush=True)  # fmt: skip
    return 0 if result["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
