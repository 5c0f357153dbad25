"""4-bit expert stacks on a GPU at the GraniteMoe-3B layer shape (H 1536, I 512, 40 experts, top-8, 8192 tokens, bf16).

The 4-bit route (the stacks dequantized for the call and again in the backward, see
``fms_acceleration_accelerate_moe.quantized_experts``) against the same Triton kernels on 16-bit stacks holding the
dequantized weights: identical outputs and gradients, less memory held between the forward and the backward, and the
time of the dequantization against the layer's forward + backward (printed; run with ``-s`` to read it)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("bitsandbytes", reason="the 4-bit expert stacks are bitsandbytes' (install bitsandbytes)")

H, INTER, E, K, T = 1536, 512, 40, 8, 8192


def _median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _inputs(dtype=torch.bfloat16):
    from fms_acceleration_accelerate_moe.quantized_experts import StackQuantization, quantize_stack

    g = torch.Generator(device="cuda").manual_seed(0)
    settings = StackQuantization("nf4", 64, True)
    gate_up = quantize_stack(
        torch.randn(E, 2 * INTER, H, device="cuda", dtype=dtype, generator=g) * 0.02, settings, "gu"
    )
    down = quantize_stack(torch.randn(E, H, INTER, device="cuda", dtype=dtype, generator=g) * 0.02, settings, "down")
    x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
    index = torch.rand(T, E, device="cuda", generator=g).topk(K, -1).indices
    weights = torch.softmax(torch.randn(T, K, device="cuda", generator=g), -1).to(dtype)
    return gate_up, down, x, index, weights


def _run(x, index, weights, gate_up, down):
    from fms_acceleration_accelerate_kernels.moe import moe_experts
    from fms_acceleration_accelerate_moe.quantized_experts import stacks_context

    with stacks_context((gate_up, down)) as (gate_up_w, down_w):
        return moe_experts(x, index, weights, gate_up_w, down_w, act="silu")


def test_4bit_route_equals_dense_route_and_timing_granitemoe_3b_layer():
    from fms_acceleration_accelerate_moe.quantized_experts import dequantize_stack

    gate_up, down, x0, index, weights0 = _inputs()
    dense = (dequantize_stack(gate_up), dequantize_stack(down))

    def step(stacks):
        x = x0.clone().requires_grad_(True)
        weights = weights0.clone().requires_grad_(True)
        out = _run(x, index, weights, *stacks)
        out.float().square().mean().backward()
        return out.detach(), x.grad, weights.grad

    want = step(dense)
    got = step((gate_up, down))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # memory held between the forward and the backward: the 4-bit route keeps no 16-bit stack
    def held(stacks) -> int:
        x = x0.clone().requires_grad_(True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = _run(x, index, weights0, *stacks)
        torch.cuda.synchronize()
        amount = torch.cuda.memory_allocated() - before
        out.float().sum().backward()
        return amount

    dense_stack_bytes = sum(t.numel() * t.element_size() for t in dense)
    held_dense, held_4bit = held(dense), held((gate_up, down))
    assert held_4bit <= held_dense + 2**20  # the dense stacks are alive anyway in the dense run (not counted there)

    dequant_ms = _median_ms(lambda: (dequantize_stack(gate_up), dequantize_stack(down)))
    dense_ms = _median_ms(lambda: step(dense))
    quant_ms = _median_ms(lambda: step((gate_up, down)))
    print(
        f"\nGraniteMoe-3B layer (H{H} I{INTER} E{E} k{K} T{T}, bf16, {torch.cuda.get_device_name()}): dequantize both "
        f"stacks {dequant_ms:.3f} ms; fwd+bwd dense {dense_ms:.3f} ms, 4-bit {quant_ms:.3f} ms "
        f"(x{quant_ms / dense_ms:.2f}); packed stacks {(gate_up.numel() + down.numel()) * 2 / 2**20:.1f} MiB vs "
        f"{dense_stack_bytes / 2**20:.1f} MiB; held fwd->bwd {held_4bit / 2**20:.1f} MiB (dense route "
        f"{held_dense / 2**20:.1f} MiB + its stacks)"
    )
    # the 4-bit route costs the dense route plus about three dequantizations (forward, backward), not more
    assert quant_ms < dense_ms + 4 * dequant_ms + 0.5
