"""4-bit weights that FSDP2 shards and all-gathers in packed form.

:class:`Packed4bitWeight` is a tensor subclass whose *logical* value is the dequantized weight
``[out_features, in_features]`` in the training dtype, and whose *storage* is

* ``packed``: ``uint8 [out_features * in_features / 2]``, two 4-bit codes per byte, row-major (bitsandbytes
  layout), and
* ``absmax``: ``float32 [out_features * in_features / blocksize]``, one scale per block of ``blocksize``
  consecutive elements (double-quantized scales are expanded to float32 once, at conversion; bitsandbytes
  computes exactly these values at every forward).

Element ``e`` of the flattened weight lives in byte ``e // 2`` and block ``e // blocksize``, so a range of
rows is a contiguous range of both inner tensors whenever the row boundary falls on a block boundary. That
is what makes FSDP2's row sharding (``Shard(0)``) exact: :meth:`Packed4bitWeight.__torch_dispatch__`
implements the handful of ops FSDP2 applies while sharding (``split``, ``new_zeros``, ``slice``, ``copy_``,
``view``, ``as_strided``, ``detach``...) on the inner tensors, and the FSDP2 extension hooks
``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` all-gather ``packed`` and ``absmax`` (≈0.56 byte per
element, 0.28x of bf16) and rebuild a full :class:`Packed4bitWeight` that *aliases* the all-gather output
(no copy, and FSDP frees/re-fills that storage between forward and backward as for any parameter).
The mixed-precision ``param_dtype`` is deliberately ignored: packed storage is never cast.

:class:`Packed4bitLinear` is the frozen linear layer that computes with it: ``y = x W^T + b`` with ``W``
dequantized by this project's own 4-bit kernels (``fms_acceleration_accelerate_kernels.nf4``, bit-exact with
bitsandbytes; no bitsandbytes C function is called) inside a custom autograd function that saves only the
packed tensors and dequantizes again in backward. The fused-ops plugin reads the same weight through the
``bnb_4bit_packed`` dequant backend (:mod:`.dequant_backend`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .packed_dispatch import SHAPE_HANDLERS

aten = torch.ops.aten


class Packed4bitWeight(torch.Tensor):
    """A 4-bit bitsandbytes weight (nf4/fp4) as a tensor subclass FSDP2 can shard. See the module docstring.

    Args:
        packed: ``uint8 [numel / 2]`` packed codes.
        absmax: ``float32 [numel / blocksize]`` block scales.
        shape: logical shape (``[out_features, in_features]``, or a view of it with the same numel).
        dtype: logical (dequantized) dtype.
        blocksize: elements per scale block.
        quant_type: ``"nf4"`` or ``"fp4"``.
        row_numel: elements per logical row of the *weight* (``in_features``); used to map row slices.
    """

    packed: torch.Tensor
    absmax: torch.Tensor

    @staticmethod
    def __new__(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        blocksize: int,
        quant_type: str,
        row_numel: int,
        requires_grad: bool = False,
    ) -> Packed4bitWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=packed.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        blocksize: int,
        quant_type: str,
        row_numel: int,
        requires_grad: bool = False,
    ) -> None:
        numel = math.prod(shape)
        assert packed.dtype == torch.uint8 and packed.dim() == 1, "packed must be flat uint8"
        assert absmax.dtype == torch.float32 and absmax.dim() == 1, "absmax must be flat float32"
        assert packed.numel() * 2 == numel, f"packed holds {packed.numel() * 2} codes for {numel} elements"
        assert absmax.numel() * blocksize == numel, f"absmax holds {absmax.numel()} blocks for {numel} elements"
        self.packed = packed
        self.absmax = absmax
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.row_numel = row_numel

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def from_params4bit(cls, weight: Any, quant_state: Any, dtype: torch.dtype) -> Packed4bitWeight:
        """Build from a bitsandbytes ``Params4bit`` (any storage dtype) and its ``QuantState``."""
        from bitsandbytes.functional import dequantize_blockwise

        packed = weight.data.reshape(-1).view(torch.uint8)
        if quant_state.nested:
            absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
            absmax = (absmax + quant_state.offset).float()
        else:
            absmax = quant_state.absmax.float()
        out_features, in_features = (int(s) for s in quant_state.shape)
        numel = out_features * in_features
        if numel % 2 or numel % quant_state.blocksize:
            raise ValueError(
                f"cannot repack a [{out_features}, {in_features}] 4-bit weight with blocksize "
                f"{quant_state.blocksize}: its element count is not a multiple of the block size"
            )
        return cls(
            packed[: numel // 2].contiguous(),
            absmax.reshape(-1).contiguous(),
            (out_features, in_features),
            dtype,
            quant_state.blocksize,
            quant_state.quant_type,
            in_features,
        )

    def _rewrap(self, packed: torch.Tensor, absmax: torch.Tensor, shape: Any, dtype: torch.dtype | None = None):
        return Packed4bitWeight(
            packed, absmax, shape, dtype or self.dtype, self.blocksize, self.quant_type, self.row_numel
        )

    def _reshaped(self, shape: Any) -> Packed4bitWeight:
        """The same packed codes and scales (no copy) under the logical ``shape`` (same number of elements)."""
        return self._rewrap(self.packed, self.absmax, shape)

    # ------------------------------------------------------------------------------------- subclass protocol
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        return ["packed", "absmax"], (self.shape, self.dtype, self.blocksize, self.quant_type, self.row_numel)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: tuple[Any, ...], outer_size: Any, outer_stride: Any):
        shape, dtype, blocksize, quant_type, row_numel = meta
        return Packed4bitWeight(inner["packed"], inner["absmax"], shape, dtype, blocksize, quant_type, row_numel)

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"Packed4bitWeight(shape={tuple(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}, device={self.packed.device})"
        )

    def four_bit_state(self, code: torch.Tensor | None = None) -> Any:
        """The ``FourBitState`` of our dequant kernels for this weight (2-D ``[rows, row_numel]`` logical shape).

        Args:
            code: fp32 ``[16]`` lookup table of ``quant_type`` on the packed tensors' device; built when ``None``.

        Returns:
            ``fms_acceleration_accelerate_kernels.nf4.FourBitState`` sharing ``absmax`` (already float32, so no
            double quantisation remains).
        """
        from fms_acceleration_accelerate_kernels.nf4 import FourBitState, four_bit_code

        numel = self.numel()
        rows = numel // self.row_numel if self.dim() != 2 else self.shape[0]
        return FourBitState(
            absmax=self.absmax,
            shape=(rows, numel // rows),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            code=code if code is not None else four_bit_code(self.quant_type, device=self.packed.device),
        )

    def dequantize(self, dtype: torch.dtype | None = None, code: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight, shape ``self.shape``, in ``dtype`` (default: the logical dtype).

        Computed by this project's 4-bit kernels (``fms_acceleration_accelerate_kernels.nf4.dequantize_4bit``:
        Triton on CUDA / in the interpreter, else the torch reference), bit-exact with bitsandbytes.

        Args:
            dtype: output dtype (fp32/bf16/fp16).
            code: optional cached fp32 ``[16]`` code table of ``quant_type`` on the weight's device.
        """
        from fms_acceleration_accelerate_kernels.nf4 import dequantize_4bit

        return dequantize_4bit(self.packed, self.four_bit_state(code), dtype=dtype or self.dtype).reshape(self.shape)

    def _element_range(self, dim: int, start: int, end: int) -> tuple[int, int]:
        """Flat element range of rows ``[start, end)`` along dim 0 (the only dim FSDP shards)."""
        if dim != 0:
            raise NotImplementedError(f"Packed4bitWeight can only be sliced along dim 0, got dim {dim}")
        row = math.prod(self.shape[1:]) if self.dim() > 1 else 1
        first, last = start * row, end * row
        for bound in (first, last):
            if bound % self.blocksize:
                raise ValueError(
                    f"cannot cut a packed 4-bit weight of shape {tuple(self.shape)} at element {bound}: "
                    f"not a multiple of the block size {self.blocksize} (shard rows must hold whole blocks)"
                )
        return first, last

    def _slice(self, dim: int, start: int, end: int) -> Packed4bitWeight:
        first, last = self._element_range(dim, start, end)
        shape = (end - start, *self.shape[1:])
        return self._rewrap(
            self.packed[first // 2 : last // 2],
            self.absmax[first // self.blocksize : last // self.blocksize],
            shape,
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func)
        if handler is not None:
            return handler(func, *args, **kwargs)
        raise NotImplementedError(
            f"Packed4bitWeight does not support {func}; dequantize() it first (packed 4-bit weights are "
            "frozen and only used through Packed4bitLinear)"
        )

    __torch_function__ = torch._C._disabled_torch_function_impl

    # ------------------------------------------------------------------------------------- FSDP2 extension
    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: nn.Module, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """All-gather the packed codes and the scales, never a cast (``mp_policy.param_dtype`` is ignored)."""
        return (self.packed, self.absmax), (tuple(outer_size), self.dtype)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[Packed4bitWeight, tuple[torch.Tensor, ...]] | None:
        """Wrap the gathered (rank-ordered, hence row-ordered) inner tensors as the full weight, no copy."""
        packed, absmax = all_gather_outputs
        shape, dtype = metadata
        if out is not None:
            # FSDP re-allocated the storage of the tensors returned the first time and gathered into it.
            assert isinstance(out, Packed4bitWeight), "unsharded parameter is not a Packed4bitWeight"
            assert out.packed.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr(), (
                "FSDP all-gather output moved"
            )
            return None
        full = self._rewrap(packed.reshape(-1), absmax.reshape(-1), shape, dtype)
        return full, (packed, absmax)


# ----------------------------------------------------------------------------------------- dispatch table
# detach / alias, split, slice, view and as_strided: the shared shape-only handlers (SHAPE_HANDLERS)
def _new_zeros(func: Any, t: Packed4bitWeight, size: Any, **kwargs: Any) -> Packed4bitWeight:
    numel = math.prod(size)
    if numel % t.blocksize:
        raise ValueError(f"new_zeros({tuple(size)}) does not hold whole {t.blocksize}-element blocks")
    device = kwargs.get("device") or t.packed.device
    return t._rewrap(
        torch.zeros(numel // 2, dtype=torch.uint8, device=device),
        torch.zeros(numel // t.blocksize, dtype=torch.float32, device=device),
        tuple(size),
    )


def _copy_(func: Any, dst: Packed4bitWeight, src: Any, non_blocking: bool = False) -> Packed4bitWeight:
    if not isinstance(src, Packed4bitWeight):
        raise TypeError("only a Packed4bitWeight can be copied into a Packed4bitWeight (no quantization here)")
    if src.numel() != dst.numel() or src.blocksize != dst.blocksize or src.quant_type != dst.quant_type:
        raise ValueError("copy_ between incompatible Packed4bitWeight tensors")
    dst.packed.copy_(src.packed, non_blocking)
    dst.absmax.copy_(src.absmax, non_blocking)
    return dst


def _to_copy(func: Any, t: Packed4bitWeight, **kwargs: Any) -> Packed4bitWeight:
    device = kwargs.get("device")
    dtype = kwargs.get("dtype") or t.dtype
    packed, absmax = t.packed, t.absmax
    if device is not None:
        packed = packed.to(device, non_blocking=kwargs.get("non_blocking", False))
        absmax = absmax.to(device, non_blocking=kwargs.get("non_blocking", False))
    # a dtype request changes only the dequantized (logical) dtype: packed codes and scales are never cast
    if packed is t.packed:
        packed, absmax = packed.clone(), absmax.clone()
    return t._rewrap(packed, absmax, t.shape, dtype)


def _clone(func: Any, t: Packed4bitWeight, **kwargs: Any) -> Packed4bitWeight:
    return t._rewrap(t.packed.clone(), t.absmax.clone(), t.shape)


def _is_pinned(func: Any, t: Packed4bitWeight, *args: Any) -> bool:
    return t.packed.is_pinned()


def _pin(func: Any, t: Packed4bitWeight, *args: Any) -> Packed4bitWeight:
    return t._rewrap(t.packed.pin_memory(), t.absmax.pin_memory(), t.shape)


def _record_stream(func: Any, t: Packed4bitWeight, stream: Any) -> None:
    t.packed.record_stream(stream)
    t.absmax.record_stream(stream)


def _empty_like(func: Any, t: Packed4bitWeight, **kwargs: Any) -> Packed4bitWeight:
    return t._rewrap(torch.empty_like(t.packed), torch.empty_like(t.absmax), t.shape)


def _equal(func: Any, a: Any, b: Any) -> bool:
    if isinstance(a, Packed4bitWeight) and isinstance(b, Packed4bitWeight):
        return bool(torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax))
    return False


_DISPATCH: Mapping[Any, Any] = MappingProxyType(
    {
        **SHAPE_HANDLERS,
        aten.new_zeros.default: _new_zeros,
        aten.copy_.default: _copy_,
        aten._to_copy.default: _to_copy,
        aten.clone.default: _clone,
        aten.is_pinned.default: _is_pinned,
        aten._pin_memory.default: _pin,
        aten.record_stream.default: _record_stream,
        aten.empty_like.default: _empty_like,
        aten.equal.default: _equal,
    }
)


# ----------------------------------------------------------------------------------------- the layer
class _Packed4bitMatmul(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized on the fly; saves only the packed weight."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: Packed4bitWeight, bias: torch.Tensor | None, code: torch.Tensor
    ) -> torch.Tensor:
        w = weight.dequantize(x.dtype, code)
        ctx.weight = weight
        ctx.code = code
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        weight: Packed4bitWeight = ctx.weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.dequantize(grad_out.dtype, ctx.code)
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_b, None


class Packed4bitLinear(nn.Module):
    """A frozen 4-bit linear layer whose weight is a :class:`Packed4bitWeight` (FSDP2-shardable).

    Args:
        weight: the packed weight, logical shape ``[out_features, in_features]``.
        bias: optional bias ``[out_features]``.
        compute_dtype: dtype of the matmul (``None``: the input's dtype).
    """

    def __init__(self, weight: Packed4bitWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad) if bias is not None else None
        self.compute_dtype = compute_dtype
        from fms_acceleration_accelerate_kernels.nf4 import four_bit_code

        # the 16-entry code table of quant_type, kept on the layer's device (moves with .to(); not saved) so
        # that no forward builds a host tensor and copies it to the GPU
        self.register_buffer(
            "quant_code", four_bit_code(weight.quant_type, device=weight.packed.device), persistent=False
        )

    @classmethod
    def from_bnb(cls, module: nn.Module, dtype: torch.dtype) -> Packed4bitLinear:
        """Convert a ``bitsandbytes.nn.Linear4bit`` (its packed bytes are shared, not copied)."""
        quant_state = module.weight.quant_state or getattr(module, "quant_state", None)
        if quant_state is None:
            raise ValueError("the Linear4bit layer has no quant_state (not quantized yet?)")
        weight = Packed4bitWeight.from_params4bit(module.weight, quant_state, dtype)
        return cls(weight, module.bias, getattr(module, "compute_dtype", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]`` in ``x``'s dtype."""
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _Packed4bitMatmul.apply(x, self.weight, bias, self.quant_code).to(in_dtype)

    def extra_repr(self) -> str:
        w = self.weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={getattr(w, 'quant_type', '?')}"
        )


def shardable_rows(weight: Packed4bitWeight, world_size: int) -> bool:
    """True when FSDP2 can cut ``weight`` into ``world_size`` equal row shards of whole blocks."""
    rows = weight.shape[0]
    return rows % world_size == 0 and ((rows // world_size) * weight.row_numel) % weight.blocksize == 0
