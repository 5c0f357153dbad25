"""Blockwise 4-bit (NF4 / FP4) dequantisation: pure-torch reference and Triton kernel.

The packed format is the one bitsandbytes writes (``bitsandbytes.functional.quantize_4bit``), described here
from its observable behaviour so that this module never calls bitsandbytes' compiled functions:

* the weight of logical shape ``shape`` (``n = prod(shape)`` values, row-major) is stored as ``ceil(n / 2)``
  bytes; byte ``i`` holds value ``2 i`` in its high nibble and value ``2 i + 1`` in its low nibble. The bytes
  may live in a tensor of any storage dtype (uint8, bf16, fp16, fp32, int32 ...): it is a view of the same
  memory, so we reinterpret it as uint8 and never cast it;
* the values are split into consecutive blocks of ``blocksize`` values (the last one may be partial); block
  ``j`` has the scale ``absmax[j]``; value = ``code[nibble] * absmax[j]`` computed in fp32 and rounded once to
  the output dtype (round to nearest even); ``code`` is the 16-entry NF4 or FP4 table (for FP4, bit 3 of the
  nibble negates entry ``nibble & 7``, which makes code 8 a -0.0 as bitsandbytes' CPU kernel does; its CUDA
  kernel gives +0.0 there, which compares equal);
* with double quantisation ("nested", bitsandbytes' ``compress_statistics``) the scales are themselves stored
  as uint8 indices into a 256-entry table ``nested.code``, in blocks of ``nested.blocksize`` scales with fp32
  scales ``nested.absmax``, plus one fp32 ``nested.offset``:
  ``absmax[j] = nested.code[q[j]] * nested.absmax[j // nested.blocksize] + nested.offset`` (fp32, the multiply
  and the add rounded separately).

``dequantize_4bit_ref`` and ``dequantize_4bit_triton`` implement exactly that arithmetic, so they agree with
bitsandbytes bit for bit (tests/kernels/test_nf4_dequant.py checks it for nf4/fp4, nested or not, odd shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import use_triton

__all__ = [
    "FP4_TABLE",
    "NF4_TABLE",
    "FourBitState",
    "NestedAbsmax",
    "dequantize_4bit",
    "dequantize_4bit_ref",
    "dequantize_4bit_triton",
    "four_bit_code",
    "packed_as_bytes",
]

# NF4: the 16 quantiles of N(0, 1) from the QLoRA paper (arXiv:2305.14314), normalised to [-1, 1].
NF4_TABLE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bit-pattern order, before normalisation by its
# largest magnitude (12); see ``four_bit_code``.
FP4_TABLE: tuple[float, ...] = (
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
    -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
)  # fmt: skip

_QUANT_TYPES = ("nf4", "fp4")
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def four_bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 lookup table of a 4-bit type.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.
        device: where to create the table.

    Returns:
        fp32 tensor of shape (16,), indexed by the 4-bit code.
    """
    if quant_type == "nf4":
        table = torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)
    elif quant_type == "fp4":
        table = torch.tensor(FP4_TABLE, dtype=torch.float32, device=device)
    else:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    # Normalise in fp32 exactly as the table is defined (largest magnitude -> 1).
    return table / table.abs().max()


