"""Weight formats: a frozen linear weight as tensors plus metadata, with its dequant op.

The fused LoRA functions (``lora.py``) take the frozen base weight of a projection as a ``QuantizedWeight``
(anything with ``shape``, ``dtype``, ``device``, ``dequantize`` and ``dequantize_ref``) and never look at its
storage format themselves. Shipped formats:

* ``DenseWeight``: a fp32/bf16/fp16 (out, in) tensor; dequantising is a no-op (or a cast);
* ``Bnb4bitWeight``: bitsandbytes' packed 4-bit bytes (nf4 / fp4, with or without double quantisation, any
  storage dtype) plus their ``FourBitState``, dequantised by our own kernels in ``nf4.py`` (bitsandbytes'
  compiled functions are never called; their signatures change between releases). ``bnb_four_bit_state``
  turns a bitsandbytes ``QuantState`` into a ``FourBitState``;
* ``GPTQWeight`` (defined in ``gptq.py``): GPTQ's packed int32 ``qweight`` / ``qzeros``, fp16 ``scales`` and int32
  ``g_idx`` (2, 4 or 8 bits, any group assignment, v1 or v2 zeros), dequantised by the Triton kernels there.

Another format is one more frozen class with the same members. Which layer holds which format, and how to read the tensors out of it, is
not kernel knowledge: the plugins declare it as dequant backends (``fms_acceleration_accelerate.dequant``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .gptq import GPTQWeight
from .nf4 import FourBitState, NestedAbsmax, dequantize_4bit, dequantize_4bit_ref

__all__ = [
    "Bnb4bitWeight",
    "DenseWeight",
    "GPTQWeight",
    "QuantizedWeight",
    "bnb_four_bit_state",
]

_DENSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@runtime_checkable
class QuantizedWeight(Protocol):
    """A frozen linear weight of logical shape (out_features, in_features) in some storage format.

    Implementations hold references to the layer's tensors (never copies), so keeping one alive between a
    forward and its backward costs no memory beyond the stored weight itself.
    """

    @property
    def shape(self) -> tuple[int, int]:
        """Logical (out_features, in_features)."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype ``dequantize()`` returns by default (the weight's original dtype)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        ...

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (out_features, in_features) weight, with the fast kernel where one applies.

        ``out`` (contiguous, right shape and dtype) receives the result when given, e.g. a row slice of a
        buffer that holds several weights.
        """
        ...

    def dequantize_ref(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out_features, in_features) weight computed by the pure-torch reference."""
        ...


@dataclass(frozen=True)
class DenseWeight:
    """A plain floating-point weight (no quantisation): ``dequantize`` returns it (cast only if asked).

    Attributes:
        weight: (out_features, in_features) fp32/bf16/fp16 tensor.
    """

    weight: torch.Tensor

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"a linear weight is 2-D (out, in), got shape {tuple(self.weight.shape)}")
        if self.weight.dtype not in _DENSE_DTYPES:
            raise TypeError(
                f"dense weight must be fp32/bf16/fp16, got {self.weight.dtype}; a packed weight needs its own "
                "weight format (see fms_acceleration_accelerate_kernels.dequant)"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.weight.shape[0]), int(self.weight.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight.detach()
        if dtype is not None and dtype != w.dtype:
            w = w.to(dtype)
        if out is not None:
            out.copy_(w)
            return out
        return w

    def dequantize_ref(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dequantize(dtype)


@dataclass(frozen=True)
class Bnb4bitWeight:
    """A bitsandbytes 4-bit (nf4 / fp4) weight: packed bytes + quantisation state.

    Attributes:
        packed: the packed bytes in their storage dtype (e.g. ``Params4bit.data``, (n/4, 1) bf16).
        state: scales, blocksize, table, logical shape and original dtype.
    """

    packed: torch.Tensor
    state: FourBitState

    def __post_init__(self) -> None:
        if len(self.state.shape) != 2:
            raise ValueError(f"a linear weight is 2-D (out, in), got quantised shape {self.state.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.state.shape[0]), int(self.state.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.state.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_4bit(self.packed, self.state, dtype=dtype, out=out)

    def dequantize_ref(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_4bit_ref(self.packed, self.state, dtype=dtype)


def bnb_four_bit_state(quant_state: object) -> FourBitState:
    """Read a bitsandbytes ``QuantState`` (duck-typed: no bitsandbytes import) into a ``FourBitState``.

    Args:
        quant_state: ``bitsandbytes.functional.QuantState`` of a 4-bit weight.

    Returns:
        The equivalent ``FourBitState`` (sharing the tensors).
    """
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this bitsandbytes weight was repacked into bitsandbytes' CPU inference layout (it happens when a "
            "Linear4bit runs in eval mode on CPU without grad); build the layer again, or keep it in train "
            "mode, before using the fused kernels"
        )
    nested = None
    if getattr(quant_state, "nested", False):
        state2 = quant_state.state2
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=quant_state.absmax.device)
        nested = NestedAbsmax(absmax=state2.absmax, code=state2.code, blocksize=int(state2.blocksize), offset=offset)
    return FourBitState(
        absmax=quant_state.absmax,
        shape=tuple(int(s) for s in quant_state.shape),
        blocksize=int(quant_state.blocksize),
        quant_type=str(quant_state.quant_type),
        dtype=quant_state.dtype,
        code=quant_state.code,
        nested=nested,
    )
