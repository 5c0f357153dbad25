"""Fused LoRA GeGLU MLP (``lora_mlp_geglu``) against its pure-torch reference, over bf16 and bnb nf4 bases.

Both GELU forms (tanh, erf) are covered, through the Triton activation kernels (CUDA or TRITON_INTERPRET=1) and
through the torch fallback; the memory checks mirror the SwiGLU ones in test_lora_fused.py.
"""

from __future__ import annotations

import fms_acceleration_accelerate_kernels as K
import pytest
import torch
import torch.nn.functional as F
from fms_acceleration_accelerate_kernels import glu as glu_module
from fms_acceleration_accelerate_kernels.glu import activation_code, glu_backward, glu_forward
from fms_acceleration_accelerate_kernels.lora import LoraProjection, lora_mlp_geglu, lora_mlp_geglu_ref

from tests.kernels.harness import check_against_reference
from tests.kernels.test_lora_fused import DEVICE, _saved_numels, _tokens, lora_weights, make_base, weight_of

pytest.importorskip("bitsandbytes")

HIDDEN, INTER, R = 64, 96, 8


def _mlp(fn, lora_on):
    def run(x, gA, gB, uA, uB, dA, dB, gate_base, up_base, down_base, scaling, approximate):
        gate_w, up_w, down_w = weight_of(gate_base), weight_of(up_base), weight_of(down_base)
        gate = LoraProjection(gate_w, gA, gB, scaling) if "gate" in lora_on else LoraProjection(gate_w)
        up = LoraProjection(up_w, uA, uB, scaling) if "up" in lora_on else LoraProjection(up_w)
        down = LoraProjection(down_w, dA, dB, scaling) if "down" in lora_on else LoraProjection(down_w)
        return fn(x, gate, up, down, approximate=approximate)

    return run


def _check(base_kind, lora_on, approximate, dtype=torch.bfloat16):
    gate_base = make_base(base_kind, HIDDEN, INTER, seed=140)
    up_base = make_base(base_kind, HIDDEN, INTER, seed=141)
    down_base = make_base(base_kind, INTER, HIDDEN, seed=142)
    ga, gb = lora_weights(HIDDEN, INTER, R, 143)
    ua, ub = lora_weights(HIDDEN, INTER, R, 144)
    da, db = lora_weights(INTER, HIDDEN, R, 145)
    grads = ("x", "dA", "dB") + (("gA", "gB", "uA", "uB") if "gate" in lora_on else ())
    check_against_reference(
        _mlp(lora_mlp_geglu_ref, lora_on),
        _mlp(lora_mlp_geglu, lora_on),
        # x scaled so that outputs are O(1): bf16 tolerances are absolute as well as relative
        inputs=dict(x=_tokens(3, 7, HIDDEN, seed=146) * 0.25, gA=ga, gB=gb, uA=ua, uB=ub, dA=da, dB=db),
        kwargs=dict(gate_base=gate_base, up_base=up_base, down_base=down_base, scaling=2.0, approximate=approximate),
        dtype=dtype,
        grad_inputs=grads,
    )