@dataclass(frozen=True)
class NestedAbsmax:
    """Double-quantised block scales (bitsandbytes ``QuantState.state2`` + ``offset``).

    Attributes:
        absmax: fp32 (ceil(n_blocks / blocksize),) scales of the scale blocks.
        code: fp32 (256,) table that the uint8 scale indices point into.
        blocksize: number of scales per scale block (256 in bitsandbytes).
        offset: fp32 0-d (or 1-element) tensor added to every dequantised scale.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    offset: torch.Tensor


@dataclass(frozen=True)
class FourBitState:
    """Everything needed to dequantise one packed 4-bit weight (the fields of a bitsandbytes ``QuantState``).

    Attributes:
        absmax: (n_blocks,) block scales; fp32 (any float dtype is upcast), or uint8 indices when ``nested``.
        shape: logical shape of the dequantised weight, e.g. (out_features, in_features).
        blocksize: values per block (bitsandbytes allows 32 ... 4096, powers of two).
        quant_type: ``"nf4"`` or ``"fp4"``.
        dtype: dtype the weight had before quantisation (default output dtype).
        code: fp32 (16,) lookup table; must be the table of ``quant_type`` (see ``four_bit_code``).
        nested: double-quantisation data, or None.
    """

    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    code: torch.Tensor
    nested: NestedAbsmax | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in _QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {_QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize < 2 or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"blocksize must be a power of two >= 2, got {self.blocksize}")
        if self.code.numel() != 16:
            raise ValueError(f"a 4-bit code table has 16 entries, got {self.code.numel()}")
        n_blocks = math.ceil(self.numel / self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise ValueError(
                f"absmax has {self.absmax.numel()} entries but shape {tuple(self.shape)} with blocksize "
                f"{self.blocksize} has {n_blocks} blocks"
            )
        if self.nested is not None:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"nested (double-quantised) absmax must be uint8, got {self.absmax.dtype}")
            if self.nested.code.numel() != 256:
                raise ValueError(f"nested code table must have 256 entries, got {self.nested.code.numel()}")
            need = math.ceil(n_blocks / self.nested.blocksize)
            if self.nested.absmax.numel() != need:
                raise ValueError(f"nested absmax has {self.nested.absmax.numel()} entries, expected {need}")
        elif not self.absmax.is_floating_point():
            raise ValueError(f"absmax must be floating point without double quantisation, got {self.absmax.dtype}")

    @property
    def numel(self) -> int:
        """Number of logical values (prod(shape))."""
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        """Number of packed bytes (two values per byte)."""
        return (self.numel + 1) // 2


def packed_as_bytes(packed: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """Reinterpret packed storage of any dtype as a flat uint8 tensor of ``n_bytes`` bytes (no copy, no cast).

    Args:
        packed: the packed tensor as stored (e.g. ``Params4bit.data``: (n_bytes / itemsize, 1) in bf16).
        n_bytes: expected number of packed bytes.

    Returns:
        uint8 tensor of shape (n_bytes,), sharing memory with ``packed``.
    """
    if not packed.is_contiguous():
        raise ValueError("packed 4-bit storage must be contiguous; it is a byte buffer and cannot be strided")
    flat = packed.reshape(-1)
    as_bytes = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    if as_bytes.numel() < n_bytes:
        raise ValueError(f"packed storage holds {as_bytes.numel()} bytes, the weight needs {n_bytes}")
    # Storage dtypes wider than a byte may carry padding at the end: keep exactly the weight's bytes.
    return as_bytes[:n_bytes]


def _block_scales_ref(state: FourBitState) -> torch.Tensor:
    """fp32 (n_blocks,) block scales, undoing double quantisation when present."""
    if state.nested is None:
        return state.absmax.reshape(-1).float()
    nested = state.nested
    idx = state.absmax.reshape(-1).long()
    n_blocks = idx.numel()
    scale_of_scales = nested.absmax.reshape(-1).float().repeat_interleave(nested.blocksize)[:n_blocks]
    scales = nested.code.float()[idx] * scale_of_scales
    return scales + nested.offset.reshape(()).float()


def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"4-bit dequantisation writes fp32/bf16/fp16, got {dtype}")


def dequantize_4bit_ref(packed: torch.Tensor, state: FourBitState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch 4-bit dequantisation (the definition the Triton kernel is tested against).

    Args:
        packed: packed 4-bit weight in any storage dtype (ceil(n / 2) bytes).
        state: quantisation state (scales, blocksize, table, logical shape).
        dtype: output dtype; defaults to ``state.dtype``.

    Returns:
        Tensor of shape ``state.shape`` and dtype ``dtype``.
    """
    dtype = dtype or state.dtype
    _check_out_dtype(dtype)
    data = packed_as_bytes(packed, state.n_bytes)
    codes = torch.stack((data >> 4, data & 0xF), dim=-1).reshape(-1)[: state.numel].long()
    code = state.code.to(device=data.device, dtype=torch.float32)
    if state.quant_type == "fp4":
        # bit 3 is the sign of entry (code & 7): code 8 gives -0.0 (as bitsandbytes' CPU kernel; the table that
        # bitsandbytes stores in QuantState.code has +0.0 there). copysign sets the sign bit on every device.
        magnitude = code[codes & 7]
        values = torch.copysign(magnitude, torch.where(codes >= 8, -1.0, 1.0).to(magnitude.dtype))
    else:
        values = code[codes]
    scales = _block_scales_ref(state).to(data.device)
    n_full = (state.numel // state.blocksize) * state.blocksize
    out = torch.empty(state.numel, dtype=torch.float32, device=data.device)
    out[:n_full] = (values[:n_full].view(-1, state.blocksize) * scales[: n_full // state.blocksize, None]).view(-1)
    if n_full < state.numel:
        out[n_full:] = values[n_full:] * scales[-1]
    return out.to(dtype).view(state.shape)


@triton.jit
def _fp32_to_bf16_bits_rne(x):
    # fp32 -> bf16 bit pattern (in the low 16 bits of a uint32), rounding to nearest even; written out so
    # that every backend rounds the same way (the Triton CPU interpreter truncates in ``.to(tl.bfloat16)``).
    # Inputs are finite here (table entry * scale).
    bits = x.to(tl.uint32, bitcast=True)
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@triton.jit
def _with_sign_of_nibble(magnitude, nibble):
    # fp32 magnitude (>= 0) with its sign bit set from bit 3 of the 4-bit code
    sign = (nibble & 8).to(tl.uint32) << 28
    return (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr,  # uint8 (n_bytes,)
    absmax_ptr,  # fp32/fp16/bf16 (n_blocks,), or uint8 (n_blocks,) when NESTED
    code_ptr,  # fp32 (16,)
    nested_code_ptr,  # fp32 (256,)  (unused unless NESTED)
    nested_absmax_ptr,  # fp32 (n_blocks / NESTED_BLOCK,)  (unused unless NESTED)
    nested_offset_ptr,  # fp32 (1,)  (unused unless NESTED)
    out_words_ptr,  # output viewed as int32 (16-bit outputs) or int64 (fp32 outputs) words, (n_bytes,)
    n_bytes,
    n_blocks,
    HALF_BLOCK: tl.constexpr,  # bytes per quantisation block (blocksize / 2)
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    OUT_KIND: tl.constexpr,  # 0 bf16, 1 fp16, 2 fp32
    SIGN_BIT: tl.constexpr,
):
    # One program dequantises BLOCKS_PER_PROGRAM whole quantisation blocks, laid out as a
    # [BLOCKS_PER_PROGRAM, HALF_BLOCK] tile of bytes: contiguous rows, one scale per row.
    pid = tl.program_id(0)
    blocks = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    blocks = blocks.to(tl.int64)
    block_mask = blocks < n_blocks
    if NESTED:
        q = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        outer = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCK, mask=block_mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * outer.to(tl.float32)
        scale = scale + tl.load(nested_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0).to(tl.float32)

    byte_offsets = blocks[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    byte_mask = byte_offsets < n_bytes
    packed = tl.load(packed_ptr + byte_offsets, mask=byte_mask, other=0)
    high = (packed >> 4).to(tl.int32)
    low = (packed & 0xF).to(tl.int32)
    if SIGN_BIT:
        # FP4: bit 3 is the sign of entry (code & 7) (entries 0..7 are >= 0), so code 8 gives -0.0. The sign
        # bit is set with an integer OR: a float negation may compile to (0 - x), which gives +0.0 for +0.0.
        value_high = _with_sign_of_nibble(tl.load(code_ptr + (high & 7)), high) * scale[:, None]
        value_low = _with_sign_of_nibble(tl.load(code_ptr + (low & 7)), low) * scale[:, None]
    else:
        value_high = tl.load(code_ptr + high) * scale[:, None]
        value_low = tl.load(code_ptr + low) * scale[:, None]
    # Byte i holds values 2i (high nibble) and 2i+1 (low nibble). Instead of interleaving the two halves in
    # registers, both are packed into one output word (little-endian: value 2i in the low half), so the
    # output is written as words at the same offsets as the input bytes: one contiguous vectorised store.
    if OUT_KIND == 0:  # bf16: 2 x 16 bits -> 32-bit word
        word = _fp32_to_bf16_bits_rne(value_high) | (_fp32_to_bf16_bits_rne(value_low) << 16)
        word = word.to(tl.int32, bitcast=True)
    elif OUT_KIND == 1:  # fp16
        bits_high = value_high.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        bits_low = value_low.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        word = (bits_high | (bits_low << 16)).to(tl.int32, bitcast=True)
    else:  # fp32: 2 x 32 bits -> 64-bit word
        bits_high = value_high.to(tl.uint32, bitcast=True).to(tl.uint64)
        bits_low = value_low.to(tl.uint32, bitcast=True).to(tl.uint64)
        word = (bits_high | (bits_low << 32)).to(tl.int64, bitcast=True)
    tl.store(out_words_ptr + byte_offsets, word, mask=byte_mask)


# Bytes one program handles: big enough to amortise scheduling, small enough for registers.
_BYTES_PER_PROGRAM = 2048


def dequantize_4bit_triton(
    packed: torch.Tensor,
    state: FourBitState,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton 4-bit dequantisation; same result as ``dequantize_4bit_ref`` (bit-exact).

    One program handles ``max(1, 2048 // (blocksize / 2))`` whole quantisation blocks with contiguous,
    vectorised byte loads, one scale load per block, and writes the two values of each byte as one 32-bit
    (64-bit for fp32) word, so that loads and stores are both contiguous.

    Args:
        packed: packed 4-bit weight in any storage dtype (ceil(n / 2) bytes), on a CUDA device (or on CPU
            with ``TRITON_INTERPRET=1``).
        state: quantisation state (scales, blocksize, table, logical shape), on the same device.
        dtype: output dtype; defaults to ``state.dtype`` (or ``out.dtype`` when ``out`` is given).
        out: optional contiguous output of shape ``state.shape`` (e.g. a row slice of a larger buffer).

    Returns:
        Tensor of shape ``state.shape`` (``out`` when given).
    """
    dtype = dtype or (out.dtype if out is not None else state.dtype)
    _check_out_dtype(dtype)
    data = packed_as_bytes(packed, state.n_bytes)
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=data.device)
    else:
        if tuple(out.shape) != tuple(state.shape) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {dtype} tensor of shape {tuple(state.shape)}, got "
                f"{out.dtype} {tuple(out.shape)} contiguous={out.is_contiguous()}"
            )
    if state.numel == 0:
        return out
    half_block = state.blocksize // 2
    blocks_per_program = max(1, _BYTES_PER_PROGRAM // half_block)
    n_blocks = math.ceil(state.numel / state.blocksize)
    absmax = state.absmax.reshape(-1)
    code = state.code.reshape(-1)
    if code.dtype != torch.float32:
        code = code.float()
    if state.nested is not None:
        nested_code = state.nested.code.reshape(-1).float()
        nested_absmax = state.nested.absmax.reshape(-1).float()
        nested_offset = state.nested.offset.reshape(1).float()
        nested_block = state.nested.blocksize
    else:
        # Unused by the kernel (NESTED=False prunes the loads); any valid pointer will do.
        nested_code = nested_absmax = nested_offset = code
        nested_block = 1
    # The kernel writes each byte's two values as one word (see the kernel). An odd number of values or a
    # view that starts mid-word goes through a padded scratch buffer.
    word_dtype = torch.int64 if dtype == torch.float32 else torch.int32
    target = out
    if state.numel % 2 or out.storage_offset() % 2:
        target = torch.empty(state.numel + state.numel % 2, dtype=dtype, device=data.device)
    words = target.reshape(-1).view(word_dtype)
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _dequant_4bit_kernel[grid](
        data,
        absmax,
        code,
        nested_code,
        nested_absmax,
        nested_offset,
        words,
        state.n_bytes,
        n_blocks,
        HALF_BLOCK=half_block,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=state.nested is not None,
        NESTED_BLOCK=nested_block,
        OUT_KIND={torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[dtype],
        SIGN_BIT=state.quant_type == "fp4",
        num_warps=4,
        # Keep multiply and add of the nested scale separately rounded (no FMA), as the definition says.
        enable_fp_fusion=False,
    )
    if target is not out:
        out.copy_(target.reshape(-1)[: state.numel].view(state.shape))
    return out


def dequantize_4bit(
    packed: torch.Tensor,
    state: FourBitState,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise with Triton on CUDA tensors or with ``TRITON_INTERPRET=1``, else with the torch reference.

    Args / Returns: as ``dequantize_4bit_triton``.
    """
    if use_triton(packed):
        return dequantize_4bit_triton(packed, state, dtype=dtype, out=out)
    result = dequantize_4bit_ref(packed, state, dtype=dtype or (out.dtype if out is not None else None))
    if out is not None:
        out.copy_(result)
        return out
    return result
