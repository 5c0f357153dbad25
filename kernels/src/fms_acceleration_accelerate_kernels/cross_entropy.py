"""Cross-entropy over (N, V) logits with ignore_index, HF's ``num_items_in_batch`` normalisation, Gemma2 logit
softcapping, Granite logit scaling and optional label smoothing.

The logits seen by the softmax are ``z = f(x)`` with ``f(x) = softcap * tanh((x / logits_scaling) / softcap)``
(no tanh without ``softcap``; ``logits_scaling`` divides, as in HF's Granite). Logits are read in their own
dtype and never upcast in memory; statistics are fp32.

Training path (reduction ``"mean"``/``"sum"``, logits requiring grad): ONE kernel per row computes the
log-sum-exp (pass 1), then re-reads the row and writes ``dloss/dlogits`` for an incoming gradient of 1
(pass 2), which the L2 cache serves in part. Block size, warps, grid, per-lane or per-block running statistics,
L2 eviction hints and the direction of pass 2 (backwards re-reads first what pass 1 read last) are launch
settings chosen by the GPU sweep of ``benchmarks/kernel-bench/bench_kernels.py``. HBM traffic is about one read plus
one write of the logits. The backward is a scale by the incoming gradient done by a
kernel that reads that gradient on the device and returns at once when it is 1 (no host sync, no traffic).

Other paths (``reduction="none"``, no grad, ``torch.compile``): a loss-only forward (one read) stores the
per-row log-sum-exp; the backward recomputes ``softmax(z) - target`` from it (one read, one write).

The same row kernel serves the fused linear cross-entropy, which writes the gradient over its private logits
chunks.

Per-token outputs (``cross_entropy_per_token``, for trainers that build their own loss from token
log-probabilities, e.g. TRL's fused LM head): a variant of the row kernel also writes each row's entropy and
whether the target is the first maximum (``argmax``), in the same pass; the loss kernel's code is unchanged.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import check_float_dtype, multiprocessor_count, next_power_of_2, use_triton

__all__ = [
    "cross_entropy",
    "cross_entropy_per_token",
    "cross_entropy_per_token_ref",
    "cross_entropy_per_token_triton",
    "cross_entropy_ref",
    "cross_entropy_triton",
]

_REDUCTIONS = ("mean", "sum", "none")
_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e**x = 2**(x * _LOG2E)


@triton.jit
def _exp(x):
    """e**x as ``exp2(x * log2 e)``: one flush-to-zero ``ex2.approx`` per element on NVIDIA GPUs, where ``tl.exp``
    emits the non-flushing ``ex2.approx.f32`` and its subnormal handling (several instructions per element; the
    row kernel is instruction-bound between its block reductions). Results below 2**-126 become 0."""
    return tl.exp2(x * _LOG2E)


@triton.jit
def _transform(x, inv_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = f(x) and dz/dx for the softcap/scaling transform; fp32."""
    z = x * inv_scale
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0  # tanh(z / softcap)
        dz = inv_scale * (1.0 - t * t)
        z = softcap * t
    else:
        dz = tl.zeros_like(x) + inv_scale
    return z, dz


@triton.jit
def _grad_block(x, cols, lse, safe_target, n_cols, inv_scale, softcap, smoothing, weight,
                HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ONEHOT: tl.constexpr = True):  # fmt: skip
    """weight * dloss/dx of one block of raw logits ``x`` (fp32): (softmax(z) - (1 - eps) onehot - eps / V) * dz/dx.

    Without ONEHOT the target term is left out (the caller writes the target's gradient itself). Without a
    softcap, z = x * inv_scale and softmax(z) = exp2(x * inv_scale * log2 e - lse * log2 e): one FMA and one ex2
    per element, and dz/dx * weight is one scalar."""
    if HAS_SOFTCAP:
        z, dz = _transform(x, inv_scale, softcap, HAS_SOFTCAP)
        g = _exp(z - lse)
    else:
        g = tl.exp2(x * (inv_scale * _LOG2E) - lse * _LOG2E)
    if ONEHOT:
        g -= tl.where(cols == safe_target, 1.0 - smoothing, 0.0)
    if HAS_SMOOTHING:
        g -= smoothing / n_cols
    if HAS_SOFTCAP:
        g = g * (dz * weight)
    else:
        g = g * (inv_scale * weight)
    return g


@triton.jit
def _ce_one_row(
    row64,
    LOGITS,
    TARGET,
    LOSS,
    LSE,
    GRAD,
    GRAD_SCALE,
    ENTROPY,
    TOP1,
    stride_logits,
    stride_grad,
    n_cols,
    ignore_index,
    inv_scale,
    softcap,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    LANE_STATS: tl.constexpr,
    L2_HINTS: tl.constexpr,
    REVERSE: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK: tl.constexpr,
    STATS: tl.constexpr = False,
):
    """Loss and log-sum-exp of row ``row64`` (int64); with WRITE_GRAD also its gradient; with STATS also the
    entropy of softmax(z) (``ENTROPY``) and whether the target is the first maximum of z (``TOP1``, int8), both 0
    on ignored rows. See ``_ce_row_kernel``."""
    n_blocks = tl.cdiv(n_cols, BLOCK)
    offs = tl.arange(0, BLOCK)
    row_ptr = LOGITS + row64 * stride_logits
    target = tl.load(TARGET + row64)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0).to(tl.int32)  # int32: the per-element compare stays 32-bit
    x_t = tl.load(row_ptr + safe_target).to(tl.float32)  # issued before the row loop: its latency is hidden
    # ---- pass 1: log-sum-exp (and the sum of z for label smoothing)
    if LANE_STATS:
        # finite start value: z - m never meets (-inf) - (-inf), masked lanes (z = -inf) add exp(-inf) = 0
        m_vec = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
    else:
        m = float("-inf")
        mx = float("-inf")  # the running max of x (plain path, no softcap)
        s = 0.0
    z_vec = tl.zeros([BLOCK], tl.float32)
    if STATS:
        # sum of exp(z - m) * z (entropy = lse - that / s), kept like s; the max of z left of the target (top-1:
        # argmax picks the first maximum, so an equal logit before the target means the target is not top-1)
        if LANE_STATS:
            sz_vec = tl.zeros([BLOCK], tl.float32)
        else:
            sz = 0.0
        before = float("-inf")
    for b in range(0, n_blocks):
        cols = b * BLOCK + offs
        mask = cols < n_cols
        # masked lanes must give z = -inf: loaded as -inf when f keeps it (x / logits_scaling, scaling > 0),
        # selected after the softcap's tanh otherwise
        fill = 0.0 if HAS_SOFTCAP else float("-inf")
        if WRITE_GRAD and L2_HINTS:
            x = tl.load(row_ptr + cols, mask=mask, other=fill, eviction_policy="evict_last").to(tl.float32)
        else:
            x = tl.load(row_ptr + cols, mask=mask, other=fill).to(tl.float32)
        if HAS_SOFTCAP:
            z, _dz = _transform(x, inv_scale, softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
        else:
            z = x * inv_scale
        if HAS_SMOOTHING:
            z_vec += tl.where(mask, z, 0.0)
        if STATS:
            before = tl.maximum(before, tl.max(tl.where(mask & (cols < safe_target), z, float("-inf")), axis=0))
        if not (LANE_STATS or HAS_SOFTCAP):
            # z = x * inv_scale, inv_scale > 0: track the max in x units; exp(z - m) = exp2(x * a - max_x * a)
            # with a = inv_scale * log2 e: one FMA and one ex2 per element (z itself only feeds smoothing)
            a = inv_scale * _LOG2E
            mx_new = tl.maximum(mx, tl.max(x, axis=0))
            rescale = tl.exp2((mx - mx_new) * a)
            e = tl.exp2(x * a - mx_new * a)
            s = s * rescale + tl.sum(e, axis=0)
            if STATS:
                sz = sz * rescale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)  # e = 0 where masked
            mx = mx_new
        elif LANE_STATS:
            # one exp per element: exp(-|z - m|) rescales either the old sum or the new element
            bigger = z > m_vec
            t = _exp(tl.where(bigger, m_vec - z, z - m_vec))
            s_vec = tl.where(bigger, s_vec * t + 1.0, s_vec + t)
            if STATS:
                sz_vec = tl.where(bigger, sz_vec * t + z, sz_vec + t * tl.where(mask, z, 0.0))
            m_vec = tl.where(bigger, z, m_vec)
        else:
            m_new = tl.maximum(m, tl.max(z, axis=0))
            rescale = _exp(m - m_new)
            e = _exp(z - m_new)
            s = s * rescale + tl.sum(e, axis=0)
            if STATS:
                sz = sz * rescale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)  # e = 0 where masked
            m = m_new
    if LANE_STATS:
        m = tl.max(m_vec, axis=0)
        lane_scale = _exp(m_vec - m)
        s = tl.sum(s_vec * lane_scale, axis=0)
        if STATS:
            sz = tl.sum(sz_vec * lane_scale, axis=0)
    elif not HAS_SOFTCAP:
        m = mx * inv_scale
    lse = m + tl.log(s)
    z_t, dz_t = _transform(x_t, inv_scale, softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - smoothing) * z_t
    if HAS_SMOOTHING:
        loss -= smoothing * tl.sum(z_vec, axis=0) / n_cols
    tl.store(LOSS + row64, tl.where(valid, loss, 0.0))
    tl.store(LSE + row64, lse)
    if STATS:
        tl.store(ENTROPY + row64, tl.where(valid, lse - sz / s, 0.0))
        tl.store(TOP1 + row64, (valid & (z_t >= m) & (z_t > before)).to(tl.int8))
    # ---- pass 2 (WRITE_GRAD): grad = scale * (softmax(z) - (1 - eps) onehot - eps / V) * dz/dx, last block
    # first so that the blocks pass 1 read last are re-read while still in L2
    if WRITE_GRAD:
        weight = tl.where(valid, tl.load(GRAD_SCALE), 0.0)
        grad_ptr = GRAD + row64 * stride_grad
        for rb in range(0, n_blocks):
            if REVERSE:
                cols = (n_blocks - 1 - rb) * BLOCK + offs
            else:
                cols = rb * BLOCK + offs
            mask = cols < n_cols
            if L2_HINTS:
                x = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            else:
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = _grad_block(x, cols, lse, safe_target, n_cols, inv_scale, softcap, smoothing, weight,
                            HAS_SOFTCAP, HAS_SMOOTHING, not FIXUP)  # fmt: skip
            tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        if FIXUP:
            # the target's gradient, from the fp32 logit loaded before pass 1 (rounded once, so the
            # cancellation in softmax - 1 is not made worse), written after every thread's pass-2 stores
            tl.debug_barrier()
            g_t = _exp(z_t - lse) - (1.0 - smoothing)
            if HAS_SMOOTHING:
                g_t -= smoothing / n_cols
            if HAS_SOFTCAP:
                g_t = g_t * dz_t
            else:
                g_t = g_t * inv_scale
            tl.store(grad_ptr + safe_target, (g_t * weight).to(grad_ptr.dtype.element_ty))


