"""RoPE kernel vs its reference: q and k together, full and partial rotary, cos/sin layouts, HF drop-in."""

import pytest
import torch
from fms_acceleration_accelerate_kernels import apply_rotary_pos_emb, rope, rope_ref, rope_triton

from tests.kernels.harness import check_against_reference, device_for_tests

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cos_sin(batch, seq, rot, base=10000.0, positions=None):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    if positions is None:
        positions = torch.arange(seq).expand(batch, seq)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _joined(fn):
    """Concatenate both outputs so the harness differentiates through q and k at once."""

    def run(q, k, cos, sin):
        q_out, k_out = fn(q, k, cos, sin)
        return torch.cat((q_out.reshape(-1), k_out.reshape(-1)))

    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,n_q,n_k,seq,head_dim,rot",
    [(2, 4, 2, 7, 16, 16), (1, 3, 1, 5, 24, 8), (3, 5, 5, 9, 10, 6), (2, 6, 2, 3, 32, 32)],
)
def test_rope_matches_reference(dtype, batch, n_q, n_k, seq, head_dim, rot):
    torch.manual_seed(0)
    cos, sin = _cos_sin(batch, seq, rot, positions=torch.randint(0, 50, (batch, seq)))
    check_against_reference(
        _joined(rope_ref),
        _joined(rope_triton),
        inputs=dict(
            q=torch.randn(batch, n_q, seq, head_dim), k=torch.randn(batch, n_k, seq, head_dim), cos=cos, sin=sin
        ),
        dtype=dtype,
        grad_inputs=("q", "k"),
    )


@pytest.mark.parametrize("cos_layout", ["SR", "1SR"])
def test_rope_broadcast_cos_layouts(cos_layout):
    torch.manual_seed(0)
    device = device_for_tests()
    cos, sin = _cos_sin(1, 6, 8)
    if cos_layout == "SR":
        cos, sin = cos[0], sin[0]
    q, k = torch.randn(3, 4, 6, 8, device=device), torch.randn(3, 2, 6, 8, device=device)
    cos, sin = cos.to(device), sin.to(device)
    for got, want in zip(rope_triton(q, k, cos, sin), rope_ref(q, k, cos, sin)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_hf_transposed_projection_layout():
    """q as HF builds it: (B, S, H, D) projection output viewed as (B, H, S, D) — no copy needed."""
    torch.manual_seed(0)
    device = device_for_tests()
    q = torch.randn(2, 5, 4, 16, device=device).transpose(1, 2)
    k = torch.randn(2, 5, 2, 16, device=device).transpose(1, 2)
    cos, sin = (t.to(device) for t in _cos_sin(2, 5, 16))
    q_out, k_out = rope_triton(q, k, cos, sin)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref, atol=1e-5, rtol=1e-5)


def test_apply_rotary_pos_emb_matches_hf():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    torch.manual_seed(0)
    device = device_for_tests()
    q, k = torch.randn(2, 4, 7, 16, device=device), torch.randn(2, 2, 7, 16, device=device)
    cos, sin = (t.to(device) for t in _cos_sin(2, 7, 16))
    for got, want in zip(apply_rotary_pos_emb(q, k, cos, sin), hf_apply(q, k, cos, sin)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # (B, S, H, D) layout with unsqueeze_dim=2
    q2, k2 = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    for got, want in zip(
        apply_rotary_pos_emb(q2, k2, cos, sin, unsqueeze_dim=2), hf_apply(q2, k2, cos, sin, unsqueeze_dim=2)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_apply_rotary_pos_emb_position_ids_gathers_table():
    torch.manual_seed(0)
    device = device_for_tests()
    positions = torch.tensor([[3, 4, 5], [0, 1, 9]], device=device)
    table_cos, table_sin = (t[0].to(device) for t in _cos_sin(1, 12, 8))
    q, k = torch.randn(2, 2, 3, 8, device=device), torch.randn(2, 1, 3, 8, device=device)
    got = apply_rotary_pos_emb(q, k, table_cos, table_sin, position_ids=positions)
    want = rope_ref(q, k, table_cos[positions], table_sin[positions])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_rope_rejects_bad_rotary_dim():
    device = device_for_tests()
    q = torch.randn(1, 2, 3, 8, device=device)
    cos = torch.randn(3, 10, device=device)
    with pytest.raises(ValueError, match="rotary dim"):
        rope(q, q, cos, cos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_8b_shape():
    torch.manual_seed(0)
    cos, sin = _cos_sin(4, 2048, 128, base=500000.0)
    check_against_reference(
        _joined(rope_ref),
        _joined(rope),
        inputs=dict(q=torch.randn(4, 32, 2048, 128), k=torch.randn(4, 8, 2048, 128), cos=cos, sin=sin),
        dtype=torch.bfloat16,
        grad_inputs=("q", "k"),
    )


def test_rope_backward_writes_gradients_in_the_layout_of_q_and_k():
    """HF's q/k are (B, S, H, D) projections viewed as (B, H, S, D): the gradients come back in that layout
    (no copy in the projection's backward or into a leaf's .grad) even when the incoming gradients do not."""
    from fms_acceleration_accelerate_kernels import rope_triton

    device = device_for_tests()
    torch.manual_seed(0)
    b, s, h, hkv, d = 2, 5, 4, 2, 16
    q_proj = torch.randn(b, s, h, d, device=device, requires_grad=True)
    k_proj = torch.randn(b, s, hkv, d, device=device, requires_grad=True)
    q, k = q_proj.transpose(1, 2), k_proj.transpose(1, 2)
    seen = {}
    q.register_hook(lambda g: seen.__setitem__("q", g.stride()))  # the gradient exactly as rope returns it
    k.register_hook(lambda g: seen.__setitem__("k", g.stride()))
    cos, sin = torch.randn(b, s, d, device=device), torch.randn(b, s, d, device=device)
    q_out, k_out = rope_triton(q, k, cos, sin)
    dq_out = torch.randn(q_out.shape, device=device)  # contiguous (B, H, S, D): a different layout
    dk_out = torch.randn(k_out.shape, device=device)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    assert seen == {"q": q.stride(), "k": k.stride()}
    q_ref, k_ref = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    torch.autograd.backward(rope_ref(q_ref, k_ref, cos, sin), (dq_out, dk_out))
    torch.testing.assert_close(q_proj.grad.transpose(1, 2), q_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_proj.grad.transpose(1, 2), k_ref.grad, atol=1e-5, rtol=1e-5)
