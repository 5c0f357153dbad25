"""SwiGLU / GeGLU kernels vs references: forward, d(gate), d(up); strided halves of a fused projection."""

import pytest
import torch
from fms_acceleration_accelerate_kernels import geglu, geglu_ref, geglu_triton, swiglu, swiglu_ref, swiglu_triton

from tests.kernels.harness import check_against_reference, device_for_tests

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(5, 7, 123), (3, 2100), (1, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(0)
    check_against_reference(
        swiglu_ref,
        swiglu_triton,
        inputs=dict(gate=torch.randn(shape) * 3, up=torch.randn(shape)),
        dtype=dtype,
        grad_inputs=("gate", "up"),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_geglu_matches_reference(shape, dtype, approximate):
    torch.manual_seed(0)
    check_against_reference(
        geglu_ref,
        geglu_triton,
        inputs=dict(gate=torch.randn(shape) * 3, up=torch.randn(shape)),
        kwargs=dict(approximate=approximate),
        dtype=dtype,
        grad_inputs=("gate", "up"),
    )


def test_glu_on_halves_of_fused_projection():
    torch.manual_seed(0)
    device = device_for_tests()
    fused = torch.randn(4, 6, 2 * 40, device=device, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)
    swiglu_triton(gate, up).square().sum().backward()
    grad = fused.grad.clone()
    fused.grad = None
    gate, up = fused.chunk(2, dim=-1)
    swiglu_ref(gate, up).square().sum().backward()
    torch.testing.assert_close(grad, fused.grad, atol=1e-5, rtol=1e-5)


def test_glu_only_up_requires_grad():
    torch.manual_seed(0)
    device = device_for_tests()
    gate = torch.randn(3, 17, device=device)
    up = torch.randn(3, 17, device=device, requires_grad=True)
    geglu_triton(gate, up).sum().backward()
    torch.testing.assert_close(up.grad, torch.nn.functional.gelu(gate, approximate="tanh"), atol=1e-5, rtol=1e-5)


def test_glu_rejects_bad_inputs():
    device = device_for_tests()
    with pytest.raises(ValueError, match="same shape"):
        swiglu_triton(torch.randn(2, 3, device=device), torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="approximate"):
        geglu_triton(torch.randn(2, 3, device=device), torch.randn(2, 3, device=device), approximate="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_glu_8b_shape(op):
    torch.manual_seed(0)
    ref, impl = (swiglu_ref, swiglu) if op == "swiglu" else (geglu_ref, geglu)
    check_against_reference(
        ref,
        impl,
        inputs=dict(gate=torch.randn(4, 2048, 14336), up=torch.randn(4, 2048, 14336)),
        dtype=torch.bfloat16,
        grad_inputs=("gate", "up"),
    )


@pytest.mark.parametrize("launch", [(128, 1), (256, 2), (1024, 8), (4096, 16)])
def test_glu_launch_variants_agree(launch):
    """The launch settings the benchmark sweeps (several column blocks per row, odd width) give the same result."""
    from fms_acceleration_accelerate_kernels.glu import _ACT_SILU, _backward, _forward

    torch.manual_seed(0)
    device = device_for_tests()
    gate, up, dout = (torch.randn(6, 333, device=device) for _ in range(3))
    out = _forward(gate, up, _ACT_SILU, launch=launch)
    dgate, dup = _backward(dout, gate, up, _ACT_SILU, True, True, launch=launch)
    g_ref, u_ref = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    ref = swiglu_ref(g_ref, u_ref)
    ref.backward(dout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dgate, g_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dup, u_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("activation", [("silu", "tanh"), ("gelu", "tanh"), ("gelu", "none")], ids=str)
def test_no_autograd_entry_points_match_autograd_and_write_dgate_in_place(activation, use_kernel, monkeypatch):
    """glu_forward / glu_backward (used by the fused LoRA MLP): the same kernels without autograd, or fp32 torch
    math where Triton does not run; dgate may be written over the incoming gradient's buffer."""
    from fms_acceleration_accelerate_kernels import glu as glu_module
    from fms_acceleration_accelerate_kernels.glu import activation_code, glu_backward, glu_forward

    if not use_kernel:
        monkeypatch.setattr(glu_module, "use_triton", lambda *tensors: False)
    torch.manual_seed(0)
    device = device_for_tests()
    gate, up, dout = (torch.randn(5, 2100, device=device) * 2 for _ in range(3))
    code = activation_code(*activation)
    g_ref, u_ref = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    ref = swiglu_ref(g_ref, u_ref) if activation[0] == "silu" else geglu_ref(g_ref, u_ref, activation[1])
    ref.backward(dout)
    torch.testing.assert_close(glu_forward(gate, up, code), ref.detach(), atol=1e-5, rtol=1e-5)
    buffer = dout.clone()
    dgate, dup = glu_backward(buffer, gate, up, code, dgate_out=buffer)
    assert dgate.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(dgate, g_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dup, u_ref.grad, atol=1e-5, rtol=1e-5)
    dgate_new, _ = glu_backward(dout, gate, up, code)
    assert dgate_new.data_ptr() != dout.data_ptr()
    torch.testing.assert_close(dgate_new, g_ref.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dgate_out must be"):
        glu_backward(dout, gate, up, code, dgate_out=dout.t().contiguous().t())
    with pytest.raises(ValueError, match="'silu' or 'gelu'"):
        activation_code("relu")
