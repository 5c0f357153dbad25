"""Dequant backends: how fused kernels read the frozen base weight of a linear layer.

Fused kernels (the fused-ops plugin's LoRA and dequant kernels) take a frozen base weight as tensors: a *weight
format* of ``fms_acceleration_accelerate_kernels.dequant`` (``DenseWeight``, ``Bnb4bitWeight``, ...), a frozen
object holding the packed tensors and their metadata whose ``dequantize`` is the dequant op. Which layer
classes hold which format, and how to take the tensors out of such a layer, is plugin knowledge. Each plugin
declares it as :class:`DequantBackend` entries returned by its ``dequant_backends()`` hook
(:meth:`~fms_acceleration_accelerate.plugin.AccelerationPlugin.dequant_backends`); the framework collects them,
in plugin order, into one :class:`DequantBackendRegistry` per framework instance
(``AccelerationFramework.dequant_registry``, also handed to every active plugin as ``plugin.dequant_registry``).
Dispatch is ordered: the first backend that handles a layer wins, as PEFT picks its LoRA layer classes, so a
plugin whose layer class subclasses another's (e.g. of ``torch.nn.Linear``) must come earlier in plugin order.

A format that packs integers, e.g. GPTQ (int32 ``qweight`` / ``qzeros`` / ``g_idx``, fp16 ``scales``), fits the
same shape: a frozen weight format holding those four tensors plus ``bits`` / ``group_size`` and the logical
(out, in) shape, whose ``dequantize`` runs the unpacking kernel, and a backend that reads the layer's buffers. ``read``
runs at every forward, so anything that needs a device read (e.g. whether ``g_idx`` is free of act-order, which
lets the kernels compute groups instead of reading them) is computed once, when the layer is loaded, and kept on
the layer as a plain value::

    DequantBackend(
        name="gptq",
        module_types=("gptqmodel.nn_modules.qlinear:BaseQuantLinear",),
        read=lambda layer: GPTQWeight(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits=layer.bits, ...,
            sequential_g_idx=layer.sequential_g_idx,  # a bool the loader set with gptq_sequential_g_idx
        ),
        weight_format=GPTQWeight,
        base_layer="auto_gptq",
    )

Nothing here is global: backends are frozen values and every registry is an immutable snapshot owned by its
framework, so two frameworks in one process never see each other's backends.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import AccelerationConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from fms_acceleration_accelerate_kernels.dequant import QuantizedWeight

    from .plugin import AccelerationPlugin

__all__ = ["DequantBackend", "DequantBackendRegistry", "base_layer_of"]

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TYPE_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def base_layer_of(module: Any) -> Any:
    """The frozen base layer of ``module``: unwraps PEFT tuner layers (``.base_layer``), else ``module``."""
    from torch import nn

    seen = 0
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
        seen += 1
        assert seen < 16, "base_layer chain does not end"
    return module


def _type_name(entry: type | str) -> str:
    return entry.rpartition(":")[2] if isinstance(entry, str) else entry.__qualname__


def _resolve_type(entry: type | str) -> type | None:
    """A class given directly, or ``"package.module:Class"`` looked up in modules already imported (a layer can
    only be an instance of a class whose module was imported, so optional packages are never imported here)."""
    if isinstance(entry, type):
        return entry
    module_name, _, attr = entry.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in attr.split("."):
        if found is None:
            return None
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def _import_type(entry: type | str) -> type:
    """A class given directly, or ``"package.module:Class"`` imported now."""
    if isinstance(entry, type):
        return entry
    module_name, _, attr = entry.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        found = getattr(found, part)
    if not isinstance(found, type):
        raise TypeError(f"{entry!r} is not a class")
    return found


@dataclass(frozen=True)
class DequantBackend:
    """How fused kernels read the frozen weight of one kind of linear layer.

    Attributes:
        name: short identifier (lowercase, digits, ``_``), unique in a registry; shown in the patch table
            (``kernels.lora_qkv [bnb_4bit]``) and in errors.
        module_types: the layer classes it reads: classes, or ``"package.module:Class"`` strings for classes of
            optional packages (matched only once that module is imported, never importing it). Subclasses match.
        read: ``layer -> weight format``: the layer's packed tensors and metadata as a frozen object of
            ``weight_format``, sharing the layer's tensors (no copy). Called inside the forward of a module that
            contains the layer (under FSDP the tensors are then gathered).
        weight_format: the class ``read`` returns (a ``fms_acceleration_accelerate_kernels.dequant`` weight
            format, or any class with the same ``shape`` / ``dtype`` / ``device`` / ``dequantize(dtype, out)`` /
            ``dequantize_ref(dtype)`` members); its ``dequantize`` is the dequant op. A
            ``"package.module:Class"`` string is imported at the first read (so declaring the backend imports
            neither the kernels nor Triton).
        base_layer: the fused-ops ``base_layer`` value this storage format is (``"bitsandbytes"``,
            ``"auto_gptq"``); ``None`` for unquantized floating-point weights.
        accepts: optional further condition on a layer of one of ``module_types`` (e.g. "its weight is a float
            tensor"); must be cheap and import nothing.
    """

    name: str
    module_types: tuple[type | str, ...]
    read: Callable[[Any], QuantizedWeight]
    weight_format: type | str
    base_layer: str | None = None
    accepts: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise TypeError(f"DequantBackend name must be lowercase letters, digits and '_', got {self.name!r}")
        who = f"DequantBackend {self.name!r}"
        if isinstance(self.module_types, (str, type)) or not isinstance(self.module_types, tuple):
            raise TypeError(f"{who}: module_types must be a tuple of classes or 'module:Class' strings")
        if not self.module_types:
            raise TypeError(f"{who}: module_types is empty; name the layer classes it reads")
        for entry in self.module_types:
            if not isinstance(entry, type) and not (isinstance(entry, str) and _TYPE_PATH.fullmatch(entry)):
                raise TypeError(f"{who}: module type {entry!r} is neither a class nor a 'package.module:Class' string")
        if not callable(self.read):
            raise TypeError(f"{who}: read must be callable (layer -> weight format)")
        if not isinstance(self.weight_format, type) and not (
            isinstance(self.weight_format, str) and _TYPE_PATH.fullmatch(self.weight_format)
        ):
            raise TypeError(
                f"{who}: weight_format must be the class that read returns (or its 'package.module:Class' path), "
                f"got {self.weight_format!r}"
            )
        if self.base_layer is not None and (not isinstance(self.base_layer, str) or not self.base_layer):
            raise TypeError(f"{who}: base_layer must be None or a non-empty string, got {self.base_layer!r}")
        if self.accepts is not None and not callable(self.accepts):
            raise TypeError(f"{who}: accepts must be None or callable (layer -> bool)")

    def handles(self, layer: Any) -> bool:
        """Whether this backend reads ``layer`` (its class is one of ``module_types`` and ``accepts`` agrees)."""
        types = tuple(t for t in (_resolve_type(e) for e in self.module_types) if t is not None)
        if not types or not isinstance(layer, types):
            return False
        return self.accepts is None or bool(self.accepts(layer))

    def read_weight(self, layer: Any) -> QuantizedWeight:
        """``read(layer)``, checked to be a ``weight_format``."""
        weight = self.read(layer)
        expected = _import_type(self.weight_format)
        if not isinstance(weight, expected):
            raise TypeError(
                f"dequant backend {self.name!r} read a {type(weight).__name__} from {type(layer).__name__}, but "
                f"declares weight_format {expected.__name__}"
            )
        return weight


class DequantBackendRegistry:
    """The ordered dequant backends of one framework instance (immutable).

    Args:
        contributions: ``(contributor, backends)`` pairs in dispatch order, e.g. each active plugin's name and
            its ``dequant_backends()``.

    Raises:
        TypeError: an entry is not a :class:`DequantBackend`.
        AccelerationConfigError: two backends share a name (the message names both contributors).
    """

    def __init__(self, contributions: Iterable[tuple[str, Iterable[DequantBackend]]] = ()) -> None:
        entries: list[tuple[str, DequantBackend]] = []
        owners: dict[str, str] = {}
        for contributor, backends in contributions:
            if isinstance(backends, DequantBackend):
                raise TypeError(f"{contributor}: dequant backends must be a tuple of DequantBackend, not one backend")
            for backend in backends:
                if not isinstance(backend, DequantBackend):
                    raise TypeError(
                        f"{contributor} contributed {backend!r} as a dequant backend; expected a DequantBackend"
                    )
                if backend.name in owners:
                    raise AccelerationConfigError(
                        f"dequant backend {backend.name!r} is contributed by both {owners[backend.name]!r} and "
                        f"{contributor!r}",
                        fix="activate only one of these plugins, or give the backends distinct names",
                    )
                owners[backend.name] = contributor
                entries.append((contributor, backend))
        self._entries: tuple[tuple[str, DequantBackend], ...] = tuple(entries)

    @classmethod
    def of(cls, *backends: DequantBackend, contributor: str = "caller") -> DequantBackendRegistry:
        """A registry of ``backends`` in the given order (for code and tests that hold backends directly)."""
        return cls([(contributor, backends)])

    @classmethod
    def from_plugins(cls, plugins: Sequence[AccelerationPlugin]) -> DequantBackendRegistry:
        """Collect every plugin's ``dequant_backends()``, in the given (run) order."""
        return cls([(p.plugin_name(), tuple(p.dequant_backends())) for p in plugins])

    # ------------------------------------------------------------------------------------------ contents
    @property
    def backends(self) -> tuple[DequantBackend, ...]:
        """Every backend in dispatch order."""
        return tuple(b for _, b in self._entries)

    def __iter__(self) -> Iterator[DequantBackend]:
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return any(b.name == name for _, b in self._entries)

    def __getitem__(self, name: str) -> DequantBackend:
        for _, backend in self._entries:
            if backend.name == name:
                return backend
        raise KeyError(f"no dequant backend named {name!r} (have: {', '.join(self.names) or 'none'})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for _, b in self._entries)

    def contributor(self, name: str) -> str:
        """Who contributed the backend called ``name``."""
        for contributor, backend in self._entries:
            if backend.name == name:
                return contributor
        raise KeyError(f"no dequant backend named {name!r} (have: {', '.join(self.names) or 'none'})")

    def contributed_by(self, contributor: str) -> tuple[DequantBackend, ...]:
        """The backends ``contributor`` (a plugin name) contributed, in order."""
        return tuple(b for c, b in self._entries if c == contributor)

    def for_base_layer(self, base_layer: str) -> tuple[DequantBackend, ...]:
        """The backends whose storage format is ``base_layer`` (e.g. ``"bitsandbytes"``)."""
        return tuple(b for _, b in self._entries if b.base_layer == base_layer)

    # ------------------------------------------------------------------------------------------ dispatch
    def find(self, module: Any) -> DequantBackend | None:
        """First backend that handles ``module``'s base layer (PEFT wrappers unwrapped), or None."""
        base = base_layer_of(module)
        for _, backend in self._entries:
            if backend.handles(base):
                return backend
        return None

    def backend_for(self, module: Any) -> DequantBackend:
        """First backend that handles ``module``'s base layer.

        Raises:
            TypeError: no backend handles that layer type (the message lists the backends tried).
        """
        backend = self.find(module)
        if backend is None:
            base = base_layer_of(module)
            tried = ", ".join(self.names) or "none"
            contributors = ", ".join(dict.fromkeys(c for c, _ in self._entries))
            if contributors:
                tried += f", contributed by {contributors}"
            raise TypeError(
                f"no dequant backend handles {type(base).__module__}.{type(base).__name__} (tried: {tried}); an "
                "active plugin must contribute a DequantBackend for this layer type through dequant_backends()"
            )
        return backend

    def read(self, module: Any) -> QuantizedWeight:
        """The weight format of ``module``'s base layer, read by the first backend that handles it.

        Under FSDP call it inside the forward of a module that contains the layer (after the all-gather).
        """
        base = base_layer_of(module)
        return self.backend_for(base).read_weight(base)

    def dequantize(self, module: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out, in) weight of ``module``'s base layer, in ``dtype`` (default: the weight's own)."""
        return self.read(module).dequantize(dtype)

    def describe(self) -> list[str]:
        """One line per backend, in dispatch order."""
        return [
            f"{b.name} ({c}): {', '.join(_type_name(e) for e in b.module_types)}"
            f" -> {_type_name(b.weight_format)}" + (f" [{b.base_layer}]" if b.base_layer else "")
            for c, b in self._entries
        ]

    def __repr__(self) -> str:
        return f"DequantBackendRegistry({', '.join(self.names)})"
