"""``move_unit_states``: a unit staged in host memory goes to the sharding device with new parameter objects,
which works where ``fully_shard``'s in-place swap of tensor-subclass parameters refuses weakly referenced ones."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fms_acceleration_accelerate.distributed import move_unit_states


class _Subclass(torch.Tensor):
    """A minimal traceable wrapper subclass (like the 4-bit plugin's packed weight)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return _Subclass(inner["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unwrapped = [a.inner if isinstance(a, _Subclass) else a for a in args]
        out = func(*unwrapped, **kwargs)
        wrap = func in (torch.ops.aten._to_copy.default, torch.ops.aten.detach.default)
        return _Subclass(out) if wrap else out


def _unit() -> nn.Module:
    unit = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    unit[1].weight = unit[0].weight  # shared
    unit[0].bias.requires_grad_(False)
    unit.register_buffer("scale", torch.ones(3))
    unit.add_module("packed", nn.Module())
    unit.packed.weight = nn.Parameter(_Subclass(torch.arange(6.0)), requires_grad=False)
    return unit


def test_host_staged_unit_moves_with_new_parameter_objects_despite_weak_references():
    unit = _unit()
    refs = {name: weakref.ref(p) for name, p in unit.named_parameters()}  # as apply_fsdp2_plan keeps them
    packed = unit.packed.weight
    try:  # what fully_shard's own move does with such a parameter
        torch.utils.swap_tensors(packed, nn.Parameter(packed.to("meta"), requires_grad=False))
        raised = False
    except RuntimeError as exc:
        raised = "weakref" in str(exc)
    assert raised
    meta = torch.device("meta")
    assert move_unit_states(unit, meta) == 4  # the shared weight counts once
    assert all(p.device == meta for p in unit.parameters()) and unit.scale.device == meta
    assert unit[1].weight is unit[0].weight
    assert not unit[0].bias.requires_grad and unit[0].weight.requires_grad
    assert isinstance(unit.packed.weight, nn.Parameter) and isinstance(unit.packed.weight.data, _Subclass)
    assert all(refs[name]() is not p for name, p in unit.named_parameters())  # new objects; old ones untouched
    assert refs["packed.weight"]().device == torch.device("cpu")
    assert move_unit_states(unit, meta) == 0  # nothing left to move
