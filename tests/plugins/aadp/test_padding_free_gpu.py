"""GPU tier: the CUDA-only backends (torch's varlen_attn, compiled flex_attention, flash-attn where installed) against
the explicit masked attention, forward and backward in bf16, and a tiny model trained padded vs padding-free with
the automatic choice on CUDA. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_aadp.attention import (
    BACKEND_CLASSES,
    EagerBackend,
    ModelNeeds,
    RunNeeds,
    choose_backend,
)
from fms_acceleration_accelerate_aadp.collate import flatten_batch
from fms_acceleration_accelerate_aadp.config import BACKEND_NAMES
from fms_acceleration_accelerate_aadp.segments import segments_of_batch

from .padding_free_helpers import loss_and_grads, padded_batch, padding_free_framework, save_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LENGTHS = (700, 3, 1200, 97, 40)  # uneven, one example shorter than a flex block


def _case(kv_heads: int):
    device = torch.device("cuda")
    total = sum(LENGTHS)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None].to(device)
    segments = segments_of_batch(batch=1, length=total, device=device, position_ids=position_ids)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 8, total, 64, device=device, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, total, 64, device=device, generator=g, dtype=torch.bfloat16) for _ in range(2))
    return segments, q, k, v


@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("name", ["flash_attn", "varlen", "flex", "sdpa"])
def test_cuda_backend_matches_explicit_attention_forward_and_backward(name, kv_heads, window):
    backend = BACKEND_CLASSES[name]()
    run = RunNeeds(device_type="cuda", dtype=torch.bfloat16)
    why = backend.unavailable() or backend.cannot_run(ModelNeeds(sliding_window=window is not None), run)
    if why:
        pytest.skip(f"{name}: {why}")
    segments, q, k, v = _case(kv_heads)
    results = []
    for impl in (EagerBackend(), backend):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        inputs = [t.to(torch.bfloat16) for t in leaves] if impl is backend else leaves
        out = impl.attend(*inputs, segments, scaling=0.125, dropout=0.0, sliding_window=window, softcap=None)
        out.float().square().sum().backward()
        results.append((out.float(), [t.grad for t in leaves]))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for g_ref, g in zip(ref_grads, grads):
        torch.testing.assert_close(g, g_ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_direct_kernel_call_equals_torch_varlen_attn(kv_heads, window):
    """The varlen backend calls torch's flash kernels without varlen_attn's custom op: the same output bit for bit,
    the same gradients up to the flash backward's own run-to-run variation (it accumulates dq with atomics), and
    less host time per call (printed with -s)."""
    import time

    direct = BACKEND_CLASSES["varlen"]()
    if direct.unavailable():
        pytest.skip(direct.unavailable())
    assert direct._calls_kernels_directly(), f"torch {torch.__version__}: flash ops' schema not as expected"
    through_op = BACKEND_CLASSES["varlen"]()
    through_op._direct = False
    segments, q, k, v = _case(kv_heads)
    results, host_us = [], []
    for impl in (direct, through_op):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def step(impl=impl, leaves=leaves):
            out = impl.attend(*leaves, segments, scaling=0.125, dropout=0.0, sliding_window=window, softcap=None)
            out.float().square().sum().backward()
            return out

        out = step()
        results.append((out.detach(), [t.grad.clone() for t in leaves]))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            step()
        host_us.append((time.perf_counter() - start) / 20 * 1e6)
        torch.cuda.synchronize()
    (got, grads), (ref, ref_grads) = results
    assert torch.equal(got, ref)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=5e-2, atol=5e-2)
    print(f"varlen fwd+bwd host us per call (kv_heads={kv_heads}, window={window}): direct {host_us[0]:.0f}, "
          f"through varlen_attn {host_us[1]:.0f}")  # fmt: skip


def test_auto_on_cuda_takes_a_varlen_kernel():
    choice = choose_backend(BACKEND_NAMES, ModelNeeds(), RunNeeds(device_type="cuda", dtype=torch.bfloat16))
    assert choice.name in ("flash_attn", "varlen", "flex"), choice.describe()


def test_tiny_model_trains_padding_free_on_cuda(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    model.train()
    batch = {k: v.cuda() for k, v in padded_batch(lengths=(60, 17, 33)).items()}
    ref, ref_grads = loss_and_grads(model, batch)
    with padding_free_framework() as framework:
        framework.augmentation(model)
        assert framework.plugin("padding_free").backend_of(model).name != "sdpa"
        flat, _ = flatten_batch({k: v.cpu() for k, v in padded_batch(lengths=(60, 17, 33)).items()})
        out, grads = loss_and_grads(model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in flat.items()})
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2
    for name, grad in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[name].float().flatten(), grad.float().flatten(), dim=0)
        assert cosine > 0.99, name
