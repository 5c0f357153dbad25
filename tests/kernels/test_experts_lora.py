"""LoRA on MoE expert stacks (kernels.moe_lora) against merged weights and between its two paths.

The reference (per-expert torch loop with the low-rank terms) must equal :func:`moe_experts_ref` on merged weights
``W + s B A`` (what PEFT's ``target_parameters`` computes), forward and every gradient; the Triton path (interpreter
on CPU) must equal the reference. Odd shapes (T=29, H=40, I=24, r=3 and 5) so the low-rank kernel runs several row
and column tiles with tails and a rank below the 16-wide dot; empty experts, expert-parallel sentinels, both gate/up
layouts, transposed storage with biases (GPT-OSS), an adapter on one stack only."""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_kernels.moe import moe_experts_ref
from fms_acceleration_accelerate_kernels.moe_lora import (
    ExpertLoRA,
    moe_experts_lora,
    moe_experts_lora_ref,
    moe_experts_lora_triton,
)

from tests.kernels.harness import device_for_tests

T, H, I = 29, 40, 24  # noqa: E741
E = 5


def _inputs(top_k=2, transposed=False, bias=False, empty=(), sentinels=0, ranks=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    index = torch.stack([allowed[torch.randperm(allowed.numel(), generator=g)[:top_k]] for _ in range(T)])
    if sentinels:
        flat = index.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:sentinels]] = E + 1
    tensors = dict(
        hidden=torch.randn(T, H, generator=g),
        top_k_weights=torch.rand(T, top_k, generator=g) + 0.1,
    )
    frozen = dict(
        gate_up=torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), generator=g) * H**-0.5,
        down=torch.randn((E, I, H) if transposed else (E, H, I), generator=g) * I**-0.5,
    )
    if bias:
        tensors["gate_up_bias"] = torch.randn(E, 2 * I, generator=g) * 0.3
        tensors["down_bias"] = torch.randn(E, H, generator=g) * 0.3
    r_gu, r_d = ranks
    if r_gu:
        tensors["a_gu"] = torch.randn(E, r_gu, H, generator=g) * H**-0.5
        tensors["b_gu"] = torch.randn(E, 2 * I, r_gu, generator=g) * 0.2
    if r_d:
        tensors["a_d"] = torch.randn(E, r_d, I, generator=g) * I**-0.5
        tensors["b_d"] = torch.randn(E, H, r_d, generator=g) * 0.2
    return index, tensors, frozen


SCALES = (2.0, 0.75)


def _lora_kwargs(leaves):
    kwargs = {}
    if "a_gu" in leaves:
        kwargs["gate_up_lora"] = ExpertLoRA(leaves["a_gu"], leaves["b_gu"], SCALES[0])
    if "a_d" in leaves:
        kwargs["down_lora"] = ExpertLoRA(leaves["a_d"], leaves["b_d"], SCALES[1])
    return kwargs


_FACTORS = ("a_gu", "b_gu", "a_d", "b_d")


def _run(fn, index, tensors, frozen, dtype, upstream, merged=False, **kwargs):
    device = device_for_tests()
    leaves = {n: t.detach().to(device, dtype).clone().requires_grad_(True) for n, t in tensors.items()}
    weights = {n: t.to(device, dtype) for n, t in frozen.items()}
    inputs = {n: t for n, t in leaves.items() if n not in _FACTORS}
    if merged:  # W + s B A in the weights' own orientation, as PEFT merges it
        transposed = kwargs.get("transposed", False)
        for name, (a, b, s) in (("gate_up", ("a_gu", "b_gu", SCALES[0])), ("down", ("a_d", "b_d", SCALES[1]))):
            if a in leaves:
                delta = s * leaves[b] @ leaves[a]
                weights[name] = weights[name] + (delta.transpose(1, 2) if transposed else delta)
        out = fn(top_k_index=index.to(device), **inputs, **weights, **kwargs)
    else:
        out = fn(top_k_index=index.to(device), **inputs, **weights, **_lora_kwargs(leaves), **kwargs)
    out.backward(upstream.to(device, out.dtype))
    return out.detach().float().cpu(), {n: t.grad.float().cpu() for n, t in leaves.items()}


def _check(index, tensors, frozen, dtype=torch.float32, tol=None, **kwargs):
    upstream = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    merged_out, merged_grads = _run(moe_experts_ref, index, tensors, frozen, torch.float32, upstream, True, **kwargs)
    ref_out, ref_grads = _run(moe_experts_lora_ref, index, tensors, frozen, torch.float32, upstream, **kwargs)
    torch.testing.assert_close(ref_out, merged_out, atol=1e-5, rtol=1e-5)
    for name, want in merged_grads.items():
        torch.testing.assert_close(ref_grads[name], want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"ref d{n}: {m}")
    out, grads = _run(moe_experts_lora_triton, index, tensors, frozen, dtype, upstream, **kwargs)
    tol = tol or dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, ref_out, **tol, msg=lambda m: f"forward: {m}")
    grad_tol = {k: v * 5 for k, v in tol.items()}
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, **grad_tol, msg=lambda m, n=name: f"triton d{n}: {m}")
    return grads