@triton.jit
def _ce_row_kernel(
    LOGITS,
    TARGET,
    LOSS,
    LSE,
    GRAD,
    GRAD_SCALE,
    stride_logits,
    stride_grad,
    n_rows,
    n_cols,
    ignore_index,
    inv_scale,
    softcap,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    LANE_STATS: tl.constexpr,
    L2_HINTS: tl.constexpr,
    REVERSE: tl.constexpr,
    FIXUP: tl.constexpr,
    PERSISTENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss and log-sum-exp of rows; with WRITE_GRAD also their gradient.

    PERSISTENT: each program loops over rows ``pid, pid + n_programs, ...`` (grid smaller than the row count);
    otherwise one program per row and no row loop.
    LANE_STATS: running max/sum kept per lane (no block reductions in the loop) instead of per block.
    L2_HINTS: pass 1 loads with ``evict_last`` and pass 2 with ``evict_first`` (no hints otherwise).
    REVERSE: pass 2 walks the row from its last block (re-reads first what pass 1 read last).
    FIXUP: pass 2 writes softmax terms only; the target column's gradient is stored once afterwards (no
    per-element compare with the target).
    """
    if PERSISTENT:
        # an int64 loop counter, so row offsets never overflow (a plain int in interpreter mode)
        for row64 in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            _ce_one_row(row64, LOGITS, TARGET, LOSS, LSE, GRAD, GRAD_SCALE, LOSS, LOSS, stride_logits, stride_grad,
                        n_cols, ignore_index, inv_scale, softcap, smoothing, HAS_SOFTCAP, HAS_SMOOTHING, WRITE_GRAD,
                        LANE_STATS, L2_HINTS, REVERSE, FIXUP, BLOCK)  # fmt: skip
    else:
        _ce_one_row(tl.program_id(0).to(tl.int64), LOGITS, TARGET, LOSS, LSE, GRAD, GRAD_SCALE, LOSS, LOSS,
                    stride_logits, stride_grad, n_cols, ignore_index, inv_scale, softcap, smoothing, HAS_SOFTCAP,
                    HAS_SMOOTHING, WRITE_GRAD, LANE_STATS, L2_HINTS, REVERSE, FIXUP, BLOCK)  # fmt: skip


@triton.jit
def _ce_row_stats_kernel(
    LOGITS,
    TARGET,
    LOSS,
    LSE,
    GRAD,
    GRAD_SCALE,
    ENTROPY,
    TOP1,
    stride_logits,
    stride_grad,
    n_rows,
    n_cols,
    ignore_index,
    inv_scale,
    softcap,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    LANE_STATS: tl.constexpr,
    L2_HINTS: tl.constexpr,
    REVERSE: tl.constexpr,
    FIXUP: tl.constexpr,
    PERSISTENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``_ce_row_kernel`` that also writes each row's entropy and top-1 flag (per-token outputs; a kernel of its
    own, so the loss kernel's code and signature stay as they are)."""
    if PERSISTENT:
        for row64 in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            _ce_one_row(row64, LOGITS, TARGET, LOSS, LSE, GRAD, GRAD_SCALE, ENTROPY, TOP1, stride_logits,
                        stride_grad, n_cols, ignore_index, inv_scale, softcap, smoothing, HAS_SOFTCAP, HAS_SMOOTHING,
                        WRITE_GRAD, LANE_STATS, L2_HINTS, REVERSE, FIXUP, BLOCK, True)  # fmt: skip
    else:
        _ce_one_row(tl.program_id(0).to(tl.int64), LOGITS, TARGET, LOSS, LSE, GRAD, GRAD_SCALE, ENTROPY, TOP1,
                    stride_logits, stride_grad, n_cols, ignore_index, inv_scale, softcap, smoothing, HAS_SOFTCAP,
                    HAS_SMOOTHING, WRITE_GRAD, LANE_STATS, L2_HINTS, REVERSE, FIXUP, BLOCK, True)  # fmt: skip


