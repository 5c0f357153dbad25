"""Shape-only ``__torch_dispatch__`` handlers shared by the packed weights FSDP2 shards.

:class:`~.packed4bit.Packed4bitWeight` (bitsandbytes 4-bit) and :class:`~.gptq.packed.GPTQPackedWeight` (GPTQ)
keep different inner tensors, but FSDP2's ``detach`` / ``alias``, ``split``, ``slice``, ``view`` and
``as_strided`` treat both the same way: either the same inner tensors under a new logical shape, or a range of
rows along dim 0. The handlers here need only two methods of the weight (see :class:`PackedWeight`); each format
keeps its own handlers for what touches the inner tensors' contents or layout (``new_zeros``, ``copy_``,
``_to_copy``, ``clone``...) and its own FSDP2 all-gather hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

import torch

aten = torch.ops.aten


class PackedWeight(Protocol):
    """What the shared handlers use of a packed weight (a ``torch.Tensor`` subclass)."""

    shape: torch.Size

    def numel(self) -> int: ...

    def _reshaped(self, shape: Any) -> Any:
        """The same inner tensors (no copy) under the logical ``shape`` (same number of elements)."""

    def _slice(self, dim: int, start: int, end: int) -> Any:
        """Logical rows ``[start, end)`` along ``dim``: contiguous ranges of the inner tensors (no copy).
        Raises when ``dim`` is not 0 or a bound does not fall on a packing boundary of the format."""


def _name(t: Any) -> str:
    return type(t).__name__


def _detach(func: Any, t: PackedWeight, *args: Any, **kwargs: Any) -> Any:
    return t._reshaped(t.shape)


def _split(func: Any, t: PackedWeight, split_size: int, dim: int = 0) -> list[Any]:
    rows = t.shape[dim]
    return [t._slice(dim, s, min(s + split_size, rows)) for s in range(0, rows, split_size)]


def _slice(func: Any, t: PackedWeight, dim: int = 0, start: int | None = 0, end: int | None = None, step: int = 1):
    if step != 1:
        raise NotImplementedError(f"{_name(t)} slicing needs step 1, got step {step}")
    rows = t.shape[dim]
    # Python's slice bounds: negative counts from the end, out-of-range clamps, an empty range stays empty
    start, end, _ = slice(start, end).indices(rows)
    return t._slice(dim, start, max(start, end))


def _view(func: Any, t: PackedWeight, size: Any) -> Any:
    size = list(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = t.numel() // known
    if math.prod(size) != t.numel():
        raise ValueError(f"cannot view a {_name(t)} of shape {tuple(t.shape)} as {tuple(size)}")
    return t._reshaped(tuple(size))


def _as_strided(func: Any, t: PackedWeight, size: Any, stride: Any, storage_offset: int | None = 0) -> Any:
    if math.prod(size) != t.numel() or (storage_offset or 0) != 0:
        raise NotImplementedError(
            f"{_name(t)}.as_strided only re-views the whole tensor: got size {tuple(size)} and storage offset "
            f"{storage_offset or 0} for a tensor of shape {tuple(t.shape)}"
        )
    return t._reshaped(tuple(size))


SHAPE_HANDLERS: Mapping[Any, Any] = MappingProxyType(
    {
        aten.detach.default: _detach,
        aten.alias.default: _detach,
        aten.split.Tensor: _split,
        aten.slice.Tensor: _slice,
        aten.view.default: _view,
        aten._unsafe_view.default: _view,
        aten.as_strided.default: _as_strided,
    }
)
"""The shape-only ops, by aten overload, for a format's dispatch table (``{**SHAPE_HANDLERS, ...}``)."""