@pytest.mark.parametrize("base_kind", ["dense_bf16", "nf4_double_quant"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("lora_on", [("gate", "up", "down"), ("down",)], ids=["all", "down_only"])
def test_lora_mlp_geglu_matches_reference(base_kind, approximate, lora_on):
    _check(base_kind, lora_on, approximate)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_lora_mlp_geglu_torch_fallback_matches_reference(monkeypatch, approximate):
    """The activation without Triton (CPU without TRITON_INTERPRET): fp32 torch math, same results."""
    calls = []

    def no_triton(*tensors):
        calls.append(len(tensors))
        return False

    monkeypatch.setattr(glu_module, "use_triton", no_triton)  # the fused MLP's activation runs in glu.py
    _check("dense_bf16", ("gate", "up", "down"), approximate, dtype=torch.float32)
    assert calls, "the patched dispatch rule was not consulted"


def test_geglu_is_not_swiglu_and_each_gelu_form_is_honoured():
    x = (_tokens(5, HIDDEN, seed=150) * 0.25).to(DEVICE, torch.bfloat16)
    bases = [make_base("dense_bf16", i, o, seed=151 + k) for k, (i, o) in enumerate([(64, 96), (64, 96), (96, 64)])]
    specs = [LoraProjection(weight_of(b)) for b in bases]
    geglu = lora_mlp_geglu(x, *specs, approximate="none").float()
    swiglu = K.lora_mlp_swiglu(x, *specs).float()
    assert not torch.allclose(swiglu, geglu, atol=1e-2)
    # tanh and erf GELU differ by < 1e-3: check the activation kernels (Triton here when TRITON_INTERPRET=1 or
    # CUDA, else torch) in fp32 against torch's gelu and its autograd, forward and backward
    gen = torch.Generator().manual_seed(152)
    g, u, dh = (torch.randn(4, 96, generator=gen).mul(3.0).to(DEVICE) for _ in range(3))
    tanh_code, erf_code = activation_code("gelu", "tanh"), activation_code("gelu", "none")
    for code, approximate in ((tanh_code, "tanh"), (erf_code, "none")):
        g_ref, u_ref = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
        want = F.gelu(g_ref, approximate=approximate) * u_ref
        want.backward(dh)
        torch.testing.assert_close(glu_forward(g, u, code), want.detach(), atol=1e-5, rtol=1e-5)
        buffer = dh.clone()
        dgate, dup = glu_backward(buffer, g, u, code, dgate_out=buffer)  # dgate written over the incoming grad
        torch.testing.assert_close(dgate, g_ref.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dup, u_ref.grad, atol=1e-5, rtol=1e-5)
    tanh_act = glu_forward(g, u, tanh_code)
    assert not torch.allclose(tanh_act, glu_forward(g, u, erf_code), atol=1e-5, rtol=0)


def test_geglu_backward_saves_no_dense_weight_and_is_repeatable():
    tokens = 3
    gate, up = (weight_of(make_base("nf4_double_quant", HIDDEN, INTER, seed=160 + i)) for i in range(2))
    down = weight_of(make_base("nf4_double_quant", INTER, HIDDEN, seed=162))
    a, b = (t.to(DEVICE, torch.bfloat16).requires_grad_(True) for t in lora_weights(HIDDEN, INTER, 4, 163))
    x = _tokens(tokens, HIDDEN, seed=164).to(DEVICE, torch.bfloat16).requires_grad_(True)

    def run():
        return lora_mlp_geglu(x, LoraProjection(gate, a, b, 1.0), LoraProjection(up), LoraProjection(down))

    saved = _saved_numels(run)
    assert HIDDEN * INTER not in saved, f"a dense (out, in) weight was saved for backward: {saved}"
    assert sum(saved) <= tokens * HIDDEN + 2 * tokens * INTER + 2 * 4 * INTER + tokens * 4 + 64
    y = run()
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, a, b], g, retain_graph=True)
    second = torch.autograd.grad(y, [x, a, b], g)
    for p, q in zip(first, second):
        assert torch.equal(p, q)


def test_bad_approximate_is_refused_and_exports_exist():
    base = weight_of(make_base("dense_bf16", HIDDEN, INTER, seed=170))
    down = weight_of(make_base("dense_bf16", INTER, HIDDEN, seed=171))
    x = torch.randn(2, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    specs = (LoraProjection(base), LoraProjection(base), LoraProjection(down))
    with pytest.raises(ValueError, match="'tanh' or 'none'"):
        lora_mlp_geglu(x, *specs, approximate="sigmoid")
    with pytest.raises(ValueError, match="'tanh' or 'none'"):
        lora_mlp_geglu_ref(x, *specs, approximate="erf")
    assert K.lora_mlp_geglu is lora_mlp_geglu and K.lora_mlp_geglu_ref is lora_mlp_geglu_ref
    assert "lora_mlp_geglu" in K.__all__ and "lora_mlp_geglu_ref" in K.__all__
