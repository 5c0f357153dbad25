"""Dispatch rule (reference on CPU without TRITON_INTERPRET) and torch.compile / custom-op registration."""

import os
import subprocess
import sys

import fms_acceleration_accelerate_kernels as K
import pytest
import torch
from fms_acceleration_accelerate_kernels._utils import use_triton

from tests.kernels.harness import device_for_tests

DISPATCH_SCRIPT = r"""
import torch
from unittest import mock
import fms_acceleration_accelerate_kernels as K
import importlib
# the package re-exports functions named like their modules: fetch the modules themselves
rms_mod, rope_mod, glu_mod, ce_mod, flce_mod = (
    importlib.import_module("fms_acceleration_accelerate_kernels." + m)
    for m in ("rms_norm", "rope", "glu", "cross_entropy", "fused_linear_cross_entropy")
)

def boom(*a, **k):
    raise AssertionError("Triton path taken on CPU without TRITON_INTERPRET")

x = torch.randn(3, 8)
t = torch.tensor([1, 2, -100])
with mock.patch.object(rms_mod, "rms_norm_triton", boom), mock.patch.object(rope_mod, "rope_triton", boom), \
     mock.patch.object(glu_mod, "swiglu_triton", boom), mock.patch.object(glu_mod, "geglu_triton", boom), \
     mock.patch.object(ce_mod, "cross_entropy_triton", boom), \
     mock.patch.object(flce_mod, "fused_linear_cross_entropy_triton", boom):
    torch.testing.assert_close(K.rms_norm(x, torch.ones(8)), K.rms_norm_ref(x, torch.ones(8)))
    q = torch.randn(1, 2, 3, 8)
    K.rope(q, q, torch.randn(3, 8), torch.randn(3, 8))
    K.swiglu(x, x); K.geglu(x, x)
    K.cross_entropy(x, t)
    K.fused_linear_cross_entropy(x, torch.randn(5, 8), t)
print("reference-ok")
"""


def test_dispatch_uses_reference_on_cpu_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, "-c", DISPATCH_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference-ok" in result.stdout


def test_use_triton_rule(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(cpu)
    assert not use_triton()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu, None)


def test_public_api_exports_pairs():
    for op in ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy"):
        for suffix in ("", "_ref", "_triton"):
            assert callable(getattr(K, op + suffix)), op + suffix
    assert callable(K.apply_rotary_pos_emb)


def _model_step(x, w, q, k, cos, sin, gate, up, lm_w, target):
    h = K.rms_norm_triton(x, w, 1e-6, 0.0)
    qr, kr = K.rope_triton(q, k, cos, sin)
    m = K.swiglu_triton(gate, up) + K.geglu_triton(gate, up)
    ce = K.cross_entropy_triton(h @ lm_w.t(), target)
    flce = K.fused_linear_cross_entropy_triton(h, lm_w, target)
    return ce + flce + qr.sum() + kr.sum() + m.sum()


def test_torch_compile_fullgraph_matches_eager():
    """The custom ops trace into one graph (aot_eager backend: no C++ toolchain needed) with equal results."""
    torch.manual_seed(0)
    device = device_for_tests()
    args = [
        torch.randn(4, 16), torch.rand(16) + 0.5, torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8),
        torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 24), torch.randn(4, 24), torch.randn(40, 16) * 0.2,
    ]  # fmt: skip
    args = [a.to(device).requires_grad_(i not in (4, 5)) for i, a in enumerate(args)]
    target = torch.tensor([1, -100, 7, 39], device=device)

    eager = _model_step(*args, target)
    eager.backward()
    eager_grads = [a.grad.clone() if a.grad is not None else None for a in args]
    for a in args:
        a.grad = None

    torch._dynamo.reset()
    compiled = torch.compile(_model_step, backend="aot_eager", fullgraph=True)(*args, target)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for a, g in zip(args, eager_grads):
        if g is not None:
            torch.testing.assert_close(a.grad, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op_name", ["rms_norm_fwd", "glu_fwd", "rope", "cross_entropy_rows"])
def test_custom_op_registration_passes_opcheck(op_name):
    device = device_for_tests()
    x = torch.randn(3, 8, device=device, requires_grad=True)
    op = getattr(torch.ops.fms_accel_kernels, op_name).default
    samples = {
        "rms_norm_fwd": (x, torch.rand(8, device=device, requires_grad=True), 1e-6, 1.0),
        "glu_fwd": (x, torch.randn(3, 8, device=device, requires_grad=True), 0),
        "rope": (torch.randn(1, 2, 3, 8, device=device, requires_grad=True), torch.randn(1, 1, 3, 8, device=device),
                 torch.randn(1, 3, 8, device=device), torch.randn(1, 3, 8, device=device), False),
        "cross_entropy_rows": (x, torch.tensor([0, 5, -100], device=device), -100, None, 1.0, 0.0),
    }  # fmt: skip
    torch.library.opcheck(
        op, samples[op_name], test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )
