"""Mixture-of-experts expert kernels: routing sort and the grouped expert MLP, forward and backward.

The op is the "experts" half of a sparse MoE block as transformers 5 keeps it (each layer's experts as two 3-D
parameters): for every token ``t`` and each of its ``k`` routing slots ``s`` (expert ``e = top_k_index[t, s]``,
weight ``w = top_k_weights[t, s]``)::

    h = x_t W_gu[e]^T (+ b_gu[e])               # (2I,) gate and up pre-activations, in W_gu's row order
    a = act(gate(h)) * up(h)                    # (I,) (or GPT-OSS's clamped SwiGLU, act="gpt_oss")
    out_t += w * (a W_d[e]^T (+ b_d[e]))        # (H,)

with ``W_gu`` (E, 2I, H) and ``W_d`` (E, H, I) (``transposed=True``: (E, H, 2I) and (E, I, H)). The gate/up rows
of ``W_gu`` are concatenated (``[gate; up]``, or ``[up; gate]`` with ``gate_first=False``) or interleaved
(``interleaved=True``: gate rows 0, 2, 4, ...). Expert ids ``>= E`` (expert-parallel sentinels) are dropped.

Design (after the ScatterMoE idea: group the ``S = T k`` (token, slot) pairs by expert with one sort, and let
the GEMMs read scattered token rows through the sort index instead of copying them into expert order):

* ``moe_route``: one stable sort of the ``S`` expert ids (``perm``: the slot ``t k + s`` of each expert-sorted
  row; sentinels sort last), its inverse, and ``offsets`` (E + 1) from a ``searchsorted`` of the sorted ids (no
  host sync, sentinels excluded). These are single torch launches over S integers (a few microseconds for the
  S <= ~1M of training batches); a Triton sort would save launches, not time, against the GEMMs below.
* Forward, two grouped GEMM kernels. Each program takes one (expert row tile, column tile): the tile's expert is
  found in-kernel from ``offsets`` (a prefix sum over the per-expert tile counts), so the grid is a static upper
  bound, no per-expert launches or host syncs, and empty experts cost nothing. Row tiles are walked in groups
  of ``_GROUP_M`` column by column, so programs running together share weight tiles in L2.

  1. ``_moe_up_kernel``: rows ``x[perm // k]`` gathered on load (no gathered copy of the tokens) times the gate
     and the up weight tiles (two accumulators sharing the x tile); the epilogue adds the bias, rounds ``h`` to
     the compute dtype, stores it (only when a gradient is needed) and writes ``a = act(gate) * up`` (S, I) in
     expert order.
  2. ``_moe_grouped_mm_kernel``: ``y = a W_d[e]^T (+ b_d)`` (S, H) in expert order.
  3. ``_moe_combine_kernel``: ``out_t = sum_s w_ts y[row(t, s)]`` in fp32, rounded once (deterministic: no
     atomics; sentinel slots skipped).

* Saved for backward: ``h`` (S, 2I) in the compute dtype, the routing integers, and references to the inputs
  (hidden states, weights, routing weights). Not saved: the gathered tokens, ``a`` and ``y`` (HF ``grouped_mm``
  keeps the gathered tokens (S, H), the projection, activation and down outputs: about ``2 S H + 4 S I``
  elements per layer against ``2 S I`` here).
* Backward, with ``g = d out``:

  1. ``da = g[perm // k] W_d[e]`` (gathered rows), then the activation backward: recompute ``a`` from ``h``,
     write ``dw_partial = <da, a>`` per column block (the routing-weight gradient ``<g_t, y>``, without ever
     forming ``y``), ``dh = (w da) * da/dgate | (w da) * da/dup`` (S, 2I) in W_gu's row order, and ``w a``
     (S, I) for the down weight gradient. Either fused into the GEMM's epilogue (``_moe_down_bwd_kernel``; its
     register pressure limits it to narrow tiles) or, the default on Hopper, in two passes: ``da`` (S, I) from
     ``_moe_grouped_mm_kernel`` on gathered rows with wide TMA tiles, then ``_moe_act_bwd_kernel`` (elementwise).
  2. ``_moe_weight_grad_kernel`` (per expert, over its row slice ``offsets[e]:offsets[e+1]``):
     ``dW_d[e] = g[perm // k]^T (w a)`` and ``dW_gu[e] = dh^T x[perm // k]`` (gathered rows again, the
     expert-ordered operand through TMA), bias gradients as row sums in the same pass; written in the parameters'
     own layout.
  3. ``_moe_grouped_mm_kernel``: ``dx_rows = dh W_gu[e]`` (S, H), then ``_moe_combine_kernel`` sums each
     token's ``k`` rows.

  Transient backward buffers: ``dh`` (S, 2I), ``w a`` (S, I) (freed after ``dW_d``), ``dx_rows`` (S, H), and
  with two passes ``da`` (S, I) (freed after the second). The saved ``h`` is dropped once the activation backward
  has read it, before the weight gradients are allocated (under non-reentrant activation checkpointing that frees
  it: at the weight-gradient peak only ``dh`` is live, against transformers' ``grouped_mm``'s gathered tokens
  (S, H) and its (S, 2I) projection gradient).

Math in fp32 accumulators, one rounding per stored tensor; bf16/fp16 operands use tensor cores, fp32 operands
TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on and IEEE fp32 otherwise. In interpreter mode the dots
run in fp32 (the interpreter's ``tl.dot`` mishandles bf16 operands). Under ``torch.compile`` the op is the custom
ops ``fms_accel_kernels::moe_experts_fwd`` / ``moe_experts_bwd`` (same kernels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import check_float_dtype, interpreter_enabled, next_power_of_2, use_triton
from .glu import _activation_and_derivative

try:  # host-side TMA descriptors (Triton >= 3.3); without them the kernels read every operand through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = [
    "ACTIVATIONS",
    "GemmLaunch",
    "MoERouting",
    "moe_act_backward_triton",
    "moe_combine_ref",
    "moe_combine_triton",
    "moe_down_backward_ref",
    "moe_down_backward_triton",
    "moe_experts",
    "moe_experts_ref",
    "moe_experts_triton",
    "moe_grouped_mm_ref",
    "moe_grouped_mm_triton",
    "moe_route",
    "moe_route_ref",
    "moe_up_ref",
    "moe_up_triton",
    "moe_weight_grad_ref",
    "moe_weight_grad_triton",
]

# gated activation name -> kernel code. 0-2: ``act(gate) * up`` with the activations of glu.py (HF ``hidden_act``
# aliases accepted); 3: GPT-OSS's clamped SwiGLU ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
# ``g = min(gate, limit)``.
ACTIVATIONS: Mapping[str, int] = MappingProxyType(
    {"silu": 0, "swish": 0, "gelu_tanh": 1, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2, "gpt_oss": 3}
)
_ACT_GPT_OSS = 3


class GemmLaunch(NamedTuple):
    """Tile sizes and launch settings of one grouped GEMM kernel (``block_m``: rows of the expert-sorted
    order; for the weight-gradient kernel the rows reduced per step). ``tma``: read the dense operands through TMA
    tensor descriptors (Hopper and newer): the weight tiles, the expert-ordered rows of the down / dx kernels'
    input, the saved ``h`` in the down-projection backward, the expert-ordered operand of the weight gradient (full
    row blocks); the pointer path is used where the layout allows no descriptor (interleaved gate/up rows, strides
    not 16-byte multiples). ``n_split`` (down-projection backward only): 1 or 2, the program's ``block_n``
    columns are computed as that many accumulators of ``block_n / n_split`` columns, whose epilogues (the
    activation backward) run one after the other; 0, no fused epilogue: ``d(a)`` comes from the plain grouped GEMM
    with these tiles, rounded to the compute dtype, and the activation backward runs as a second pass."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False
    n_split: int = 1


# Per kernel: "up" (block_n per half: gate and up each), "down", "down_bwd", "dx", and the weight gradients
# "wgrad_down" (dW_d = g^T (w a): gathered rows of g, expert-ordered w a) and "wgrad_gate_up" (dW_gu = dh^T x:
# expert-ordered dh, gathered rows of x), each a block_n x block_k output tile of dW with block_m rows per step (a
# ``launch`` override may give "wgrad" for both). ``_LAUNCH``: GPUs with TMA (Hopper and newer; from a sweep on an
# H100 at a GraniteMoe-3B-shaped and a Mixtral-shaped layer; every setting compiles for sm_90 without spills);
# ``_LAUNCH_NO_TMA``: older GPUs. The weight gradient reads its gathered rows through a per-step index load, which
# takes two of its pipeline stages: num_stages 5 keeps three row blocks in flight. Its tiles are widest along the
# expert-ordered operand (read through TMA). The benchmark's --sweep overrides these through ``launch``.
_LAUNCH: Mapping[str, GemmLaunch] = MappingProxyType(
    {
        "up": GemmLaunch(128, 128, 64, 8, 3, True),
        "down": GemmLaunch(128, 256, 64, 8, 4, True),
        "down_bwd": GemmLaunch(128, 256, 64, 8, 4, True, 0),
        "dx": GemmLaunch(128, 256, 64, 8, 4, True),
        "wgrad_down": GemmLaunch(64, 128, 256, 8, 5, True),
        "wgrad_gate_up": GemmLaunch(64, 256, 128, 8, 5, True),
    }
)
_LAUNCH_NO_TMA: Mapping[str, GemmLaunch] = MappingProxyType(
    {
        "up": GemmLaunch(128, 64, 64, 8, 3),
        "down": GemmLaunch(128, 128, 64, 8, 3),
        "down_bwd": GemmLaunch(128, 64, 64, 8, 3),
        "dx": GemmLaunch(128, 128, 64, 8, 3),
        "wgrad_down": GemmLaunch(64, 128, 128, 8, 3),
        "wgrad_gate_up": GemmLaunch(64, 128, 128, 8, 3),
    }
)
# Interpreter: small tiles so that the odd test shapes exercise several row, column and K tiles and their tails.
_LAUNCH_INTERPRETER = GemmLaunch(16, 32, 32, 4, 1)
_COMBINE_BLOCK = 1024
_ACT_BWD_BLOCK_R, _ACT_BWD_BLOCK_C = 16, 256  # rows x columns per program of the two-pass activation backward
_GROUP_M = 8  # row tiles per swizzle group (see _swizzle)

# dot precision codes (constexpr PRECISION of the kernels)
_PREC_NATIVE, _PREC_TF32, _PREC_IEEE = 0, 1, 2


class MoERouting(NamedTuple):
    """Expert-sorted order of the ``S = T * top_k`` routing slots (slot ``t * top_k + s``).

    Attributes:
        perm: int32 (S,): the slot of each row of the expert-sorted order (stable: slots of one expert keep their
            order); slots of sentinel ids (``>= num_experts``) come last.
        inv_perm: int32 (S,): the expert-sorted row of each slot (``perm[inv_perm[i]] == i``).
        tokens_per_expert: int32 (E,): slots routed to each expert.
        offsets: int32 (E + 1,): rows ``offsets[e]:offsets[e + 1]`` of the sorted order belong to expert ``e``;
            ``offsets[E]`` is the number of non-sentinel slots.
        num_experts: E.
        top_k: k.
    """

    perm: torch.Tensor
    inv_perm: torch.Tensor
    tokens_per_expert: torch.Tensor
    offsets: torch.Tensor
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class _Layout:
    """Where the gate and up rows of W_gu are, the activation, and the weights' orientation."""

    act: int
    gate_first: bool
    interleaved: bool
    transposed: bool
    alpha: float = 1.702
    limit: float = 7.0

    def gate_up_rows(self, intermediate: int) -> tuple[int, int, int]:
        """(gate_offset, up_offset, step): gate row of column c is ``gate_offset + c * step`` (likewise up)."""
        if self.interleaved:
            return (0, 1, 2) if self.gate_first else (1, 0, 2)
        return (0, intermediate, 1) if self.gate_first else (intermediate, 0, 1)

    def gate_up_strides(self, w: torch.Tensor) -> tuple[int, int]:
        """(stride along the 2I rows, stride along H) of a gate_up-shaped tensor."""
        return (w.stride(2), w.stride(1)) if self.transposed else (w.stride(1), w.stride(2))

    def down_strides(self, w: torch.Tensor) -> tuple[int, int]:
        """(stride along H, stride along I) of a down-shaped tensor."""
        return (w.stride(2), w.stride(1)) if self.transposed else (w.stride(1), w.stride(2))


# ============================================================================================ routing


def _check_index(top_k_index: torch.Tensor) -> None:
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be 2-D (tokens, top_k), got shape {tuple(top_k_index.shape)}")
    if top_k_index.is_floating_point() or top_k_index.is_complex() or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    on_cpu = top_k_index.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_cpu and top_k_index.numel() and int(top_k_index.min()) < 0:
        raise ValueError("top_k_index has negative expert ids; ids must be in [0, num_experts) (or >= num_experts "
                         "for slots dropped by expert parallelism)")  # fmt: skip


