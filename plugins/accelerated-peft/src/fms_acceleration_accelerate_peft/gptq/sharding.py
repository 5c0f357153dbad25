"""What the GPTQ plugin asks of FSDP (through ``fms_acceleration_accelerate.distributed``).

FSDP1 (flat parameters, one dtype per unit; buffers replicated and, under mixed precision, cast):
    each :class:`~.layer.GPTQLinear` is replaced by the same layer in *parameter storage*
    (:meth:`~.layer.GPTQLinear.with_parameter_storage`): ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` become
    frozen parameters viewed as the training dtype (no copy; int32 words and float16 scales reinterpreted bit for
    bit), declared *keep-dtype*, so FSDP1 flattens them with the unit's other frozen weights, shards the flat
    parameter and all-gathers its bytes; the framework checks that the mixed-precision ``param_dtype`` equals
    the storage dtype (any cast would corrupt the words) and splits trainable LoRA weights into units of their
    own. As buffers they would be replicated on every rank, and FSDP1's ``buffer_dtype`` cast would round float16
    scales to bfloat16.

FSDP2 (per-parameter sharding along dim 0; buffers are left alone):
    each ``GPTQLinear`` whose output channels split over the world size into whole zero-point words
    (``out_features / world`` a multiple of ``32 // bits``) is replaced by :class:`~.packed.PackedGPTQLinear`,
    whose packed tensors are one :class:`~.packed.GPTQPackedWeight` parameter: each rank keeps its output
    channels in packed form and the all-gather moves packed bytes. Other layers keep their buffers (replicated,
    correct, not sharded) and are named in the notes. The conversion copies the packed tensors transposed, one
    layer at a time, and empties the original layer's buffers at once, so preparing never holds the model's
    packed weights twice; on revert the original layer is refilled from its replacement (an all-gather of the
    shards once sharded: collective, every rank must revert).

Both replacements carry each layer's ``sequential_g_idx`` (no act-order: the kernels compute groups from ``k``),
computed first where the loader did not set it, and go through the patch recorder (summary table, revert) as
:class:`GPTQSwap` records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .layer import PACKED_NAMES, GPTQLinear
from .packed import GPTQPackedWeight, PackedGPTQLinear, shardable_rows

Replace = Callable[[nn.Module, str, nn.Module, "GPTQSwap"], None]
"""``(parent, child_name, new_child, swap)``: installs ``new_child`` (through the patch recorder, with
``swap.restore`` as its undo)."""

STORAGE_MARK = "_gptq_packed_storage"
"""Attribute set on the parameters of a ``GPTQLinear`` in parameter storage (selects them as keep-dtype)."""


def is_gptq_storage(name: str, param: nn.Parameter) -> bool:
    """Selector for the packed tensors of a ``GPTQLinear`` in parameter storage (FSDP1 keep-dtype)."""
    return bool(getattr(param, STORAGE_MARK, False))


def is_gptq_packed_weight(name: str, param: nn.Parameter) -> bool:
    """Selector for :class:`~.packed.GPTQPackedWeight` parameters (sharded or not)."""
    return isinstance(getattr(param, "_local_tensor", param), GPTQPackedWeight)


@dataclass(frozen=True)
class ConversionReport:
    """Result of a conversion.

    Attributes:
        converted: names of the replaced layers.
        kept: names of ``GPTQLinear`` layers left as they were (FSDP2: output channels do not split evenly).
    """

    converted: tuple[str, ...]
    kept: tuple[str, ...]


class GPTQSwap:
    """One replacement of a ``GPTQLinear``: undo information that pins no memory.

    Holds the original layer object, whose buffers are emptied as soon as the replacement holds the packed tensors
    (FSDP2: a transposed copy; FSDP1: views of the same memory). :meth:`restore` refills them from the replacement
    and returns the original.

    Args:
        parent: module holding the layer.
        child: attribute name of the layer on ``parent``.
        original: the ``GPTQLinear`` being replaced.
    """

    def __init__(self, parent: nn.Module, child: str, original: GPTQLinear) -> None:
        self.parent = parent
        self.child = child
        self.original = original
        self.released = False

    def release(self) -> None:
        """Empty the original's packed buffers (the replacement holds the tensors now)."""
        for name in PACKED_NAMES:
            buf = self.original._buffers[name]
            self.original._buffers[name] = torch.empty(0, dtype=buf.dtype, device=buf.device)
        self.released = True

    def restore(self) -> nn.Module:
        """The original layer with its packed tensors taken back from the replacement.

        FSDP2: a sharded replacement's tensors are all-gathered (collective). FSDP1: a replacement whose tensors
        FSDP1 holds in a sharded flat parameter (outside ``summon_full_params``) cannot give them back; it stays
        in place (it is a ``GPTQLinear`` too, in parameter storage) and is returned instead.
        """
        current = getattr(self.parent, self.child)
        if isinstance(current, PackedGPTQLinear):
            tensors = _full_packed(current.weight).checkpoint_layout()
            bias = current.bias
        else:
            if not _whole(current):
                return current
            tensors = {k: v.clone() for k, v in current.packed_tensors().items()}
            bias = current.bias
        for name, tensor in tensors.items():
            self.original._buffers[name] = tensor
        if bias is not None:
            from torch.distributed.tensor import DTensor

            if isinstance(bias, DTensor):
                bias = nn.Parameter(bias.full_tensor(), requires_grad=bias.requires_grad)
            self.original.bias = bias
        self.released = False
        return self.original