@triton.jit
def _ce_bwd_kernel(
    LOGITS,
    TARGET,
    LSE,
    GRAD_LOSS,
    GRAD,
    stride_logits,
    stride_grad,
    stride_grad_loss,
    n_cols,
    ignore_index,
    inv_scale,
    softcap,
    smoothing,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad[row] = grad_loss[row] * dloss_row/dlogits[row], recomputed from the stored log-sum-exp."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    weight = tl.where(valid, tl.load(GRAD_LOSS + row * stride_grad_loss).to(tl.float32), 0.0)
    safe_target = tl.where(valid, target, 0).to(tl.int32)
    lse = tl.load(LSE + row)
    row_ptr = LOGITS + row * stride_logits
    grad_ptr = GRAD + row * stride_grad
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = _grad_block(x, cols, lse, safe_target, n_cols, inv_scale, softcap, smoothing, weight,
                        HAS_SOFTCAP, HAS_SMOOTHING)  # fmt: skip
        tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(GRAD, SCALE, stride_grad, n_rows, n_cols, BLOCK: tl.constexpr):
    """grad *= scale (a device scalar), skipped without touching memory when scale == 1."""
    scale = tl.load(SCALE).to(tl.float32)
    if scale != 1.0:
        offs = tl.arange(0, BLOCK)
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            grad_ptr = GRAD + row * stride_grad
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                g = tl.load(grad_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(grad_ptr + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# Launch settings per kernel kind: (BLOCK cap, num_warps, programs per SM (0: one program per row), LANE_STATS,
# L2_HINTS, REVERSE, FIXUP); the last three only matter for the gradient-writing row kernel ("fwd_grad").
# "fwd" (loss only, one read) and "bwd" (read + write) come from the H100 sweep at V=128256 recorded in
# benchmarks/results/2026-11-25-h100-x1-kernels-initial/; "fwd_grad" (read, L2 re-read, write) is swept by benchmarks/kernel-bench/bench_kernels.py.
_LAUNCH = MappingProxyType(
    {
        "fwd": (4096, 4, 0, False, False, False, False),
        # H100 sweep at 8192 x 128256 bf16 (exp2/FMA kernel body, two runs):
        # (32768, 32, 0, False, True, False, True) 1.580 / 1.581 ms; the previous default (…, True, True, False)
        # 1.606 / 1.604 ms; 4096 / 8 warps 2.05 ms (benchmarks/results/2026-11-26-h100-x1-kernels-ce)
        "fwd_grad": (32768, 32, 0, False, True, False, True),
        "bwd": (32768, 32, 0, False, False, False, False),
    }
)

# Per-GPU overrides of _LAUNCH (a substring of the CUDA device name -> kind -> settings), each from a sweep on
# that GPU. H200, 8192 x 128256 bf16, exp2/FMA kernel body (benchmarks/results/2026-11-26-h200-x1-kernels-ce):
# (16384, 16, 0, False, True, True, True) 1.319 ms; the H100 default 1.340 ms; the previous H200 override
# (4096, 8, 0, False, True, True, False) 1.495 ms.
_LAUNCH_BY_GPU = MappingProxyType(
    {
        "H200": MappingProxyType({"fwd_grad": (16384, 16, 0, False, True, True, True)}),
    }
)


def launch_defaults(kind: str, device: torch.device) -> tuple:
    """The default launch settings of a row-kernel kind on ``device`` (per-GPU override, else ``_LAUNCH``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_properties(device).name
        for key, table in _LAUNCH_BY_GPU.items():
            if key in name and kind in table:
                return table[kind]
    return _LAUNCH[kind]


def _launch_settings(
    n_cols: int, kind: str, launch: tuple | None = None, device: torch.device | None = None
) -> tuple[int, int, int, bool, bool, bool, bool]:
    """(BLOCK, num_warps, programs_per_sm, lane_stats, l2_hints, reverse, fixup) of a row kernel; ``launch``
    overrides (benchmark sweep).

    ``launch`` may give the first 2 to 7 entries; missing ones come from the defaults of ``kind`` on ``device``.
    """
    defaults = launch_defaults(kind, device) if device is not None else _LAUNCH[kind]
    settings = defaults if launch is None else tuple(launch) + defaults[len(launch) :]
    cap, warps, per_sm, lane, hints, reverse, fixup = settings
    block = min(cap, next_power_of_2(n_cols))
    # small rows: fewer warps than elements per block would only idle
    warps = max(1, min(warps, block // 256)) if block < 256 * warps else warps
    return block, warps, per_sm, bool(lane), bool(hints), bool(reverse), bool(fixup)


def _softcap_args(softcap: float | None) -> tuple[float, bool]:
    return (float(softcap), True) if softcap is not None else (1.0, False)


def _grid(n_rows: int, per_sm: int, device: torch.device) -> int:
    if per_sm <= 0:
        return n_rows
    return max(1, min(n_rows, per_sm * multiprocessor_count(device)))


def ce_forward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
    grad_out: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    launch: tuple | None = None,
    stats_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp of (N, V) logits; optionally writes the gradient in the same kernel.

    Args:
        logits: (N, V) with unit stride on V.
        target: (N,) integer class ids (``ignore_index`` rows give loss 0 and gradient 0).
        grad_out: optional (N, V) buffer with unit stride on V (may be ``logits`` itself) receiving
            ``grad_scale * dloss_row/dlogits``.
        grad_scale: 1-element fp32 tensor (device) multiplying the written gradient; required with ``grad_out``.
        launch: launch-setting override (benchmark sweep), see :func:`_launch_settings`.
        stats_out: optional ``(entropy, top1)`` buffers, (N,) fp32 and (N,) int8 (or bool), receiving each row's
            entropy of ``softmax(z)`` and whether its target is the first maximum of ``z`` (``argmax``), 0 on
            ignored rows; computed in the same pass (a kernel variant with the extra statistics).

    Returns:
        ``(loss_rows, lse)``: two (N,) fp32 tensors.
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss, lse
    write_grad = grad_out is not None
    block, warps, per_sm, lane, hints, reverse, fixup = _launch_settings(
        n_cols, "fwd_grad" if write_grad else "fwd", launch, logits.device
    )
    softcap_value, has_softcap = _softcap_args(softcap)
    if write_grad:
        assert grad_scale is not None and grad_out.stride(-1) == 1
    grid = (_grid(n_rows, per_sm, logits.device),)
    common = (logits.stride(0), grad_out.stride(0) if write_grad else 0, n_rows, n_cols, ignore_index,
              1.0 / logits_scaling, softcap_value, label_smoothing)  # fmt: skip
    options = dict(
        HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=label_smoothing > 0, WRITE_GRAD=write_grad, LANE_STATS=lane,
        L2_HINTS=hints, REVERSE=reverse, FIXUP=fixup, PERSISTENT=per_sm > 0, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    grad_args = (grad_out if write_grad else logits, grad_scale if write_grad else lse)
    if stats_out is None:
        _ce_row_kernel[grid](logits, target, loss, lse, *grad_args, *common, **options)
    else:
        entropy, top1 = stats_out
        assert entropy.dtype == torch.float32 and top1.dtype in (torch.int8, torch.bool)
        assert entropy.shape == (n_rows,) and top1.shape == (n_rows,)
        top1_bytes = top1.view(torch.int8) if top1.dtype == torch.bool else top1
        _ce_row_stats_kernel[grid](logits, target, loss, lse, *grad_args, entropy, top1_bytes, *common, **options)
    return loss, lse


def ce_backward_rows(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
    out: torch.Tensor | None = None,
    launch: tuple | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_loss * loss_rows)`` w.r.t. (N, V) logits, written to ``out`` (new if None).

    ``grad_loss`` is (N,) with any stride (0 for a broadcast scalar). ``out`` may be ``logits`` itself.
    """
    n_rows, n_cols = logits.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    block, warps = _launch_settings(n_cols, "bwd", launch, logits.device)[:2]
    softcap_value, has_softcap = _softcap_args(softcap)
    _ce_bwd_kernel[(n_rows,)](
        logits, target, lse, grad_loss, out,
        logits.stride(0), out.stride(0), grad_loss.stride(0), n_cols, ignore_index,
        1.0 / logits_scaling, softcap_value, label_smoothing,
        HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=label_smoothing > 0, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad *= scale`` in place for a (N, V) buffer with unit stride on V and a 1-element device ``scale``.

    The kernel reads ``scale`` on the device and exits without touching ``grad`` when it equals 1, so the
    common ``loss.backward()`` costs one tiny launch and no host synchronisation.
    """
    n_rows, n_cols = grad.shape
    if grad.numel() == 0:
        return grad
    assert grad.stride(-1) == 1 and scale.numel() == 1
    block = min(4096, next_power_of_2(n_cols))
    _scale_rows_kernel[(_grid(n_rows, 8, grad.device),)](
        grad, scale, grad.stride(0), n_rows, n_cols, BLOCK=block, num_warps=4 if block < 4096 else 8
    )
    return grad


class _CrossEntropyFusedFunction(torch.autograd.Function):
    """Reduced loss (mean/sum) whose gradient is written during the forward pass (eager training path)."""

    @staticmethod
    def forward(ctx, logits, target, divisor, ignore_index, softcap, logits_scaling, label_smoothing, inplace):
        if inplace:
            grad = logits.detach()  # a fresh alias: autograd may adopt it as a leaf's .grad without a copy
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if divisor is None:
            grad_scale = torch.ones(1, dtype=torch.float32, device=logits.device)
        else:
            grad_scale = divisor.reciprocal().reshape(1)
        loss_rows, _lse = ce_forward_rows(
            logits, target, ignore_index, softcap, logits_scaling, label_smoothing, grad_out=grad,
            grad_scale=grad_scale,
        )  # fmt: skip
        total = loss_rows.sum()
        ctx.grad = grad
        return total if divisor is None else total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "cross_entropy writes the logits gradient during the forward pass and hands it out once; a "
                "second backward through the same graph (retain_graph=True) is not supported. Recompute the loss."
            )
        ctx.grad = None
        scale_rows_(grad, grad_loss.detach().to(torch.float32).reshape(1))
        return grad, None, None, None, None, None, None, None


class _CrossEntropyRowsFunction(torch.autograd.Function):
    """Per-row losses with autograd (eager path); reductions are plain torch ops on the result."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, softcap, logits_scaling, label_smoothing, inplace_backward):
        loss, lse = ce_forward_rows(logits, target, ignore_index, softcap, logits_scaling, label_smoothing)
        ctx.save_for_backward(logits, target, lse)
        ctx.options = (ignore_index, softcap, logits_scaling, label_smoothing)
        ctx.inplace_backward = inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        # a fresh alias of the logits' storage, so autograd can adopt it as a leaf's .grad without a copy
        out = logits.detach() if ctx.inplace_backward else None
        grad = ce_backward_rows(grad_loss, logits, target, lse, *ctx.options, out=out)
        return grad, None, None, None, None, None, None


@torch.library.custom_op("fms_accel_kernels::cross_entropy_rows", mutates_args=())
def _ce_rows_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ce_forward_rows(logits, target, ignore_index, softcap, logits_scaling, label_smoothing)


@_ce_rows_op.register_fake
def _(logits, target, ignore_index, softcap, logits_scaling, label_smoothing):
    n_rows = logits.shape[0]
    return logits.new_empty(n_rows, dtype=torch.float32), logits.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("fms_accel_kernels::cross_entropy_rows_bwd", mutates_args=())
def _ce_rows_bwd_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> torch.Tensor:
    return ce_backward_rows(grad_loss, logits, target, lse, ignore_index, softcap, logits_scaling, label_smoothing)


@_ce_rows_bwd_op.register_fake
def _(grad_loss, logits, target, lse, ignore_index, softcap, logits_scaling, label_smoothing):
    return logits.new_empty(logits.shape)


def _ce_rows_setup_context(ctx, inputs, output):
    logits, target, ignore_index, softcap, logits_scaling, label_smoothing = inputs
    _loss, lse = output
    ctx.save_for_backward(logits, target, lse)
    ctx.options = (ignore_index, softcap, logits_scaling, label_smoothing)


def _ce_rows_autograd_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = _ce_rows_bwd_op(grad_loss.float(), logits, target, lse, *ctx.options)
    return grad, None, None, None, None, None


_ce_rows_op.register_autograd(_ce_rows_autograd_backward, setup_context=_ce_rows_setup_context)


def validate_loss_options(
    reduction: str,
    num_items_in_batch: int | float | torch.Tensor | None,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> None:
    """Raise ``ValueError`` for option combinations the loss kernels do not define."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            "num_items_in_batch replaces the divisor of reduction='mean' (loss = sum / num_items_in_batch); "
            f"pass reduction='mean' (got {reduction!r})"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None; got {softcap!r}")
    if not logits_scaling > 0:
        raise ValueError(f"logits_scaling must be positive (logits are divided by it); got {logits_scaling!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")


def loss_divisor(
    target: torch.Tensor, ignore_index: int, num_items_in_batch: int | float | torch.Tensor | None
) -> torch.Tensor:
    """Divisor of the summed loss for reduction='mean': ``num_items_in_batch`` or the count of valid targets."""
    if num_items_in_batch is None:
        return (target != ignore_index).sum().to(torch.float32)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=target.device, dtype=torch.float32)
    return torch.tensor(float(num_items_in_batch), dtype=torch.float32, device=target.device)


def check_target(target: torch.Tensor, n_rows: int) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``target`` is an (n_rows,) int64/int32 tensor of class ids."""
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(f"target must be 1-D with {n_rows} entries; got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 or int32 tensor of class ids; got {target.dtype}")


def loss_options(
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | float | torch.Tensor | None,
    softcap: float | None,
    logits_scaling: float,
    label_smoothing: float,
) -> dict:
    """The loss options shared by the cross-entropy entry points, as keyword arguments."""
    return dict(
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        softcap=softcap,
        logits_scaling=logits_scaling,
        label_smoothing=label_smoothing,
    )


def _check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    check_float_dtype("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V); got shape {tuple(logits.shape)}. Flatten with .view(-1, V).")
    check_target(target, logits.shape[0])


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str, num_items_in_batch):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / loss_divisor(target, ignore_index, num_items_in_batch)


def cross_entropy_ref(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Pure-torch cross-entropy with the same options (fp32 math, as HF's loss upcasts logits).

    Args:
        logits: (N, V) unnormalised scores.
        target: (N,) class ids; entries equal to ``ignore_index`` contribute nothing.
        ignore_index: target value to skip.
        reduction: ``"mean"`` (sum / number of valid targets, or / ``num_items_in_batch``), ``"sum"`` or
            ``"none"`` ((N,) losses, 0 at ignored rows).
        num_items_in_batch: divisor of the summed loss (HF's gradient-accumulation-correct loss); needs
            ``reduction="mean"``.
        softcap: Gemma2's final logit softcapping ``softcap * tanh(z / softcap)``; None disables it.
        logits_scaling: Granite's divisor of the logits (1.0 disables it).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.

    Returns:
        fp32 scalar, or (N,) fp32 for ``reduction="none"``.
    """
    _check_inputs(logits, target)
    validate_loss_options(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    z = logits.float() / logits_scaling
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(
        z, target.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    return _reduce(rows, target, ignore_index, reduction, num_items_in_batch)


def cross_entropy_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Triton cross-entropy with autograd; contract of :func:`cross_entropy_ref`.

    Args:
        inplace_backward: write the logits gradient over ``logits`` (saves one (N, V) buffer). With
            ``reduction="mean"``/``"sum"`` the gradient is written during the forward pass, so ``logits`` hold
            the gradient as soon as this returns; with ``"none"`` it is written by the backward. Only safe when
            nothing reads ``logits`` afterwards; ignored under ``torch.compile``.
        (others): as in :func:`cross_entropy_ref`.

    With ``reduction="mean"``/``"sum"`` and logits that require grad, the gradient is computed in the forward
    kernel (one read + one write of the logits in all), so a second backward through the same graph
    (``retain_graph=True``) raises.
    """
    _check_inputs(logits, target)
    validate_loss_options(reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    softcap = float(softcap) if softcap is not None else None
    options = (int(ignore_index), softcap, float(logits_scaling), float(label_smoothing))
    if torch.compiler.is_compiling():
        loss_rows = _ce_rows_op(logits, target, *options)[0]
    elif reduction != "none" and logits.requires_grad and torch.is_grad_enabled():
        # training path: gradient written by the forward kernel, backward is a (usually skipped) scale
        divisor = None if reduction == "sum" else loss_divisor(target, ignore_index, num_items_in_batch)
        return _CrossEntropyFusedFunction.apply(logits, target, divisor, *options, bool(inplace_backward))
    else:
        loss_rows = _CrossEntropyRowsFunction.apply(logits, target, *options, bool(inplace_backward))
    return _reduce(loss_rows, target, ignore_index, reduction, num_items_in_batch)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy: Triton on CUDA (or ``TRITON_INTERPRET=1``), else the reference.

    Args:
        logits: (N, V) unnormalised scores, fp32/bf16/fp16 (never upcast in memory by the Triton path).
        target: (N,) class ids; ``ignore_index`` entries contribute nothing.
        ignore_index: target value to skip.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        num_items_in_batch: divisor of the summed loss (HF's gradient-accumulation-correct loss).
        softcap: Gemma2 final logit softcapping value, or None.
        logits_scaling: Granite's logits divisor.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        inplace_backward: Triton path only: write the gradient over ``logits`` (saves an (N, V) buffer; only
            safe when nothing reads the logits after the loss call; see :func:`cross_entropy_triton`).

    Returns:
        fp32 scalar, or (N,) fp32 for ``reduction="none"``.
    """
    kwargs = loss_options(ignore_index, reduction, num_items_in_batch, softcap, logits_scaling, label_smoothing)
    if use_triton(logits, target):
        return cross_entropy_triton(logits, target, **kwargs, inplace_backward=inplace_backward)
    return cross_entropy_ref(logits, target, **kwargs)


# ------------------------------------------------------------------------------------------ per-token outputs

ENTROPY_GRAD_MESSAGE = (
    "the per-token loss kernels return the entropy for metrics only and compute no gradient for it; a loss that "
    "depends on the entropy (an entropy bonus) needs the full-logits path"
)


class _EntropyHasNoGrad(torch.autograd.Function):
    """Identity on an entropy tensor whose backward refuses a gradient (instead of silently dropping it)."""

    @staticmethod
    def forward(ctx, entropy):
        ctx.set_materialize_grads(False)
        return entropy.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            raise RuntimeError(ENTROPY_GRAD_MESSAGE)
        return None


def check_per_token_options(softcap: float | None, logits_scaling: float) -> None:
    """Raise ``ValueError`` for options the per-token entry points do not define."""
    validate_loss_options("none", None, softcap, logits_scaling, 0.0)


def cross_entropy_per_token_ref(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch per-token negative log-likelihood, entropy and top-1 flag of (N, V) logits (fp32 math).

    Args:
        logits: (N, V) unnormalised scores; the softmax sees ``z = softcap * tanh((logits / logits_scaling) /
            softcap)`` (no tanh without ``softcap``).
        target: (N,) class ids; ``ignore_index`` rows give 0 in every output.
        ignore_index: target value to skip.
        softcap: Gemma2's final logit softcapping, or None.
        logits_scaling: Granite's divisor of the logits.

    Returns:
        ``(loss, entropy, is_top1)``: (N,) fp32 ``-log softmax(z)[target]`` with gradient; (N,) fp32 entropy of
        ``softmax(z)``, whose backward raises (metrics only); (N,) bool ``argmax(z) == target``.
    """
    _check_inputs(logits, target)
    check_per_token_options(softcap, logits_scaling)
    z = logits.float() / logits_scaling
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = target != ignore_index
    log_p = torch.log_softmax(z, dim=-1)
    loss = F.nll_loss(log_p, target.long(), ignore_index=ignore_index, reduction="none")
    entropy = -(log_p.exp() * log_p).sum(-1).masked_fill(~valid, 0.0)
    is_top1 = (z.detach().argmax(-1) == target) & valid
    return loss, _EntropyHasNoGrad.apply(entropy), is_top1


class _CrossEntropyPerTokenFunction(torch.autograd.Function):
    """Per-row losses (with autograd), entropy and top-1 flags from one pass over the logits (eager path)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, softcap, logits_scaling):
        n_rows = logits.shape[0]
        entropy = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        is_top1 = torch.empty(n_rows, dtype=torch.bool, device=logits.device)
        loss, lse = ce_forward_rows(
            logits, target, ignore_index, softcap, logits_scaling, 0.0, stats_out=(entropy, is_top1)
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, target, lse)
        ctx.options = (ignore_index, softcap, logits_scaling, 0.0)
        ctx.mark_non_differentiable(is_top1)
        return loss, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, _grad_top1):
        if grad_entropy is not None:
            raise RuntimeError(ENTROPY_GRAD_MESSAGE)
        if grad_loss is None:
            return None, None, None, None, None
        logits, target, lse = ctx.saved_tensors
        grad = ce_backward_rows(grad_loss, logits, target, lse, *ctx.options)
        return grad, None, None, None, None


def cross_entropy_per_token_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton per-token outputs; contract of :func:`cross_entropy_per_token_ref`.

    One kernel pass reads the logits once for the loss, log-sum-exp, entropy and top-1 flag; the backward
    recomputes ``softmax(z) - onehot`` from the stored log-sum-exp, scaled per row by the incoming gradient
    (one read and one write of the logits).
    """
    _check_inputs(logits, target)
    check_per_token_options(softcap, logits_scaling)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    softcap = float(softcap) if softcap is not None else None
    return _CrossEntropyPerTokenFunction.apply(logits, target, int(ignore_index), softcap, float(logits_scaling))


def cross_entropy_per_token(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    logits_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood (with gradient), entropy (metrics only) and top-1 flag of (N, V) logits:
    Triton on CUDA (or ``TRITON_INTERPRET=1``), else the reference. See :func:`cross_entropy_per_token_ref`."""
    if use_triton(logits, target):
        return cross_entropy_per_token_triton(logits, target, ignore_index, softcap, logits_scaling)
    return cross_entropy_per_token_ref(logits, target, ignore_index, softcap, logits_scaling)