def moe_route(top_k_index: torch.Tensor, num_experts: int) -> MoERouting:
    """Expert-sorted order of the routing slots: one stable sort, its inverse and the per-expert offsets.

    Torch ops on purpose: a stable sort, a ``searchsorted`` and a scatter over ``S`` integers are one launch each
    and take microseconds next to the expert GEMMs; none syncs with the host, so the result can feed the kernels
    (and CUDA graphs) directly. Expert ids ``>= num_experts`` (expert-parallel sentinels) are sorted last and
    excluded from ``tokens_per_expert`` / ``offsets``. Negative ids are invalid (checked on CPU only: a check on
    CUDA would sync).

    Args:
        top_k_index: (T, k) integer expert ids.
        num_experts: E, the number of (local) experts.

    Returns:
        A ``MoERouting``.
    """
    _check_index(top_k_index)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ids = top_k_index.reshape(-1)
    n_slots = ids.numel()
    sorted_ids, perm = torch.sort(ids, stable=True)
    bounds = torch.arange(num_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    perm32 = perm.to(torch.int32)
    inv = torch.empty_like(perm32)
    inv.scatter_(0, perm, torch.arange(n_slots, device=ids.device, dtype=torch.int32))
    return MoERouting(perm32, inv, offsets.diff(), offsets, num_experts, int(top_k_index.shape[1]))


def moe_route_ref(top_k_index: torch.Tensor, num_experts: int) -> MoERouting:
    """Pure-torch reference of :func:`moe_route`, one expert at a time (same contract and result)."""
    _check_index(top_k_index)
    ids = top_k_index.reshape(-1).long()
    pieces, counts = [], []
    for e in range(num_experts):
        slots = torch.nonzero(ids == e).flatten()
        pieces.append(slots)
        counts.append(slots.numel())
    for sentinel in torch.unique(ids[ids >= num_experts]).tolist():
        pieces.append(torch.nonzero(ids == sentinel).flatten())
    perm = torch.cat(pieces) if pieces else ids.new_empty(0)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    tokens = torch.tensor(counts, dtype=torch.int32, device=ids.device)
    offsets = torch.cat([tokens.new_zeros(1), torch.cumsum(tokens, 0, dtype=torch.int32)])
    return MoERouting(
        perm.to(torch.int32), inv.to(torch.int32), tokens, offsets, num_experts, int(top_k_index.shape[1])
    )


# ============================================================================================ Triton kernels


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b; PRECISION 0: native (bf16/fp16 tensor cores), 1: tf32, 2: IEEE fp32 (also the interpreter)."""
    if PRECISION == 2:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PRECISION == 1:
        out = tl.dot(a, b, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _expert_tile(pid_m, OFFSETS, n_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert of row tile ``pid_m`` and the tile's row range [row_start, row_end) in the expert-sorted order.

    Tiles are numbered expert by expert (``ceil(count_e / BLOCK_M)`` each); expert >= n_experts past the last."""
    idx = tl.arange(0, BLOCK_E)
    in_range = idx < n_experts
    starts = tl.load(OFFSETS + idx, mask=in_range, other=0)
    ends = tl.load(OFFSETS + idx + 1, mask=in_range, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, axis=0)  # inclusive: tiles of experts 0..e
    expert = tl.sum((last <= pid_m).to(tl.int32), axis=0)
    pick = idx == expert
    first = tl.sum(tl.where(pick, last - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(pick, starts, 0), axis=0) + (pid_m - first) * BLOCK_M
    row_end = tl.sum(tl.where(pick, ends, 0), axis=0)
    return expert, row_start, row_end


@triton.jit
def _gated(gate, up, ACT: tl.constexpr, alpha, limit, NEED_GRAD: tl.constexpr):
    """(a, da/dgate, da/dup) of the gated activation, fp32 in and out (gradients are placeholders unless
    NEED_GRAD)."""
    if ACT == 3:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(alpha * g)
        glu = g * sig
        a = (u + 1.0) * glu
        if NEED_GRAD:
            d_gate = tl.where(gate <= limit, (u + 1.0) * sig * (1.0 + alpha * g * (1.0 - sig)), 0.0)
            d_up = tl.where((up >= -limit) & (up <= limit), glu, 0.0)
        else:
            d_gate = a
            d_up = a
    else:
        act, deriv = _activation_and_derivative(gate, ACT, NEED_GRAD)
        a = act * up
        d_gate = deriv * up
        d_up = act
    return a, d_gate, d_up


@triton.jit
def _tma_weight_tile(desc, expert, n0, k0, K_INNER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_N) tile (rows k0.., columns n0..) of one expert's weight through a TMA descriptor over the
    stack in memory order: (E, N, K) when K is the unit-stride dim (K_INNER), else (E, K, N); zero past the edges."""
    if K_INNER:
        w = tl.trans(desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        w = desc.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    return w


@triton.jit
def _swizzle(pid, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``, in groups of GROUP_M row tiles walked column by column, so
    that programs running together share weight tiles (same expert, same columns) and token rows in L2."""
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _moe_up_kernel(
    X,  # (T, K) hidden states, unit stride along K
    W,  # gate_up weights; element (e, r, k) at e * stride_we + r * stride_wr + k * stride_wk
    BIAS,  # (E, 2I) or a dummy
    PERM,  # int32 (S,)
    OFFSETS,  # int32 (E + 1,)
    HOUT,  # (S, 2I): h in W's row order (STORE_H)
    AOUT,  # (S, I): act(gate) * up
    W_DESC,  # TMA descriptor over W (USE_TMA; concatenated gate/up rows only) or None
    n_experts,
    n_tiles_m,  # row tiles in the grid (an upper bound: tiles past the last expert exit)
    K,
    n_inter,
    stride_xt,
    stride_we,
    stride_wr,
    stride_wk,
    stride_be,
    stride_br,
    gate_off,
    up_off,
    alpha,
    limit,
    STEP: tl.constexpr,
    TOPK: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_H: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    W_K_INNER: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    n_tiles_n = tl.cdiv(n_inter, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), n_tiles_m, n_tiles_n, GROUP_M)
    expert, row_start, row_end = _expert_tile(pid_m, OFFSETS, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(PERM + rows, mask=row_mask, other=0)
    tokens = (slots // TOPK).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_inter
    gate_rows = gate_off + cols * STEP
    up_rows = up_off + cols * STEP
    w_expert = W + expert.to(tl.int64) * stride_we
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tokens[:, None] * stride_xt + offs_k[None, :]
    wg_ptrs = w_expert + gate_rows[None, :].to(tl.int64) * stride_wr + offs_k[:, None] * stride_wk
    wu_ptrs = w_expert + up_rows[None, :].to(tl.int64) * stride_wr + offs_k[:, None] * stride_wk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        if USE_TMA:  # gate/up tiles are row blocks of W (columns past I read rows nobody stores)
            wg = _tma_weight_tile(W_DESC, expert, gate_off + pid_n * BLOCK_N, k0, W_K_INNER, BLOCK_N, BLOCK_K)
            wu = _tma_weight_tile(W_DESC, expert, up_off + pid_n * BLOCK_N, k0, W_K_INNER, BLOCK_N, BLOCK_K)
        elif EVEN_K:
            wg = tl.load(wg_ptrs, mask=col_mask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            wg = tl.load(wg_ptrs, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            wu = tl.load(wu_ptrs, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc_g = _mma(x, wg, acc_g, PRECISION)
        acc_u = _mma(x, wu, acc_u, PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_expert = BIAS + expert.to(tl.int64) * stride_be
        acc_g += tl.load(b_expert + gate_rows * stride_br, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_expert + up_rows * stride_br, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # h is rounded once to the compute dtype; a is computed from the rounded values the backward will read
    g_lp = acc_g.to(AOUT.dtype.element_ty)
    u_lp = acc_u.to(AOUT.dtype.element_ty)
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    if STORE_H:
        h_row = HOUT + rows64[:, None] * (2 * n_inter)
        tl.store(h_row + gate_rows[None, :], g_lp, mask=mask)
        tl.store(h_row + up_rows[None, :], u_lp, mask=mask)
    a, _unused_g, _unused_u = _gated(g_lp.to(tl.float32), u_lp.to(tl.float32), ACT, alpha, limit, False)
    tl.store(AOUT + rows64[:, None] * n_inter + cols[None, :], a.to(AOUT.dtype.element_ty), mask=mask)


@triton.jit
def _moe_grouped_mm_kernel(
    X,  # (S, K) rows in expert order (or token rows read through PERM: X_GATHER), unit stride along K
    W,  # element (e, n, k) at e * stride_we + n * stride_wn + k * stride_wk
    BIAS,  # (E, N) or a dummy
    PERM,  # int32 (S,) (X_GATHER)
    OFFSETS,
    Y,  # (S, N) rows in expert order
    X_DESC,  # TMA descriptor over X (S, K) (X_TMA) or None
    W_DESC,  # TMA descriptor over W (USE_TMA) or None
    n_experts,
    n_tiles_m,  # row tiles in the grid (an upper bound: tiles past the last expert exit)
    K,
    N,
    stride_x,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_y,
    TOPK: tl.constexpr,
    X_GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    X_TMA: tl.constexpr,
    W_K_INNER: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), n_tiles_m, n_tiles_n, GROUP_M)
    expert, row_start, row_end = _expert_tile(pid_m, OFFSETS, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if X_GATHER:
        x_rows = (tl.load(PERM + rows, mask=row_mask, other=0) // TOPK).to(tl.int64)
    else:
        x_rows = rows64
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + x_rows[:, None] * stride_x + offs_k[None, :]
    w_ptrs = W + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # X_TMA: whole row blocks; rows past the expert's last are the next expert's, their outputs never stored
        if X_TMA:
            x = X_DESC.load([row_start, k0])
        elif EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        if USE_TMA:
            w = _tma_weight_tile(W_DESC, expert, pid_n * BLOCK_N, k0, W_K_INNER, BLOCK_N, BLOCK_K)
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=col_mask[None, :] & ((k0 + offs_k) < K)[:, None], other=0.0)
        acc = _mma(x, w, acc, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b = tl.load(BIAS + expert.to(tl.int64) * stride_be + cols * stride_bn, mask=col_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _moe_act_bwd_kernel(
    DA,  # (S, I) d(a) before the routing weight, expert order
    HBUF,  # (S, 2I) saved h
    PERM,
    OFFSETS,
    TKW,  # (S,) routing weights by slot
    DH,  # (S, 2I) out (STORE_DH)
    AW,  # (S, I) out: w * a (STORE_AW)
    DWP,  # fp32 (column blocks, S) out: per column block <da, a> (STORE_DWP)
    n_experts,
    n_inter,
    n_slots,
    gate_off,
    up_off,
    alpha,
    limit,
    STEP: tl.constexpr,
    ACT: tl.constexpr,
    STORE_DH: tl.constexpr,
    STORE_AW: tl.constexpr,
    STORE_DWP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # the down-projection backward's epilogue as its own pass (GemmLaunch.fused False), rows < offsets[E]
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < tl.load(OFFSETS + n_experts)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (cols < n_inter)[None, :]
    rows64 = rows.to(tl.int64)
    da = tl.load(DA + rows64[:, None] * n_inter + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h_row = HBUF + rows64[:, None] * (2 * n_inter)
    gate_rows = gate_off + cols * STEP
    up_rows = up_off + cols * STEP
    gate = tl.load(h_row + gate_rows[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_row + up_rows[None, :], mask=mask, other=0.0).to(tl.float32)
    a, d_gate, d_up = _gated(gate, up, ACT, alpha, limit, STORE_DH)
    slots = tl.load(PERM + rows, mask=row_mask, other=0)
    weight = tl.load(TKW + slots, mask=row_mask, other=0.0).to(tl.float32)
    if STORE_DWP:
        tl.store(DWP + pid_c.to(tl.int64) * n_slots + rows64, tl.sum(da * a, axis=1), mask=row_mask)
    if STORE_AW:
        tl.store(
            AW + rows64[:, None] * n_inter + cols[None, :], (a * weight[:, None]).to(AW.dtype.element_ty), mask=mask
        )
    if STORE_DH:
        dw = da * weight[:, None]
        dh_row = DH + rows64[:, None] * (2 * n_inter)
        tl.store(dh_row + gate_rows[None, :], (dw * d_gate).to(DH.dtype.element_ty), mask=mask)
        tl.store(dh_row + up_rows[None, :], (dw * d_up).to(DH.dtype.element_ty), mask=mask)


@triton.jit
def _down_bwd_epilogue(
    acc, pid_n, half, rows, row_mask, slots, TKW, HBUF, DH, AW, DWP, n_inter, n_slots, gate_off, up_off, alpha,
    limit, STEP: tl.constexpr, ACT: tl.constexpr, STORE_DH: tl.constexpr, STORE_AW: tl.constexpr,
    STORE_DWP: tl.constexpr, HALVES: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Stores of one (BLOCK_M, BLOCK_N) column block ``half`` of the program's tile; ``acc`` = d(a) before the
    routing weight; a is recomputed from the saved h."""
    n0 = (pid_n * HALVES + half) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < n_inter
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    gate_rows = gate_off + cols * STEP
    up_rows = up_off + cols * STEP
    h_row = HBUF + rows64[:, None] * (2 * n_inter)
    gate = tl.load(h_row + gate_rows[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_row + up_rows[None, :], mask=mask, other=0.0).to(tl.float32)
    a, d_gate, d_up = _gated(gate, up, ACT, alpha, limit, STORE_DH)
    weight = tl.load(TKW + slots, mask=row_mask, other=0.0).to(tl.float32)
    if STORE_DWP:
        dwp_row = (pid_n * HALVES + half).to(tl.int64) * n_slots
        tl.store(DWP + dwp_row + rows64, tl.sum(acc * a, axis=1), mask=row_mask)
    if STORE_AW:
        tl.store(
            AW + rows64[:, None] * n_inter + cols[None, :], (a * weight[:, None]).to(AW.dtype.element_ty), mask=mask
        )
    if STORE_DH:
        da = acc * weight[:, None]
        dh_row = DH + rows64[:, None] * (2 * n_inter)
        tl.store(dh_row + gate_rows[None, :], (da * d_gate).to(DH.dtype.element_ty), mask=mask)
        tl.store(dh_row + up_rows[None, :], (da * d_up).to(DH.dtype.element_ty), mask=mask)


@triton.jit
def _moe_down_bwd_kernel(
    DOUT,  # (T, K) gradient of the output, unit stride along K (= H)
    W,  # down weights; element (e, h, i) at e * stride_we + i * stride_wn + h * stride_wk
    PERM,
    OFFSETS,
    TKW,  # (S,) routing weights by slot
    HBUF,  # (S, 2I) saved h
    DH,  # (S, 2I) out: gradient of h (STORE_DH)
    AW,  # (S, I) out: w * a (STORE_AW)
    DWP,  # fp32 (column blocks, S) out: per column block <da, a> (STORE_DWP)
    W_DESC,  # TMA descriptor over W (USE_TMA) or None
    n_experts,
    n_tiles_m,  # row tiles in the grid (an upper bound: tiles past the last expert exit)
    K,
    n_inter,
    n_slots,
    stride_dt,
    stride_we,
    stride_wn,
    stride_wk,
    gate_off,
    up_off,
    alpha,
    limit,
    STEP: tl.constexpr,
    TOPK: tl.constexpr,
    ACT: tl.constexpr,
    STORE_DH: tl.constexpr,
    STORE_AW: tl.constexpr,
    STORE_DWP: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    W_K_INNER: tl.constexpr,
    PRECISION: tl.constexpr,
    HALVES: tl.constexpr,  # 1 or 2 column blocks of BLOCK_N per program, sharing the gathered DOUT tile
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    n_tiles_n = tl.cdiv(n_inter, HALVES * BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), n_tiles_m, n_tiles_n, GROUP_M)
    expert, row_start, row_end = _expert_tile(pid_m, OFFSETS, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(PERM + rows, mask=row_mask, other=0)
    tokens = (slots // TOPK).to(tl.int64)
    n0 = pid_n * HALVES * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = DOUT + tokens[:, None] * stride_dt + offs_k[None, :]
    w_ptrs = W + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    w_ptrs2 = w_ptrs + BLOCK_N * stride_wn
    col_mask = cols < n_inter
    col_mask2 = (cols + BLOCK_N) < n_inter
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            g = tl.load(g_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            g = tl.load(g_ptrs, mask=row_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        if USE_TMA:
            w = _tma_weight_tile(W_DESC, expert, n0, k0, W_K_INNER, BLOCK_N, BLOCK_K)
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=col_mask[None, :] & ((k0 + offs_k) < K)[:, None], other=0.0)
        acc = _mma(g, w, acc, PRECISION)
        if HALVES == 2:
            if USE_TMA:
                w2 = _tma_weight_tile(W_DESC, expert, n0 + BLOCK_N, k0, W_K_INNER, BLOCK_N, BLOCK_K)
            elif EVEN_K:
                w2 = tl.load(w_ptrs2, mask=col_mask2[None, :], other=0.0)
            else:
                w2 = tl.load(w_ptrs2, mask=col_mask2[None, :] & ((k0 + offs_k) < K)[:, None], other=0.0)
            acc2 = _mma(g, w2, acc2, PRECISION)
        g_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
        w_ptrs2 += BLOCK_K * stride_wk
    _down_bwd_epilogue(
        acc, pid_n, 0, rows, row_mask, slots, TKW, HBUF, DH, AW, DWP, n_inter, n_slots, gate_off, up_off, alpha,
        limit, STEP, ACT, STORE_DH, STORE_AW, STORE_DWP, HALVES, BLOCK_N,
    )  # fmt: skip
    if HALVES == 2:
        _down_bwd_epilogue(
            acc2, pid_n, 1, rows, row_mask, slots, TKW, HBUF, DH, AW, DWP, n_inter, n_slots, gate_off, up_off, alpha,
            limit, STEP, ACT, STORE_DH, STORE_AW, STORE_DWP, HALVES, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _wgrad_rows(
    G, X, PERM, G_DESC, X_DESC, r0, row_end, offs_n, offs_k, n0, k0, N, K, stride_g, stride_x,
    TOPK: tl.constexpr, G_GATHER: tl.constexpr, X_GATHER: tl.constexpr, NEED_SLOTS: tl.constexpr,
    MASK_ROWS: tl.constexpr, G_TMA: tl.constexpr, X_TMA: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """(g (BLOCK_M, BLOCK_N), x (BLOCK_M, BLOCK_K), slots) of rows r0.. of one expert: gathered operands through
    PERM, expert-ordered ones through their TMA descriptor (G_TMA / X_TMA, full row blocks only) or pointers; rows
    past row_end are zero when MASK_ROWS (else every row is the expert's)."""
    rows = r0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = rows
    if NEED_SLOTS:
        if MASK_ROWS:
            slots = tl.load(PERM + rows, mask=row_mask, other=0)
        else:
            slots = tl.load(PERM + rows)
    if G_GATHER:
        g_rows = (slots // TOPK).to(tl.int64)
    else:
        g_rows = rows.to(tl.int64)
    if X_GATHER:
        x_rows = (slots // TOPK).to(tl.int64)
    else:
        x_rows = rows.to(tl.int64)
    g_ptrs = G + g_rows[:, None] * stride_g + offs_n[None, :]
    x_ptrs = X + x_rows[:, None] * stride_x + offs_k[None, :]
    if MASK_ROWS:
        if EVEN_N:
            g = tl.load(g_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            g = tl.load(g_ptrs, mask=row_mask[:, None] & (offs_n < N)[None, :], other=0.0)
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_mask[:, None] & (offs_k < K)[None, :], other=0.0)
    else:
        if G_TMA:
            g = G_DESC.load([r0, n0])
        elif EVEN_N:
            g = tl.load(g_ptrs)
        else:
            g = tl.load(g_ptrs, mask=(offs_n < N)[None, :], other=0.0)
        if X_TMA:
            x = X_DESC.load([r0, k0])
        elif EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(offs_k < K)[None, :], other=0.0)
    return g, x, slots


@triton.jit
def _moe_weight_grad_kernel(
    G,  # rows of (.., N): expert order (G_GATHER False) or token rows read through PERM (True)
    X,  # rows of (.., K): likewise with X_GATHER
    PERM,
    OFFSETS,
    SCALE,  # (S,) by slot: scales G's rows in the bias sum (HAS_SCALE)
    DW,  # element (e, n, k) at e * stride_dwe + n * stride_dwn + k * stride_dwk
    DB,  # element (e, n) at e * stride_dbe + n * stride_dbn (HAS_DB)
    G_DESC,  # TMA descriptors over G (S, N) (G_TMA: G in expert order) and X (S, K) (X_TMA), or None
    X_DESC,
    N,
    K,
    stride_g,
    stride_x,
    stride_dwe,
    stride_dwn,
    stride_dwk,
    stride_dbe,
    stride_dbn,
    TOPK: tl.constexpr,
    G_GATHER: tl.constexpr,
    X_GATHER: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NEED_SLOTS: tl.constexpr,  # G_GATHER or X_GATHER or HAS_SCALE
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    G_TMA: tl.constexpr,
    X_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dW[e] = sum over the expert's rows j of G[j]^T X[j]: an (N, K) tile per program, rows reduced BLOCK_M at a
    # time (full row blocks unmasked, then the expert's tail block masked); an expert's tiles are walked in groups
    # of GROUP_M N-tiles, K-tile by K-tile, so programs running together share G and X columns in L2
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    n_tiles_k = tl.cdiv(K, BLOCK_K)
    per_expert = n_tiles_n * n_tiles_k
    expert = pid // per_expert
    pid_n, pid_k = _swizzle(pid % per_expert, n_tiles_n, n_tiles_k, GROUP_M)
    row_start = tl.load(OFFSETS + expert)
    row_end = tl.load(OFFSETS + expert + 1)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    n_full = (row_end - row_start) // BLOCK_M
    for i in range(0, n_full):
        r0 = row_start + i * BLOCK_M
        g, x, slots = _wgrad_rows(
            G, X, PERM, G_DESC, X_DESC, r0, row_end, offs_n, offs_k, n0, k0, N, K, stride_g, stride_x, TOPK,
            G_GATHER, X_GATHER, NEED_SLOTS, False, G_TMA, X_TMA, EVEN_N, EVEN_K, BLOCK_M,
        )  # fmt: skip
        acc = _mma(tl.trans(g), x, acc, PRECISION)
        if HAS_DB:
            if pid_k == 0:
                gf = g.to(tl.float32)
                if HAS_SCALE:
                    gf = gf * tl.load(SCALE + slots).to(tl.float32)[:, None]
                bias_acc += tl.sum(gf, axis=0)
    r_tail = row_start + n_full * BLOCK_M
    if r_tail < row_end:
        g, x, slots = _wgrad_rows(
            G, X, PERM, G_DESC, X_DESC, r_tail, row_end, offs_n, offs_k, n0, k0, N, K, stride_g, stride_x, TOPK,
            G_GATHER, X_GATHER, NEED_SLOTS, True, False, False, EVEN_N, EVEN_K, BLOCK_M,
        )  # fmt: skip
        acc = _mma(tl.trans(g), x, acc, PRECISION)
        if HAS_DB:
            if pid_k == 0:
                gf = g.to(tl.float32)
                if HAS_SCALE:
                    rows = r_tail + tl.arange(0, BLOCK_M)
                    gf = gf * tl.load(SCALE + slots, mask=rows < row_end, other=0.0).to(tl.float32)[:, None]
                bias_acc += tl.sum(gf, axis=0)
    dw = (
        DW + expert.to(tl.int64) * stride_dwe + offs_n[:, None].to(tl.int64) * stride_dwn + offs_k[None, :] * stride_dwk
    )
    if EVEN_N and EVEN_K:
        tl.store(dw, acc.to(DW.dtype.element_ty))
    else:
        tl.store(dw, acc.to(DW.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])
    if HAS_DB:
        if pid_k == 0:
            db = DB + expert.to(tl.int64) * stride_dbe + offs_n * stride_dbn
            tl.store(db, bias_acc.to(DB.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _moe_combine_kernel(
    Y,  # (S, N) rows in expert order
    INV,  # int32 (S,) expert-order row of each slot
    TKW,  # (S,) routing weights by slot (WEIGHTED)
    OFFSETS,
    OUT,  # (T, N)
    n_experts,
    N,
    stride_y,
    stride_o,
    TOPK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[t] = sum_s (w[t, s] *) Y[inv[t * k + s]] in fp32, one rounding; sentinel slots (rows >= offsets[E]) skipped
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    token = pid // n_blocks
    cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < N
    n_valid = tl.load(OFFSETS + n_experts)  # rows past it belong to sentinel slots
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(TOPK):
        slot = token * TOPK + s
        row = tl.load(INV + slot)
        limit = tl.where(row < n_valid, N, 0)  # a sentinel slot reads nothing
        y = tl.load(Y + row.to(tl.int64) * stride_y + cols, mask=cols < limit, other=0.0)
        y = y.to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(TKW + slot).to(tl.float32)
        acc += y
    tl.store(OUT + token.to(tl.int64) * stride_o + cols, acc.to(OUT.dtype.element_ty), mask=col_mask)


# ============================================================================================ launchers


def _precision(dtype: torch.dtype) -> int:
    if interpreter_enabled():
        return _PREC_IEEE
    if dtype == torch.float32:
        return _PREC_TF32 if torch.backends.cuda.matmul.allow_tf32 else _PREC_IEEE
    return _PREC_NATIVE


def _launch_for(name: str, launch: Mapping[str, GemmLaunch] | None, like: torch.Tensor) -> GemmLaunch:
    """The tile setting of kernel ``name`` for operands like ``like`` (device, dtype): the override, else the
    defaults (the pointer-only ones for IEEE fp32 dots, which run on CUDA cores and keep their operands in
    registers), whose reduction step (block_k; block_m for the weight gradients) is halved for 4-byte operands so
    that a pipeline stage takes the shared memory it takes in 16-bit."""
    if launch is not None:
        if name in launch:
            return GemmLaunch(*launch[name])
        if name.startswith("wgrad_") and "wgrad" in launch:
            return GemmLaunch(*launch["wgrad"])
    if interpreter_enabled():
        return _LAUNCH_INTERPRETER
    wide = _tma_available(like.device) and _precision(like.dtype) != _PREC_IEEE
    cfg = _LAUNCH[name] if wide else _LAUNCH_NO_TMA[name]
    return _for_element_size(name, cfg, like.element_size())


def _for_element_size(name: str, cfg: GemmLaunch, element_size: int) -> GemmLaunch:
    """A default setting for operands of ``element_size`` bytes: the reduction step halved for 4-byte ones."""
    if element_size <= 2:
        return cfg
    if name.startswith("wgrad_"):
        return cfg._replace(block_m=cfg.block_m // 2)
    return cfg._replace(block_k=cfg.block_k // 2)


def _fit(block: int, extent: int) -> int:
    """A block no wider than the extent needs (at least 16, the tensor-core minimum)."""
    return max(16, min(block, next_power_of_2(extent)))


def _tma_available(device: torch.device) -> bool:
    """TMA descriptors work here: Hopper or newer (or the interpreter, which emulates them)."""
    if TensorDescriptor is None:
        return False
    if interpreter_enabled():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _weight_descriptor(weight, stride_n, stride_k, n_extent, k_extent, block_n, block_k):
    """(descriptor, k_inner) over an expert stack seen as (e, n, k) with the given strides, in memory order; None
    when TMA cannot address it (no unit-stride dim among n and k, or strides / base not 16-byte aligned)."""
    if stride_k == 1:
        shape, strides, block, k_inner = (
            [weight.shape[0], n_extent, k_extent],
            [weight.stride(0), stride_n, 1],
            [1, block_n, block_k],
            True,
        )
    elif stride_n == 1:
        shape, strides, block, k_inner = (
            [weight.shape[0], k_extent, n_extent],
            [weight.stride(0), stride_k, 1],
            [1, block_k, block_n],
            False,
        )
    else:
        return None
    size = weight.element_size()
    if weight.data_ptr() % 16 or any((st * size) % 16 for st in strides[:-1]):
        return None
    return TensorDescriptor(weight, shape, strides, block), k_inner


def _rows_descriptor(rows: torch.Tensor, block_m: int, block_n: int):
    """TMA descriptor over a 2-D row buffer (unit stride along its columns, 16-byte aligned), or None."""
    size = rows.element_size()
    if rows.stride(1) != 1 or rows.data_ptr() % 16 or (rows.stride(0) * size) % 16 or rows.shape[0] == 0:
        return None
    return TensorDescriptor(rows, list(rows.shape), [rows.stride(0), 1], [block_m, block_n])


def _row_tiles_bound(routing: MoERouting, block_m: int) -> int:
    """Upper bound on the number of row tiles (sum over experts of ceil(count / block_m)) without reading counts."""
    n_slots = routing.perm.numel()
    return triton.cdiv(n_slots, block_m) + min(routing.num_experts, n_slots)


def moe_up_triton(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    routing: MoERouting,
    layout: _Layout,
    store_h: bool = True,
    launch: Mapping[str, GemmLaunch] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton up projection: ``(h (S, 2I) or None, a (S, I))`` in expert order (contract of :func:`moe_up_ref`)."""
    n_slots = routing.perm.numel()
    two_i = gate_up.shape[2] if layout.transposed else gate_up.shape[1]
    inter = two_i // 2
    hidden_dim = hidden.shape[1]
    a = torch.empty(n_slots, inter, dtype=hidden.dtype, device=hidden.device)
    h = torch.empty(n_slots, two_i, dtype=hidden.dtype, device=hidden.device) if store_h else None
    if n_slots == 0:
        return h, a
    cfg = _launch_for("up", launch, hidden)
    block_n, block_k = _fit(cfg.block_n, inter), _fit(cfg.block_k, hidden_dim)
    stride_wr, stride_wk = layout.gate_up_strides(gate_up)
    gate_off, up_off, step = layout.gate_up_rows(inter)
    bias = gate_up_bias if gate_up_bias is not None else a
    desc = None
    if cfg.tma and step == 1 and _tma_available(hidden.device):
        desc = _weight_descriptor(gate_up, stride_wr, stride_wk, two_i, hidden_dim, block_n, block_k)
    w_desc, k_inner = desc if desc is not None else (None, True)
    n_tiles_m = _row_tiles_bound(routing, cfg.block_m)
    grid = (n_tiles_m * triton.cdiv(inter, block_n),)
    has_bias = gate_up_bias is not None
    _moe_up_kernel[grid](
        hidden, gate_up, bias, routing.perm, routing.offsets, h if store_h else a, a, w_desc,
        routing.num_experts, n_tiles_m, hidden_dim, inter, hidden.stride(0), gate_up.stride(0), stride_wr, stride_wk,
        bias.stride(0) if has_bias else 0, bias.stride(1) if has_bias else 0, gate_off, up_off, layout.alpha,
        layout.limit, STEP=step, TOPK=routing.top_k, ACT=layout.act, HAS_BIAS=has_bias, STORE_H=store_h,
        EVEN_K=hidden_dim % block_k == 0, USE_TMA=w_desc is not None, W_K_INNER=k_inner,
        PRECISION=_precision(hidden.dtype), GROUP_M=_GROUP_M, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_E=next_power_of_2(routing.num_experts), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return h, a


def moe_grouped_mm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride_n: int,
    stride_k: int,
    out_features: int,
    routing: MoERouting,
    bias: torch.Tensor | None = None,
    launch_name: str = "down",
    launch: Mapping[str, GemmLaunch] | None = None,
    x_gather: bool = False,
) -> torch.Tensor:
    """Triton grouped GEMM on expert-ordered rows (contract of :func:`moe_grouped_mm_ref`); ``x_gather``: ``x``
    holds token rows, row ``j`` of the expert order being ``x[perm[j] // top_k]`` (read in the kernel)."""
    n_slots, k_dim = (routing.perm.numel() if x_gather else x.shape[0]), x.shape[1]
    y = torch.empty(n_slots, out_features, dtype=x.dtype, device=x.device)
    if n_slots == 0:
        return y
    cfg = _launch_for(launch_name, launch, x)
    block_n, block_k = _fit(cfg.block_n, out_features), _fit(cfg.block_k, k_dim)
    b = bias if bias is not None else y
    x_desc, w_desc, k_inner = None, None, True
    if cfg.tma and _tma_available(x.device):
        desc = _weight_descriptor(weight, stride_n, stride_k, out_features, k_dim, block_n, block_k)
        if desc is not None:
            w_desc, k_inner = desc
            if not x_gather:
                x_desc = _rows_descriptor(x, cfg.block_m, block_k)
    n_tiles_m = _row_tiles_bound(routing, cfg.block_m)
    grid = (n_tiles_m * triton.cdiv(out_features, block_n),)
    _moe_grouped_mm_kernel[grid](
        x, weight, b, routing.perm, routing.offsets, y, x_desc, w_desc, routing.num_experts, n_tiles_m, k_dim,
        out_features, x.stride(0), weight.stride(0), stride_n, stride_k, b.stride(0) if bias is not None else 0,
        b.stride(1) if bias is not None else 0, y.stride(0), TOPK=routing.top_k, X_GATHER=x_gather,
        HAS_BIAS=bias is not None, EVEN_K=k_dim % block_k == 0, USE_TMA=w_desc is not None, X_TMA=x_desc is not None,
        W_K_INNER=k_inner, PRECISION=_precision(x.dtype), GROUP_M=_GROUP_M, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_E=next_power_of_2(routing.num_experts), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def _down_backward_two_pass(dout, down, h, top_k_weights, routing, layout, need_dh, need_aw, need_dw, launch):
    """``moe_down_backward_triton`` with ``n_split=0``: ``d(a)`` (S, I) from the grouped GEMM on gathered rows
    (wide tiles, no epilogue pressure), rounded to the compute dtype as transformers' own experts round it, then
    the activation backward in one elementwise pass. (The routing-weight gradient ``<d(a), a>`` sums the rounded
    values: measured on an H100, its error against fp32 stays under transformers' grouped_mm's; an fp32 ``d(a)``
    would match the fused epilogue's digits at twice the traffic of this buffer.)"""
    n_slots, two_i = h.shape
    da = h
    if n_slots and (need_dh or need_aw or need_dw):
        stride_h, stride_i = layout.down_strides(down)
        da = moe_grouped_mm_triton(dout, down, stride_i, stride_h, two_i // 2, routing, None, "down_bwd", launch, True)
    return moe_act_backward_triton(da, h, top_k_weights, routing, layout, need_dh, need_aw, need_dw)


def moe_act_backward_triton(
    da: torch.Tensor,
    h: torch.Tensor,
    top_k_weights: torch.Tensor,
    routing: MoERouting,
    layout: _Layout,
    need_dh: bool = True,
    need_aw: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gated activation's backward on expert-ordered rows, one elementwise pass: from ``d(a)`` (S, I) before
    the routing weight and the saved ``h`` (S, 2I), ``(dh (S, 2I) = act'(h) * (w d(a)), w * a (S, I),
    <d(a), a> (S,) fp32)``, each None when not asked for (rows past ``offsets[E]``: unset, zero for the last)."""
    n_slots, two_i = h.shape
    inter = two_i // 2
    block_c = min(_ACT_BWD_BLOCK_C, next_power_of_2(inter))
    n_blocks_c = triton.cdiv(inter, block_c)
    dh = torch.empty_like(h) if need_dh else None
    aw = torch.empty(n_slots, inter, dtype=h.dtype, device=h.device) if need_aw else None
    dwp = torch.zeros(n_blocks_c, n_slots, dtype=torch.float32, device=h.device) if need_dw else None
    if n_slots and (need_dh or need_aw or need_dw):
        gate_off, up_off, step = layout.gate_up_rows(inter)
        grid = (triton.cdiv(n_slots, _ACT_BWD_BLOCK_R), n_blocks_c)
        _moe_act_bwd_kernel[grid](
            da, h, routing.perm, routing.offsets, top_k_weights, dh if need_dh else h, aw if need_aw else h,
            dwp if need_dw else h, routing.num_experts, inter, n_slots, gate_off, up_off, layout.alpha, layout.limit,
            STEP=step, ACT=layout.act, STORE_DH=need_dh, STORE_AW=need_aw, STORE_DWP=need_dw,
            BLOCK_R=_ACT_BWD_BLOCK_R, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return dh, aw, (dwp.sum(0) if need_dw else None)


def moe_down_backward_triton(
    dout: torch.Tensor,
    down: torch.Tensor,
    h: torch.Tensor,
    top_k_weights: torch.Tensor,
    routing: MoERouting,
    layout: _Layout,
    need_dh: bool = True,
    need_aw: bool = True,
    need_dw: bool = True,
    launch: Mapping[str, GemmLaunch] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton down-projection backward: ``(dh (S, 2I), w * a (S, I), <da, a> (S,) fp32)`` in expert order, each
    None when not asked for (contract of :func:`moe_down_backward_ref`)."""
    n_slots, two_i = h.shape
    inter = two_i // 2
    hidden_dim = dout.shape[1]
    cfg = _launch_for("down_bwd", launch, h)
    if cfg.n_split not in (0, 1, 2):
        raise ValueError(f"GemmLaunch.n_split must be 0, 1 or 2, got {cfg.n_split}")
    if cfg.n_split == 0:
        return _down_backward_two_pass(dout, down, h, top_k_weights, routing, layout, need_dh, need_aw, need_dw, launch)
    halves = cfg.n_split
    block_n, block_k = _fit(cfg.block_n // halves, inter), _fit(cfg.block_k, hidden_dim)
    if halves == 2 and block_n >= inter:
        halves = 1
    n_tiles_n = triton.cdiv(inter, halves * block_n)
    dh = torch.empty_like(h) if need_dh else None
    aw = torch.empty(n_slots, inter, dtype=h.dtype, device=h.device) if need_aw else None
    dwp = torch.zeros(n_tiles_n * halves, n_slots, dtype=torch.float32, device=h.device) if need_dw else None
    if n_slots and (need_dh or need_aw or need_dw):
        stride_h, stride_i = layout.down_strides(down)
        gate_off, up_off, step = layout.gate_up_rows(inter)
        dummy = h
        desc = None
        if cfg.tma and _tma_available(h.device):
            desc = _weight_descriptor(down, stride_i, stride_h, inter, hidden_dim, block_n, block_k)
        w_desc, k_inner = desc if desc is not None else (None, True)
        n_tiles_m = _row_tiles_bound(routing, cfg.block_m)
        grid = (n_tiles_m * n_tiles_n,)
        _moe_down_bwd_kernel[grid](
            dout, down, routing.perm, routing.offsets, top_k_weights, h,
            dh if need_dh else dummy, aw if need_aw else dummy, dwp if need_dw else dummy, w_desc,
            routing.num_experts, n_tiles_m, hidden_dim, inter, n_slots, dout.stride(0), down.stride(0), stride_i,
            stride_h, gate_off, up_off, layout.alpha, layout.limit, STEP=step, TOPK=routing.top_k, ACT=layout.act,
            STORE_DH=need_dh, STORE_AW=need_aw, STORE_DWP=need_dw, EVEN_K=hidden_dim % block_k == 0,
            USE_TMA=w_desc is not None, W_K_INNER=k_inner, PRECISION=_precision(h.dtype), HALVES=halves,
            GROUP_M=_GROUP_M, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=next_power_of_2(routing.num_experts),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dh, aw, (dwp.sum(0) if need_dw else None)


def moe_weight_grad_triton(
    g: torch.Tensor,
    g_gather: bool,
    x: torch.Tensor,
    x_gather: bool,
    routing: MoERouting,
    dw: torch.Tensor,
    dw_strides: tuple[int, int],
    db: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    launch: Mapping[str, GemmLaunch] | None = None,
    launch_name: str = "wgrad_gate_up",
) -> None:
    """Triton per-expert weight gradient written into ``dw`` (element (e, n, k) at ``e * dw.stride(0) +
    n * dw_strides[0] + k * dw_strides[1]``) and, when given, ``db`` (E, N) (contract of
    :func:`moe_weight_grad_ref`); ``launch_name``: the tile setting to use ("wgrad_down" or "wgrad_gate_up")."""
    n_out, k_dim = g.shape[1], x.shape[1]
    cfg = _launch_for(launch_name, launch, g)
    block_n, block_k = _fit(cfg.block_n, n_out), _fit(cfg.block_k, k_dim)
    g_desc = x_desc = None
    if cfg.tma and _tma_available(g.device):  # the expert-ordered operand through TMA (full row blocks)
        if not g_gather:
            g_desc = _rows_descriptor(g, cfg.block_m, block_n)
        if not x_gather:
            x_desc = _rows_descriptor(x, cfg.block_m, block_k)
    use_tma = (g_gather or g_desc is not None) and (x_gather or x_desc is not None) and not (g_gather and x_gather)
    grid = (routing.num_experts * triton.cdiv(n_out, block_n) * triton.cdiv(k_dim, block_k),)
    _moe_weight_grad_kernel[grid](
        g, x, routing.perm, routing.offsets, scale if scale is not None else g, dw, db if db is not None else dw,
        g_desc if use_tma else None, x_desc if use_tma else None, n_out, k_dim, g.stride(0), x.stride(0),
        dw.stride(0), dw_strides[0], dw_strides[1], db.stride(0) if db is not None else 0,
        db.stride(1) if db is not None else 0, TOPK=routing.top_k, G_GATHER=g_gather, X_GATHER=x_gather,
        HAS_DB=db is not None, HAS_SCALE=scale is not None, NEED_SLOTS=g_gather or x_gather or scale is not None,
        EVEN_N=n_out % block_n == 0, EVEN_K=k_dim % block_k == 0, G_TMA=use_tma and not g_gather,
        X_TMA=use_tma and not x_gather, PRECISION=_precision(g.dtype), GROUP_M=_GROUP_M, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def moe_combine_triton(
    y: torch.Tensor, routing: MoERouting, top_k_weights: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Triton weighted gather-sum of expert-ordered rows back to tokens (contract of :func:`moe_combine_ref`)."""
    n_tokens = routing.perm.numel() // routing.top_k if routing.top_k else 0
    n_cols = y.shape[1]
    out = torch.empty(n_tokens, n_cols, dtype=out_dtype, device=y.device)
    if out.numel() == 0:
        return out
    block = min(_COMBINE_BLOCK, next_power_of_2(n_cols))
    grid = (n_tokens * triton.cdiv(n_cols, block),)
    _moe_combine_kernel[grid](
        y, routing.inv_perm, top_k_weights if top_k_weights is not None else y, routing.offsets, out,
        routing.num_experts, n_cols, y.stride(0), out.stride(0), TOPK=routing.top_k,
        WEIGHTED=top_k_weights is not None, BLOCK=block, num_warps=4 if block >= 512 else 2,
    )  # fmt: skip
    return out


# ============================================================================================ piece references


def _gated_torch(gate: torch.Tensor, up: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """The gated activation in torch (GPT-OSS's as its experts module computes it)."""
    if layout.act == _ACT_GPT_OSS:
        gate = gate.clamp(max=layout.limit)
        up = up.clamp(min=-layout.limit, max=layout.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * layout.alpha))
    if layout.act == 0:
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if layout.act == 1 else "none") * up


def _expert_rows(routing: MoERouting, e: int) -> tuple[int, int]:
    return int(routing.offsets[e]), int(routing.offsets[e + 1])


def _split_gate_up(h: torch.Tensor, layout: _Layout, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    gate_off, up_off, step = layout.gate_up_rows(inter)
    return h[:, gate_off : gate_off + step * inter : step], h[:, up_off : up_off + step * inter : step]


def _gate_up_matrix(gate_up: torch.Tensor, e: int, layout: _Layout) -> torch.Tensor:
    """(2I, H) weight of expert e in W_gu's row order."""
    return gate_up[e].t() if layout.transposed else gate_up[e]


def _down_matrix(down: torch.Tensor, e: int, layout: _Layout) -> torch.Tensor:
    """(H, I) weight of expert e."""
    return down[e].t() if layout.transposed else down[e]


def moe_up_ref(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    routing: MoERouting,
    layout: _Layout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference up projection: ``h`` (S, 2I) (rounded to the compute dtype) and ``a = act(gate) * up`` (S, I)
    for the expert-sorted rows (rows past ``offsets[E]`` are zero)."""
    n_slots = routing.perm.numel()
    two_i = gate_up.shape[2] if layout.transposed else gate_up.shape[1]
    h = hidden.new_zeros(n_slots, two_i)
    tokens = routing.perm.long() // routing.top_k
    for e in range(routing.num_experts):
        lo, hi = _expert_rows(routing, e)
        if lo == hi:
            continue
        rows = hidden[tokens[lo:hi]].float() @ _gate_up_matrix(gate_up, e, layout).float().t()
        if gate_up_bias is not None:
            rows = rows + gate_up_bias[e].float()
        h[lo:hi] = rows.to(h.dtype)
    gate, up = _split_gate_up(h.float(), layout, two_i // 2)
    return h, _gated_torch(gate, up, layout).to(hidden.dtype)


def moe_grouped_mm_ref(
    x: torch.Tensor, weight_of: list[torch.Tensor], routing: MoERouting, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference grouped GEMM: rows of expert e times ``weight_of[e]`` (K, N) (+ bias[e]); rows past
    ``offsets[E]`` are zero."""
    out = x.new_zeros(x.shape[0], weight_of[0].shape[1])
    for e in range(routing.num_experts):
        lo, hi = _expert_rows(routing, e)
        if lo == hi:
            continue
        rows = x[lo:hi].float() @ weight_of[e].float()
        if bias is not None:
            rows = rows + bias[e].float()
        out[lo:hi] = rows.to(out.dtype)
    return out


def moe_down_backward_ref(
    dout: torch.Tensor,
    down: torch.Tensor,
    h: torch.Tensor,
    top_k_weights: torch.Tensor,
    routing: MoERouting,
    layout: _Layout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the down-projection backward: ``dh`` (S, 2I), ``w * a`` (S, I) and ``<da, a>`` (S,) fp32."""
    n_slots, two_i = h.shape
    inter = two_i // 2
    tokens = routing.perm.long() // routing.top_k
    weights = top_k_weights.reshape(-1)[routing.perm.long()].float()
    da = torch.zeros(n_slots, inter, dtype=torch.float32, device=h.device)
    for e in range(routing.num_experts):
        lo, hi = _expert_rows(routing, e)
        if lo < hi:
            da[lo:hi] = dout[tokens[lo:hi]].float() @ _down_matrix(down, e, layout).float()
    gate, up = (t.detach().requires_grad_(True) for t in _split_gate_up(h.float(), layout, inter))
    a = _gated_torch(gate, up, layout)
    d_gate, d_up = torch.autograd.grad(a, (gate, up), da * weights[:, None])
    a = a.detach()
    dh = torch.zeros_like(h, dtype=torch.float32)
    gate_off, up_off, step = layout.gate_up_rows(inter)
    dh[:, gate_off : gate_off + step * inter : step] = d_gate
    dh[:, up_off : up_off + step * inter : step] = d_up
    valid = (torch.arange(n_slots, device=h.device) < routing.offsets[-1]).float()[:, None]
    return (dh * valid).to(h.dtype), (a * weights[:, None] * valid).to(h.dtype), (da * a).sum(1) * valid[:, 0]


def moe_weight_grad_ref(
    g: torch.Tensor, g_gather: bool, x: torch.Tensor, x_gather: bool, routing: MoERouting,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Reference per-expert weight gradient: ``dW[e] = G_e^T X_e`` (E, N, K) and ``db[e] = sum_j s_j G_e[j]``
    (E, N), both fp32, where rows are expert-ordered or (``*_gather``) token rows read through ``perm // k``."""
    tokens = routing.perm.long() // routing.top_k
    n_experts = routing.num_experts
    dw = torch.zeros(n_experts, g.shape[1], x.shape[1], dtype=torch.float32, device=g.device)
    db = torch.zeros(n_experts, g.shape[1], dtype=torch.float32, device=g.device)
    for e in range(n_experts):
        lo, hi = _expert_rows(routing, e)
        if lo == hi:
            continue
        ge = (g[tokens[lo:hi]] if g_gather else g[lo:hi]).float()
        xe = (x[tokens[lo:hi]] if x_gather else x[lo:hi]).float()
        dw[e] = ge.t() @ xe
        s = scale.reshape(-1)[routing.perm[lo:hi].long()].float()[:, None] if scale is not None else 1.0
        db[e] = (ge * s).sum(0)
    return dw, db


def moe_combine_ref(
    y: torch.Tensor, routing: MoERouting, top_k_weights: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Reference combine: ``out[t] = sum_s w[t, s] * y[inv_perm[t k + s]]`` over non-sentinel slots (fp32 sum)."""
    k = routing.top_k
    n_tokens = routing.perm.numel() // k
    rows = routing.inv_perm.long()
    valid = rows < routing.offsets[-1].long()
    gathered = y.float()[rows] * valid[:, None].float()
    if top_k_weights is not None:
        gathered = gathered * top_k_weights.reshape(-1).float()[:, None]
    return gathered.view(n_tokens, k, -1).sum(1).to(out_dtype)


# ============================================================================================ forward / backward


def _forward_impl(hidden, top_k_weights, gate_up, down, gate_up_bias, down_bias, routing, layout, store_h, launch):
    """(out (T, H), h (S, 2I) or None)."""
    h, a = moe_up_triton(hidden, gate_up, gate_up_bias, routing, layout, store_h, launch)
    stride_h, stride_i = layout.down_strides(down)
    y = moe_grouped_mm_triton(a, down, stride_h, stride_i, hidden.shape[1], routing, down_bias, "down", launch)
    del a
    out = moe_combine_triton(y, routing, top_k_weights.reshape(-1), hidden.dtype)
    return out, h


def _bias_grad_torch(g, g_gather, routing, scale, dtype):
    """db[e] = sum over expert e's rows j of s_j * G[j], in torch: used only when the weight itself needs no
    gradient (otherwise the weight-gradient kernel sums the bias in the same pass)."""
    sorted_slots = routing.perm.long()
    experts = torch.repeat_interleave(
        torch.arange(routing.num_experts, device=g.device), routing.tokens_per_expert.long()
    )  # the first offsets[E] sorted rows, by expert
    n_valid = experts.numel()
    rows = sorted_slots[:n_valid] // routing.top_k if g_gather else torch.arange(n_valid, device=g.device)
    vals = g[rows].float()
    if scale is not None:
        vals = vals * scale.reshape(-1)[sorted_slots[:n_valid]].float()[:, None]
    db = torch.zeros(routing.num_experts, g.shape[1], dtype=torch.float32, device=g.device)
    return db.index_add_(0, experts, vals).to(dtype)


def _backward_impl(dout, saved, routing, layout, needs, launch):
    """Gradients (hidden, top_k_weights, gate_up, down, gate_up_bias, down_bias), None where not needed.

    ``saved``: the list ``[hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, h]``, emptied
    here, so that ``h`` (S, 2I) goes as soon as the activation backward has read it, before the weight gradients are
    allocated. (Under non-reentrant activation checkpointing the unpacked recomputed ``h`` is referenced only from
    here; without checkpointing autograd's saved variable keeps it until the backward returns, as before.)"""
    hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, h = saved
    saved.clear()
    need_x, need_w, need_gu, need_d, need_gub, need_db = needs
    dout = dout.contiguous()
    weights = top_k_weights.reshape(-1)
    need_dh = need_x or need_gu or need_gub
    dh, aw, dw_rows = moe_down_backward_triton(
        dout, down, h, weights, routing, layout, need_dh=need_dh, need_aw=need_d, need_dw=need_w, launch=launch
    )
    del h
    d_hidden = d_weights = d_gate_up = d_down = d_gate_up_bias = d_down_bias = None
    if need_db:
        d_down_bias = torch.empty_like(down_bias)
    if need_d:
        d_down = torch.empty_like(down)
        moe_weight_grad_triton(
            dout, True, aw, False, routing, d_down, layout.down_strides(d_down), db=d_down_bias, scale=weights,
            launch=launch, launch_name="wgrad_down",
        )  # fmt: skip
    elif need_db:
        d_down_bias = _bias_grad_torch(dout, True, routing, weights, down_bias.dtype)
    del aw
    if need_gub:
        d_gate_up_bias = torch.empty_like(gate_up_bias)
    if need_gu:
        d_gate_up = torch.empty_like(gate_up)
        moe_weight_grad_triton(
            dh, False, hidden, True, routing, d_gate_up, layout.gate_up_strides(d_gate_up), db=d_gate_up_bias,
            launch=launch, launch_name="wgrad_gate_up",
        )  # fmt: skip
    elif need_gub:
        d_gate_up_bias = _bias_grad_torch(dh, False, routing, None, gate_up_bias.dtype)
    if need_x:
        stride_r, stride_h = layout.gate_up_strides(gate_up)
        dx_rows = moe_grouped_mm_triton(dh, gate_up, stride_h, stride_r, hidden.shape[1], routing, None, "dx", launch)
        d_hidden = moe_combine_triton(dx_rows, routing, None, hidden.dtype)
        del dx_rows
    if need_w:
        d_flat = dw_rows[routing.inv_perm.long()]
        if down_bias is not None:
            # + <g_t, b_d[e]> per slot (sentinel slots get nothing)
            ids = top_k_index.reshape(-1)
            valid = ids < routing.num_experts
            per_expert = dout.float() @ down_bias.float().t()  # (T, E)
            bias_term = torch.gather(per_expert, 1, ids.clamp(max=routing.num_experts - 1).view(dout.shape[0], -1))
            d_flat = d_flat + bias_term.reshape(-1) * valid
        d_weights = d_flat.view(top_k_weights.shape).to(top_k_weights.dtype)
    return d_hidden, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias


# ============================================================================================ autograd


class _MoEExpertsFunction(torch.autograd.Function):
    """Eager autograd path; ``torch.compile`` uses the custom ops below."""

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, routing, layout,
                launch):  # fmt: skip
        needs = ctx.needs_input_grad
        store_h = any(needs[i] for i in (0, 2, 3, 4, 5, 6))
        out, h = _forward_impl(
            hidden, top_k_weights, gate_up, down, gate_up_bias, down_bias, routing, layout, store_h, launch
        )
        ctx.save_for_backward(hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, h)
        ctx.routing, ctx.layout, ctx.launch = routing, layout, launch
        return out

    @staticmethod
    def backward(ctx, dout):
        n = ctx.needs_input_grad
        needs = (n[0], n[2], n[3], n[4], n[5], n[6])
        # the saved tensors go in a list that the backward empties: no reference to h stays in this frame
        grads = _backward_impl(dout, list(ctx.saved_tensors), ctx.routing, ctx.layout, needs, ctx.launch)
        d_hidden, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias = grads
        return d_hidden, None, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias, None, None, None


def _routing_from(perm, inv_perm, offsets, num_experts, top_k) -> MoERouting:
    return MoERouting(perm, inv_perm, offsets.diff(), offsets, num_experts, top_k)


def _layout_args(layout: _Layout) -> tuple[int, bool, bool, bool, float, float]:
    return layout.act, layout.gate_first, layout.interleaved, layout.transposed, layout.alpha, layout.limit


@torch.library.custom_op("fms_accel_kernels::moe_experts_fwd", mutates_args=())
def _moe_fwd_op(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    act: int,
    gate_first: bool,
    interleaved: bool,
    transposed: bool,
    alpha: float,
    limit: float,
    store_h: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _Layout(act, gate_first, interleaved, transposed, alpha, limit)
    routing = moe_route(top_k_index, gate_up.shape[0])
    out, h = _forward_impl(
        hidden, top_k_weights, gate_up, down, gate_up_bias, down_bias, routing, layout, store_h, None
    )
    return out, (h if h is not None else hidden.new_empty(0)), routing.perm, routing.inv_perm, routing.offsets


@_moe_fwd_op.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, act, gate_first, interleaved,
      transposed, alpha, limit, store_h):  # fmt: skip
    n_slots = top_k_index.numel()
    two_i = gate_up.shape[2] if transposed else gate_up.shape[1]
    out = hidden.new_empty(hidden.shape)
    h = hidden.new_empty(n_slots, two_i) if store_h else hidden.new_empty(0)
    index = top_k_index.new_empty(n_slots, dtype=torch.int32)
    return out, h, index, top_k_index.new_empty(n_slots, dtype=torch.int32), index.new_empty(gate_up.shape[0] + 1)


@torch.library.custom_op("fms_accel_kernels::moe_experts_bwd", mutates_args=())
def _moe_bwd_op(
    dout: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    h: torch.Tensor,
    perm: torch.Tensor,
    inv_perm: torch.Tensor,
    offsets: torch.Tensor,
    act: int,
    gate_first: bool,
    interleaved: bool,
    transposed: bool,
    alpha: float,
    limit: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _Layout(act, gate_first, interleaved, transposed, alpha, limit)
    routing = _routing_from(perm, inv_perm, offsets, gate_up.shape[0], top_k_index.shape[1])
    saved = [hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, h]
    grads = _backward_impl(dout, saved, routing, layout, tuple(needs), None)
    return tuple(g if g is not None else dout.new_empty(0) for g in grads)


@_moe_bwd_op.register_fake
def _(dout, hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, h, perm, inv_perm, offsets,
      act, gate_first, interleaved, transposed, alpha, limit, needs):  # fmt: skip
    like = (hidden, top_k_weights, gate_up, down, gate_up_bias, down_bias)
    return tuple(torch.empty_like(t) if need and t is not None else dout.new_empty(0) for t, need in zip(like, needs))


def _moe_setup_context(ctx, inputs, output):
    (hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, act, gate_first, interleaved,
     transposed, alpha, limit, _store_h) = inputs  # fmt: skip
    _out, h, perm, inv_perm, offsets = output
    ctx.save_for_backward(
        hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, h, perm, inv_perm, offsets
    )
    ctx.layout_args = (act, gate_first, interleaved, transposed, alpha, limit)


def _moe_autograd_backward(ctx, dout, _dh, _dperm, _dinv, _doffsets):
    saved = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [bool(n[0]), bool(n[2]), bool(n[3]), bool(n[4]), bool(n[5]), bool(n[6])]
    grads = _moe_bwd_op(dout, *saved, *ctx.layout_args, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    d_hidden, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias = grads
    return (d_hidden, None, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias) + (None,) * 7


_moe_fwd_op.register_autograd(_moe_autograd_backward, setup_context=_moe_setup_context)


# ============================================================================================ public API


def _layout_and_shapes(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias, down_bias,
                       transposed, interleaved, alpha=1.702, limit=7.0) -> _Layout:  # fmt: skip
    """Validate the arguments of ``moe_experts*``; returns the layout."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (tokens, hidden_size), got shape {tuple(hidden.shape)}")
    _check_index(top_k_index)
    check_float_dtype("hidden", hidden)
    check_float_dtype("gate_up", gate_up)
    check_float_dtype("down", down)
    check_float_dtype("top_k_weights", top_k_weights)
    n_tokens, hidden_dim = hidden.shape
    if top_k_index.shape[0] != n_tokens or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} must both be "
            f"(tokens, top_k) with tokens = {n_tokens} (hidden's rows)"
        )
    if gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"gate_up and down must be 3-D expert stacks, got {tuple(gate_up.shape)}, {tuple(down.shape)}")
    n_experts = gate_up.shape[0]
    two_i, h_gu = (gate_up.shape[2], gate_up.shape[1]) if transposed else (gate_up.shape[1], gate_up.shape[2])
    h_d, inter = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    names = ("(E, H, 2I)", "(E, I, H)") if transposed else ("(E, 2I, H)", "(E, H, I)")
    if h_gu != hidden_dim or h_d != hidden_dim or two_i != 2 * inter or down.shape[0] != n_experts:
        raise ValueError(
            f"expert weights do not fit hidden size {hidden_dim}: gate_up {tuple(gate_up.shape)} must be {names[0]} "
            f"and down {tuple(down.shape)} must be {names[1]} with the same E and I (transposed={transposed})"
        )
    if gate_up_bias is not None and tuple(gate_up_bias.shape) != (n_experts, two_i):
        raise ValueError(
            f"gate_up_bias has shape {tuple(gate_up_bias.shape)}, expected (E, 2I) = ({n_experts}, {two_i})"
        )
    if down_bias is not None and tuple(down_bias.shape) != (n_experts, hidden_dim):
        raise ValueError(f"down_bias has shape {tuple(down_bias.shape)}, expected (E, H) = ({n_experts}, {hidden_dim})")
    return _Layout(ACTIVATIONS[act], bool(gate_first), bool(interleaved), bool(transposed), float(alpha), float(limit))


def moe_experts_ref(
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
) -> torch.Tensor:
    """Pure-torch expert MLPs, one expert at a time (the semantics of transformers' eager experts forward).

    Args:
        hidden: (T, H) token hidden states.
        top_k_index: (T, k) expert id of each routing slot; ids >= E (expert-parallel sentinels) are dropped.
        top_k_weights: (T, k) routing weight of each slot.
        gate_up: (E, 2I, H) gate and up projections (``transposed``: (E, H, 2I)).
        down: (E, H, I) down projections (``transposed``: (E, I, H)).
        act: gated activation: ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"`` applied as ``act(gate) * up`` (HF
            ``hidden_act`` aliases in ``ACTIVATIONS``), or ``"gpt_oss"``: GPT-OSS's
            ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
        gate_first: the gate rows come first in ``gate_up`` (``[gate; up]``); False for ``[up; gate]``.
        gate_up_bias: (E, 2I) bias of the gate/up projection, or None.
        down_bias: (E, H) bias of the down projection, or None.
        transposed: weights stored as (E, in, out) instead of (E, out, in).
        interleaved: gate and up rows alternate (gate, up, gate, up, ...; ``gate_first=False``: up first).
        alpha, limit: the ``"gpt_oss"`` activation's constants (its config's ``swiglu_alpha``, ``swiglu_limit``).

    Returns:
        (T, H) tensor in hidden's dtype: ``sum_s w[t, s] * down_e(act(gate_e(x_t)) * up_e(x_t))``.
    """
    layout = _layout_and_shapes(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias,
                                down_bias, transposed, interleaved, alpha, limit)  # fmt: skip
    inter = (gate_up.shape[2] if transposed else gate_up.shape[1]) // 2
    out = torch.zeros_like(hidden)
    for e in range(gate_up.shape[0]):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        proj = F.linear(hidden[token_idx], _gate_up_matrix(gate_up, e, layout),
                        gate_up_bias[e] if gate_up_bias is not None else None)  # fmt: skip
        gate, up = _split_gate_up(proj, layout, inter)
        rows = F.linear(_gated_torch(gate, up, layout), _down_matrix(down, e, layout),
                        down_bias[e] if down_bias is not None else None)  # fmt: skip
        rows = rows * top_k_weights[token_idx, slot, None]
        out = out.index_add(0, token_idx, rows.to(out.dtype))
    return out


def _compute_dtype(hidden: torch.Tensor, gate_up: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return gate_up.dtype


def moe_experts_triton(
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
    routing: MoERouting | None = None,
    launch: Mapping[str, GemmLaunch] | None = None,
) -> torch.Tensor:
    """Triton expert MLPs with autograd (contract of :func:`moe_experts_ref`).

    The math runs in the weights' dtype (or the autocast dtype when autocast is on; other inputs are cast to it),
    the result comes back in hidden's dtype.

    Args:
        routing: the result of ``moe_route(top_k_index, E)`` when the caller already has it (e.g. to log
            tokens per expert); computed here otherwise. Ignored under ``torch.compile``.
        launch: per-kernel ``GemmLaunch`` overrides (benchmark sweeps); the defaults otherwise.
        Other arguments: as in :func:`moe_experts_ref`.
    """
    layout = _layout_and_shapes(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias,
                                down_bias, transposed, interleaved, alpha, limit)  # fmt: skip
    dtype = _compute_dtype(hidden, gate_up)
    x = hidden.to(dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weights = [t.to(dtype) if t is not None else None for t in (gate_up, down, gate_up_bias, down_bias)]
    tkw = top_k_weights if top_k_weights.is_contiguous() else top_k_weights.contiguous()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if torch.compiler.is_compiling():
            store_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, tkw, *weights))
            out = _moe_fwd_op(x, top_k_index, tkw, *weights, *_layout_args(layout), store_h)[0]
        else:
            if routing is None:
                routing = moe_route(top_k_index, gate_up.shape[0])
            elif routing.num_experts != gate_up.shape[0] or routing.perm.numel() != top_k_index.numel():
                raise ValueError(
                    f"routing was computed for {routing.num_experts} experts and {routing.perm.numel()} slots; "
                    f"this call has {gate_up.shape[0]} experts and {top_k_index.numel()} slots"
                )
            out = _MoEExpertsFunction.apply(x, top_k_index, tkw, *weights, routing, layout, launch)
    return out.to(hidden.dtype)


def moe_experts(
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
    routing: MoERouting | None = None,
) -> torch.Tensor:
    """Grouped expert MLPs of a sparse MoE block: Triton on CUDA (or ``TRITON_INTERPRET=1``), else the reference.

    Args:
        hidden: (T, H) token hidden states.
        top_k_index: (T, k) integer expert id of each routing slot; ids >= E are dropped (expert parallelism).
        top_k_weights: (T, k) routing weights.
        gate_up: (E, 2I, H) stacked gate and up projections (``transposed``: (E, H, 2I)).
        down: (E, H, I) stacked down projections (``transposed``: (E, I, H)).
        act: ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` (HF ``hidden_act`` aliases accepted, see ``ACTIVATIONS``) or
            ``"gpt_oss"`` (GPT-OSS's clamped SwiGLU with ``alpha`` and ``limit``).
        gate_first: ``[gate; up]`` row order (False: ``[up; gate]``).
        gate_up_bias: (E, 2I) or None.
        down_bias: (E, H) or None.
        transposed: weights stored (E, in, out).
        interleaved: gate and up rows alternate.
        alpha, limit: constants of the ``"gpt_oss"`` activation.
        routing: a precomputed ``moe_route(top_k_index, E)`` (Triton path only).

    Returns:
        (T, H) tensor in hidden's dtype.
    """
    if use_triton(hidden, gate_up, down):
        return moe_experts_triton(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias,
                                  down_bias, transposed, interleaved, alpha=alpha, limit=limit,
                                  routing=routing)  # fmt: skip
    return moe_experts_ref(hidden, top_k_index, top_k_weights, gate_up, down, act, gate_first, gate_up_bias,
                           down_bias, transposed, interleaved, alpha=alpha, limit=limit)  # fmt: skip
