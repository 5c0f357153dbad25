"""GPTQ weights: packing, pure-torch dequantisation, Triton kernels and a frozen GPTQ linear.

The format is the one auto-gptq, gptqmodel and optimum write into Hugging Face checkpoints. A quantised linear of
logical weight ``W`` (``N = out_features``, ``K = in_features``) with ``bits`` in {2, 4, 8} (pack factor
``pf = 32 // bits``) and ``G`` groups (``ceil(K / group_size)``, 1 for ``group_size == -1``) is stored as:

* ``qweight`` int32 (K / pf, N): the integer code ``q[k, n]`` is bits ``[(k % pf) * bits, + bits)`` of
  ``qweight[k // pf, n]`` (``k % pf == 0`` in the lowest bits);
* ``qzeros`` int32 (G, N / pf): the stored zero of ``(g, n)`` is bits ``[(n % pf) * bits, + bits)`` of
  ``qzeros[g, n // pf]``;
* ``scales`` (G, N), fp16 in checkpoints;
* ``g_idx`` int32 (K,): the group of input channel ``k``; ``k // group_size`` without act-order (``desc_act``),
  an arbitrary assignment with it (never assumed monotonic here).

``W[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``, computed in fp32 and rounded once to
the output dtype. The true zero is ``stored + 1`` for ``checkpoint_format="gptq"`` (v1: auto-gptq's off-by-one,
read without wrap-around, so a stored ``2**bits - 1`` means ``2**bits``) and ``stored`` for ``"gptq_v2"``.
Symmetric quantisation has ``zero == 2**(bits - 1)`` everywhere (v1 words of 4-bit ``0x77777777``).

Contents:

* ``pack_gptq`` / ``unpack_gptq``: integer codes and true zeros to and from the packed tensors;
* ``gptq_dequantize_ref`` (pure torch) and ``gptq_dequantize`` (Triton on CUDA tensors or with
  ``TRITON_INTERPRET=1``, else the reference): the dense (N, K) weight;
* ``GPTQWeight``: the packed tensors plus metadata as a weight format (the ``QuantizedWeight`` members of
  ``dequant.py``), usable as the frozen base of the fused LoRA functions of ``lora.py``;
* ``gptq_linear``: ``y = x W^T + b`` with ``W`` frozen; saves only the packed tensors and dequantises again in
  backward for ``dx = dy W``.

Kernels (Triton). Both read every packed word once and spread its codes along k in registers, through the packed
tensors' strides (row-major as loaded, or e.g. transposed views, read in place without a copy). The layout is
"sequential" when ``g_idx[k] == k // group_size`` (no act-order; checked once by the loader with
``gptq_sequential_g_idx`` and passed as ``GPTQWeight(sequential_g_idx=True)``) or when there is one group: the
kernels then compute each tile's group instead of reading g_idx.

* ``_gptq_dequant_kernel`` writes the dense (N, K) weight tile by tile in its stored layout. With any other g_idx
  it reads the tile's groups: a tile of one group (checked on the data) takes one zero and scale vector, others
  gather zeros and scales per input channel. bf16 is rounded by the hardware conversion on GPU and by hand in the
  CPU interpreter (which truncates), so both agree with the reference bit for bit.
* ``_gptq_matmul_kernel`` computes ``x W^T`` for few rows (``M <= _FUSED_MAX_ROWS`` tokens, e.g. generation or
  small evaluation batches) of a large sequential-layout weight without writing ``W``: programs split K, read their
  slice of packed words (``bits / 16`` of a bf16 weight's bytes) and multiply the integer codes directly (tensor
  cores, or a multiply-sum for a single row), applying zero and scale per group; a small kernel sums the splits.
  With many rows (training) the GEMM is compute-bound and dequant + cuBLAS is faster; with act-order the fused
  kernel would gather per channel and loses too, so ``gptq_linear`` runs dequant + cuBLAS there. Its backward
  always dequantises (Triton) and calls cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import interpreter_enabled, multiprocessor_count, next_power_of_2, use_triton
from .nf4 import _fp32_to_bf16_bits_rne

__all__ = [
    "GPTQWeight",
    "gptq_dequantize",
    "gptq_dequantize_ref",
    "gptq_linear",
    "gptq_sequential_g_idx",
    "pack_gptq",
    "unpack_gptq",
]

SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
CHECKPOINT_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------ validation


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        hint = (
            " 3-bit GPTQ packs codes across int32 words, which these kernels do not read; quantise with 2, 4 or 8 bits."
            if bits == 3
            else ""
        )
        raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits!r}.{hint}")
    return bits


def _zero_offset(checkpoint_format: str) -> int:
    """1 for v1 (``"gptq"``: stored zero = true zero - 1), 0 for ``"gptq_v2"``."""
    if checkpoint_format == "gptq":
        return 1
    if checkpoint_format == "gptq_v2":
        return 0
    raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")


def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"GPTQ dequantisation writes fp32/bf16/fp16, got {dtype}")


def _check_int32(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as stored in GPTQ checkpoints), got {tensor.dtype}")


def _check_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    in_features: int,
    out_features: int,
) -> int:
    """Validate the shapes and dtypes of the packed tensors; returns the number of groups G."""
    pf = 32 // _check_bits(bits)
    if in_features % pf or out_features % pf:
        raise ValueError(
            f"a {bits}-bit GPTQ weight needs in_features and out_features divisible by {pf} (32 // bits), got "
            f"in_features={in_features}, out_features={out_features}"
        )
    _check_int32("qweight", qweight)
    _check_int32("qzeros", qzeros)
    if tuple(qweight.shape) != (in_features // pf, out_features):
        raise ValueError(
            f"qweight has shape {tuple(qweight.shape)}, expected (in_features / {pf}, out_features) = "
            f"({in_features // pf}, {out_features})"
        )
    if qzeros.dim() != 2 or qzeros.shape[1] != out_features // pf or qzeros.shape[0] < 1:
        raise ValueError(
            f"qzeros has shape {tuple(qzeros.shape)}, expected (groups, out_features / {pf}) = "
            f"(G, {out_features // pf})"
        )
    groups = int(qzeros.shape[0])
    if scales is not None:
        if not scales.is_floating_point():
            raise TypeError(f"scales must be floating point (fp16 in GPTQ checkpoints), got {scales.dtype}")
        if tuple(scales.shape) != (groups, out_features):
            raise ValueError(
                f"scales has shape {tuple(scales.shape)}, expected (groups, out_features) = ({groups}, {out_features})"
            )
    if g_idx is not None:
        if g_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"g_idx must be int32 (or int64), got {g_idx.dtype}")
        if tuple(g_idx.shape) != (in_features,):
            raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected (in_features,) = ({in_features},)")
    return groups


def _as_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) to int32 with the same 32 bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# ------------------------------------------------------------------------------------------ packing


def pack_gptq(
    intweight: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack integer codes and true zeros into GPTQ ``qweight`` / ``qzeros``.

    Args:
        intweight: integer tensor (K, N) (in_features, out_features: the transpose of the weight) of codes in
            ``[0, 2**bits)``.
        zeros: integer tensor (G, N) of true zeros. Stored as ``zeros - 1`` for ``"gptq"`` (v1), so they must be
            in ``[1, 2**bits]`` there (a quantiser writing v1 clamps zeros to >= 1), and in ``[0, 2**bits)`` for
            ``"gptq_v2"``.
        bits: 2, 4 or 8.
        checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``.

    Returns:
        ``(qweight int32 (K / pf, N), qzeros int32 (G, N / pf))`` with ``pf = 32 // bits``.
    """
    pf = 32 // _check_bits(bits)
    offset = _zero_offset(checkpoint_format)
    if intweight.dim() != 2 or zeros.dim() != 2:
        raise ValueError(
            f"intweight (K, N) and zeros (G, N) must be 2-D, got {tuple(intweight.shape)}, {tuple(zeros.shape)}"
        )
    if intweight.is_floating_point() or zeros.is_floating_point() or intweight.dtype == torch.bool:
        raise TypeError(f"intweight and zeros must be integer tensors, got {intweight.dtype} and {zeros.dtype}")
    k, n = intweight.shape
    if zeros.shape[1] != n:
        raise ValueError(f"zeros has {zeros.shape[1]} columns, intweight has {n} (out_features)")
    if k % pf or n % pf:
        raise ValueError(f"{bits}-bit packing needs K and N divisible by {pf}, got intweight of shape ({k}, {n})")
    limit = 1 << bits
    codes = intweight.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= limit):
        raise ValueError(f"intweight codes must be in [0, {limit}) for {bits} bits")
    stored = zeros.to(torch.int64) - offset
    if stored.numel() and (stored.min() < 0 or stored.max() >= limit):
        valid = f"[1, {limit}]" if offset else f"[0, {limit})"
        fix = " (v1 cannot store a zero of 0: clamp zeros to >= 1, or write gptq_v2)" if offset else ""
        raise ValueError(f"zeros must be in {valid} for {bits}-bit {checkpoint_format!r}{fix}")
    shifts = torch.arange(pf, device=codes.device, dtype=torch.int64) * bits
    qweight = (codes.view(k // pf, pf, n) << shifts.view(1, pf, 1)).sum(dim=1)
    qzeros = (stored.view(-1, n // pf, pf) << shifts.view(1, 1, pf)).sum(dim=2)
    return _as_int32_words(qweight), _as_int32_words(qzeros)


def _unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) int32 words -> (R * pf, C) int32 codes (codes of a word along the first dim)."""
    pf = 32 // bits
    shifts = torch.arange(pf, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight.unsqueeze(1) >> shifts.view(1, pf, 1)) & ((1 << bits) - 1)
    return codes.reshape(qweight.shape[0] * pf, qweight.shape[1])


def _unpack_cols(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) int32 words -> (R, C * pf) int32 codes (codes of a word along the last dim)."""
    pf = 32 // bits
    shifts = torch.arange(pf, device=qzeros.device, dtype=torch.int32) * bits
    codes = (qzeros.unsqueeze(2) >> shifts.view(1, 1, pf)) & ((1 << bits) - 1)
    return codes.reshape(qzeros.shape[0], qzeros.shape[1] * pf)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    in_features: int,
    out_features: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack GPTQ ``qweight`` / ``qzeros`` into integer codes and true zeros.

    Args:
        qweight: int32 (in_features / pf, out_features).
        qzeros: int32 (G, out_features / pf).
        bits: 2, 4 or 8.
        in_features: K.
        out_features: N.
        checkpoint_format: ``"gptq"`` (v1: true zero = stored + 1, no wrap-around) or ``"gptq_v2"``.

    Returns:
        ``(intweight int32 (K, N), zeros int32 (G, N))``.
    """
    offset = _zero_offset(checkpoint_format)
    _check_packed(qweight, qzeros, None, None, bits, in_features, out_features)
    return _unpack_rows(qweight, bits), _unpack_cols(qzeros, bits) + offset


# ------------------------------------------------------------------------------------------ dequantisation


def gptq_dequantize_ref(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-torch GPTQ dequantisation (the definition the Triton kernels are tested against).

    Args:
        qweight: int32 (K / pf, N) packed codes.
        qzeros: int32 (G, N / pf) packed stored zeros.
        scales: (G, N) scales (fp16 in checkpoints).
        g_idx: int32 (K,) group of every input channel (any assignment, e.g. act-order).
        bits: 2, 4 or 8.
        checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``.
        dtype: output dtype (fp32/bf16/fp16); defaults to ``scales.dtype``.

    Returns:
        Contiguous (N, K) weight in ``dtype``.
    """
    dtype = dtype or scales.dtype
    _check_out_dtype(dtype)
    in_features, out_features = int(g_idx.shape[0]), int(scales.shape[-1])
    _check_packed(qweight, qzeros, scales, g_idx, bits, in_features, out_features)
    codes, zeros = unpack_gptq(qweight, qzeros, bits, in_features, out_features, checkpoint_format)
    groups = g_idx.long()
    # (N, K): codes^T - zeros[g_idx]^T, times scales[g_idx]^T, in fp32 (exact for fp16 scales), rounded once
    diff = (codes.t() - zeros.t()[:, groups]).to(torch.float32)
    return (scales.t().to(torch.float32)[:, groups] * diff).to(dtype)


def gptq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    *,
    sequential_group_size: int = 0,
) -> torch.Tensor:
    """Dense (N, K) GPTQ weight: Triton on CUDA tensors or with ``TRITON_INTERPRET=1``, else the reference.

    Args: as ``gptq_dequantize_ref``, plus
        out: optional contiguous (N, K) output (e.g. a row slice of a larger buffer); its dtype is the output
            dtype when ``dtype`` is None.
        sequential_group_size: the group size when the caller knows that ``g_idx[k] == k // group_size`` for
            every k (``gptq_sequential_g_idx``); the kernel then computes groups instead of reading g_idx. 0 (the
            default): any g_idx.

    Returns:
        (N, K) weight (``out`` when given), equal bit for bit to ``gptq_dequantize_ref``.
    """
    dtype = dtype or (out.dtype if out is not None else scales.dtype)
    if use_triton(qweight, qzeros, scales, g_idx):
        if not torch.compiler.is_compiling():
            return _dequantize_triton(
                qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype, out=out,
                sequential_group_size=sequential_group_size,
            )  # fmt: skip
        # under torch.compile the kernel runs behind an opaque custom op (Dynamo does not trace the launcher)
        result = _dequantize_op(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype, sequential_group_size)
        if out is not None:
            _check_out(out, (result.shape[0], result.shape[1]), dtype)
            out.copy_(result)
            return out
        return result
    result = gptq_dequantize_ref(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype)
    if out is not None:
        _check_out(out, (result.shape[0], result.shape[1]), dtype)
        out.copy_(result)
        return out
    return result


def gptq_sequential_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether ``g_idx[k] == k // group_size`` for every input channel k (no act-order permutation).

    Reads ``g_idx`` (a device synchronisation): call it once, e.g. when loading a checkpoint, and pass the result
    as ``GPTQWeight(..., sequential_g_idx=...)``.

    Args:
        g_idx: (K,) group of every input channel.
        group_size: input channels per group, or -1 for one group.
    """
    k = int(g_idx.numel())
    per_group = group_size if group_size > 0 else max(k, 1)
    expected = torch.arange(k, device=g_idx.device, dtype=torch.int64) // per_group
    return bool(torch.equal(g_idx.to(torch.int64), expected))


def _check_out(out: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)} "
            f"contiguous={out.is_contiguous()}"
        )


# ------------------------------------------------------------------------------------------ Triton kernels


@triton.jit
def _codes_kn(qweight_ptr, k0, offs_n, mask_n, stride_qk, stride_qn, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    # int32 codes [BLOCK_K, BLOCK_N] of input channels k0 ... k0 + BLOCK_K (k0 a multiple of BLOCK_K), 0 where
    # masked: each packed word is loaded once ([BLOCK_K / PF, BLOCK_N]) and its PF codes are spread along k
    PF: tl.constexpr = 32 // BITS
    offs_kw = k0 // PF + tl.arange(0, BLOCK_K // PF)
    mask = (offs_kw < K // PF)[:, None] & mask_n[None, :]
    words = tl.load(qweight_ptr + offs_kw[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
    shifts = tl.arange(0, PF) * BITS
    return tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))


@triton.jit
def _codes_nk(qweight_ptr, k0, offs_n, mask_n, stride_qk, stride_qn, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    # the transpose of ``_codes_kn``: [BLOCK_N, BLOCK_K], k along the last dim as in the dense (N, K) weight
    PF: tl.constexpr = 32 // BITS
    offs_kw = k0 // PF + tl.arange(0, BLOCK_K // PF)
    mask = mask_n[:, None] & (offs_kw < K // PF)[None, :]
    words = tl.load(qweight_ptr + offs_kw[None, :] * stride_qk + offs_n[:, None] * stride_qn, mask=mask, other=0)
    shifts = tl.arange(0, PF) * BITS
    return tl.reshape((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BLOCK_N, BLOCK_K))


@triton.jit
def _group_vectors(qzeros_ptr, scales_ptr, group, offs_n, mask_n, stride_zg, stride_zn, stride_sg, stride_sn,
                   BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):  # fmt: skip
    # true zeros (int32) and fp32 scales [BLOCK_N] of one group
    PF: tl.constexpr = 32 // BITS
    zero_words = tl.load(qzeros_ptr + group * stride_zg + (offs_n // PF) * stride_zn, mask=mask_n, other=0)
    zeros = ((zero_words >> ((offs_n % PF) * BITS)) & ((1 << BITS) - 1)) + ZERO_OFFSET
    scales = tl.load(scales_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    return zeros, scales


@triton.jit
def _gptq_dequant_kernel(
    qweight_ptr,  # int32 (K / PF, N)
    qzeros_ptr,  # int32 (G, N / PF)
    scales_ptr,  # (G, N)
    g_idx_ptr,  # int32 / int64 (K,)
    out_ptr,  # (N, K): fp16 / fp32, or the int16 bit patterns of bf16
    N,
    K,
    group_size,  # SEQUENTIAL: g_idx[k] == k // group_size, taken as given
    stride_qk,  # the packed tensors' strides (row-major as loaded; transposed views under FSDP2, read in place)
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    OUT_KIND: tl.constexpr,  # 0 bf16, 1 fp16, 2 fp32
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SEQUENTIAL: tl.constexpr,
    HW_ROUND: tl.constexpr,  # 1: bf16 by the hardware conversion (GPU); 0: by hand (the interpreter truncates)
):
    # one [BLOCK_N, BLOCK_K] tile of the dense weight, computed in the layout it is stored in (k contiguous)
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_n[:, None] & mask_k[None, :]
    codes = _codes_nk(qweight_ptr, k0, offs_n, mask_n, stride_qk, stride_qn, K, BITS, BLOCK_K, BLOCK_N)
    if SEQUENTIAL:  # tiles lie in one group (BLOCK_K divides the group size)
        zeros, scales = _group_vectors(qzeros_ptr, scales_ptr, k0 // group_size, offs_n, mask_n, stride_zg, stride_zn,
                                       stride_sg, stride_sn, BITS, ZERO_OFFSET)  # fmt: skip
        w = (codes - zeros[:, None]).to(tl.float32) * scales[:, None]
    else:
        # any g_idx (e.g. act-order): a tile whose channels share one group (checked on the data) takes one zero
        # and scale vector; others gather them per channel
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        first = tl.load(g_idx_ptr + k0)
        if tl.max(tl.where(mask_k & (g != first), 1, 0), axis=0) == 0:
            zeros, scales = _group_vectors(qzeros_ptr, scales_ptr, first, offs_n, mask_n, stride_zg, stride_zn,
                                           stride_sg, stride_sn, BITS, ZERO_OFFSET)  # fmt: skip
            w = (codes - zeros[:, None]).to(tl.float32) * scales[:, None]
        else:
            zero_words = tl.load(qzeros_ptr + g[None, :] * stride_zg + (offs_n // PF)[:, None] * stride_zn, mask=mask,
                                 other=0)  # fmt: skip
            tile_zeros = ((zero_words >> ((offs_n % PF) * BITS)[:, None]) & MASK) + ZERO_OFFSET
            tile_scales = tl.load(scales_ptr + g[None, :] * stride_sg + offs_n[:, None] * stride_sn, mask=mask,
                                  other=0.0)  # fmt: skip
            w = (codes - tile_zeros).to(tl.float32) * tile_scales.to(tl.float32)
    # fp32 products are exact (a 9-bit integer times an fp16 scale): one rounding to the output dtype
    dst = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    if OUT_KIND == 0:
        if HW_ROUND:
            bits16 = w.to(tl.bfloat16).to(tl.int16, bitcast=True)
        else:
            bits16 = _fp32_to_bf16_bits_rne(w).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(dst, bits16, mask=mask)
    elif OUT_KIND == 1:
        tl.store(dst, w.to(tl.float16), mask=mask)
    else:
        tl.store(dst, w, mask=mask)


@triton.jit
def _gptq_matmul_kernel(
    x_ptr,  # fp16 / bf16 (M, K), strided
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    bias_ptr,  # (N,) or a dummy (HAS_BIAS 0)
    out_ptr,  # SPLIT_OUT: fp32 (splits, M, N) partial products; else (M, N) in x's dtype, bias added
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    k_per_split,  # a multiple of BLOCK_K
    group_size,  # g_idx[k] == k // group_size (the sequential layout), with BLOCK_K dividing it
    stride_qk,  # the packed tensors' strides, as in _gptq_dequant_kernel
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,  # tensor cores (BLOCK_M >= 16), else a broadcast multiply and sum
    SPLIT_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 operands as their integer bit patterns
):
    # y = x W^T for few rows: each program reads the packed words of BLOCK_N output columns over a K slice once
    # and accumulates in fp32, so W is read packed (bits / 16 of a bf16 weight's bytes) and never written dense.
    # A tile lies in one group g, so the codes are multiplied directly: sum_k x s (q - z) = s (sum_k x q - z sum_k x)
    # (codes are exact in fp16/bf16).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * k_per_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)  # fmt: skip
        codes = _codes_kn(qweight_ptr, k0, offs_n, mask_n, stride_qk, stride_qn, K, BITS, BLOCK_K, BLOCK_N)
        if USE_DOT:
            if DOT_FP32:
                prod = tl.dot(x.to(tl.float32), codes.to(tl.float32), input_precision="ieee")
            else:
                prod = tl.dot(x, codes.to(x.dtype))
        else:
            prod = tl.sum(x.to(tl.float32)[:, :, None] * codes.to(tl.float32)[None, :, :], axis=1)
        zeros, scales = _group_vectors(qzeros_ptr, scales_ptr, k0 // group_size, offs_n, mask_n, stride_zg, stride_zn,
                                       stride_sg, stride_sn, BITS, ZERO_OFFSET)  # fmt: skip
        row_sums = tl.sum(x.to(tl.float32), axis=1)
        acc += (prod - row_sums[:, None] * zeros.to(tl.float32)[None, :]) * scales[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_OUT:
        tl.store(out_ptr + (split * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(partial_ptr, bias_ptr, out_ptr, MN, N, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # out (M, N) = sum over splits of the fp32 partial products (+ bias), rounded once to out's dtype
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Launch settings from benchmarks/kernel-bench/gptq_bench.py's sweep on one H100
# (benchmarks/results/2026-12-06-h100-x1-kernels-gptq-tuning). Dequant: (BLOCK_N, BLOCK_K, num_warps) for the
# sequential layout (groups computed from k) and for any g_idx (read and checked per tile).
_DEQUANT_LAUNCH_SEQUENTIAL = (64, 32, 2)
_DEQUANT_LAUNCH = (64, 32, 2)
# Fused dequant-matmul by row count M: (largest M, tensor cores, (BLOCK_N, BLOCK_K, num_warps, programs per
# multiprocessor that the K split aims for)); the last entry also serves larger M.
_MATMUL_LAUNCHES = ((1, False, (32, 128, 2, 16)), (16, True, (128, 64, 4, 2)), (64, True, (64, 128, 4, 2)))
# gptq_linear runs the fused kernel (sequential layout only) for at most _FUSED_MAX_ROWS rows (tokens) of a weight
# of at least _FUSED_MIN_NUMEL elements; otherwise dequant + cuBLAS. On the H100 the fused kernel took 0.27-0.63x
# the kernel time of dequant + cuBLAS at 1-16 rows of the 8B MLP weights (0.68-0.78x launch overhead
# included); on the 4096x4096 and 1024x4096 weights the two launches of each path cost more than either kernel,
# and the fused path's were the slower ones.
_FUSED_MAX_ROWS = 16
_FUSED_MIN_NUMEL = 1 << 25
_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _sequential_block_k(block_k: int, sequential_group_size: int, in_features: int, groups: int, smallest: int) -> int:
    """BLOCK_K with which the kernels compute each tile's group as ``k0 // group_size`` instead of reading g_idx,
    or 0 when they must read it.

    Possible for one group (every channel is in group 0) and for a weight whose ``g_idx[k] == k //
    sequential_group_size`` (the caller's word; 0 when unknown), with BLOCK_K (a power of two, at least
    ``smallest``) dividing the group size so that no tile spans two groups.
    """
    if groups == 1:
        return block_k
    if sequential_group_size > 0:
        block_k = min(block_k, sequential_group_size & -sequential_group_size)
        if block_k >= smallest:
            return block_k
    return 0


def _dequantize_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    sequential_group_size: int = 0,
    launch: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Triton GPTQ dequantisation into a contiguous (N, K) tensor; bit-exact with ``gptq_dequantize_ref``."""
    _check_out_dtype(dtype)
    offset = _zero_offset(checkpoint_format)
    in_features, out_features = int(g_idx.shape[0]), int(scales.shape[-1])
    groups = _check_packed(qweight, qzeros, scales, g_idx, bits, in_features, out_features)
    if out is None:
        out = torch.empty((out_features, in_features), dtype=dtype, device=qweight.device)
    else:
        _check_out(out, (out_features, in_features), dtype)
    if out.numel() == 0:
        return out
    pf = 32 // bits
    seq_launch = launch or _DEQUANT_LAUNCH_SEQUENTIAL
    block_k = _sequential_block_k(max(seq_launch[1], pf), sequential_group_size, in_features, groups, pf)
    if block_k:
        block_n, num_warps = seq_launch[0], seq_launch[2]
        group_size = in_features if groups == 1 else sequential_group_size
    else:
        block_n, block_k, num_warps = launch or _DEQUANT_LAUNCH
        block_k = max(block_k, pf)  # whole packed words per tile
        group_size = 0
        # zeros and scales gathered per channel load coalesced only in their stored row-major layout: these small
        # tensors are copied when they are not (e.g. FSDP2's transposed views); the packed codes are read in place
        qzeros, scales = qzeros.contiguous(), scales.contiguous()
    target = out.view(torch.int16) if dtype == torch.bfloat16 else out
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(out_features, block_n))
    # the packed tensors are read through their strides, in place (e.g. the transposed views of FSDP2's layout)
    _gptq_dequant_kernel[grid](
        qweight, qzeros, scales, g_idx.contiguous(), target, out_features, in_features, max(group_size, 1),
        *qweight.stride(), *qzeros.stride(), *scales.stride(),
        BITS=bits, ZERO_OFFSET=offset, OUT_KIND=_OUT_KIND[dtype], BLOCK_N=block_n, BLOCK_K=block_k,
        SEQUENTIAL=group_size > 0, HW_ROUND=not interpreter_enabled(), num_warps=num_warps,
    )  # fmt: skip
    return out


def _fused_launch(m: int, weight: GPTQWeight, launch: tuple | None = None) -> tuple | None:
    """(tensor cores, BLOCK_N, BLOCK_K, num_warps, programs per multiprocessor) of the fused kernel for ``m``
    rows (``launch`` overrides ``_MATMUL_LAUNCHES``), or None when the weight's layout needs g_idx read (act-order,
    or not flagged sequential)."""
    if launch is None:
        launch = next(((d, *entry) for rows, d, entry in _MATMUL_LAUNCHES if m <= rows), None)
        if launch is None:
            launch = (_MATMUL_LAUNCHES[-1][1], *_MATMUL_LAUNCHES[-1][2])
    use_dot, block_n, block_k, num_warps, per_sm = launch
    w = weight
    sequential_group_size = w.group_size if w.sequential_g_idx else 0
    block_k = _sequential_block_k(block_k, sequential_group_size, w.in_features, int(w.qzeros.shape[0]), 16)
    return (use_dot, block_n, block_k, num_warps, per_sm) if block_k else None


def _matmul_fused(
    x2: torch.Tensor,
    weight: GPTQWeight,
    bias: torch.Tensor | None,
    launch: tuple[bool, int, int, int, int] | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """(M, K) fp16/bf16 ``x2`` -> (M, N) ``x2 W^T + bias`` with the fused dequant-matmul kernel (few rows)."""
    m, k = x2.shape
    n = weight.out_features
    plan = _fused_launch(m, weight, launch)
    if plan is None:
        raise ValueError(
            "the fused GPTQ dequant-matmul reads groups as k // group_size: it needs one group or a weight built "
            "with GPTQWeight(sequential_g_idx=True) and a group size divisible by 16"
        )
    use_dot, block_n, block_k, num_warps, per_sm = plan
    block_m = min(max(16, next_power_of_2(m)), 64) if use_dot else min(next_power_of_2(m), 8)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:
        # few output tiles: split K so that about ``per_sm`` programs run per multiprocessor
        split_k = max(1, min(per_sm * multiprocessor_count(x2.device) // tiles, triton.cdiv(k, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x2.device) if split_k > 1 else y
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    w = weight
    group_size = k if int(w.qzeros.shape[0]) == 1 else w.group_size
    _gptq_matmul_kernel[grid](
        x2, w.qweight, w.qzeros, w.scales, bias if bias is not None else partial, partial, m, n, k, x2.stride(0),
        x2.stride(1), k_per_split, group_size, *w.qweight.stride(), *w.qzeros.stride(), *w.scales.stride(),
        BITS=w.bits, ZERO_OFFSET=_zero_offset(w.checkpoint_format), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, USE_DOT=use_dot, SPLIT_OUT=split_k > 1, HAS_BIAS=bias is not None,
        DOT_FP32=interpreter_enabled(), num_warps=num_warps,
    )  # fmt: skip
    if split_k > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            partial, bias if bias is not None else partial, y, m * n, n, split_k, HAS_BIAS=bias is not None,
            BLOCK=block,
        )  # fmt: skip
    return y


# torch.compile seam: the Triton launchers behind custom ops (plain tensors and scalars in), used only while
# compiling; eager calls launch directly (a custom op's dispatch costs more than a small-M kernel runs).


@torch.library.custom_op("fms_accel_kernels::gptq_dequantize", mutates_args=())
def _dequantize_op(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str,
    dtype: torch.dtype,
    sequential_group_size: int,
) -> torch.Tensor:
    return _dequantize_triton(
        qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype, sequential_group_size=sequential_group_size
    )


@_dequantize_op.register_fake
def _(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype, sequential_group_size):
    return qweight.new_empty((scales.shape[-1], g_idx.shape[0]), dtype=dtype)


@torch.library.custom_op("fms_accel_kernels::gptq_matmul_fused", mutates_args=())
def _matmul_fused_op(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    checkpoint_format: str,
    sequential_g_idx: bool,
) -> torch.Tensor:
    weight = GPTQWeight(
        qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format, scales.shape[-1], g_idx.shape[0],
        sequential_g_idx=sequential_g_idx,
    )  # fmt: skip
    return _matmul_fused(x2, weight, bias)


@_matmul_fused_op.register_fake
def _(x2, qweight, qzeros, scales, g_idx, bias, bits, group_size, checkpoint_format, sequential_g_idx):
    return x2.new_empty((x2.shape[0], scales.shape[-1]))


def _linear_fused(x2: torch.Tensor, weight: GPTQWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        w = weight
        return _matmul_fused_op(
            x2, w.qweight, w.qzeros, w.scales, w.g_idx, bias, w.bits, w.group_size, w.checkpoint_format,
            w.sequential_g_idx,
        )  # fmt: skip
    return _matmul_fused(x2, weight, bias)


def _use_fused(x2: torch.Tensor, weight: GPTQWeight) -> bool:
    # act-order (or an unflagged g_idx) runs dequant + cuBLAS: gathering zeros and scales per input channel inside
    # the fused kernel made it slower than the two steps at every row count measured
    return (
        0 < x2.shape[0] <= _FUSED_MAX_ROWS
        and weight.out_features * weight.in_features >= _FUSED_MIN_NUMEL
        and x2.dtype in (torch.bfloat16, torch.float16)
        and _fused_launch(x2.shape[0], weight) is not None
        and use_triton(x2, weight.qweight, weight.qzeros, weight.scales, weight.g_idx)
    )


# ------------------------------------------------------------------------------------------ weight format


@dataclass(frozen=True)
class GPTQWeight:
    """A GPTQ-quantised frozen linear weight (the ``QuantizedWeight`` members of ``dequant.py``).

    Holds references to the layer's tensors (no copies). Only shapes and dtypes are validated here (no device
    synchronisation), so building one per forward is cheap.

    Attributes:
        qweight: int32 (in_features / pf, out_features) packed codes, ``pf = 32 // bits``.
        qzeros: int32 (G, out_features / pf) packed stored zeros.
        scales: (G, out_features) scales (fp16 in checkpoints).
        g_idx: int32 (in_features,) group of every input channel.
        bits: 2, 4 or 8.
        group_size: input channels per group, or -1 for one group over all of them.
        checkpoint_format: ``"gptq"`` (v1 zeros, stored = zero - 1) or ``"gptq_v2"``.
        out_features: N.
        in_features: K.
        dtype: compute dtype, the default dtype of ``dequantize`` (defaults to ``scales.dtype``).
        sequential_g_idx: True when ``g_idx[k] == k // group_size`` for every k (no act-order), as checked once
            by whoever builds the weight (``gptq_sequential_g_idx``, e.g. at load). The kernels then compute
            groups instead of reading g_idx, and ``gptq_linear`` may use the fused kernel for few rows. Not
            checked here (no device synchronisation): a wrong True gives wrong results.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    checkpoint_format: str
    out_features: int
    in_features: int
    dtype: torch.dtype | None = None
    sequential_g_idx: bool = False

    def __post_init__(self) -> None:
        _zero_offset(self.checkpoint_format)
        groups = _check_packed(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features, self.out_features
        )
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs > 0):
            raise ValueError(f"group_size must be a positive number of input channels or -1, got {gs!r}")
        expected = 1 if gs == -1 else -(-self.in_features // gs)
        if groups != expected:
            raise ValueError(
                f"qzeros/scales have {groups} groups, but in_features={self.in_features} with group_size={gs} "
                f"gives {expected}"
            )
        if not isinstance(self.sequential_g_idx, bool):
            raise TypeError(f"sequential_g_idx must be a bool, got {self.sequential_g_idx!r}")
        if self.dtype is None:
            object.__setattr__(self, "dtype", self.scales.dtype)
        _check_out_dtype(self.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        """Logical (out_features, in_features)."""
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (out_features, in_features) weight (Triton where ``use_triton`` allows)."""
        dtype = dtype or (out.dtype if out is not None else self.dtype)
        return gptq_dequantize(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format, dtype, out=out,
            sequential_group_size=self.group_size if self.sequential_g_idx and self.group_size > 0 else 0,
        )  # fmt: skip

    def dequantize_ref(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out_features, in_features) weight from the pure-torch reference."""
        return gptq_dequantize_ref(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format, dtype or self.dtype
        )


# ------------------------------------------------------------------------------------------ linear


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _GPTQLinearFunction(torch.autograd.Function):
    """y = x W^T + b with a frozen GPTQ ``W``; saves no dense weight (backward dequantises again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: GPTQWeight, bias: torch.Tensor | None):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        if _use_fused(x2, weight):
            y = _linear_fused(x2, weight, bias)
        else:
            w = weight.dequantize(dtype)
            y = F.linear(x2, w, bias.to(dtype) if bias is not None else None)
            del w
        ctx.weight = weight
        ctx.x_shape = x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*x.shape[:-1], weight.out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        weight: GPTQWeight = ctx.weight
        need_x, _, need_bias = ctx.needs_input_grad
        dtype = grad_y.dtype
        gy = grad_y.reshape(-1, weight.out_features)
        dx = dbias = None
        with torch.autocast(device_type=gy.device.type, enabled=False):
            if need_x:
                w = weight.dequantize(dtype)  # recomputed instead of saved
                dx = (gy @ w).view(ctx.x_shape)
                del w
            if need_bias:
                dbias = gy.sum(0).to(ctx.bias_dtype)
        return dx, None, dbias


def gptq_linear(x: torch.Tensor, weight: GPTQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Frozen GPTQ linear ``x W^T + bias``; gradients for ``x`` and (when it requires grad) ``bias`` only.

    Saves only references to the packed tensors: the backward dequantises ``W`` again for ``dx = dy W``. With
    Triton (CUDA tensors or ``TRITON_INTERPRET=1``), a bf16/fp16 input of at most ``_FUSED_MAX_ROWS`` (16) rows
    times a weight of at least ``_FUSED_MIN_NUMEL`` (2**25) elements flagged ``sequential_g_idx`` (or of one
    group) runs the fused dequant-matmul kernel; otherwise ``W`` is dequantised (Triton) into a temporary for one
    cuBLAS GEMM.

    Args:
        x: (..., in_features) input.
        weight: the GPTQ weight (tensors as seen inside the module's forward, e.g. after FSDP gathered them).
        bias: (out_features,) bias, or None.

    Returns:
        (..., out_features) output in the compute dtype (``x``'s dtype, or the autocast dtype).
    """
    if not isinstance(weight, GPTQWeight):
        raise TypeError(f"weight must be a GPTQWeight, got {type(weight).__name__}")
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"input has {x.shape[-1]} features but the GPTQ weight is {weight.shape} (out, in)")
    if bias is not None and tuple(bias.shape) != (weight.out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.out_features},)")
    dtype = _compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _GPTQLinearFunction.apply(x.to(dtype), weight, bias)
