"""What the 4-bit plugin asks of FSDP (through ``fms_acceleration_accelerate.distributed``).

FSDP1 (flat parameters, one dtype per unit):
    the packed ``Params4bit`` storage is declared *keep-dtype* (the framework checks it equals the
    mixed-precision ``param_dtype``; any cast would scramble the packed codes). The framework's FSDP1 plan
    already makes decoder layers units and splits trainable LoRA linears into units of their own, so frozen
    4-bit storage and (possibly float32) LoRA weights never share a flat parameter. ``Linear4bit`` restores
    its ``quant_state`` from the module after FSDP flattens/unshards the weight.

FSDP2 (per-parameter sharding):
    before ``fully_shard``, every ``bitsandbytes.nn.Linear4bit`` whose rows split into whole 64-element
    blocks over the world size is converted to :class:`~.packed4bit.Packed4bitLinear`, whose weight is a
    :class:`~.packed4bit.Packed4bitWeight`: each rank then keeps only its rows in 4-bit form (codes and
    scales), and the all-gather moves packed bytes. Layers that do not split evenly keep bitsandbytes'
    layer and are sharded by FSDP2 as plain storage (still 4-bit bytes, scales replicated). Each swap goes
    through the patch recorder (summary table, revert) with a :class:`PackedSwap` that rebuilds the original
    layer on revert instead of the record holding it: once FSDP2 has sharded the replacement, the original's
    full packed bytes are released (:meth:`PackedSwap.release`), so a rank keeps only its shard of every
    layer (holding them cost a whole unsharded 4-bit layer per decoder layer on every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .packed4bit import Packed4bitLinear, Packed4bitWeight, shardable_rows


def is_params4bit(name: str, param: nn.Parameter) -> bool:
    """Selector for packed bitsandbytes storage (``Params4bit``), by type name (no bnb import needed)."""
    return type(param).__name__ == "Params4bit"


def is_packed_weight(name: str, param: nn.Parameter) -> bool:
    """Selector for :class:`Packed4bitWeight` parameters (sharded or not)."""
    local = getattr(param, "_local_tensor", param)
    return isinstance(local, Packed4bitWeight)


@dataclass(frozen=True)
class ConversionReport:
    """Result of :func:`convert_linear4bit_for_fsdp2`.

    Attributes:
        converted: names of the layers now ``Packed4bitLinear``.
        kept: names of ``Linear4bit`` layers left as they were (rows do not split into whole blocks).
    """

    converted: tuple[str, ...]
    kept: tuple[str, ...]


def convert_linear4bit_for_fsdp2(
    model: nn.Module,
    training_dtype: torch.dtype,
    world_size: int,
    replace: Callable[[nn.Module, str, nn.Module], None] | None = None,
) -> ConversionReport:
    """Replace shardable ``bitsandbytes.nn.Linear4bit`` layers of ``model`` by :class:`Packed4bitLinear`.

    Args:
        model: the (LoRA-augmented) model, before any ``fully_shard``.
        training_dtype: logical dtype of the packed weights (the dequantized dtype).
        world_size: the FSDP shard group size (rows must split into whole blocks per rank).
        replace: ``(parent, child_name, new_child)`` setter; default ``setattr``.

    Returns:
        Which layers were converted and which were kept.
    """
    import bitsandbytes as bnb

    setter = replace or (lambda parent, child, new: setattr(parent, child, new))
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    converted, kept = [], []
    for name, module in targets:
        new = Packed4bitLinear.from_bnb(module, training_dtype)
        if not shardable_rows(new.weight, world_size):
            kept.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setter(parent, child, new)
        converted.append(name)
    return ConversionReport(tuple(converted), tuple(kept))


class PackedSwap:
    """One ``Linear4bit`` -> :class:`Packed4bitLinear` swap: undo information that does not pin memory.

    Holds the original layer object, whose packed bytes :meth:`release` drops once the replacement is sharded
    (the replacement's shard is then the only copy on this rank); :meth:`restore` refills them from the
    replacement (an all-gather when it is sharded: collective, every rank must revert) and returns the original.

    Args:
        parent: module holding the layer.
        child: attribute name of the layer on ``parent``.
        original: the ``bitsandbytes.nn.Linear4bit`` being replaced.
    """

    def __init__(self, parent: nn.Module, child: str, original: nn.Module) -> None:
        self.parent = parent
        self.child = child
        self.original = original
        data = original.weight.data
        self.data_shape, self.data_dtype, self.device = data.shape, data.dtype, data.device
        self.released = False

    def release(self) -> bool:
        """Drop the original's packed bytes if the replacement's weight is now a shard (DTensor); True if so."""
        from torch.distributed.tensor import DTensor

        current = getattr(self.parent, self.child)
        if self.released or not isinstance(current.weight, DTensor):
            return False
        self.original.weight.data = torch.empty(0, dtype=self.data_dtype, device=self.device)
        self.released = True
        return True

    def restore(self) -> nn.Module:
        """The original layer with its packed bytes (gathered from the replacement's shards if released)."""
        if self.released:
            from torch.distributed.tensor import DTensor

            from .save import gather_packed

            weight = getattr(self.parent, self.child).weight
            full = gather_packed(weight._local_tensor, weight) if isinstance(weight, DTensor) else weight
            data = torch.zeros(self.data_shape, dtype=self.data_dtype, device=self.device)
            codes = full.packed.reshape(-1)
            data.view(-1).view(torch.uint8)[: codes.numel()].copy_(codes)  # storage may round up to its dtype
            self.original.weight.data = data
            self.released = False
        return self.original


def packed_bytes_per_rank(model: nn.Module) -> int:
    """Bytes of 4-bit codes + scales this rank holds (sharded or not), for logs and tests."""
    total = 0
    for _, param in model.named_parameters():
        local = getattr(param, "_local_tensor", param)
        if isinstance(local, Packed4bitWeight):
            total += local.packed.numel() + local.absmax.numel() * 4
    return total
