"""GPTQ weights that FSDP2 shards and all-gathers as packed integers.

:class:`GPTQPackedWeight` is a tensor subclass whose *logical* value is the dequantized weight
``[out_features N, in_features K]`` in the compute dtype, and whose *storage* is the checkpoint's packed tensors,
stored transposed so that output rows are contiguous:

* ``qweight_t``: int32 ``[N, K / pf]`` (``qweight`` of the checkpoint is ``[K / pf, N]``),
* ``qzeros_t``:  int32 ``[N / pf, G]`` (``qzeros`` is ``[G, N / pf]``),
* ``scales_t``:  ``[N, G]`` in the checkpoint's dtype (``scales`` is ``[G, N]``),
* ``g_idx``:     int32 ``[K]``, the same on every rank (input channels are not split).

FSDP2 shards a parameter by rows of its logical shape (``Shard(0)``). Rows ``[a, b)`` of the logical weight are
rows ``[a, b)`` of ``qweight_t`` and ``scales_t`` and rows ``[a / pf, b / pf)`` of ``qzeros_t``: contiguous slices of
every inner tensor whenever ``a`` and ``b`` are multiples of the pack factor ``pf = 32 // bits`` (zero points of
``pf`` consecutive output channels share one int32 word). :meth:`GPTQPackedWeight.__torch_dispatch__` implements
the few ops FSDP2 applies while sharding (``split``, ``new_zeros``, ``slice``, ``copy_``, ``view``,
``as_strided``, ``detach``...) on the inner tensors. The FSDP2 extension hooks ``fsdp_pre_all_gather`` /
``fsdp_post_all_gather`` all-gather ``qweight_t``, ``qzeros_t`` and ``scales_t`` as they are (int32 and float16
bytes: at 4 bits about 0.26 of a bf16 all-gather with group size 128) and wrap the gathered tensors, without a
copy, as the full weight; ``g_idx`` is not gathered (each shard holds it whole). The mixed-precision
``param_dtype`` is ignored: packed integers and scales are never cast. ``DTensor.full_tensor()`` of a sharded weight
(a full state dict, e.g. Accelerate's ``get_state_dict`` when a trainer saves) gathers the packed tensors the same
way.

The gathered weight is read through :meth:`GPTQPackedWeight.gptq_weight`, a
``fms_acceleration_accelerate_kernels.gptq.GPTQWeight`` over transposed views of the inner tensors (``qweight``
``[K / pf, N]`` with strides ``(1, K / pf)``), which the kernels read in place through their strides (no copy of
the packed codes; the dense weight is never kept).

``sequential_g_idx`` (``g_idx[k] == k // group_size``, no act-order; see :mod:`.layer`) travels as metadata of the
weight (``None`` when not known): the conversion takes it from the ``GPTQLinear``, every shard, all-gathered weight
and copy keeps it, and :class:`PackedGPTQLinear` keeps it as a plain bool (computed at its first forward from the
whole ``g_idx`` every rank holds when the weight came without it).

:class:`PackedGPTQLinear` is the frozen linear layer that computes with it, with the same forward as
:class:`~.layer.GPTQLinear` (``gptq_linear``: dequantise + matmul, backward dequantises again), and the same
``quantized_weight()`` that the plugin's ``gptq`` dequant backend hands to the fused kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..packed_dispatch import SHAPE_HANDLERS
from .layer import GPTQComputeMixin

aten = torch.ops.aten

_INNER = ("qweight_t", "qzeros_t", "scales_t", "g_idx")
_GATHERED = ("qweight_t", "qzeros_t", "scales_t")


class GPTQPackedWeight(torch.Tensor):
    """A GPTQ weight as a tensor subclass FSDP2 can shard by output rows. See the module docstring.

    Args:
        qweight_t: int32 ``[n, K / pf]`` packed codes, one row per output channel.
        qzeros_t: int32 ``[n / pf, G]`` packed stored zero points.
        scales_t: ``[n, G]`` scales (the checkpoint's dtype).
        g_idx: int32 ``[K]`` group of every input channel.
        shape: logical shape (``[n, K]``, or a view of it with the same number of elements).
        dtype: logical (dequantized) dtype.
        bits: 2, 4 or 8.
        group_size: input channels per group, or -1.
        checkpoint_format: ``"gptq"`` (v1 zero points) or ``"gptq_v2"``.
        requires_grad: always False in practice (the weight is frozen).
        sequential_g_idx: whether ``g_idx[k] == k // group_size`` for every k (no act-order); None: not known.
    """

    qweight_t: torch.Tensor
    qzeros_t: torch.Tensor
    scales_t: torch.Tensor
    g_idx: torch.Tensor

    @staticmethod
    def __new__(
        cls,
        qweight_t: torch.Tensor,
        qzeros_t: torch.Tensor,
        scales_t: torch.Tensor,
        g_idx: torch.Tensor,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        bits: int,
        group_size: int,
        checkpoint_format: str,
        requires_grad: bool = False,
        sequential_g_idx: bool | None = None,
    ) -> GPTQPackedWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=qweight_t.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        qweight_t: torch.Tensor,
        qzeros_t: torch.Tensor,
        scales_t: torch.Tensor,
        g_idx: torch.Tensor,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        bits: int,
        group_size: int,
        checkpoint_format: str,
        requires_grad: bool = False,
        sequential_g_idx: bool | None = None,
    ) -> None:
        pf = 32 // bits
        rows, in_features = qweight_t.shape[0], g_idx.shape[0]
        assert qweight_t.dtype == torch.int32 and qzeros_t.dtype == torch.int32, "packed tensors must be int32"
        assert tuple(qweight_t.shape) == (rows, in_features // pf), f"qweight_t {tuple(qweight_t.shape)}"
        assert qzeros_t.shape[0] * pf == rows and scales_t.shape == (rows, qzeros_t.shape[1]), (
            f"qzeros_t {tuple(qzeros_t.shape)} / scales_t {tuple(scales_t.shape)} do not match {rows} rows"
        )
        assert math.prod(shape) == rows * in_features, f"logical shape {tuple(shape)} holds {rows} x {in_features}"
        self.qweight_t = qweight_t
        self.qzeros_t = qzeros_t
        self.scales_t = scales_t
        self.g_idx = g_idx
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        self.sequential_g_idx = sequential_g_idx

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint_layout(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        *,
        dtype: torch.dtype,
        bits: int,
        group_size: int,
        checkpoint_format: str,
        sequential_g_idx: bool | None = None,
    ) -> GPTQPackedWeight:
        """Build from tensors in the checkpoint's layout (``qweight [K / pf, N]`` ...); transposed copies."""
        return cls(
            qweight.t().contiguous(),
            qzeros.t().contiguous(),
            scales.t().contiguous(),
            g_idx.to(torch.int32),
            (scales.shape[1], g_idx.shape[0]),
            dtype,
            bits,
            group_size,
            checkpoint_format,
            sequential_g_idx=sequential_g_idx,
        )

    def checkpoint_layout(self) -> dict[str, torch.Tensor]:
        """``{"qweight", "qzeros", "scales", "g_idx"}`` in the checkpoint's layout (row-major copies)."""
        return {
            "qweight": self.qweight_t.t().contiguous(),
            "qzeros": self.qzeros_t.t().contiguous(),
            "scales": self.scales_t.t().contiguous(),
            "g_idx": self.g_idx,
        }

    def _rewrap(self, inner: Mapping[str, torch.Tensor], shape: Any, dtype: torch.dtype | None = None):
        return GPTQPackedWeight(
            inner["qweight_t"],
            inner["qzeros_t"],
            inner["scales_t"],
            inner["g_idx"],
            shape,
            dtype or self.dtype,
            self.bits,
            self.group_size,
            self.checkpoint_format,
            sequential_g_idx=self.sequential_g_idx,
        )

    def _inner(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _INNER}

    def _reshaped(self, shape: Any) -> GPTQPackedWeight:
        """The same inner tensors (no copy) under the logical ``shape`` (same number of elements)."""
        return self._rewrap(self._inner(), shape)

    @property
    def rows(self) -> int:
        """Output channels held (the local shard's, or all of them once gathered)."""
        return int(self.qweight_t.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.g_idx.shape[0])

    def packed_nbytes(self, *, with_g_idx: bool = True) -> int:
        """Bytes of the inner tensors (those all-gathered, plus ``g_idx`` unless ``with_g_idx`` is False)."""
        names = _INNER if with_g_idx else _GATHERED
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    # ------------------------------------------------------------------------------------- reading
    def gptq_weight(self, dtype: torch.dtype | None = None, sequential_g_idx: bool | None = None) -> Any:
        """The weight as a ``fms_acceleration_accelerate_kernels.gptq.GPTQWeight`` (transposed views, no copy).

        Args:
            dtype: compute dtype of the ``GPTQWeight`` (default: the logical dtype).
            sequential_g_idx: the layout flag to pass (default: this weight's; not known counts as False, which
                reads any ``g_idx`` correctly).
        """
        from fms_acceleration_accelerate_kernels.gptq import GPTQWeight

        return GPTQWeight(
            qweight=self.qweight_t.t(),
            qzeros=self.qzeros_t.t(),
            scales=self.scales_t.t(),
            g_idx=self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            checkpoint_format=self.checkpoint_format,
            out_features=self.rows,
            in_features=self.in_features,
            dtype=dtype or self.dtype,
            sequential_g_idx=bool(self.sequential_g_idx if sequential_g_idx is None else sequential_g_idx),
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[rows, in_features]`` weight in ``dtype`` (default: the logical dtype)."""
        return self.gptq_weight(dtype).dequantize()

    # ------------------------------------------------------------------------------------- subclass protocol
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        meta = (self.shape, self.dtype, self.bits, self.group_size, self.checkpoint_format, self.sequential_g_idx)
        return list(_INNER), meta

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: tuple[Any, ...], outer_size: Any, outer_stride: Any):
        shape, dtype, bits, group_size, checkpoint_format, sequential_g_idx = meta
        return GPTQPackedWeight(
            inner["qweight_t"],
            inner["qzeros_t"],
            inner["scales_t"],
            inner["g_idx"],
            shape,
            dtype,
            bits,
            group_size,
            checkpoint_format,
            sequential_g_idx=sequential_g_idx,
        )

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"GPTQPackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
            f"group_size={self.group_size}, checkpoint_format={self.checkpoint_format}, "
            f"sequential_g_idx={self.sequential_g_idx}, device={self.qweight_t.device})"
        )

    def _row_range(self, dim: int, start: int, end: int) -> tuple[int, int]:
        """Output rows ``[first, last)`` of logical indices ``[start, end)`` along dim 0 (FSDP shards dim 0)."""
        if dim != 0:
            raise NotImplementedError(f"GPTQPackedWeight can only be sliced along dim 0, got dim {dim}")
        per_index = math.prod(self.shape[1:]) if self.dim() > 1 else 1
        pf = 32 // self.bits
        bounds = []
        for index in (start, end):
            element = index * per_index
            if element % self.in_features or (element // self.in_features) % pf:
                raise ValueError(
                    f"cannot cut a GPTQ weight of shape {tuple(self.shape)} at index {index}: shards must hold whole "
                    f"groups of {pf} output channels (the zero points of {pf} channels share one int32 word)"
                )
            bounds.append(element // self.in_features)
        return bounds[0], bounds[1]

    def _slice(self, dim: int, start: int, end: int) -> GPTQPackedWeight:
        first, last = self._row_range(dim, start, end)
        pf = 32 // self.bits
        inner = {
            "qweight_t": self.qweight_t[first:last],
            "qzeros_t": self.qzeros_t[first // pf : last // pf],
            "scales_t": self.scales_t[first:last],
            "g_idx": self.g_idx,
        }
        return self._rewrap(inner, (end - start, *self.shape[1:]))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func) or _BY_SCHEMA.get(func._schema.name)
        if handler is not None:
            return handler(func, *args, **kwargs)
        raise NotImplementedError(
            f"GPTQPackedWeight does not support {func}; read it through gptq_weight() / dequantize() (packed GPTQ "
            "weights are frozen and only used through PackedGPTQLinear)"
        )

    __torch_function__ = torch._C._disabled_torch_function_impl

    # ------------------------------------------------------------------------------------- FSDP2 extension
    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: nn.Module, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """All-gather the packed codes, zero points and scales as stored, never a cast (``mp_policy.param_dtype``
        is ignored); ``g_idx`` stays local (every shard has all of it)."""
        return (self.qweight_t, self.qzeros_t, self.scales_t), (tuple(outer_size), self.dtype)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[GPTQPackedWeight, tuple[torch.Tensor, ...]] | None:
        """Wrap the gathered (rank-ordered, hence row-ordered) inner tensors as the full weight, no copy."""
        qweight_t, qzeros_t, scales_t = all_gather_outputs
        shape, dtype = metadata
        if out is not None:
            # FSDP re-allocated the storage of the tensors returned the first time and gathered into it
            assert isinstance(out, GPTQPackedWeight), "unsharded parameter is not a GPTQPackedWeight"
            assert out.qweight_t.untyped_storage().data_ptr() == qweight_t.untyped_storage().data_ptr(), (
                "FSDP all-gather output moved"
            )
            return None
        inner = {"qweight_t": qweight_t, "qzeros_t": qzeros_t, "scales_t": scales_t, "g_idx": self.g_idx}
        return self._rewrap(inner, shape, dtype), (qweight_t, qzeros_t, scales_t)


# ----------------------------------------------------------------------------------------- dispatch table
def _map_inner(t: GPTQPackedWeight, fn: Any) -> dict[str, torch.Tensor]:
    return {name: fn(getattr(t, name)) for name in _INNER}


# detach / alias, split, slice, view and as_strided: the shared shape-only handlers (SHAPE_HANDLERS)
def _new_zeros(func: Any, t: GPTQPackedWeight, size: Any, **kwargs: Any) -> GPTQPackedWeight:
    numel = math.prod(size)
    pf = 32 // t.bits
    if numel % t.in_features or (numel // t.in_features) % pf:
        raise ValueError(f"new_zeros({tuple(size)}) does not hold whole groups of {pf} GPTQ output channels")
    rows = numel // t.in_features
    device = kwargs.get("device") or t.qweight_t.device
    inner = {
        "qweight_t": torch.zeros(rows, t.qweight_t.shape[1], dtype=torch.int32, device=device),
        "qzeros_t": torch.zeros(rows // pf, t.qzeros_t.shape[1], dtype=torch.int32, device=device),
        "scales_t": torch.zeros(rows, t.scales_t.shape[1], dtype=t.scales_t.dtype, device=device),
        "g_idx": torch.zeros_like(t.g_idx, device=device),
    }
    return t._rewrap(inner, tuple(size))


def _copy_(func: Any, dst: GPTQPackedWeight, src: Any, non_blocking: bool = False) -> GPTQPackedWeight:
    if not isinstance(src, GPTQPackedWeight):
        raise TypeError("only a GPTQPackedWeight can be copied into a GPTQPackedWeight (no quantization here)")
    if (src.numel(), src.bits, src.group_size, src.checkpoint_format) != (
        dst.numel(),
        dst.bits,
        dst.group_size,
        dst.checkpoint_format,
    ):
        raise ValueError("copy_ between incompatible GPTQPackedWeight tensors")
    for name in _INNER:
        getattr(dst, name).copy_(getattr(src, name), non_blocking)
    dst.sequential_g_idx = src.sequential_g_idx  # it describes the g_idx just copied
    return dst


def _to_copy(func: Any, t: GPTQPackedWeight, **kwargs: Any) -> GPTQPackedWeight:
    device = kwargs.get("device")
    non_blocking = kwargs.get("non_blocking", False)
    # a dtype request changes only the dequantized (logical) dtype: packed integers and scales are never cast
    if device is not None and torch.device(device) != t.qweight_t.device:
        inner = _map_inner(t, lambda x: x.to(device, non_blocking=non_blocking))
    else:
        inner = _map_inner(t, torch.clone)
    return t._rewrap(inner, t.shape, kwargs.get("dtype") or t.dtype)


def _clone(func: Any, t: GPTQPackedWeight, **kwargs: Any) -> GPTQPackedWeight:
    return t._rewrap(_map_inner(t, torch.clone), t.shape)


def _is_pinned(func: Any, t: GPTQPackedWeight, *args: Any) -> bool:
    return t.qweight_t.is_pinned()


def _pin(func: Any, t: GPTQPackedWeight, *args: Any) -> GPTQPackedWeight:
    return t._rewrap(_map_inner(t, lambda x: x.pin_memory()), t.shape)


def _record_stream(func: Any, t: GPTQPackedWeight, stream: Any) -> None:
    for name in _INNER:
        getattr(t, name).record_stream(stream)


def _empty_like(func: Any, t: GPTQPackedWeight, **kwargs: Any) -> GPTQPackedWeight:
    return t._rewrap(_map_inner(t, torch.empty_like), t.shape)


def _equal(func: Any, a: Any, b: Any) -> bool:
    if isinstance(a, GPTQPackedWeight) and isinstance(b, GPTQPackedWeight):
        return all(torch.equal(getattr(a, n), getattr(b, n)) for n in _INNER)
    return False


def _all_gather(func: Any, t: GPTQPackedWeight, group_size: int, group_name: str) -> GPTQPackedWeight:
    """The functional all-gather (``DTensor.full_tensor()`` of a row-sharded weight, e.g. for a full state dict):
    each gathered inner tensor separately, ``g_idx`` kept (every shard has all of it); collective."""
    inner = {name: func(getattr(t, name).contiguous(), group_size, group_name) for name in _GATHERED}
    inner["g_idx"] = t.g_idx
    return t._rewrap(inner, (t.shape[0] * group_size, *t.shape[1:]))


def _wait(func: Any, t: GPTQPackedWeight) -> GPTQPackedWeight:
    wait = torch.ops._c10d_functional.wait_tensor.default
    return t._rewrap({name: wait(getattr(t, name)) if name in _GATHERED else t.g_idx for name in _INNER}, t.shape)


_BY_SCHEMA: Mapping[str, Any] = MappingProxyType(
    {
        "_c10d_functional::all_gather_into_tensor": _all_gather,
        "_c10d_functional::wait_tensor": _wait,
        # an asynchronous wrapper (registered when torch.distributed._functional_collectives is imported): wait now
        "_c10d_functional::_wrap_tensor_autograd": _wait,
    }
)
"""The functional collectives behind ``DTensor.full_tensor()``, by schema name (some exist only once their
module is imported)."""


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
class PackedGPTQLinear(GPTQComputeMixin, nn.Module):
    """A frozen GPTQ linear layer whose packed tensors are one :class:`GPTQPackedWeight` parameter (FSDP2 shards
    it by output rows and all-gathers it as packed bytes).

    Args:
        weight: the packed weight, logical shape ``[out_features, in_features]``.
        bias: optional bias ``[out_features]`` (the parameter itself is kept, so a trainable bias stays trainable).
        compute_dtype: dtype of the matmul (the training dtype).
    """

    def __init__(self, weight: GPTQPackedWeight, bias: nn.Parameter | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.checkpoint_format = weight.checkpoint_format
        self.compute_dtype = compute_dtype
        # a plain bool once known (the weight's, or computed at the first forward): see quantized_weight
        self.sequential_g_idx: bool | None = weight.sequential_g_idx
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_gptq_linear(cls, layer: nn.Module) -> PackedGPTQLinear:
        """Convert a :class:`~.layer.GPTQLinear` (its packed tensors are copied transposed; its bias is shared;
        its ``sequential_g_idx`` is taken along, computed first when not known)."""
        tensors = layer.packed_tensors()
        weight = GPTQPackedWeight.from_checkpoint_layout(
            tensors["qweight"],
            tensors["qzeros"],
            tensors["scales"],
            tensors["g_idx"],
            dtype=layer.compute_dtype,
            bits=layer.bits,
            group_size=layer.group_size,
            checkpoint_format=layer.checkpoint_format,
            sequential_g_idx=layer.resolve_sequential_g_idx(),
        )
        return cls(weight, layer.bias, layer.compute_dtype)

    def quantized_weight(self) -> Any:
        """The gathered weight as a ``GPTQWeight`` in ``compute_dtype`` (no copies), flagged ``sequential_g_idx``.
        Call it inside a forward of a module containing the layer under FSDP2 (where the shards are all-gathered).
        A flag not known yet is computed here once from ``g_idx`` (whole on every rank) and kept on the layer (not
        while ``torch.compile`` traces: it then counts as False).

        Raises:
            ValueError: the weight is still a shard (read outside the forward of its FSDP unit).
        """
        weight = self.weight
        if not isinstance(weight, GPTQPackedWeight):
            raise ValueError(
                f"the weight of this PackedGPTQLinear is a {type(weight).__name__}, not a gathered GPTQPackedWeight: "
                "it was read outside the forward of its FSDP unit; read it inside the forward of a module that "
                "contains the layer (the fused kernels do), where FSDP2 has all-gathered it"
            )
        flag = self.sequential_g_idx
        if flag is None and not torch.compiler.is_compiling():
            from fms_acceleration_accelerate_kernels.gptq import gptq_sequential_g_idx

            flag = self.sequential_g_idx = gptq_sequential_g_idx(weight.g_idx, self.group_size)
        return weight.gptq_weight(self.compute_dtype, sequential_g_idx=bool(flag))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """A loaded weight brings its own ``sequential_g_idx`` (not known: computed at the next forward)."""
        if prefix + "weight" in state_dict:
            value = state_dict[prefix + "weight"]
            local = getattr(value, "_local_tensor", value)
            self.sequential_g_idx = local.sequential_g_idx if isinstance(local, GPTQPackedWeight) else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def shardable_rows(out_features: int, bits: int, world_size: int) -> bool:
    """True when FSDP2 can cut ``out_features`` GPTQ output channels into ``world_size`` equal shards of whole
    zero-point words (``out_features / world_size`` a multiple of ``32 // bits``)."""
    return out_features % world_size == 0 and (out_features // world_size) % (32 // bits) == 0
