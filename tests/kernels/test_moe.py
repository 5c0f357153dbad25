"""MoE expert kernels vs their torch references and vs transformers' eager experts modules.

Shapes are small and odd (T=37 tokens, H=48, I=40) so every kernel runs several row tiles, column tiles and K
tiles with tails in the Triton interpreter; routing leaves some experts empty; top-k 1/2/4 with 5 experts and
top-8 with 10. Forward and every gradient (hidden states, both weight stacks, biases, routing weights)."""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_kernels import moe as M
from fms_acceleration_accelerate_kernels.moe import (
    GemmLaunch,
    MoERouting,
    moe_experts,
    moe_experts_ref,
    moe_experts_triton,
    moe_route,
    moe_route_ref,
)

from tests.kernels.harness import device_for_tests

T, H, I = 37, 48, 40  # noqa: E741
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-1, rtol=5e-2)}


def _routing(n_tokens, n_experts, top_k, empty=(), sentinels=0, seed=0):
    """Distinct experts per token (as top-k gives), never the ``empty`` ones; ``sentinels`` slots set to ids >= E."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(n_experts) if e not in empty])
    rows = [allowed[torch.randperm(allowed.numel(), generator=g)[:top_k]] for _ in range(n_tokens)]
    index = torch.stack(rows)
    if sentinels:
        flat = index.view(-1)
        pick = torch.randperm(flat.numel(), generator=g)[:sentinels]
        flat[pick] = n_experts + torch.randint(0, 3, (sentinels,), generator=g)
    weights = torch.rand(n_tokens, top_k, generator=g) + 0.1
    return index, weights


def _inputs(n_experts, top_k, transposed=False, bias=False, empty=(), sentinels=0, hidden=H, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    index, weights = _routing(T, n_experts, top_k, empty, sentinels, seed)
    gate_up_shape = (n_experts, hidden, 2 * I) if transposed else (n_experts, 2 * I, hidden)
    down_shape = (n_experts, I, hidden) if transposed else (n_experts, hidden, I)
    tensors = dict(
        hidden=torch.randn(T, hidden, generator=g),
        top_k_weights=weights,
        gate_up=torch.randn(gate_up_shape, generator=g) * hidden**-0.5,
        down=torch.randn(down_shape, generator=g) * I**-0.5,
    )
    if bias:
        tensors["gate_up_bias"] = torch.randn(n_experts, 2 * I, generator=g) * 0.3
        tensors["down_bias"] = torch.randn(n_experts, hidden, generator=g) * 0.3
    return index, tensors


def _run(fn, index, tensors, dtype, upstream, **kwargs):
    device = device_for_tests()
    leaves = {n: t.detach().to(device, dtype).clone().requires_grad_(True) for n, t in tensors.items()}
    out = fn(top_k_index=index.to(device), **leaves, **kwargs)
    out.backward(upstream.to(device, out.dtype))
    return out.detach().float().cpu(), {n: t.grad.float().cpu() for n, t in leaves.items()}


def _compare(index, tensors, dtype, kwargs=None, tol=None, grad_tol=None):
    kwargs = kwargs or {}
    upstream = torch.randn(T, tensors["hidden"].shape[1], generator=torch.Generator().manual_seed(7))
    ref_out, ref_grads = _run(moe_experts_ref, index, tensors, torch.float32, upstream, **kwargs)
    out, grads = _run(moe_experts_triton, index, tensors, dtype, upstream, **kwargs)
    torch.testing.assert_close(out, ref_out, **(tol or TOL[dtype]), msg=lambda m: f"forward: {m}")
    for name, ref in ref_grads.items():
        torch.testing.assert_close(
            grads[name], ref, **(grad_tol or GRAD_TOL[dtype]), msg=lambda m, n=name: f"d{n}: {m}"
        )
    return out, grads


# ------------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("top_k,n_experts,sentinels", [(1, 5, 0), (2, 5, 3), (4, 5, 0), (8, 10, 7)])
def test_route_matches_reference(top_k, n_experts, sentinels):
    index, _ = _routing(T, n_experts, top_k, empty=(1,), sentinels=sentinels)
    routing, ref = moe_route(index, n_experts), moe_route_ref(index, n_experts)
    for name in ("perm", "inv_perm", "tokens_per_expert", "offsets"):
        assert torch.equal(getattr(routing, name), getattr(ref, name)), name
    ids = index.view(-1)
    assert routing.tokens_per_expert[1] == 0
    assert int(routing.offsets[-1]) == int((ids < n_experts).sum())
    sorted_ids = ids[routing.perm.long()]
    assert torch.all(sorted_ids[1:] >= sorted_ids[:-1])  # expert order, sentinels last
    assert torch.equal(routing.perm.long()[routing.inv_perm.long()], torch.arange(ids.numel()))


def test_route_rejects_bad_index():
    with pytest.raises(ValueError, match="negative expert ids"):
        moe_route(torch.tensor([[0, -1]]), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        moe_route(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="2-D"):
        moe_route(torch.zeros(3, dtype=torch.long), 4)


# ------------------------------------------------------------------------------------------ full op vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k,n_experts", [(1, 5), (2, 5), (4, 5), (8, 10)], ids=lambda v: str(v))
def test_experts_match_reference(top_k, n_experts, dtype):
    empty = (3,) if n_experts == 5 else (0, 7)
    index, tensors = _inputs(n_experts, top_k, empty=empty)
    assert not torch.isin(torch.tensor(empty), index).any()  # some experts get no token
    _compare(index, tensors, dtype)


@pytest.mark.parametrize(
    "kwargs,transposed,bias",
    [
        (dict(act="gelu_tanh", gate_first=False), False, False),
        (dict(act="gelu", interleaved=True, transposed=True), True, True),
        (dict(act="silu", interleaved=True, gate_first=False), False, True),
    ],
    ids=["gelu_tanh-up_first", "gelu-interleaved-transposed-bias", "silu-interleaved-up_first-bias"],
)
def test_experts_layouts_activations_and_biases(kwargs, transposed, bias):
    index, tensors = _inputs(5, 2, transposed=transposed, bias=bias, empty=(2,))
    _compare(index, tensors, torch.float32, kwargs)


def test_mixed_dtypes_and_strided_weights():
    """bf16 experts with fp32 routing weights (a router that keeps its softmax in fp32), and weight stacks that are
    strided views (a transposed copy seen through ``transpose``): gradients come back in each input's dtype and
    layout."""
    device = device_for_tests()
    index, t = _inputs(5, 2, empty=(4,))
    upstream = torch.randn(T, H, generator=torch.Generator().manual_seed(7)).to(device)
    ref_out, ref_grads = _run(moe_experts_ref, index, t, torch.float32, upstream)
    leaves = {n: v.detach().to(device, torch.bfloat16).clone().requires_grad_(True) for n, v in t.items()}
    leaves["top_k_weights"] = t["top_k_weights"].to(device).clone().requires_grad_(True)
    gate_up_t = t["gate_up"].transpose(1, 2).contiguous().to(device, torch.bfloat16).requires_grad_(True)
    leaves["gate_up"] = gate_up_t.transpose(1, 2)  # (E, 2I, H) with unit stride along 2I
    out = moe_experts_triton(top_k_index=index.to(device), **leaves)
    out.backward(upstream.to(out.dtype))
    assert leaves["top_k_weights"].grad.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref_out, **TOL[torch.bfloat16])
    torch.testing.assert_close(
        gate_up_t.grad.transpose(1, 2).float().cpu(), ref_grads["gate_up"], **GRAD_TOL[torch.bfloat16]
    )
    for name in ("hidden", "top_k_weights", "down"):
        torch.testing.assert_close(leaves[name].grad.float().cpu(), ref_grads[name], **GRAD_TOL[torch.bfloat16])


def test_expert_parallel_sentinels_are_dropped():
    """Slots routed to ids >= E (experts owned by other ranks) contribute nothing and get zero routing grads."""
    index, tensors = _inputs(5, 4, sentinels=20, bias=True)
    _, grads = _compare(index, tensors, torch.float32)
    assert torch.all(grads["top_k_weights"].view(-1)[index.view(-1) >= 5] == 0)


def test_even_k_tiles_and_larger_blocks():
    """H divisible by the K tile (the unmasked K loop) and tiles wider than the data."""
    index, tensors = _inputs(5, 2, hidden=64, empty=(4,))
    launch = {
        "up": GemmLaunch(32, 16, 32, 4, 1),
        "down": GemmLaunch(16, 64, 64, 4, 1),
        "wgrad": GemmLaunch(32, 16, 64, 4, 1),
    }
    upstream = torch.randn(T, 64)
    ref_out, ref_grads = _run(moe_experts_ref, index, tensors, torch.float32, upstream)
    out, grads = _run(moe_experts_triton, index, tensors, torch.float32, upstream, launch=launch)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **GRAD_TOL[torch.float32])


TMA_LAUNCH = {name: GemmLaunch(16, 32, 32, 4, 1, True) for name in ("up", "down", "down_bwd", "dx", "wgrad")}


# the down / dx tiles read whole row blocks, including never-written rows past the last expert's (sentinel slots):
# their products may be NaN in rows that are never stored
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["stored_out_in", "transposed"])
def test_tma_descriptor_path(transposed, dtype):
    """The TMA (tensor descriptor) variants read the same tiles as the pointer path: weight tiles past the edges are
    zero (or rows nobody stores), rows of the next expert in the down / dx kernels give outputs nobody stores."""
    index, tensors = _inputs(5, 4, transposed=transposed, bias=True, empty=(2,), sentinels=5)
    upstream = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    kwargs = dict(transposed=transposed)
    ref_out, ref_grads = _run(moe_experts_ref, index, tensors, torch.float32, upstream, **kwargs)
    out, grads = _run(moe_experts_triton, index, tensors, dtype, upstream, launch=TMA_LAUNCH, **kwargs)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **GRAD_TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")


def test_frozen_weights_and_precomputed_routing():
    """Only hidden and routing weights require grad (e.g. LoRA elsewhere): no weight gradient is produced, the
    others match; a routing computed by the caller is used as given."""
    device = device_for_tests()
    index, tensors = _inputs(5, 2, empty=(1,))
    hidden = tensors["hidden"].to(device).requires_grad_(True)
    weights = tensors["top_k_weights"].to(device).requires_grad_(True)
    gate_up, down = tensors["gate_up"].to(device), tensors["down"].to(device)
    routing = moe_route(index.to(device), 5)
    out = moe_experts_triton(hidden, index.to(device), weights, gate_up, down, routing=routing)
    out.square().sum().backward()
    hidden_ref = hidden.detach().clone().requires_grad_(True)
    weights_ref = weights.detach().clone().requires_grad_(True)
    moe_experts_ref(hidden_ref, index.to(device), weights_ref, gate_up, down).square().sum().backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(weights.grad, weights_ref.grad, **GRAD_TOL[torch.float32])
    with pytest.raises(ValueError, match="routing was computed for 4 experts"):
        moe_experts_triton(hidden, index.to(device), weights, gate_up, down, routing=moe_route(index.to(device) % 4, 4))


def test_trainable_biases_on_frozen_weights():
    """Bias gradients when the weight stacks need none (summed in torch instead of the weight-gradient kernel)."""
    device = device_for_tests()
    index, t = _inputs(5, 2, bias=True, empty=(3,), sentinels=4)
    t = {n: v.to(device) for n, v in t.items()}
    grads = []
    for fn in (moe_experts_triton, moe_experts_ref):
        biases = {n: t[n].clone().requires_grad_(True) for n in ("gate_up_bias", "down_bias")}
        fn(
            t["hidden"], index.to(device), t["top_k_weights"], t["gate_up"], t["down"], **biases
        ).square().sum().backward()
        grads.append({n: b.grad for n, b in biases.items()})
    for name in ("gate_up_bias", "down_bias"):
        torch.testing.assert_close(grads[0][name], grads[1][name], **GRAD_TOL[torch.float32])


def test_no_grad_forward_and_empty_batch():
    device = device_for_tests()
    index, tensors = _inputs(5, 2)
    t = {n: v.to(device) for n, v in tensors.items()}
    with torch.no_grad():
        out = moe_experts_triton(top_k_index=index.to(device), **t)
    torch.testing.assert_close(out, moe_experts_ref(top_k_index=index.to(device), **t), **TOL[torch.float32])
    empty = moe_experts_triton(
        t["hidden"][:0].requires_grad_(True), index[:0].to(device), t["top_k_weights"][:0], t["gate_up"], t["down"]
    )
    assert empty.shape == (0, H)


def test_autocast_computes_in_autocast_dtype():
    """fp32 master weights under bf16 autocast: the kernels run in bf16, the result comes back in hidden's dtype
    and the weight gradients in the weights' dtype (fp32)."""
    device = device_for_tests()
    index, tensors = _inputs(5, 2)
    leaves = {n: v.to(device).requires_grad_(True) for n, v in tensors.items()}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = moe_experts_triton(top_k_index=index.to(device), **leaves)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert leaves["gate_up"].grad.dtype == torch.float32
    ref = moe_experts_ref(top_k_index=index.to(device), **{n: v.detach() for n, v in leaves.items()})
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.bfloat16])


