"""Dequantisation backends: turn the frozen weight of any supported linear layer into a dense (out, in) tensor.

The fused LoRA functions (``lora.py``) never look at a layer's storage format themselves; they ask for a
``QuantizedWeight`` and call its ``dequantize``. Which ``QuantizedWeight`` a layer gives is decided by an
ordered tuple of ``DequantBackend`` dispatchers keyed by the layer type; the first whose ``matches`` accepts the
layer wins (as PEFT picks its LoRA layer classes). Shipped backends:

* ``BNB_4BIT_BACKEND``: ``bitsandbytes.nn.Linear4bit`` (nf4 / fp4, with or without double quantisation, any
  ``quant_storage``), dequantised by our own kernels in ``nf4.py`` (bitsandbytes' compiled functions are never
  called; their signatures change between releases);
* ``DENSE_BACKEND``: a plain ``torch.nn.Linear`` with a fp32/bf16/fp16 weight; dequantising is a no-op.

Adding a format (e.g. GPTQ: packed int32 ``qweight``/``qzeros``, fp16 ``scales``, ``g_idx``) is one more
``QuantizedWeight`` class plus one ``DequantBackend`` entry placed before ``DENSE_BACKEND``::

    backends = (GPTQ_BACKEND, *DEFAULT_DEQUANT_BACKENDS)
    weight = quantized_weight(layer, backends)

Everything here is immutable: there is no global registry to mutate; callers own the tuple they pass.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .nf4 import FourBitState, NestedAbsmax, dequantize_4bit, dequantize_4bit_ref

__all__ = [
    "BNB_4BIT_BACKEND",
    "DEFAULT_DEQUANT_BACKENDS",
    "DENSE_BACKEND",
    "Bnb4bitWeight",
    "DenseWeight",
    "DequantBackend",
    "QuantizedWeight",
    "base_layer_of",
    "bnb_four_bit_state",
    "dequantize_weight",
    "get_dequant_backend",
    "quantized_weight",
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
                "dequant backend (see fms_acceleration_accelerate_kernels.dequant)"
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


@dataclass(frozen=True)
class DequantBackend:
    """One dispatcher entry: which layers it handles and how to read their weight.

    Attributes:
        name: short identifier (``"bnb_4bit"``, ``"dense"``, ...), shown in errors and summaries.
        matches: ``layer -> bool``; must be cheap and must not import optional packages.
        extract: ``layer -> QuantizedWeight`` for a layer that ``matches`` accepted.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    extract: Callable[[nn.Module], QuantizedWeight]


def base_layer_of(module: nn.Module) -> nn.Module:
    """The frozen base layer of ``module``: unwraps PEFT tuner layers (``.base_layer``), else ``module``."""
    seen = 0
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
        seen += 1
        assert seen < 16, "base_layer chain does not end"
    return module


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    # A layer can only be a bitsandbytes Linear4bit if bitsandbytes has been imported already; looking in
    # sys.modules keeps bitsandbytes optional and the check free.
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def _extract_bnb_4bit(module: nn.Module) -> Bnb4bitWeight:
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        # FSDP may replace Params4bit by a plain parameter; Linear4bit keeps a copy of the state on the module.
        quant_state = getattr(module, "quant_state", None)
    if quant_state is None:
        raise ValueError(
            f"{type(module).__name__} has no quant_state: its weight is not quantised yet. Move the layer to "
            "its device first (bitsandbytes quantises in Params4bit.to(device)), e.g. layer.to('cuda')."
        )
    return Bnb4bitWeight(packed=weight.detach(), state=bnb_four_bit_state(quant_state))


def _is_dense_linear(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    weight = module.weight
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype in _DENSE_DTYPES
        and getattr(weight, "quant_state", None) is None
        and getattr(module, "quant_state", None) is None
    )


def _extract_dense(module: nn.Module) -> DenseWeight:
    return DenseWeight(module.weight)


BNB_4BIT_BACKEND = DequantBackend(name="bnb_4bit", matches=_is_bnb_linear4bit, extract=_extract_bnb_4bit)
DENSE_BACKEND = DequantBackend(name="dense", matches=_is_dense_linear, extract=_extract_dense)
# Order matters: Linear4bit subclasses nn.Linear, so the quantised backend must come before the dense one.
DEFAULT_DEQUANT_BACKENDS: tuple[DequantBackend, ...] = (BNB_4BIT_BACKEND, DENSE_BACKEND)


def get_dequant_backend(
    module: nn.Module, backends: Sequence[DequantBackend] = DEFAULT_DEQUANT_BACKENDS
) -> DequantBackend:
    """First backend (in order) that handles ``module``'s base layer.

    Args:
        module: a linear layer, or a PEFT LoRA layer wrapping one (its ``base_layer`` is used).
        backends: ordered dispatchers; the first match wins.

    Returns:
        The matching ``DequantBackend``.

    Raises:
        TypeError: no backend handles the layer type (the message lists the backends tried).
    """
    base = base_layer_of(module)
    for backend in backends:
        if backend.matches(base):
            return backend
    tried = ", ".join(b.name for b in backends) or "none"
    raise TypeError(
        f"no dequant backend handles {type(base).__module__}.{type(base).__name__} (tried: {tried}); "
        "supported are torch.nn.Linear with a fp32/bf16/fp16 weight and bitsandbytes Linear4bit; pass a "
        "backends tuple with an entry for this layer type to support it"
    )


def quantized_weight(
    module: nn.Module, backends: Sequence[DequantBackend] = DEFAULT_DEQUANT_BACKENDS
) -> QuantizedWeight:
    """The ``QuantizedWeight`` of ``module``'s base layer, read by the first matching backend.

    Under FSDP call it inside the module's forward (after the parameters are gathered).

    Args:
        module: a linear layer, or a PEFT LoRA layer wrapping one.
        backends: ordered dispatchers; the first match wins.

    Returns:
        A ``QuantizedWeight`` of logical shape (out_features, in_features).
    """
    base = base_layer_of(module)
    return get_dequant_backend(base, backends).extract(base)


def dequantize_weight(
    module: nn.Module,
    dtype: torch.dtype | None = None,
    backends: Sequence[DequantBackend] = DEFAULT_DEQUANT_BACKENDS,
) -> torch.Tensor:
    """Dense weight of ``module``'s base layer.

    Args:
        module: a linear layer, or a PEFT LoRA layer wrapping one.
        dtype: output dtype; defaults to the weight's original dtype.
        backends: ordered dispatchers; the first match wins.

    Returns:
        Tensor of shape (out_features, in_features). For a dense layer of the requested dtype this is the
        layer's own weight (detached), not a copy.
    """
    return quantized_weight(module, backends).dequantize(dtype)
