"""Fused LoRA functions (lora.py) against their pure-torch references and bitsandbytes.

Forward and the gradients of x, lora_A, lora_B (and a trainable bias) are compared through the shared harness,
over a bf16 weight and over the packed weights of real bitsandbytes ``Linear4bit`` layers (nf4 double-quant, fp4)
that bitsandbytes 0.50 quantises on CPU, passed as the kernels' weight formats (``DenseWeight``,
``Bnb4bitWeight``). Odd token counts and mixed adapter / no-adapter projections are covered. Reading PEFT layers
is the fused-ops plugin's part (tests/plugins/fused_ops/test_peft_reading.py).
"""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_kernels.dequant import DenseWeight, QuantizedWeight
from fms_acceleration_accelerate_kernels.lora import (
    LoraProjection,
    lora_linear,
    lora_linear_ref,
    lora_mlp_swiglu,
    lora_mlp_swiglu_ref,
    lora_qkv,
    lora_qkv_ref,
    quantized_linear,
    quantized_linear_ref,
)
from torch import nn

from tests.kernels.harness import DTYPE_TOLERANCES, Tolerance, check_against_reference, device_for_tests
from tests.kernels.test_nf4_dequant import bnb_weight, make_bnb_linear

bnb = pytest.importorskip("bitsandbytes")

DEVICE = device_for_tests()
BASES = ["dense_bf16", "nf4_double_quant", "fp4"]


def make_base(kind: str, in_features: int, out_features: int, bias: bool = False, seed: int = 0) -> nn.Module:
    """A frozen base layer of the given kind (bf16 compute dtype)."""
    if kind == "dense_bf16":
        torch.manual_seed(seed)
        layer = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16, device=DEVICE)
        with torch.no_grad():
            layer.weight.mul_(4.0)
        return layer.requires_grad_(False)
    quant_type, nested = {"nf4_double_quant": ("nf4", True), "fp4": ("fp4", False)}[kind]
    layer, _ = make_bnb_linear(in_features, out_features, quant_type=quant_type, nested=nested, bias=bias, seed=seed)
    return layer.requires_grad_(False)


def weight_of(layer: nn.Module) -> QuantizedWeight:
    """The weight format of a test base layer, as the kernels take it: packed 4-bit or dense."""
    if getattr(layer.weight, "quant_state", None) is not None:
        return bnb_weight(layer)
    return DenseWeight(layer.weight)


def lora_weights(in_features: int, out_features: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, in_features, generator=gen) / in_features**0.5
    b = torch.randn(out_features, r, generator=gen) / r**0.5
    return a, b


def _tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ one projection


@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lora_linear_matches_reference(base_kind, dtype):
    base = make_base(base_kind, 128, 96, bias=True, seed=1)
    a, b = lora_weights(128, 96, 8, seed=2)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(3))
    check_against_reference(
        lora_linear_ref,
        lora_linear,
        inputs=dict(x=_tokens(3, 7, 128), lora_A=a, lora_B=b, bias=bias),  # 21 tokens
        kwargs=dict(base=weight_of(base), scaling=2.0),
        dtype=dtype,
        grad_inputs=("x", "lora_A", "lora_B", "bias"),
        # a 4-bit base dequantised in fp32 (reference) vs in the dtype under test differ by its rounding
        tolerance=None if dtype != torch.float32 or base_kind == "dense_bf16" else Tolerance(1e-2, 1e-2),
    )


@pytest.mark.parametrize("base_kind", BASES)
def test_quantized_linear_matches_reference_and_bitsandbytes(base_kind):
    base = make_base(base_kind, 128, 64, bias=True, seed=4)
    check_against_reference(
        quantized_linear_ref,
        quantized_linear,
        inputs=dict(x=_tokens(5, 128)),
        kwargs=dict(base=weight_of(base), bias=base.bias),
        dtype=torch.bfloat16,
        grad_inputs=("x",),
    )
    if base_kind == "dense_bf16":
        return
    # the layer's own forward/backward (bitsandbytes' matmul_4bit) gives the same output and input gradient
    x = _tokens(5, 128, seed=5).to(DEVICE, torch.bfloat16).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = quantized_linear(x, weight_of(base), base.bias)
    y_ref = base(x_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = DTYPE_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y, y_ref, atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=4 * tol.atol, rtol=4 * tol.rtol)