def test_dispatch_uses_reference_without_triton(monkeypatch):
    index, tensors = _inputs(5, 2)
    monkeypatch.setattr(M, "use_triton", lambda *t: False)

    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken")

    monkeypatch.setattr(M, "moe_experts_triton", boom)
    torch.testing.assert_close(moe_experts(top_k_index=index, **tensors), moe_experts_ref(top_k_index=index, **tensors))


def test_bad_arguments_raise_clear_errors():
    index, t = _inputs(5, 2)
    with pytest.raises(ValueError, match="act must be one of"):
        moe_experts_triton(t["hidden"], index, t["top_k_weights"], t["gate_up"], t["down"], act="relu")
    with pytest.raises(ValueError, match=r"must be \(E, H, 2I\)"):
        moe_experts_triton(t["hidden"], index, t["top_k_weights"], t["gate_up"], t["down"], transposed=True)
    with pytest.raises(ValueError, match="tokens, top_k"):
        moe_experts_triton(t["hidden"], index[:5], t["top_k_weights"], t["gate_up"], t["down"])
    with pytest.raises(ValueError, match="gate_up_bias has shape"):
        moe_experts_triton(
            t["hidden"], index, t["top_k_weights"], t["gate_up"], t["down"], gate_up_bias=torch.zeros(5, I)
        )
    with pytest.raises(TypeError, match="top_k_index must be an integer tensor"):
        moe_experts_triton(t["hidden"], index.float(), t["top_k_weights"], t["gate_up"], t["down"])