@pytest.mark.parametrize("top_k,sentinels,empty", [(1, 0, ()), (2, 4, (1,)), (4, 0, (3,))])
def test_lora_experts_match_merged_weights(top_k, sentinels, empty):
    index, tensors, frozen = _inputs(top_k=top_k, sentinels=sentinels, empty=empty)
    grads = _check(index, tensors, frozen)
    for name in _FACTORS:
        assert grads[name].abs().sum() > 0
        for e in empty:  # an expert without rows gets no adapter gradient
            assert grads[name][e].abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(act="gelu_tanh", gate_first=False),
        dict(act="silu", interleaved=True),
        dict(act="gpt_oss", interleaved=True, transposed=True, alpha=1.702, limit=0.8),
    ],
    ids=["up-first-gelu", "interleaved", "gpt-oss-transposed"],
)
def test_lora_experts_layouts(kwargs):
    index, tensors, frozen = _inputs(transposed=kwargs.get("transposed", False), bias=True, sentinels=3)
    _check(index, tensors, frozen, **kwargs)


@pytest.mark.parametrize("ranks", [(4, 0), (0, 2)], ids=["gate-up-only", "down-only"])
def test_lora_on_one_stack(ranks):
    index, tensors, frozen = _inputs(ranks=ranks)
    _check(index, tensors, frozen)


def test_lora_experts_bf16():
    """bf16 against the fp32 reference, judged by the error of the route it replaces (the adapter merged into the
    weights, bf16, through moe_experts' kernels): within 2.5 times that error (it rounds h and y once more: base,
    then base + low-rank term), floor 1e-2 of the tensor's scale."""
    from fms_acceleration_accelerate_kernels.moe import moe_experts_triton

    index, tensors, frozen = _inputs(bias=True)
    upstream = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    want = _run(moe_experts_lora_ref, index, tensors, frozen, torch.float32, upstream)
    merged = _run(moe_experts_triton, index, tensors, frozen, torch.bfloat16, upstream, merged=True)
    got = _run(moe_experts_lora_triton, index, tensors, frozen, torch.bfloat16, upstream)
    pairs = [("out", want[0], merged[0], got[0])] + [(f"d{n}", want[1][n], merged[1][n], got[1][n]) for n in want[1]]
    for name, exact, route, ours in pairs:
        allowed = max(2.5 * (route - exact).abs().max(), 1e-2 * exact.abs().max())
        assert (ours - exact).abs().max() <= allowed, name