# ------------------------------------------------------------------------------------------------- QKV


def _qkv_impl(fn):
    def run(x, qA, qB, vA, vB, q_base, k_base, v_base, scaling):
        q = LoraProjection(weight_of(q_base), qA, qB, scaling)
        k = LoraProjection(weight_of(k_base))  # no adapter on k: a frozen projection inside the same fused call
        v = LoraProjection(weight_of(v_base), vA, vB, scaling / 2)
        return torch.cat(fn(x, q, k, v), dim=-1)  # compare all three outputs (and their gradients)

    return run


@pytest.mark.parametrize("base_kind", BASES)
def test_lora_qkv_matches_reference(base_kind):
    hidden, q_out, kv_out, r = 128, 128, 32, 8
    q_base = make_base(base_kind, hidden, q_out, seed=10)
    k_base = make_base(base_kind, hidden, kv_out, seed=11)
    v_base = make_base(base_kind, hidden, kv_out, seed=12)
    qa, qb = lora_weights(hidden, q_out, r, seed=13)
    va, vb = lora_weights(hidden, kv_out, 4, seed=14)  # different rank
    check_against_reference(
        _qkv_impl(lora_qkv_ref),
        _qkv_impl(lora_qkv),
        inputs=dict(x=_tokens(3, 5, hidden, seed=15), qA=qa, qB=qb, vA=va, vB=vb),
        kwargs=dict(q_base=q_base, k_base=k_base, v_base=v_base, scaling=2.0),
        dtype=torch.bfloat16,
        grad_inputs=("x", "qA", "qB", "vA", "vB"),
    )