# ------------------------------------------------------------------------------------------ pieces vs references


def test_pieces_match_references():
    """Each kernel against its torch reference on one routing (empty expert, sentinels, top-4)."""
    device = device_for_tests()
    index, t = _inputs(5, 4, empty=(2,), sentinels=9, bias=True)
    t = {n: v.to(device) for n, v in t.items()}
    routing = moe_route(index.to(device), 5)
    layout = M._Layout(M.ACTIVATIONS["silu"], True, False, False)
    tol = TOL[torch.float32]
    n_valid = int(routing.offsets[-1])

    h, a = M.moe_up_triton(t["hidden"], t["gate_up"], t["gate_up_bias"], routing, layout)
    h_ref, a_ref = M.moe_up_ref(t["hidden"], t["gate_up"], t["gate_up_bias"], routing, layout)
    torch.testing.assert_close(h[:n_valid], h_ref[:n_valid], **tol)
    torch.testing.assert_close(a[:n_valid], a_ref[:n_valid], **tol)

    down_of = [t["down"][e].t() for e in range(5)]
    y = M.moe_grouped_mm_triton(a, t["down"], t["down"].stride(1), t["down"].stride(2), H, routing, t["down_bias"])
    y_ref = M.moe_grouped_mm_ref(a_ref, down_of, routing, t["down_bias"])
    torch.testing.assert_close(y[:n_valid], y_ref[:n_valid], **tol)

    out = M.moe_combine_triton(y, routing, t["top_k_weights"].reshape(-1), torch.float32)
    torch.testing.assert_close(out, M.moe_combine_ref(y_ref, routing, t["top_k_weights"], torch.float32), **tol)

    dout = torch.randn(T, H, device=device)
    weights = t["top_k_weights"].reshape(-1)
    dh, aw, dw = M.moe_down_backward_triton(dout, t["down"], h, weights, routing, layout)
    dh_ref, aw_ref, dw_ref = M.moe_down_backward_ref(dout, t["down"], h_ref, weights, routing, layout)
    torch.testing.assert_close(dh[:n_valid], dh_ref[:n_valid], **tol)
    torch.testing.assert_close(aw[:n_valid], aw_ref[:n_valid], **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)  # sentinel rows exactly zero in both

    d_down = torch.empty_like(t["down"])
    d_bias = torch.empty_like(t["down_bias"])
    M.moe_weight_grad_triton(
        dout, True, aw, False, routing, d_down, (d_down.stride(1), d_down.stride(2)), d_bias, weights
    )
    dw_ref, db_ref = M.moe_weight_grad_ref(dout, True, aw_ref, False, routing, weights)
    torch.testing.assert_close(d_down, dw_ref, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(d_bias, db_ref, **GRAD_TOL[torch.float32])
    assert torch.all(d_down[2] == 0)  # the empty expert gets an exact zero gradient

    d_gu = torch.empty_like(t["gate_up"])
    M.moe_weight_grad_triton(dh, False, t["hidden"], True, routing, d_gu, (d_gu.stride(1), d_gu.stride(2)))
    torch.testing.assert_close(
        d_gu, M.moe_weight_grad_ref(dh, False, t["hidden"], True, routing)[0], **GRAD_TOL[torch.float32]
    )


@pytest.mark.parametrize(
    "n_split,tma,interleaved",
    [(1, False, False), (2, False, True), (2, True, False), (0, False, True), (0, True, False)],
    ids=["fused", "fused_split-interleaved", "fused_split-tma", "two_pass-interleaved", "two_pass-tma"],
)
def test_down_backward_variants(n_split, tma, interleaved):
    """The down-projection backward with its activation backward fused into one accumulator's epilogue, into two
    accumulators' (n_split=2: column blocks of 16, so I=40 ends in a partial and an empty block), or as a second
    pass after the plain grouped GEMM (n_split=0); TMA weight tiles; concatenated and interleaved gate/up."""
    device = device_for_tests()
    index, t = _inputs(5, 4, empty=(2,), sentinels=9)
    t = {n: v.to(device) for n, v in t.items()}
    routing = moe_route(index.to(device), 5)
    layout = M._Layout(M.ACTIVATIONS["gelu_tanh"], False, interleaved, False)
    n_valid = int(routing.offsets[-1])
    h, _ = M.moe_up_ref(t["hidden"], t["gate_up"], None, routing, layout)
    dout = torch.randn(T, H, device=device)
    weights = t["top_k_weights"].reshape(-1)
    launch = {"down_bwd": GemmLaunch(16, 32, 16, 4, 1, tma, n_split)}
    dh, aw, dw = M.moe_down_backward_triton(dout, t["down"], h, weights, routing, layout, launch=launch)
    dh_ref, aw_ref, dw_ref = M.moe_down_backward_ref(dout, t["down"], h, weights, routing, layout)
    torch.testing.assert_close(dh[:n_valid], dh_ref[:n_valid], **TOL[torch.float32])
    torch.testing.assert_close(aw[:n_valid], aw_ref[:n_valid], **TOL[torch.float32])
    torch.testing.assert_close(dw, dw_ref, **TOL[torch.float32])  # sentinel rows exactly zero in both
    with pytest.raises(ValueError, match="n_split must be 0, 1 or 2"):
        M.moe_down_backward_triton(dout, t["down"], h, weights, routing, layout,
                                   launch={"down_bwd": GemmLaunch(16, 32, 16, 4, 1, tma, 3)})  # fmt: skip


# ------------------------------------------------------------------------------------------ vs transformers


def _hf_experts(arch, n_experts, top_k, dtype, limit):
    from transformers import GptOssConfig, GraniteMoeConfig, MixtralConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    common = dict(hidden_size=H, num_experts_per_tok=top_k)
    if arch == "mixtral":
        module = MixtralExperts(MixtralConfig(intermediate_size=I, num_local_experts=n_experts, **common))
    elif arch == "qwen3_moe":
        module = Qwen3MoeExperts(Qwen3MoeConfig(moe_intermediate_size=I, num_experts=n_experts, **common))
    elif arch == "granitemoe":
        module = GraniteMoeExperts(GraniteMoeConfig(intermediate_size=I, num_local_experts=n_experts, **common))
    else:
        config = GptOssConfig(intermediate_size=I, num_local_experts=n_experts, swiglu_limit=limit, **common)
        module = GptOssExperts(config)
    module.config._experts_implementation = "eager"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            fan_in = H if name == "gate_up_proj" else I
            param.copy_(torch.randn(param.shape, generator=g) * (0.3 if "bias" in name else fan_in**-0.5))
    return module.to(device_for_tests(), dtype)


# GPT-OSS: in fp32 a small clamp limit, so that both clamps cut some values; in bf16 its default (a value within
# one bf16 rounding of the limit may be clamped on one side and not on the other: the gradient jumps there)
GPT_OSS_LIMIT = {torch.float32: 0.8, torch.bfloat16: 7.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "arch,top_k,n_experts", [("mixtral", 2, 5), ("qwen3_moe", 8, 10), ("granitemoe", 4, 5), ("gpt_oss", 4, 5)]
)
def test_matches_transformers_eager_experts(arch, top_k, n_experts, dtype):
    """Same output and gradients (hidden, gate_up_proj, down_proj, their biases, routing weights) as the model's
    own eager experts forward, on the module's own parameters."""
    device = device_for_tests()
    module = _hf_experts(arch, n_experts, top_k, dtype, GPT_OSS_LIMIT[dtype])
    if arch == "gpt_oss":
        assert module.is_transposed and not module.is_concatenated and module.has_bias
    else:
        assert module.has_gate and not module.is_transposed and module.is_concatenated and not module.has_bias
    kwargs = dict(act="silu")
    if arch == "gpt_oss":
        kwargs = dict(act="gpt_oss", transposed=True, interleaved=True, alpha=1.702, limit=GPT_OSS_LIMIT[dtype])
    index, weights = _routing(T, n_experts, top_k, empty=(1,))
    index = index.to(device)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    upstream = torch.randn(T, H, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    params = [n for n, _ in module.named_parameters()]

    def run(use_kernel):
        module.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_(True)
        w = weights.to(device, dtype).requires_grad_(True)
        if use_kernel:
            biases = dict(
                gate_up_bias=getattr(module, "gate_up_proj_bias", None),
                down_bias=getattr(module, "down_proj_bias", None),
            )
            out = moe_experts_triton(x, index, w, module.gate_up_proj, module.down_proj, **biases, **kwargs)
        else:
            out = module(x, index, w)
        out.backward(upstream)
        grads = [getattr(module, n).grad.float() for n in params]
        return [out.detach().float(), x.grad.float(), w.grad.float(), *grads]

    names = ["forward", "d hidden", "d top_k_weights"] + [f"d {n}" for n in params]
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
    grad_tol = GRAD_TOL[dtype] if dtype == torch.float32 else dict(atol=2e-1, rtol=6e-2)
    for i, (mine, theirs) in enumerate(zip(run(True), run(False), strict=True)):
        torch.testing.assert_close(mine, theirs, **(tol if i == 0 else grad_tol), msg=lambda m, n=names[i]: f"{n}: {m}")


def test_gpt_oss_activation_matches_reference_with_clamping():
    """The clamped SwiGLU's gradient is zero where a clamp cuts (gate above the limit, up outside it)."""
    index, tensors = _inputs(5, 2, transposed=True, bias=True, empty=(0,))
    _compare(index, tensors, torch.float32, dict(act="gpt_oss", transposed=True, interleaved=True, limit=0.5))


# ------------------------------------------------------------------------------------------ torch.compile


def test_torch_compile_fullgraph_matches_eager():
    index, tensors = _inputs(5, 2, empty=(0,))
    upstream = torch.randn(T, H)

    def step(top_k_index, **leaves):
        return moe_experts_triton(top_k_index=top_k_index, **leaves)

    eager_out, eager_grads = _run(step, index, tensors, torch.float32, upstream)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out, grads = _run(compiled, index, tensors, torch.float32, upstream)
    torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=1e-6)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-6)


