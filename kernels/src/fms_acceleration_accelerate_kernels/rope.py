"""Rotary position embedding on q and k in one kernel (HF "rotate_half" convention), with partial rotary.

Layout: q (B, H, S, D) and k (B, Hkv, S, D), any strides with unit stride on D (HF's transposed projections
are fine, no copy); cos/sin (B, S, R), (1, S, R) or (S, R) with R = rotary dim <= D, R even. The first R
features of each head are rotated, the rest pass through:

    out[:R/2]  = x[:R/2] * cos[:R/2] - x[R/2:R] * sin[:R/2]
    out[R/2:R] = x[R/2:R] * cos[R/2:] + x[:R/2] * sin[R/2:]

The backward is the transposed rotation (the same kernel with the sine's sign flipped), so it needs only cos/sin,
never the forward inputs. One program handles one (batch, position): cos/sin are loaded once for all heads of q
and k. No gradient flows to cos/sin (they are derived from a frozen frequency buffer in every HF model).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_float_dtype, next_power_of_2, use_triton

__all__ = ["apply_rotary_pos_emb", "rope", "rope_ref", "rope_triton"]


@triton.jit
def _rope_rotate_heads(
    X,
    OUT,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_ob,
    stride_oh,
    stride_os,
    b,
    s,
    n_heads,
    head_dim,
    c1,
    c2,
    s1,
    s2,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_base = X + b * stride_xb + s * stride_xs + heads * stride_xh
    o_base = OUT + b * stride_ob + s * stride_os + heads * stride_oh
    x1 = tl.load(x_base + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + half + dims, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_base + dims, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_base + half + dims, o2.to(OUT.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        rot = 2 * half
        pdims = tl.arange(0, BLOCK_PASS)[None, :]
        pmask = (heads < n_heads) & (pdims < head_dim - rot)
        xp = tl.load(x_base + rot + pdims, mask=pmask, other=0.0)
        tl.store(o_base + rot + pdims, xp, mask=pmask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    seq_len,
    n_q_heads,
    n_k_heads,
    head_dim,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < half
    cos_row = COS + b * stride_cb + s * stride_cs
    sin_row = SIN + b * stride_sb + s * stride_ss
    c1 = tl.load(cos_row + dims, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + half + dims, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + dims, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + half + dims, mask=dmask, other=0.0).to(tl.float32)
    _rope_rotate_heads(
        Q, QO, stride_qb, stride_qh, stride_qs, stride_qob, stride_qoh, stride_qos, b, s, n_q_heads, head_dim,
        c1, c2, s1, s2, half, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS, BACKWARD,
    )  # fmt: skip
    _rope_rotate_heads(
        K, KO, stride_kb, stride_kh, stride_ks, stride_kob, stride_koh, stride_kos, b, s, n_k_heads, head_dim,
        c1, c2, s1, s2, half, BLOCK_HK, BLOCK_HALF, BLOCK_PASS, BACKWARD,
    )  # fmt: skip


def _as_batched_table(t: torch.Tensor, name: str) -> torch.Tensor:
    """cos/sin of shape (S, R), (1, S, R) or (B, S, R) -> 3-D tensor with unit stride on R."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape (S, R), (1, S, R) or (B, S, R); got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _check_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, S, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, sequence and head dim")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    rot = cos.shape[-1]
    if rot % 2 or rot > q.shape[-1] or rot == 0:
        raise ValueError(f"rotary dim (cos.shape[-1]={rot}) must be even, > 0 and <= head dim {q.shape[-1]}")
    if cos.shape[-2] != q.shape[2]:
        raise ValueError(f"cos/sin cover {cos.shape[-2]} positions but q has sequence length {q.shape[2]}")
    if cos.dim() == 3 and cos.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"cos/sin batch {cos.shape[0]} must be 1 or q's batch {q.shape[0]}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _output_like(t: torch.Tensor, strides: tuple[int, ...] | None = None) -> torch.Tensor:
    """Empty tensor shaped like ``t`` with ``strides`` (or ``t``'s dense layout), unit stride on the last dim."""
    if strides is not None:
        return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
    out = torch.empty_like(t)  # keeps a dense layout, e.g. HF's (B, S, H, D) memory viewed as (B, H, S, D)
    if out.stride(-1) != 1:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool,
    out_strides: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (or their gradients when ``backward``).

    Outputs keep the inputs' memory layout, or take ``out_strides`` (the backward writes the gradients in the
    layout of the forward inputs, so the projection's backward and a leaf's ``.grad`` need no copy whatever
    layout the incoming gradients have).
    """
    q = _unit_last(q)
    k = _unit_last(k)
    cos = _as_batched_table(cos, "cos")
    sin = _as_batched_table(sin, "sin")
    batch, n_q, seq, head_dim = q.shape
    n_k = k.shape[1]
    half = cos.shape[-1] // 2
    q_out = _output_like(q, out_strides[0] if out_strides else None)
    k_out = _output_like(k, out_strides[1] if out_strides else None)
    if q.numel() == 0:
        return q_out, k_out
    block_half = next_power_of_2(half)
    n_pass = head_dim - 2 * half
    block_pass = next_power_of_2(n_pass) if n_pass > 0 else 0
    block_hq = next_power_of_2(n_q)
    block_hk = next_power_of_2(n_k)
    work = (block_hq + block_hk) * (2 * block_half + block_pass)
    num_warps = 8 if work >= 8192 else 4
    cos_bstride = 0 if cos.shape[0] == 1 else cos.stride(0)
    sin_bstride = 0 if sin.shape[0] == 1 else sin.stride(0)
    _rope_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos_bstride, cos.stride(1), sin_bstride, sin.stride(1),
        seq, n_q, n_k, head_dim, half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        BACKWARD=backward, num_warps=num_warps,
    )  # fmt: skip
    return q_out, k_out


class _RopeFunction(torch.autograd.Function):
    """Eager autograd path; ``torch.compile`` uses the custom op below."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_out, k_out = _launch(q, k, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.out_strides = (q_out.stride(), k_out.stride())  # dense, unit last stride: the inputs' layout
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors  # unused outputs arrive as zeros (grads are materialized by default)
        dq, dk = _launch(dq_out, dk_out, cos, sin, backward=True, out_strides=ctx.out_strides)
        return dq, dk, None, None


