"""Fused linear cross-entropy vs the full-logits reference: loss, grad of hidden, weight and bias, chunking."""

import pytest
import torch
from fms_acceleration_accelerate_kernels import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    fused_linear_cross_entropy_triton,
)

from tests.kernels.harness import Tolerance, check_against_reference, device_for_tests

# bf16/fp16 logits are rounded once before the loss (as in the reference run in that dtype); losses are O(log V).
TOL = {
    torch.float32: (Tolerance(1e-4, 1e-4), Tolerance(1e-4, 1e-3)),
    torch.bfloat16: (Tolerance(5e-2, 2e-2), Tolerance(5e-2, 5e-2)),
    torch.float16: (Tolerance(2e-2, 2e-2), Tolerance(2e-2, 5e-2)),
}


def _problem(n, hidden, vocab, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[1::5] = ignore_index
    return dict(
        hidden=torch.randn(n, hidden, generator=g),
        weight=torch.randn(vocab, hidden, generator=g) / hidden**0.5,
        target=target,
    )


def _chunked(chunk_rows):
    def run(**kwargs):
        return fused_linear_cross_entropy_triton(**kwargs, chunk_rows=chunk_rows)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [4, None])
def test_flce_matches_reference(dtype, chunk_rows):
    tol, gtol = TOL[dtype]
    check_against_reference(
        fused_linear_cross_entropy_ref,
        _chunked(chunk_rows),
        inputs=_problem(n=19, hidden=48, vocab=1000),
        dtype=dtype,
        grad_inputs=("hidden", "weight"),
        tolerance=tol,
        grad_tolerance=gtol,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [
        dict(reduction="sum"),
        dict(num_items_in_batch=7),
        dict(softcap=30.0, logits_scaling=2.0),
        dict(label_smoothing=0.1),
    ],
    ids=["sum", "num_items", "softcap_scaling", "smoothing"],
)
def test_flce_options_with_bias(dtype, options):
    tol, gtol = TOL[dtype]
    inputs = _problem(n=10, hidden=32, vocab=301)
    inputs["bias"] = torch.randn(301) * 0.1
    if options.get("reduction") == "sum":
        tol = Tolerance(tol.atol * 10, tol.rtol)
    check_against_reference(
        fused_linear_cross_entropy_ref,
        _chunked(3),
        inputs=inputs,
        kwargs=options,
        dtype=dtype,
        grad_inputs=("hidden", "weight", "bias"),
        tolerance=tol,
        grad_tolerance=gtol,
    )


def test_flce_frozen_weight_and_upstream_scale():
    torch.manual_seed(0)
    device = device_for_tests()
    p = _problem(n=9, hidden=16, vocab=77)
    hidden = p["hidden"].to(device).requires_grad_(True)
    weight, target = p["weight"].to(device), p["target"].to(device)
    (fused_linear_cross_entropy_triton(hidden, weight, target, chunk_rows=2) * 3.0).backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    (fused_linear_cross_entropy_ref(ref_hidden, weight, target) * 3.0).backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=1e-5, rtol=1e-4)


def test_flce_no_grad_forward_only():
    device = device_for_tests()
    p = {k: v.to(device) for k, v in _problem(n=5, hidden=8, vocab=40).items()}
    with torch.no_grad():
        got = fused_linear_cross_entropy_triton(**p, chunk_rows=2)
    torch.testing.assert_close(got, fused_linear_cross_entropy_ref(**p), atol=1e-5, rtol=1e-5)


def test_flce_rejects_reduction_none_and_second_backward():
    device = device_for_tests()
    p = {k: v.to(device) for k, v in _problem(n=4, hidden=8, vocab=20).items()}
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(**p, reduction="none")
    hidden = p["hidden"].requires_grad_(True)
    loss = fused_linear_cross_entropy_triton(hidden, p["weight"], p["target"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flce_8b_shape():
    p = _problem(n=8192, hidden=4096, vocab=128256)
    check_against_reference(
        fused_linear_cross_entropy_ref,
        fused_linear_cross_entropy,
        inputs=p,
        kwargs=dict(reduction="sum"),  # O(1) gradients, so the tolerances below can fail
        dtype=torch.bfloat16,
        grad_inputs=("hidden", "weight"),
        tolerance=Tolerance(atol=1.0, rtol=1e-2),
        grad_tolerance=Tolerance(atol=3e-2, rtol=5e-2),  # grad_weight accumulates over chunks in bf16
    )