def test_custom_op_registration_passes_opcheck():
    device = device_for_tests()
    index, t = _inputs(3, 2, bias=True)
    t = {
        n: v[:9].to(device).requires_grad_(True)
        if n in ("hidden", "top_k_weights")
        else v[:3].to(device).requires_grad_(True)
        for n, v in t.items()
    }
    args = (t["hidden"], index[:9].to(device) % 3, t["top_k_weights"], t["gate_up"], t["down"], t["gate_up_bias"],
            t["down_bias"], 0, True, False, False, 1.702, 7.0, True)  # fmt: skip
    torch.library.opcheck(
        torch.ops.fms_accel_kernels.moe_experts_fwd.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden,inter,n_experts,top_k", [(1536, 512, 40, 8), (4096, 1792, 8, 2)])
def test_experts_real_shapes_gpu(hidden, inter, n_experts, top_k):
    torch.manual_seed(0)
    n_tokens = 2048
    device = torch.device("cuda")
    logits = torch.randn(n_tokens, n_experts, device=device)
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    tensors = dict(
        hidden=torch.randn(n_tokens, hidden, device=device),
        top_k_weights=weights,
        gate_up=torch.randn(n_experts, 2 * inter, hidden, device=device) * hidden**-0.5,
        down=torch.randn(n_experts, hidden, inter, device=device) * inter**-0.5,
    )
    upstream = torch.randn(n_tokens, hidden, device=device)

    def run(fn, dtype):
        # copy=True: a same-dtype .to() returns the shared tensor itself, whose grad flag would leak into later runs
        leaves = {n: v.to(dtype, copy=True).requires_grad_(True) for n, v in tensors.items()}
        out = fn(top_k_index=index, **leaves)
        out.backward(upstream.to(dtype))
        return [out.float()] + [leaves[n].grad.float() for n in tensors]

    ref = run(moe_experts_ref, torch.float32)
    mine = run(moe_experts_triton, torch.bfloat16)
    for r, m in zip(ref, mine):
        scale = r.abs().max().item()
        assert (m - r).abs().max().item() <= 2e-2 * scale + 1e-3


def test_routing_namedtuple_fields():
    assert MoERouting._fields == ("perm", "inv_perm", "tokens_per_expert", "offsets", "num_experts", "top_k")


def test_default_tiles_compile_for_sm90_without_spills():
    """Every kernel's default tile setting compiles offline for H100/H200 (sm_90; no GPU needed): in bf16 the dots
    lower to wgmma and nothing spills to local memory; the settings fp32 operands get (reduction step halved; the
    pointer-only defaults for IEEE dots) fit the 227 KiB of shared memory, TF32 ones without spills too. In a
    subprocess: here the kernels may be interpreter functions."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no ptxas/cuobjdump for offline sm_90 compilation")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel-bench" / "moe_bench.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    for flags in ([], ["--dtype", "fp32", "--precision", "tf32"], ["--dtype", "fp32", "--precision", "ieee"]):
        out = subprocess.run(
            [sys.executable, str(script), "--codegen", "--json", *flags],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        stats = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        assert {s["kernel"] for s in stats} == set(M._LAUNCH), flags
        for s in stats:
            assert s["shared_bytes"] <= 232448, (flags, s)
            if "ieee" not in flags:
                assert s["wgmma"], (flags, s)
                assert s["stack_bytes"] == 0, (flags, s)
