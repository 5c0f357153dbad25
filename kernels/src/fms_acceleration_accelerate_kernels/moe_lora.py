"""LoRA on the experts of a sparse MoE block, without merged expert weights.

The op of :mod:`.moe` with a low-rank adapter on each expert stack: for every routing slot (token ``t``, expert
``e``, weight ``w``)::

    h = x_t W_gu[e]^T (+ b_gu[e]) + s_gu (x_t A_gu[e]^T) B_gu[e]^T      # (2I,), in W_gu's row order
    a = act(gate(h)) * up(h)
    out_t += w * (a W_d[e]^T (+ b_d[e]) + s_d (a A_d[e]^T) B_d[e]^T)   # (H,)

with per-expert factors ``A`` (E, r, in) and ``B`` (E, out, r) and a scaling ``s`` (:class:`ExpertLoRA`). "in" and
"out" are the projection's own (gate_up: in H, out 2I; down: in I, out H) whatever the storage orientation of the
3-D weights (``transposed``). Merging the adapter first (``W + s B A``, what PEFT's ``target_parameters`` does on
every forward) writes a tensor the size of the whole expert stack per layer and call, and its gradient in the
backward; here nothing of that size exists: the low-rank terms are small grouped GEMMs over the same
expert-sorted rows as the base GEMMs.

Triton path (CUDA or ``TRITON_INTERPRET=1``), one autograd function over the pieces of :mod:`.moe` plus one kernel
of its own (``_moe_lowrank_kernel``: ``Y += s U B[e]^T`` for expert-ordered rows ``U`` (S, r), in place, the
gate_up case also writing the activation ``a`` from the updated ``h``):

* forward: ``h`` by the grouped GEMM on gathered token rows, ``u_gu = x A_gu^T`` (S, r), ``h += s u_gu B_gu^T``
  and ``a`` in one pass; ``y = a W_d^T`` (+ bias), ``u_d = a A_d^T``, ``y += s u_d B_d^T``; the weighted combine.
  Saved: ``h`` (as the base op saves it) and the two (S, r) projections.
* backward (``g = d out``): ``d(a) = g W_d + s (g B_d) A_d`` (unweighted, gathered rows), the activation backward
  of :func:`.moe.moe_act_backward_triton` (``dh``, ``w a``, the routing-weight gradient ``<d(a), a>``);
  ``dB_d[e] = s g^T (w u_d)``, ``dA_d[e] = s (g B_d)^T (w a)``, ``du_gu = s dh B_gu``,
  ``dB_gu[e] = s dh^T u_gu``, ``dA_gu[e] = du_gu^T x`` (the weight-gradient kernel of :mod:`.moe`, fp32
  accumulation and output); ``dx = dh W_gu + du_gu A_gu``, summed per token.

The frozen expert weights get no gradient here (they are the base of the adapter; a caller whose base weights
train uses :func:`.moe.moe_experts` on merged weights). Biases and routing weights get theirs.

Reference path (:func:`moe_experts_lora_ref`): the per-expert loop of :func:`.moe.moe_experts_ref` with the low-rank
terms, autograd through torch; it never forms a merged weight either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import interpreter_enabled, next_power_of_2, use_triton
from .moe import (
    _GROUP_M,
    GemmLaunch,
    MoERouting,
    _bias_grad_torch,
    _compute_dtype,
    _down_matrix,
    _expert_tile,
    _fit,
    _gate_up_matrix,
    _gated,
    _gated_torch,
    _Layout,
    _layout_and_shapes,
    _mma,
    _precision,
    _row_tiles_bound,
    _split_gate_up,
    _swizzle,
    moe_act_backward_triton,
    moe_combine_triton,
    moe_grouped_mm_triton,
    moe_route,
    moe_up_triton,
    moe_weight_grad_triton,
)

__all__ = ["ExpertLoRA", "moe_experts_lora", "moe_experts_lora_ref", "moe_experts_lora_triton"]


class ExpertLoRA(NamedTuple):
    """The low-rank adapter of one expert stack: ``delta W[e] = scaling * b[e] @ a[e]`` in (out, in) orientation.

    Attributes:
        a: (E, r, in) down-projections (PEFT's ``lora_A`` of a ``target_parameters`` adapter, viewed per expert).
        b: (E, out, r) up-projections (PEFT's ``lora_B``, viewed per expert).
        scaling: the adapter's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


# Tile settings of the low-rank GEMMs on GPUs (the interpreter uses moe's small test tiles): "lora_r" for the
# (S, r) projections (N = r, K = H / I / 2I), "wgrad_lora" for the factor gradients (N or K = r); pointer reads
# (tma False): rank-sized extents are often below a TMA box. Not tuned: these GEMMs move (S, r) rows and
# rank-sized weight tiles, a few percent of the base GEMMs' traffic.
_LORA_LAUNCH: Mapping[str, GemmLaunch] = {
    "lora_r": GemmLaunch(64, 64, 64, 4, 3),
    "wgrad_lora": GemmLaunch(32, 64, 64, 4, 3),
}
# rows x columns (gate_up: columns of I, a gate and an up tile each) x rank step per program of _moe_lowrank_kernel
# on GPUs, and its warps / stages: compiled for sm_90 without spills in bf16, fp16 and fp32, gated or not, ranks up
# to 64 (tests/kernels/test_experts_lora.py); the interpreter's small tiles exercise tails in the tests
_LOWRANK_BLOCK_M, _LOWRANK_BLOCK_N, _LOWRANK_BLOCK_R, _LOWRANK_WARPS, _LOWRANK_STAGES = 64, 64, 64, 8, 2
_LOWRANK_INTERPRETER = (16, 32, 16)


# ============================================================================================ Triton kernel


@triton.jit
def _moe_lowrank_kernel(
    U,  # (S, R) rows in expert order, unit stride along R
    W,  # element (e, n, r) at e * stride_we + n * stride_wn + r * stride_wr
    Y,  # (S, N) rows in expert order, unit stride along N: read, + scale * U W[e]^T, written back
    A_OUT,  # GATED: (S, I) a = act(gate) * up of the updated gate / up columns of Y
    OFFSETS,
    n_experts,
    n_tiles_m,
    R,
    N_COLS,  # N, or I when GATED (column c covers Y's gate column gate_off + c * STEP and up column up_off + ...)
    stride_u,
    stride_we,
    stride_wn,
    stride_wr,
    stride_y,
    stride_a,
    scale,
    gate_off,
    up_off,
    alpha,
    limit,
    GATED: tl.constexpr,
    STEP: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    n_tiles_n = tl.cdiv(N_COLS, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), n_tiles_m, n_tiles_n, GROUP_M)
    expert, row_start, row_end = _expert_tile(pid_m, OFFSETS, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_COLS
    if GATED:
        first_cols = gate_off + cols * STEP
        second_cols = up_off + cols * STEP
    else:
        first_cols = cols
        second_cols = cols
    offs_r = tl.arange(0, BLOCK_R)
    w_expert = W + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_mask = (r0 + offs_r) < R
        u = tl.load(
            U + rows64[:, None] * stride_u + (r0 + offs_r)[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0
        )
        w_mask = r_mask[:, None] & col_mask[None, :]
        w_r = (r0 + offs_r)[:, None] * stride_wr
        w = tl.load(w_expert + first_cols[None, :].to(tl.int64) * stride_wn + w_r, mask=w_mask, other=0.0)
        acc = _mma(u, w, acc, PRECISION)
        if GATED:
            w2 = tl.load(w_expert + second_cols[None, :].to(tl.int64) * stride_wn + w_r, mask=w_mask, other=0.0)
            acc2 = _mma(u, w2, acc2, PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    y_rows = Y + rows64[:, None] * stride_y
    first = tl.load(y_rows + first_cols[None, :], mask=mask, other=0.0).to(tl.float32) + scale * acc
    first = first.to(Y.dtype.element_ty)
    tl.store(y_rows + first_cols[None, :], first, mask=mask)
    if GATED:
        second = tl.load(y_rows + second_cols[None, :], mask=mask, other=0.0).to(tl.float32) + scale * acc2
        second = second.to(Y.dtype.element_ty)
        tl.store(y_rows + second_cols[None, :], second, mask=mask)
        # the activation of the rounded h, as the backward recomputes it from the saved h
        a, _d_gate, _d_up = _gated(first.to(tl.float32), second.to(tl.float32), ACT, alpha, limit, False)
        tl.store(A_OUT + rows64[:, None] * stride_a + cols[None, :], a.to(A_OUT.dtype.element_ty), mask=mask)


def _lowrank_add(
    u: torch.Tensor,
    w: torch.Tensor,
    stride_wn: int,
    stride_wr: int,
    y: torch.Tensor,
    scale: float,
    routing: MoERouting,
    layout: _Layout | None = None,
) -> torch.Tensor | None:
    """``y[j] += scale * u[j] @ W[e]^T`` in place for the expert-ordered rows of every expert ``e`` (rows past
    ``offsets[E]`` untouched), ``W[e]`` element (n, r) at ``e * w.stride(0) + n * stride_wn + r * stride_wr``.
    With ``layout`` (``y`` is the gate_up pre-activation ``h``): also returns ``a = act(gate) * up`` (S, I) of the
    updated ``h``."""
    n_slots, rank = u.shape
    gated = layout is not None
    n_cols = y.shape[1] // 2 if gated else y.shape[1]
    a = torch.empty(n_slots, n_cols, dtype=y.dtype, device=y.device) if gated else None
    if n_slots == 0 or n_cols == 0:
        return a
    if u.stride(1) != 1:
        u = u.contiguous()
    assert y.stride(1) == 1, "the low-rank update writes rows with unit column stride"
    block_m, block_n, block_r = _LOWRANK_INTERPRETER if interpreter_enabled() else (
        _LOWRANK_BLOCK_M, _LOWRANK_BLOCK_N, _LOWRANK_BLOCK_R
    )  # fmt: skip
    block_n, block_r = _fit(block_n, n_cols), _fit(block_r, rank)
    gate_off, up_off, step = layout.gate_up_rows(n_cols) if gated else (0, 0, 1)
    n_tiles_m = _row_tiles_bound(routing, block_m)
    grid = (n_tiles_m * triton.cdiv(n_cols, block_n),)
    out_a = a if a is not None else y
    _moe_lowrank_kernel[grid](
        u, w, y, out_a, routing.offsets, routing.num_experts, n_tiles_m, rank, n_cols, u.stride(0), w.stride(0),
        stride_wn, stride_wr, y.stride(0), out_a.stride(0), float(scale), gate_off, up_off,
        layout.alpha if gated else 0.0, layout.limit if gated else 0.0, GATED=gated, STEP=step,
        ACT=layout.act if gated else 0, PRECISION=_precision(y.dtype), GROUP_M=_GROUP_M, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_E=next_power_of_2(routing.num_experts), num_warps=_LOWRANK_WARPS,
        num_stages=_LOWRANK_STAGES,
    )  # fmt: skip
    return a


def _wgrad(g, g_gather, x, x_gather, routing, n_out, k_dim, launch):
    """fp32 (E, n_out, k_dim) per-expert ``G_e^T X_e`` (zero for experts without rows)."""
    dw = torch.zeros(routing.num_experts, n_out, k_dim, dtype=torch.float32, device=g.device)
    if routing.perm.numel():
        moe_weight_grad_triton(
            g, g_gather, x, x_gather, routing, dw, (dw.stride(1), dw.stride(2)), launch=launch,
            launch_name="wgrad_lora",
        )  # fmt: skip
    return dw


# ============================================================================================ autograd


def _factor(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


class _MoELoRAExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, a_gu, b_gu, a_d,
                b_d, s_gu, s_d, routing, layout, launch):  # fmt: skip
        dtype = hidden.dtype
        lora_launch = None if interpreter_enabled() else {**_LORA_LAUNCH, **(launch or {})}
        a_gu_c, b_gu_c, a_d_c, b_d_c = (_factor(t, dtype) for t in (a_gu, b_gu, a_d, b_d))
        two_i = gate_up.shape[2] if layout.transposed else gate_up.shape[1]
        stride_r, stride_h = layout.gate_up_strides(gate_up)
        u_gu = u_d = None
        if a_gu_c is not None:
            h = moe_grouped_mm_triton(
                hidden, gate_up, stride_r, stride_h, two_i, routing, gate_up_bias, "down_bwd", launch, x_gather=True
            )
            u_gu = moe_grouped_mm_triton(
                hidden, a_gu_c, a_gu_c.stride(1), a_gu_c.stride(2), a_gu_c.shape[1], routing, None, "lora_r",
                lora_launch, x_gather=True,
            )  # fmt: skip
            a = _lowrank_add(u_gu, b_gu_c, b_gu_c.stride(1), b_gu_c.stride(2), h, s_gu, routing, layout)
        else:
            h, a = moe_up_triton(hidden, gate_up, gate_up_bias, routing, layout, True, launch)
        stride_dh, stride_di = layout.down_strides(down)
        y = moe_grouped_mm_triton(a, down, stride_dh, stride_di, hidden.shape[1], routing, down_bias, "down", launch)
        if a_d_c is not None:
            u_d = moe_grouped_mm_triton(
                a, a_d_c, a_d_c.stride(1), a_d_c.stride(2), a_d_c.shape[1], routing, None, "lora_r", lora_launch
            )
            _lowrank_add(u_d, b_d_c, b_d_c.stride(1), b_d_c.stride(2), y, s_d, routing)
        del a
        out = moe_combine_triton(y, routing, top_k_weights.reshape(-1), dtype)
        ctx.save_for_backward(
            hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, a_gu_c, b_gu_c, a_d_c, b_d_c,
            h, u_gu, u_d,
        )  # fmt: skip
        ctx.routing, ctx.layout, ctx.launch, ctx.lora_launch, ctx.scales = routing, layout, launch, lora_launch, (
            s_gu, s_d
        )  # fmt: skip
        ctx.factor_dtypes = tuple(t.dtype if t is not None else None for t in (a_gu, b_gu, a_d, b_d))
        return out

    @staticmethod
    def backward(ctx, dout):
        (hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, a_gu, b_gu, a_d, b_d, h, u_gu,
         u_d) = ctx.saved_tensors  # fmt: skip
        routing, layout, launch, lora_launch = ctx.routing, ctx.layout, ctx.launch, ctx.lora_launch
        s_gu, s_d = ctx.scales
        n = ctx.needs_input_grad
        need_x, need_w, need_gub, need_db = n[0], n[2], n[5], n[6]
        need_a_gu, need_b_gu, need_a_d, need_b_d = (n[7] and a_gu is not None, n[8] and b_gu is not None,
                                                    n[9] and a_d is not None, n[10] and b_d is not None)  # fmt: skip
        dout = dout.contiguous()
        weights = top_k_weights.reshape(-1)
        inter = h.shape[1] // 2
        hidden_dim = hidden.shape[1]
        stride_dh, stride_di = layout.down_strides(down)
        need_dh = need_x or need_gub or need_a_gu or need_b_gu
        g_b = None
        # d(a) before the routing weight, with the down adapter's term
        if need_dh or need_a_d or need_w:
            da = moe_grouped_mm_triton(dout, down, stride_di, stride_dh, inter, routing, None, "down_bwd", launch, True)
            if a_d is not None:
                g_b = moe_grouped_mm_triton(
                    dout, b_d, b_d.stride(2), b_d.stride(1), b_d.shape[2], routing, None, "lora_r", lora_launch, True
                )  # fmt: skip
                _lowrank_add(g_b, a_d, a_d.stride(2), a_d.stride(1), da, s_d, routing)
        else:
            da = h
        dh, aw, dw_rows = moe_act_backward_triton(da, h, weights, routing, layout, need_dh, need_a_d, need_w)
        del da, h  # h (S, 2I) is freed here under non-reentrant activation checkpointing (see moe.py)
        d_a_gu = d_b_gu = d_a_d = d_b_d = None
        if need_b_d:  # dB_d[e] = s g^T (w u_d)
            wu = u_d * weights[routing.perm.long()].to(u_d.dtype)[:, None]
            d_b_d = _wgrad(dout, True, wu, False, routing, hidden_dim, u_d.shape[1], lora_launch).mul_(s_d)
            del wu
        if need_a_d:  # dA_d[e] = s (g B_d)^T (w a)
            assert g_b is not None
            d_a_d = _wgrad(g_b, False, aw, False, routing, g_b.shape[1], inter, lora_launch).mul_(s_d)
        del aw, g_b
        du = None
        if a_gu is not None and (need_x or need_a_gu or need_b_gu):
            du = moe_grouped_mm_triton(
                dh, b_gu, b_gu.stride(2), b_gu.stride(1), b_gu.shape[2], routing, None, "lora_r", lora_launch
            ).mul_(s_gu)
        if need_b_gu:  # dB_gu[e] = s dh^T u_gu
            d_b_gu = _wgrad(dh, False, u_gu, False, routing, dh.shape[1], u_gu.shape[1], lora_launch).mul_(s_gu)
        if need_a_gu:  # dA_gu[e] = du^T x
            d_a_gu = _wgrad(du, False, hidden, True, routing, du.shape[1], hidden_dim, lora_launch)
        d_hidden = d_weights = d_gate_up_bias = d_down_bias = None
        if need_db:
            d_down_bias = _bias_grad_torch(dout, True, routing, weights, down_bias.dtype)
        if need_gub:
            d_gate_up_bias = _bias_grad_torch(dh, False, routing, None, gate_up_bias.dtype)
        if need_x:
            stride_r, stride_h = layout.gate_up_strides(gate_up)
            dx_rows = moe_grouped_mm_triton(dh, gate_up, stride_h, stride_r, hidden_dim, routing, None, "dx", launch)
            if du is not None:
                _lowrank_add(du, a_gu, a_gu.stride(2), a_gu.stride(1), dx_rows, 1.0, routing)
            d_hidden = moe_combine_triton(dx_rows, routing, None, hidden.dtype)
            del dx_rows
        if need_w:
            d_flat = dw_rows[routing.inv_perm.long()]
            if down_bias is not None:
                ids = top_k_index.reshape(-1)
                valid = ids < routing.num_experts
                per_expert = dout.float() @ down_bias.float().t()  # (T, E)
                bias_term = torch.gather(per_expert, 1, ids.clamp(max=routing.num_experts - 1).view(dout.shape[0], -1))
                d_flat = d_flat + bias_term.reshape(-1) * valid
            d_weights = d_flat.view(top_k_weights.shape).to(top_k_weights.dtype)
        factor_grads = tuple(
            g.to(dt) if g is not None else None for g, dt in zip((d_a_gu, d_b_gu, d_a_d, d_b_d), ctx.factor_dtypes)
        )
        return (d_hidden, None, d_weights, None, None, d_gate_up_bias, d_down_bias, *factor_grads) + (None,) * 5


# ============================================================================================ public API


def _check_lora(name: str, lora: ExpertLoRA | None, n_experts: int, in_dim: int, out_dim: int) -> None:
    if lora is None:
        return
    a, b = lora.a, lora.b
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != n_experts or b.shape[0] != n_experts:
        raise ValueError(
            f"{name}: the factors must be (E, r, in) and (E, out, r) with E = {n_experts}, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[2] != in_dim or b.shape[1] != out_dim or a.shape[1] != b.shape[2]:
        raise ValueError(
            f"{name}: the factors {tuple(a.shape)} and {tuple(b.shape)} do not fit the projection ({in_dim} -> "
            f"{out_dim}); expected ({n_experts}, r, {in_dim}) and ({n_experts}, {out_dim}, r)"
        )


def _validate(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias, down_bias, transposed,
              interleaved, alpha, limit, gate_up_lora, down_lora) -> _Layout:  # fmt: skip
    layout = _layout_and_shapes(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias,
                                down_bias, transposed, interleaved, alpha, limit)  # fmt: skip
    n_experts, hidden_dim = gate_up.shape[0], hidden.shape[1]
    two_i = gate_up.shape[2] if transposed else gate_up.shape[1]
    _check_lora("gate_up_lora", gate_up_lora, n_experts, hidden_dim, two_i)
    _check_lora("down_lora", down_lora, n_experts, two_i // 2, hidden_dim)
    if gate_up.requires_grad or down.requires_grad:
        raise ValueError(
            "moe_experts_lora computes no gradient for the expert weights (the adapters' frozen base): pass them "
            "detached, or use moe_experts on merged weights when the base trains too"
        )
    return layout


def moe_experts_lora_ref(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: str = "silu",
    gate_first: bool = True,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    transposed: bool = False,
    interleaved: bool = False,
    *,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """Pure-torch expert MLPs with LoRA on the expert stacks, one expert at a time (autograd through torch).

    The factors are cast to the weights' dtype (as PEFT casts its merged delta). Arguments and result: as
    :func:`moe_experts_lora`.
    """
    layout = _validate(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias, down_bias,
                       transposed, interleaved, alpha, limit, gate_up_lora, down_lora)  # fmt: skip
    inter = (gate_up.shape[2] if transposed else gate_up.shape[1]) // 2

    def low_rank(lora: ExpertLoRA | None, dtype: torch.dtype):
        return None if lora is None else (lora.a.to(dtype), lora.b.to(dtype), lora.scaling)

    lora_gu, lora_d = low_rank(gate_up_lora, gate_up.dtype), low_rank(down_lora, down.dtype)
    out = torch.zeros_like(hidden)
    for e in range(gate_up.shape[0]):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        proj = F.linear(x, _gate_up_matrix(gate_up, e, layout), gate_up_bias[e] if gate_up_bias is not None else None)
        if lora_gu is not None:
            proj = proj + lora_gu[2] * F.linear(F.linear(x, lora_gu[0][e]), lora_gu[1][e])
        gate, up = _split_gate_up(proj, layout, inter)
        a = _gated_torch(gate, up, layout)
        rows = F.linear(a, _down_matrix(down, e, layout), down_bias[e] if down_bias is not None else None)
        if lora_d is not None:
            rows = rows + lora_d[2] * F.linear(F.linear(a, lora_d[0][e]), lora_d[1][e])
        rows = rows * top_k_weights[token_idx, slot, None]
        out = out.index_add(0, token_idx, rows.to(out.dtype))
    return out


def moe_experts_lora_triton(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: str = "silu",
    gate_first: bool = True,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    transposed: bool = False,
    interleaved: bool = False,
    *,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
    routing: MoERouting | None = None,
    launch: Mapping[str, GemmLaunch] | None = None,
) -> torch.Tensor:
    """Triton expert MLPs with LoRA on the expert stacks, with autograd (contract of :func:`moe_experts_lora`).

    The math runs in the weights' dtype (or the autocast dtype); the factors are cast to it for the GEMMs and
    their gradients come back in their own dtype, accumulated in fp32. ``routing`` / ``launch``: as in
    :func:`.moe.moe_experts_triton` (``launch`` may also override "lora_r" and "wgrad_lora").
    """
    layout = _validate(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias, down_bias,
                       transposed, interleaved, alpha, limit, gate_up_lora, down_lora)  # fmt: skip
    dtype = _compute_dtype(hidden, gate_up)
    x = hidden.to(dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weights = [t.to(dtype) if t is not None else None for t in (gate_up, down, gate_up_bias, down_bias)]
    tkw = top_k_weights if top_k_weights.is_contiguous() else top_k_weights.contiguous()
    if routing is None:
        routing = moe_route(top_k_index, gate_up.shape[0])
    elif routing.num_experts != gate_up.shape[0] or routing.perm.numel() != top_k_index.numel():
        raise ValueError(
            f"routing was computed for {routing.num_experts} experts and {routing.perm.numel()} slots; "
            f"this call has {gate_up.shape[0]} experts and {top_k_index.numel()} slots"
        )
    factors = [(lora.a, lora.b) if lora is not None else (None, None) for lora in (gate_up_lora, down_lora)]
    scales = [float(lora.scaling) if lora is not None else 0.0 for lora in (gate_up_lora, down_lora)]
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        out = _MoELoRAExpertsFunction.apply(
            x, top_k_index, tkw, *weights, *factors[0], *factors[1], *scales, routing, layout, launch
        )
    return out.to(hidden.dtype)


def moe_experts_lora(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: str = "silu",
    gate_first: bool = True,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    transposed: bool = False,
    interleaved: bool = False,
    *,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
    routing: MoERouting | None = None,
) -> torch.Tensor:
    """Grouped expert MLPs with LoRA adapters on the frozen expert stacks: Triton on CUDA (or
    ``TRITON_INTERPRET=1``), else the reference. No merged (E, out, in) weight is formed, in either pass.

    Args:
        gate_up_lora: the gate_up stack's adapter, factors (E, r, H) and (E, 2I, r) (2I in ``gate_up``'s row
            order), or None.
        down_lora: the down stack's adapter, factors (E, r, I) and (E, H, r), or None.
        routing: a precomputed ``moe_route(top_k_index, E)`` (Triton path only).
        Other arguments: as in :func:`.moe.moe_experts`; ``gate_up`` and ``down`` must not require grad.

    Returns:
        (T, H) tensor in hidden's dtype.
    """
    if use_triton(hidden, gate_up, down):
        return moe_experts_lora_triton(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first,
                                       gate_up_bias, down_bias, transposed, interleaved, alpha=alpha, limit=limit,
                                       gate_up_lora=gate_up_lora, down_lora=down_lora, routing=routing)  # fmt: skip
    return moe_experts_lora_ref(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias,
                                down_bias, transposed, interleaved, alpha=alpha, limit=limit,
                                gate_up_lora=gate_up_lora, down_lora=down_lora)  # fmt: skip