def test_lora_qkv_with_unused_output_gives_correct_grads():
    q_base, k_base, v_base = (make_base("nf4_double_quant", 64, n, seed=20 + n) for n in (64, 32, 32))
    qa, qb = lora_weights(64, 64, 4, 30)
    ka, kb = lora_weights(64, 32, 4, 31)
    va, vb = lora_weights(64, 32, 4, 32)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in (qa, qb, ka, kb, va, vb)]
    x = _tokens(7, 64, seed=33).to(DEVICE).requires_grad_(True)

    def specs(ts):
        return (
            LoraProjection(weight_of(q_base), ts[0], ts[1], 1.5),
            LoraProjection(weight_of(k_base), ts[2], ts[3], 1.5),
            LoraProjection(weight_of(v_base), ts[4], ts[5], 1.5),
        )

    q, _, v = lora_qkv(x, *specs(leaves))  # k unused: its gradient arrives as None
    (q.sum() + (v * v).sum()).backward()
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    x_ref = x.detach().clone().requires_grad_(True)
    q_r, _, v_r = lora_qkv_ref(x_ref, *specs(ref_leaves))
    (q_r.sum() + (v_r * v_r).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    for i, (got, want) in enumerate(zip(leaves, ref_leaves)):
        if i in (2, 3):
            assert got.grad is None or torch.count_nonzero(got.grad) == 0
            continue
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- MLP


def _mlp_impl(fn, lora_on=("gate", "up", "down")):
    def run(x, gA, gB, uA, uB, dA, dB, gate_base, up_base, down_base, scaling):
        gate_w, up_w, down_w = weight_of(gate_base), weight_of(up_base), weight_of(down_base)
        gate = LoraProjection(gate_w, gA, gB, scaling) if "gate" in lora_on else LoraProjection(gate_w)
        up = LoraProjection(up_w, uA, uB, scaling) if "up" in lora_on else LoraProjection(up_w)
        down = LoraProjection(down_w, dA, dB, scaling) if "down" in lora_on else LoraProjection(down_w)
        return fn(x, gate, up, down)

    return run


@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("lora_on", [("gate", "up", "down"), ("down",)], ids=["all", "down_only"])
def test_lora_mlp_swiglu_matches_reference(base_kind, lora_on):
    hidden, inter, r = 64, 96, 8
    gate_base = make_base(base_kind, hidden, inter, seed=40)
    up_base = make_base(base_kind, hidden, inter, seed=41)
    down_base = make_base(base_kind, inter, hidden, seed=42)
    ga, gb = lora_weights(hidden, inter, r, 43)
    ua, ub = lora_weights(hidden, inter, r, 44)
    da, db = lora_weights(inter, hidden, r, 45)
    grads = ("x", "dA", "dB") + (("gA", "gB", "uA", "uB") if "gate" in lora_on else ())
    # x scaled so that outputs are O(1): bf16 tolerances are absolute as well as relative
    check_against_reference(
        _mlp_impl(lora_mlp_swiglu_ref, lora_on),
        _mlp_impl(lora_mlp_swiglu, lora_on),
        inputs=dict(x=_tokens(3, 7, hidden, seed=46) * 0.25, gA=ga, gB=gb, uA=ua, uB=ub, dA=da, dB=db),
        kwargs=dict(gate_base=gate_base, up_base=up_base, down_base=down_base, scaling=2.0),
        dtype=torch.bfloat16,
        grad_inputs=grads,
    )


def test_lora_mlp_backward_twice_with_retain_graph_is_stable():
    bases = [
        weight_of(make_base("nf4_double_quant", i, o, seed=50 + k))
        for k, (i, o) in enumerate([(64, 96), (64, 96), (96, 64)])
    ]
    tensors = [t.to(DEVICE, torch.bfloat16).requires_grad_(True) for t in lora_weights(64, 96, 4, 53)]
    x = _tokens(6, 64, seed=54).to(DEVICE, torch.bfloat16).requires_grad_(True)
    y = lora_mlp_swiglu(x, LoraProjection(bases[0], *tensors, 2.0), LoraProjection(bases[1]), LoraProjection(bases[2]))
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, *tensors], g, retain_graph=True)
    second = torch.autograd.grad(y, [x, *tensors], g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- memory behaviour


def _saved_numels(fn) -> list[int]:
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_backward_saves_no_dense_weight():
    hidden, inter, tokens = 64, 128, 3
    gate, up = (weight_of(make_base("nf4_double_quant", hidden, inter, seed=60 + i)) for i in range(2))
    down = weight_of(make_base("nf4_double_quant", inter, hidden, seed=62))
    a, b = (t.to(DEVICE, torch.bfloat16).requires_grad_(True) for t in lora_weights(hidden, inter, 4, 63))
    x = _tokens(tokens, hidden, seed=64).to(DEVICE, torch.bfloat16).requires_grad_(True)
    dense_numel = hidden * inter

    saved = _saved_numels(
        lambda: lora_mlp_swiglu(x, LoraProjection(gate, a, b, 1.0), LoraProjection(up), LoraProjection(down))
    )
    assert dense_numel not in saved, f"a dense (out, in) weight was saved for backward: {saved}"
    # x, gate, up, x A^T, the (empty) down LoRA slot and A/B: nothing grows with the weight
    assert sum(saved) <= tokens * hidden + 2 * tokens * inter + 2 * 4 * inter + tokens * 4 + 64
    saved = _saved_numels(lambda: lora_linear(x, gate, a, b, 1.0))
    assert dense_numel not in saved
    saved_ref = _saved_numels(lambda: lora_linear_ref(x, gate, a, b, 1.0))
    assert dense_numel in saved_ref  # the reference does keep the dense weight: the check can tell the difference


def test_backward_casts_no_adapter_weight():
    """fp32 adapters (PEFT's default under a bf16 model): A and B are cast to the compute dtype once, in forward,
    and saved; the backward only casts the adapter gradients back to fp32 (one cast per gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default:
                self.seen.append((args[0].dtype, out.dtype))
            return out

    hidden, outs, r = 64, (64, 32, 32), 4
    bases = [weight_of(make_base("dense_bf16", hidden, n, seed=80 + n)) for n in outs]
    leaves = []
    for i, n in enumerate(outs):
        leaves += [t.to(DEVICE, torch.float32).requires_grad_(True) for t in lora_weights(hidden, n, r, 90 + i)]
    x = _tokens(5, hidden, seed=95).to(DEVICE, torch.bfloat16).requires_grad_(True)
    specs = [LoraProjection(bases[i], leaves[2 * i], leaves[2 * i + 1], 2.0) for i in range(3)]
    q, k, v = lora_qkv(x, *specs)
    loss = (q * q).sum() + k.sum() + v.sum()  # bf16 throughout: the loss's backward casts nothing
    casts = Casts()
    with casts:
        loss.backward()
    assert (torch.float32, torch.bfloat16) not in casts.seen, f"the backward cast fp32 weights again: {casts.seen}"
    assert casts.seen.count((torch.bfloat16, torch.float32)) == 6  # dA, dB of three adapters
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


# ---------------------------------------------------------------------------------- refusals and options


def test_trainable_dense_base_and_bad_shapes_are_refused():
    layer = nn.Linear(16, 8, dtype=torch.bfloat16, device=DEVICE)  # requires grad: full fine-tuning
    x = torch.randn(2, 16, dtype=torch.bfloat16, device=DEVICE)
    a, b = lora_weights(16, 8, 2, 80)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight_of(layer), a.to(DEVICE), b.to(DEVICE), 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, layer.weight, a.to(DEVICE), b.to(DEVICE), 1.0)
    layer.requires_grad_(False)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear(x, weight_of(layer), b.t().contiguous().to(DEVICE), a.t().contiguous().to(DEVICE), 1.0)
    with pytest.raises(ValueError, match="input has 15 features"):
        lora_linear(x[:, :15], weight_of(layer), a.to(DEVICE), b.to(DEVICE), 1.0)
    with pytest.raises(ValueError, match="both be given"):
        LoraProjection(weight_of(layer), a, None)
    with pytest.raises(TypeError, match="weight tensor or a QuantizedWeight"):
        lora_linear(x, layer, a.to(DEVICE), b.to(DEVICE), 1.0)  # modules are the plugins' to read


def test_fsdp1_orig_param_views_of_a_mixed_flat_parameter_are_treated_as_frozen():
    """FSDP1 with use_orig_params: inside the forward, the frozen base weight is a plain tensor *view* of a flat
    parameter that requires grad (it also holds the LoRA weights). The fused kernel must run, give the LoRA
    gradients of the reference, and leave the frozen segment's gradient zero."""
    torch.manual_seed(0)
    out_f, in_f, r = 8, 16, 2
    weight = torch.randn(out_f, in_f, dtype=torch.float32)
    a, b = lora_weights(in_f, out_f, r, 81)
    flat = nn.Parameter(torch.cat([weight.flatten(), a.flatten(), b.flatten()]).to(DEVICE))
    n_w, n_a = weight.numel(), a.numel()
    layer = nn.Linear(in_f, out_f, bias=False, device=DEVICE)
    del layer.weight
    layer.weight = flat[:n_w].view(out_f, in_f)  # what FSDP1 sets during forward: a view, not a Parameter
    a_view = flat[n_w : n_w + n_a].view(r, in_f)
    b_view = flat[n_w + n_a :].view(out_f, r)
    x = torch.randn(3, in_f, device=DEVICE)

    lora_linear(x, weight_of(layer), a_view, b_view, 0.5).square().sum().backward()

    a_ref, b_ref = a.clone().to(DEVICE).requires_grad_(), b.clone().to(DEVICE).requires_grad_()
    lora_linear_ref(x, weight.to(DEVICE), a_ref, b_ref, 0.5).square().sum().backward()
    torch.testing.assert_close(flat.grad[n_w : n_w + n_a].view(r, in_f), a_ref.grad)
    torch.testing.assert_close(flat.grad[n_w + n_a :].view(out_f, r), b_ref.grad)
    assert torch.count_nonzero(flat.grad[:n_w]) == 0


def test_autocast_runs_in_the_autocast_dtype():
    base = weight_of(make_base("nf4_double_quant", 64, 32, seed=90))
    a, b = (t.to(DEVICE).requires_grad_(True) for t in lora_weights(64, 32, 4, 91))
    x = _tokens(5, 64, seed=92).to(DEVICE).requires_grad_(True)  # fp32 activations, fp32 adapters
    with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
        y = lora_linear(x, base, a, b, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    y_ref = lora_linear_ref(x.detach(), base, a.detach(), b.detach(), 2.0)
    tol = DTYPE_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y.float(), y_ref, atol=tol.atol, rtol=tol.rtol)


# ------------------------------------------------------------------------------------------------ GPU tier

_8B = dict(hidden=4096, q=4096, kv=1024, inter=14336, tokens=4 * 2048, r=16)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _gpu_case(fn, ref, inputs: dict, grad_names, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    ref_leaves = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    out_ref = ref(**ref_leaves, **kwargs)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    errs = {"out": _rel_err(out, out_ref)}
    errs.update({k: _rel_err(leaves[k].grad, ref_leaves[k].grad) for k in grad_names})
    return errs


@pytest.mark.gpu
@pytest.mark.parametrize("base_kind", ["dense_bf16", "nf4_double_quant"])
def test_gpu_8b_shapes(base_kind):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    s = _8B
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * scale

    x = rand(s["tokens"], s["hidden"])
    bases = {
        "q": make_base(base_kind, s["hidden"], s["q"], seed=1),
        "k": make_base(base_kind, s["hidden"], s["kv"], seed=2),
        "v": make_base(base_kind, s["hidden"], s["kv"], seed=3),
        "o": make_base(base_kind, s["q"], s["hidden"], seed=4),
    }
    lora = {
        n: (rand(s["r"], s["hidden"], scale=s["hidden"] ** -0.5), rand(bases[n].out_features, s["r"], scale=0.25))
        for n in bases
    }
    errs = _gpu_case(
        _qkv_impl(lora_qkv),
        _qkv_impl(lora_qkv_ref),
        dict(x=x, qA=lora["q"][0], qB=lora["q"][1], vA=lora["v"][0], vB=lora["v"][1]),
        ("x", "qA", "qB", "vA", "vB"),
        q_base=bases["q"], k_base=bases["k"], v_base=bases["v"], scaling=2.0,
    )  # fmt: skip
    assert max(errs.values()) < 2e-2, errs
    o_base = weight_of(bases["o"])
    errs = _gpu_case(
        lambda x, a, b: lora_linear(x, o_base, a, b, 2.0),
        lambda x, a, b: lora_linear_ref(x, o_base, a, b, 2.0),
        dict(x=x, a=lora["o"][0], b=lora["o"][1]),
        ("x", "a", "b"),
    )
    assert max(errs.values()) < 2e-2, errs
    bases = lora = o_base = None  # free the attention layers before the MLP
    torch.cuda.empty_cache()
    mlp = [
        make_base(base_kind, s["hidden"], s["inter"], seed=5),
        make_base(base_kind, s["hidden"], s["inter"], seed=6),
        make_base(base_kind, s["inter"], s["hidden"], seed=7),
    ]
    errs = _gpu_case(
        _mlp_impl(lora_mlp_swiglu),
        _mlp_impl(lora_mlp_swiglu_ref),
        dict(
            x=x,
            gA=rand(s["r"], s["hidden"], scale=s["hidden"] ** -0.5), gB=rand(s["inter"], s["r"], scale=0.25),
            uA=rand(s["r"], s["hidden"], scale=s["hidden"] ** -0.5), uB=rand(s["inter"], s["r"], scale=0.25),
            dA=rand(s["r"], s["inter"], scale=s["inter"] ** -0.5), dB=rand(s["hidden"], s["r"], scale=0.25),
        ),
        ("x", "gA", "gB", "uA", "uB", "dA", "dB"),
        gate_base=mlp[0], up_base=mlp[1], down_base=mlp[2], scaling=2.0,
    )  # fmt: skip
    assert max(errs.values()) < 2e-2, errs