def _whole(layer: GPTQLinear) -> bool:
    """True when a parameter-storage layer's tensors are readable (not freed views of an FSDP1 flat parameter)."""
    for name in PACKED_NAMES:
        tensor = getattr(layer, name, None)
        if tensor is None or tensor.untyped_storage().nbytes() == 0:
            return False
    return True


def _full_packed(weight: torch.Tensor) -> GPTQPackedWeight:
    """The whole :class:`GPTQPackedWeight` of a (possibly row-sharded DTensor) parameter; collective if sharded."""
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        assert isinstance(weight, GPTQPackedWeight)
        return weight
    return gather_gptq_packed(weight)


def gather_gptq_packed(dtensor: torch.Tensor) -> GPTQPackedWeight:
    """All-gather a row-sharded :class:`GPTQPackedWeight` DTensor into the full packed weight (every rank)."""
    import torch.distributed as dist

    local: GPTQPackedWeight = dtensor._local_tensor  # type: ignore[attr-defined]
    group = dtensor.device_mesh.get_group()  # type: ignore[attr-defined]
    world = dist.get_world_size(group)
    parts = []
    for inner in (local.qweight_t, local.qzeros_t, local.scales_t):
        out = torch.empty((inner.shape[0] * world, *inner.shape[1:]), dtype=inner.dtype, device=inner.device)
        dist.all_gather_into_tensor(out, inner.contiguous(), group=group)
        parts.append(out)
    return GPTQPackedWeight(
        parts[0],
        parts[1],
        parts[2],
        local.g_idx,
        tuple(dtensor.shape),
        local.dtype,
        local.bits,
        local.group_size,
        local.checkpoint_format,
        sequential_g_idx=local.sequential_g_idx,
    )


def _targets(model: nn.Module) -> list[tuple[str, nn.Module, str, GPTQLinear]]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, GPTQLinear):
            parent_name, _, child = name.rpartition(".")
            out.append((name, model.get_submodule(parent_name) if parent_name else model, child, module))
    return out


def _default_replace(parent: nn.Module, child: str, new: nn.Module, swap: GPTQSwap) -> None:
    setattr(parent, child, new)


def convert_gptq_for_fsdp2(model: nn.Module, world_size: int, replace: Replace | None = None) -> ConversionReport:
    """Replace shardable :class:`GPTQLinear` layers of ``model`` by :class:`PackedGPTQLinear` (one at a time:
    transposed copy, then the original's buffers are emptied).

    Args:
        model: the (LoRA-augmented) model, before any ``fully_shard``.
        world_size: the FSDP shard group size.
        replace: installs a replacement (default ``setattr``); see :data:`Replace`.
    """
    setter = replace or _default_replace
    converted, kept = [], []
    for name, parent, child, module in _targets(model):
        if module.storage_dtype is not None or not shardable_rows(module.out_features, module.bits, world_size):
            kept.append(name)
            continue
        swap = GPTQSwap(parent, child, module)
        new = PackedGPTQLinear.from_gptq_linear(module)
        setter(parent, child, new, swap)
        swap.release()
        converted.append(name)
    return ConversionReport(tuple(converted), tuple(kept))


def convert_gptq_for_fsdp1(
    model: nn.Module, storage_dtype: torch.dtype, replace: Replace | None = None
) -> ConversionReport:
    """Replace every :class:`GPTQLinear` (buffer storage) of ``model`` by the same layer in parameter storage
    viewed as ``storage_dtype`` (no copy); its packed parameters are marked for :func:`is_gptq_storage`.

    Args:
        model: the (LoRA-augmented) model, before FSDP1 wraps it.
        storage_dtype: the dtype of the unit's other frozen weights (the training dtype).
        replace: installs a replacement (default ``setattr``); see :data:`Replace`.
    """
    setter = replace or _default_replace
    converted = []
    for name, parent, child, module in _targets(model):
        if module.storage_dtype is not None:
            continue
        swap = GPTQSwap(parent, child, module)
        module.resolve_sequential_g_idx()  # known before FSDP1 turns g_idx into a view of a sharded flat parameter
        new = GPTQLinear.with_parameter_storage(module, storage_dtype)
        for pname in PACKED_NAMES:
            setattr(new._parameters[pname], STORAGE_MARK, True)
        setter(parent, child, new, swap)
        swap.release()
        converted.append(name)
    return ConversionReport(tuple(converted), ())


def packed_bytes_per_rank(model: nn.Module) -> int:
    """Bytes of GPTQ packed tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) this rank holds in
    :class:`GPTQPackedWeight` parameters (their local shards) and in ``GPTQLinear`` buffers, for logs and tests."""
    total = 0
    for _, param in model.named_parameters():
        local = getattr(param, "_local_tensor", param)
        if isinstance(local, GPTQPackedWeight):
            total += local.packed_nbytes()
    for module in model.modules():
        if isinstance(module, GPTQLinear) and module.storage_dtype is None:
            total += sum(t.numel() * t.element_size() for t in module.packed_tensors().values())
    return total