@torch.library.custom_op("fms_accel_kernels::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos, sin, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, backward):
    return torch.empty_like(q), torch.empty_like(k)


def _rope_setup_context(ctx, inputs, output):
    _q, _k, cos, sin, _backward = inputs
    ctx.save_for_backward(cos, sin)


def _rope_autograd_backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(dq_out, dk_out, cos, sin, True)
    return dq, dk, None, None, None


_rope_op.register_autograd(_rope_autograd_backward, setup_context=_rope_setup_context)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch rotary embedding (HF's ``apply_rotary_pos_emb`` with partial rotary support).

    Args:
        q: (B, H, S, D) queries.
        k: (B, Hkv, S, D) keys.
        cos: (B, S, R), (1, S, R) or (S, R) cosines, R <= D even.
        sin: same shape as ``cos``.

    Returns:
        ``(q_rotated, k_rotated)`` with the shapes and dtypes of ``q`` and ``k``.
    """
    _check_shapes(q, k, cos, sin)
    cos = _as_batched_table(cos, "cos").unsqueeze(1)
    sin = _as_batched_table(sin, "sin").unsqueeze(1)
    rot = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        rotated = x_rot * cos + _rotate_half(x_rot) * sin
        return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)

    return rotate(q), rotate(k)


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotary embedding with autograd for q and k; same contract as :func:`rope_ref`."""
    check_float_dtype("q", q)
    check_float_dtype("k", k)
    _check_shapes(q, k, cos, sin)
    if torch.compiler.is_compiling():
        return _rope_op(q, k, cos, sin, False)
    return _RopeFunction.apply(q, k, cos, sin)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k: Triton on CUDA (or ``TRITON_INTERPRET=1``), else the reference.

    Args:
        q: (B, H, S, D) queries.
        k: (B, Hkv, S, D) keys.
        cos: (B, S, R), (1, S, R) or (S, R) cosines as HF's rotary module returns them, R <= D even.
        sin: same shape as ``cos``.

    Returns:
        ``(q_rotated, k_rotated)`` with the shapes and dtypes of ``q`` and ``k``.
    """
    if use_triton(q, k, cos, sin):
        return rope_triton(q, k, cos, sin)
    return rope_ref(q, k, cos, sin)


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's ``apply_rotary_pos_emb`` (both the 4.x signature with ``position_ids`` and the 5.x one).

    Args:
        q: (B, H, S, D) queries, or (B, S, H, D) with ``unsqueeze_dim=2``.
        k: (B, Hkv, S, D) keys, or (B, S, Hkv, D) with ``unsqueeze_dim=2``.
        cos: (B, S, R) / (1, S, R) / (S, R) as HF's rotary module returns them; with ``position_ids``, a
            (max_positions, R) table that is gathered at ``position_ids``.
        sin: same shape as ``cos``.
        position_ids: optional (B, S) positions into a 2-D cos/sin table (ignored for 3-D cos/sin, as HF did).
        unsqueeze_dim: 1 for the (B, H, S, D) layout, 2 for (B, S, H, D).

    Returns:
        ``(q_embed, k_embed)`` in the layout of the inputs.
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ((B, H, S, D) layout) or 2 ((B, S, H, D)); got {unsqueeze_dim}")
    if position_ids is not None and cos.dim() == 2:
        cos = cos[position_ids]
        sin = sin[position_ids]
    if unsqueeze_dim == 2:
        q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return rope(q, k, cos, sin)
