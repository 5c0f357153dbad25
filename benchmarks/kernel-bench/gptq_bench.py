"""GPU check and timing of the GPTQ kernels (kernels/.../gptq.py) at Llama-8B layer shapes.

For each weight shape (out, in) = q/o (4096, 4096), k/v (1024, 4096), gate/up (14336, 4096), down (4096, 14336),
4-bit, group size 128, v1 zeros, act-order (``desc_act``, a permuted ``g_idx``) off and on, bf16 and fp16:

* checks: the Triton dequant equals ``gptq_dequantize_ref`` bit for bit; ``gptq_linear`` forward and the
  gradient of ``x`` against an fp32 product with the reference weight, for every row count measured, next to the
  error of a dense GEMM in the same dtype (a path is ok when its error is at most twice the dense GEMM's);
* timings (CUDA events, median): dequant (ms, GB/s of packed reads + dense writes, % of the measured device
  copy bandwidth) and the pure-torch reference dequant; ``gptq_linear`` forward and forward+backward at each row
  count (default 8192 = 4 x 2048 training tokens, and 16) against a dense ``F.linear`` in the same dtype; at row
  counts where ``gptq_linear`` runs the fused dequant-matmul kernel, also the unfused dequant + cuBLAS forward.

Then (unless ``--no-sweep``): the fused-vs-unfused forward over row counts 1 ... 512 (where the fused kernel
stops winning, to set ``_FUSED_MAX_ROWS``), and alternative launch settings of both kernels (``_DEQUANT_LAUNCH``,
``_MATMUL_LAUNCH``, split-K), each named with its time, so the defaults can be updated from one run.

Usage (repository root, one CUDA GPU; a few minutes)::

    PYTHONPATH=kernels/src python benchmarks/kernel-bench/gptq_bench.py --out benchmarks/results/<date>-<gpu>-x1-kernels-gptq

``--out`` defaults to ``$OUT``. Writes ``gptq_bench.json`` (environment, rows, sweeps, ``all_checks_ok``) and
prints one line per measurement. ``--smoke`` runs the whole script on tiny shapes on CPU in Triton's interpreter
(timings meaningless), to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

SHAPES_8B = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}
SHAPES_SMOKE = {"q_o": (64, 128), "k_v": (32, 128), "gate_up": (96, 128), "down": (64, 256)}
DEQUANT_LAUNCHES = [(64, 128, 8), (64, 64, 4), (128, 64, 4), (32, 128, 4), (128, 128, 8), (64, 256, 8), (32, 64, 2)]
MATMUL_LAUNCHES = [(64, 64, 4), (32, 64, 4), (128, 64, 4), (64, 128, 4), (32, 128, 4), (64, 32, 2), (128, 128, 8)]
CROSSOVER_ROWS = [1, 16, 32, 64, 128, 256, 512]
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
    parser.add_argument("--no-sweep", action="store_true", help="skip the crossover and launch-setting sweeps")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give --out DIR or set $OUT")
    return args


# ------------------------------------------------------------------------------------------ measurement


def make_timer(smoke: bool, warmup: int, reps: int) -> Callable[[Callable[[], object], int], float]:
    """``timer(fn, inner)``: median ms of one ``fn`` call (CUDA events around ``inner`` back-to-back calls)."""
    import torch

    def cuda_ms(fn: Callable[[], object], inner: int = 10) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / inner)
        return sorted(times)[len(times) // 2]

    def cpu_ms(fn: Callable[[], object], inner: int = 1) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_ms if smoke else cuda_ms


def max_err(got, truth) -> float:
    """max |got - truth| / max |truth| (fp32)."""
    return ((got.float() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def environment(args: argparse.Namespace, device) -> dict:
    import torch

    versions = {"python": platform.python_version()}
    for name in ("torch", "triton", "fms-acceleration-accelerate-kernels"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "cuda": torch.version.cuda,
        "versions": versions,
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "bits": args.bits,
        "group_size": args.group_size,
        "checkpoint_format": "gptq",
    }
    if device.type == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def copy_bandwidth_gbs(timer, device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) over a 1 GiB buffer."""
    import torch

    src = torch.empty(2**30 if device.type == "cuda" else 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timer(lambda: dst.copy_(src), 5) * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------ cases


def make_weight(gptq, n: int, k: int, bits: int, group_size: int, desc_act: bool, dtype, device, seed: int = 0):
    """A random GPTQ weight (asymmetric v1 zeros, fp16 scales) of logical shape (n, k), packed on ``device``."""
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
    return gptq.GPTQWeight(qweight, qzeros, scales, g_idx, bits, group_size, "gptq", n, k, dtype)


def packed_bytes(weight) -> int:
    return sum(t.numel() * t.element_size() for t in (weight.qweight, weight.qzeros, weight.scales, weight.g_idx))


def run_case(gptq, name, n, k, desc_act, dtype, args, timer, copy_gbs, device) -> dict:
    import torch
    import torch.nn.functional as F

    weight = make_weight(gptq, n, k, args.bits, args.group_size, desc_act, dtype, device)
    row = {"shape": name, "out_features": n, "in_features": k, "desc_act": desc_act, "dtype": str(dtype)[6:]}

    # dequant: exactness and bandwidth
    ref = weight.dequantize_ref(dtype)
    tri = weight.dequantize(dtype)
    row["dequant_mismatches"] = int((tri.view(torch.int16) != ref.view(torch.int16)).sum().item())
    row["dequant_exact"] = row["dequant_mismatches"] == 0
    buf = torch.empty_like(ref)
    ms = timer(lambda b=buf: weight.dequantize(dtype, out=b), 20)
    moved = packed_bytes(weight) + ref.numel() * ref.element_size()
    row["dequant_ms"] = ms
    row["dequant_gbs"] = moved / (ms * 1e-3) / 1e9
    row["dequant_pct_copy_bw"] = 100 * row["dequant_gbs"] / copy_gbs
    row["dequant_ref_ms"] = timer(lambda: weight.dequantize_ref(dtype), 2)
    del buf, tri

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


def crossover(gptq, shapes, dtype, args, timer, device, row_counts) -> list[dict]:
    """Fused kernel vs dequant + cuBLAS forward over row counts (sets where the fused kernel should stop)."""
    import torch
    import torch.nn.functional as F

    out = []
    for name, (n, k) in shapes.items():
        weight = make_weight(gptq, n, k, args.bits, args.group_size, False, dtype, device)
        for m in row_counts:
            x = torch.randn(m, k, device=device).to(dtype)
            with torch.no_grad():
                fused_ms = timer(lambda x=x, w=weight: gptq._matmul_fused(x, w, None), 10)
                unfused_ms = timer(lambda x=x, w=weight: F.linear(x, w.dequantize(dtype)), 10)
            out.append({"shape": name, "rows": m, "fused_ms": fused_ms, "unfused_ms": unfused_ms,
                        "fused_speedup": unfused_ms / fused_ms})  # fmt: skip
    return out


def launch_sweep(gptq, shapes, dtype, args, timer, copy_gbs, device, dequant_launches, matmul_launches) -> dict:
    """Times alternative launch settings of the dequant kernel and of the fused kernel (M = 16)."""
    import torch

    result = {"dequant": [], "matmul": []}
    for name, (n, k) in shapes.items():
        weight = make_weight(gptq, n, k, args.bits, args.group_size, True, dtype, device)
        ref = weight.dequantize_ref(dtype)
        buf = torch.empty_like(ref)
        moved = packed_bytes(weight) + ref.numel() * ref.element_size()
        packed = (weight.qweight, weight.qzeros, weight.scales, weight.g_idx, weight.bits, "gptq", dtype)
        for launch in dequant_launches:
            buf.fill_(float("nan"))
            gptq._dequantize_triton(*packed, out=buf, launch=launch)
            exact = torch.equal(buf, ref)
            ms = timer(lambda launch=launch, p=packed, b=buf: gptq._dequantize_triton(*p, out=b, launch=launch), 20)
            gbs = moved / (ms * 1e-3) / 1e9
            result["dequant"].append({"shape": name, "launch": launch, "ms": ms, "gbs": gbs,
                                      "pct_copy_bw": 100 * gbs / copy_gbs, "exact": exact,
                                      "default": launch == gptq._DEQUANT_LAUNCH})  # fmt: skip
        x = torch.randn(16, k, device=device).to(dtype)
        truth = x.float() @ ref.float().t()
        for launch in matmul_launches:
            for split_k in (None, 1, 2, 4, 8):
                y = gptq._matmul_fused(x, weight, None, launch=launch, split_k=split_k)
                ms = timer(lambda a=(x, weight, None, launch, split_k): gptq._matmul_fused(*a), 10)
                result["matmul"].append({"shape": name, "rows": 16, "launch": launch, "split_k": split_k, "ms": ms,
                                         "err": max_err(y, truth),
                                         "default": launch == gptq._MATMUL_LAUNCH and split_k is None})  # fmt: skip
        del ref, buf
    for kind in ("dequant", "matmul"):
        best = {}
        for entry in result[kind]:
            if entry["shape"] not in best or entry["ms"] < best[entry["shape"]]["ms"]:
                best[entry["shape"]] = entry
        result[f"{kind}_best"] = best
    return result


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    import fms_acceleration_accelerate_kernels.gptq as gptq
    import torch

    if args.smoke:
        device = torch.device("cpu")
        shapes = {name: SHAPES_SMOKE[name] for name in args.shapes}
        args.group_size = min(args.group_size, 32)
        args.rows = [r if r <= gptq._FUSED_MAX_ROWS else gptq._FUSED_MAX_ROWS + 16 for r in args.rows]
        row_counts, dequant_launches, matmul_launches = [1, 16], DEQUANT_LAUNCHES[:2], MATMUL_LAUNCHES[:2]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --smoke for a CPU check of the script)")
        device = torch.device("cuda")
        shapes = {name: SHAPES_8B[name] for name in args.shapes}
        row_counts, dequant_launches, matmul_launches = CROSSOVER_ROWS, DEQUANT_LAUNCHES, MATMUL_LAUNCHES
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = make_timer(args.smoke, args.warmup, args.reps)
    started = time.perf_counter()
    env = environment(args, device)
    env["copy_bandwidth_gbs"] = copy_gbs = copy_bandwidth_gbs(timer, device)
    env["fused_max_rows"] = gptq._FUSED_MAX_ROWS
    env["dequant_launch"] = gptq._DEQUANT_LAUNCH
    env["matmul_launch"] = gptq._MATMUL_LAUNCH
    print(f"{env['device']}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    rows = []
    for name, (n, k) in shapes.items():
        for desc_act in (False, True):
            for dtype_name in args.dtypes:
                row = run_case(gptq, name, n, k, desc_act, dtypes[dtype_name], args, timer, copy_gbs, device)
                rows.append(row)
                print(f"{name:8s} {n:5d}x{k:<5d} act={int(desc_act)} {dtype_name}  dequant exact={row['dequant_exact']}"
                      f" {row['dequant_ms']:.4f} ms {row['dequant_gbs']:.0f} GB/s ({row['dequant_pct_copy_bw']:.0f}%"
                      f" of copy)  torch ref {row['dequant_ref_ms']:.3f} ms", flush=True)  # fmt: skip
                for e in row["linear"]:
                    unfused = f" unfused fwd {e['unfused_fwd_ms']:.4f}" if "unfused_fwd_ms" in e else ""
                    print(f"    M={e['rows']:<5d} {e['path']:21s} fwd {e['gptq_fwd_ms']:.4f} ms (dense "
                          f"{e['dense_fwd_ms']:.4f}, x{e['fwd_vs_dense']:.2f}){unfused}  fwd+bwd "
                          f"{e['gptq_fwd_bwd_ms']:.4f} ms (dense {e['dense_fwd_bwd_ms']:.4f}, "
                          f"x{e['fwd_bwd_vs_dense']:.2f})  err fwd {e['fwd_err']:.1e} (dense {e['dense_fwd_err']:.1e})"
                          f" dx {e['dx_err']:.1e} (dense {e['dense_dx_err']:.1e}) ok={e['ok']}", flush=True)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    sweeps = {}
    if not args.no_sweep:
        dtype = dtypes[args.dtypes[0]]
        sweeps["crossover"] = crossover(gptq, shapes, dtype, args, timer, device, row_counts)
        for e in sweeps["crossover"]:
            print(f"crossover {e['shape']:8s} M={e['rows']:<4d} fused {e['fused_ms']:.4f} ms unfused "
                  f"{e['unfused_ms']:.4f} ms  x{e['fused_speedup']:.2f}", flush=True)  # fmt: skip
        sweeps["launch"] = launch_sweep(
            gptq, shapes, dtype, args, timer, copy_gbs, device, dequant_launches, matmul_launches
        )
        for kind in ("dequant", "matmul"):
            for shape, best in sweeps["launch"][f"{kind}_best"].items():
                print(f"best {kind} launch {shape:8s}: {json.dumps(best)}", flush=True)

    all_ok = all(r["checks_ok"] for r in rows) and all(e["exact"] for e in sweeps.get("launch", {}).get("dequant", []))
    env["script_seconds"] = time.perf_counter() - started
    result = {"environment": env, "all_checks_ok": all_ok, "rows": rows, "sweeps": sweeps}
    (out_dir / "gptq_bench.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"all checks ok: {all_ok}; wrote {out_dir / 'gptq_bench.json'} in {env['script_seconds']:.0f} s", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