def test_dispatch_and_refusals(monkeypatch):
    index, tensors, frozen = _inputs()
    lora = _lora_kwargs(tensors)
    args = (tensors["hidden"], index, tensors["top_k_weights"], frozen["gate_up"], frozen["down"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.testing.assert_close(moe_experts_lora(*args, **lora), moe_experts_lora_ref(*args, **lora))
    with pytest.raises(ValueError, match="frozen base"):
        moe_experts_lora_ref(*args[:3], frozen["gate_up"].requires_grad_(True), frozen["down"], **lora)
    frozen["gate_up"].requires_grad_(False)
    bad = ExpertLoRA(tensors["a_gu"][:, :, :-1], tensors["b_gu"], 1.0)
    with pytest.raises(ValueError, match="gate_up_lora"):
        moe_experts_lora_ref(*args, gate_up_lora=bad)


_CODEGEN = r"""
import importlib.util, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fms_acceleration_accelerate_kernels import moe_lora as ML

tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def usage(compiled):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        text = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", text)
    return int(found.group(1)), int(found.group(2)), compiled.metadata.shared


fn = ML._moe_lowrank_kernel
names = fn.arg_names
for dtype, precision in (("bf16", 0), ("fp16", 0), ("fp32", 1), ("fp32", 2)):
    for gated in (False, True):
        for rank in (16, 64):
            constexprs = dict(GATED=gated, STEP=1, ACT=0, PRECISION=precision, GROUP_M=8, BLOCK_M=ML._LOWRANK_BLOCK_M,
                              BLOCK_N=ML._LOWRANK_BLOCK_N, BLOCK_R=min(ML._LOWRANK_BLOCK_R, rank), BLOCK_E=8)
            pointers = {n: f"*{dtype}" for n in ("U", "W", "Y", "A_OUT")} | {"OFFSETS": "*i32"}
            signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in ("scale", "alpha", "limit") else "i32") for n in names}
            source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": ML._LOWRANK_WARPS, "num_stages": ML._LOWRANK_STAGES})
            regs, stack, shared = usage(compiled)
            print(json.dumps(dict(kernel="lowrank", dtype=dtype, precision=precision, gated=gated, rank=rank,
                                  registers=regs, stack_bytes=stack, shared_bytes=shared)))
# the shared moe kernels with the LoRA GEMMs' tiles (rank-wide N or K)
spec = importlib.util.spec_from_file_location("moe_bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
lora_r, wgrad = ML._LORA_LAUNCH["lora_r"], ML._LORA_LAUNCH["wgrad_lora"]
for dtype, precision in (("bf16", 0), ("fp32", 1), ("fp32", 2)):
    for rank in (16, 64):
        cases = (("down", lora_r._replace(block_n=rank)), ("dx", lora_r._replace(block_n=rank)),
                 ("wgrad_gate_up", wgrad._replace(block_n=rank)), ("wgrad_down", wgrad._replace(block_k=rank)))
        for kernel, launch in cases:
            for s in bench.compile_stats(kernel, tuple(launch), dtype=dtype, precision=precision):
                print(json.dumps(dict(s, dtype=dtype, precision=precision, rank=rank)))
"""


def test_gpu_tiles_compile_for_sm90_without_spills():
    """The low-rank kernel with its GPU tiles, and moe's grouped GEMM / weight-gradient kernels with the LoRA GEMMs'
    tiles, compile for sm_90 (Triton's bundled ptxas, no GPU) within shared memory, without register spills (IEEE
    fp32 dots excepted, as for moe's kernels). In a subprocess: here the kernels may be interpreter functions."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no ptxas/cuobjdump for offline sm_90 compilation")
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel-bench" / "moe_bench.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, "-c", _CODEGEN, str(bench)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stats = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len([s for s in stats if s["kernel"] == "lowrank"]) == 16 and len(stats) == 16 + 3 * 2 * 4
    for s in stats:
        assert s["shared_bytes"] <= 232448, s
        if s["precision"] != 2:  # IEEE fp32 dots (TF32 off) run on CUDA cores: a few spilled bytes are tolerated
            assert s["stack_bytes"] == 0, s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden,inter,n_experts,top_k", [(1536, 512, 40, 8), (4096, 1792, 8, 2)])
def test_lora_experts_real_shapes_gpu(hidden, inter, n_experts, top_k):
    """Layer shapes of GraniteMoe-3B and Mixtral (intermediate cut), 2048 tokens, r 16 on both stacks: fp32 equals
    the merged-weight reference; bf16 within 4 times the error of the merged-weight route in bf16 (floor 2e-2 of
    the scale): h, y, d(a) and the input-gradient rows are rounded twice (the base GEMM's output, then with the
    low-rank term), and the routing-weight gradient <d(a), a> sums two such tensors."""
    from fms_acceleration_accelerate_kernels.moe import moe_experts_triton

    g = torch.Generator().manual_seed(0)
    n_tokens, rank = 2048, 16
    weights, index = torch.topk(torch.randn(n_tokens, n_experts, generator=g).softmax(-1), top_k, dim=-1)
    tensors = dict(
        hidden=torch.randn(n_tokens, hidden, generator=g),
        top_k_weights=weights,
        a_gu=torch.randn(n_experts, rank, hidden, generator=g) * hidden**-0.5,
        b_gu=torch.randn(n_experts, 2 * inter, rank, generator=g) * 0.05,
        a_d=torch.randn(n_experts, rank, inter, generator=g) * inter**-0.5,
        b_d=torch.randn(n_experts, hidden, rank, generator=g) * 0.05,
    )
    frozen = dict(
        gate_up=torch.randn(n_experts, 2 * inter, hidden, generator=g) * hidden**-0.5,
        down=torch.randn(n_experts, hidden, inter, generator=g) * inter**-0.5,
    )
    upstream = torch.randn(n_tokens, hidden, generator=g)
    want = _run(moe_experts_ref, index, tensors, frozen, torch.float32, upstream, merged=True)
    ours32 = _run(moe_experts_lora_triton, index, tensors, frozen, torch.float32, upstream)
    merged16 = _run(moe_experts_triton, index, tensors, frozen, torch.bfloat16, upstream, merged=True)
    ours16 = _run(moe_experts_lora_triton, index, tensors, frozen, torch.bfloat16, upstream)
    torch.testing.assert_close(ours32[0], want[0], atol=1e-3, rtol=1e-3)
    for name in want[1]:
        torch.testing.assert_close(ours32[1][name], want[1][name], atol=2e-3, rtol=2e-3, msg=lambda m, n=name: n + m)
    pairs = [("out", want[0], merged16[0], ours16[0])]
    pairs += [(f"d{n}", want[1][n], merged16[1][n], ours16[1][n]) for n in want[1]]
    for name, exact, route, ours in pairs:
        allowed = max(4 * (route - exact).abs().max(), 2e-2 * exact.abs().max())
        assert (ours - exact).abs().max() <= allowed, name
