"""RMSNorm kernel vs its pure-torch reference (forward, dx, dweight), incl. Gemma's (1 + w) variant."""

import pytest
import torch
from fms_acceleration_accelerate_kernels import rms_norm, rms_norm_ref, rms_norm_triton

from tests.kernels.harness import check_against_reference, device_for_tests

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 123), (3, 64), (2, 1, 257)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_reference(shape, dtype, offset):
    torch.manual_seed(0)
    hidden = shape[-1]
    check_against_reference(
        rms_norm_ref,
        rms_norm_triton,
        inputs=dict(x=torch.randn(shape), weight=torch.randn(hidden) * 0.5 + 1.0),
        kwargs=dict(eps=1e-6, offset=offset),
        dtype=dtype,
        grad_inputs=("x", "weight"),
    )


def test_rms_norm_frozen_weight_gives_only_dx():
    torch.manual_seed(0)
    device = device_for_tests()
    x = torch.randn(4, 33, device=device, requires_grad=True)
    weight = torch.randn(33, device=device)
    rms_norm_triton(x, weight).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    rms_norm_ref(x_ref, weight).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_rms_norm_non_contiguous_rows():
    torch.manual_seed(0)
    device = device_for_tests()
    base = torch.randn(6, 80, device=device)
    x = base[:, :40]  # row stride 80, unit column stride
    weight = torch.randn(40, device=device)
    torch.testing.assert_close(rms_norm_triton(x, weight), rms_norm_ref(x, weight), atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_triton(torch.randn(2, 8, device=device_for_tests()), torch.randn(7, device=device_for_tests()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_8b_shape(dtype):
    torch.manual_seed(0)
    check_against_reference(
        rms_norm_ref,
        rms_norm,
        inputs=dict(x=torch.randn(4, 2048, 4096), weight=torch.randn(4096) * 0.1 + 1.0),
        kwargs=dict(eps=1e-5),
        dtype=dtype,
        grad_inputs=("x", "weight"),
    )


@pytest.mark.parametrize(
    "programs_per_sm,prefetch,num_warps", [(1, False, 4), (2, True, 4), (3, True, 2), (64, True, 1), (64, False, 1)]
)
def test_rms_norm_backward_launch_variants_agree(programs_per_sm, prefetch, num_warps):
    """Every backward launch the benchmark sweeps gives the same dx and dweight (odd row counts, programs
    with no rows, prefetch of a row past the program's last)."""
    from fms_acceleration_accelerate_kernels.rms_norm import _backward, _forward

    torch.manual_seed(0)
    device = device_for_tests()
    x = torch.randn(37, 203, device=device)
    weight = torch.randn(203, device=device)
    dy = torch.randn_like(x)
    _y, rstd = _forward(x, weight, 1e-6, 0.0)
    dx, dw = _backward(dy, x, weight, rstd, 0.0, True, True, programs_per_sm, num_warps, prefetch)
    x_ref = x.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    rms_norm_ref(x_ref, w_ref, 1e-6).backward(dy)
    torch.testing.assert_close(dx, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, w_ref.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("partials", "cols"), [(70, 100), (1, 5), (32, 64)])
def test_weight_gradient_partials_are_summed_over_every_tile(partials, cols):
    """The dweight reduction reads (32, 64) tiles: partial-row and column counts off the tile sizes."""
    import importlib

    rms_module = importlib.import_module("fms_acceleration_accelerate_kernels.rms_norm")
    torch.manual_seed(0)
    partial = torch.randn(partials, cols, device=device_for_tests())
    out = rms_module._sum_partials(partial, torch.float32)
    torch.testing.assert_close(out, partial.sum(0), atol=1e-5, rtol=1e-5)
