"""4-bit expert weights: the 3-D expert stacks of a QLoRA MoE model in bitsandbytes' 4-bit storage.

transformers 5 keeps each MoE layer's experts as 3-D parameters of one experts module, not as ``nn.Linear`` layers,
so bitsandbytes' ``load_in_4bit`` (and the ``peft.quantization.bitsandbytes`` plugin, which goes through it) leaves
them in the training dtype: in a "QLoRA" Mixtral nearly all weights stay 16-bit. With the bitsandbytes plugin active,
the MoE plugin quantizes each stack itself (option ``quantize_experts``):

* **Storage.** Each stack ``(E, rows, cols)`` becomes one bitsandbytes ``Params4bit`` (packed codes in the stack's
  own dtype, which the bitsandbytes plugin keeps equal to the training dtype; a ``QuantState`` whose shape is the
  3-D stack), quantized with the settings of the model's ``Linear4bit`` layers (quant type, block size, double
  quantization). A block never straddles two experts (each expert's size is a multiple of the block size, checked),
  so every expert's codes and scales are the ones quantizing that expert alone gives; with double quantization the
  second level (the scales of the scales) runs over the whole stack. The replacement is a recorded patch; reverting
  puts back a dequantized parameter of the original dtype (the 16-bit stack is not kept).
* **Compute.** The experts forward dequantizes one layer's two stacks into transient buffers of the stack's dtype
  (bitsandbytes' ``dequantize_4bit``, one call per stack) right before the expert kernels. The kernels' autograd
  saves those buffers for the input gradient; a saved-tensor hook (:func:`dequantized_stacks`) stores a reference to
  the packed stack instead and dequantizes it again when the backward needs it, so no 16-bit copy lives between the
  forward and the backward. Inside activation checkpointing (an outer saved-tensor hook is active) the checkpoint
  already drops and recomputes everything the layer saves, so the hook stands aside.
* **Training.** The 4-bit stacks are frozen; LoRA on them (PEFT ``target_parameters``) is computed from the adapters'
  factors on the dequantized buffers (see :mod:`.expert_lora`). A recorded patch of PEFT's
  ``ParamWrapper._get_in_out_features`` gives PEFT the stack's logical ``(E, rows, cols)`` shape when it wraps a
  4-bit stack (adapters added after the quantization, e.g. by a trainer's ``peft_config``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BLOCKSIZE = 64
"""bitsandbytes' ``Linear4bit`` block size, used when the model has no 4-bit linear layer to copy it from."""


@dataclass(frozen=True)
class StackQuantization:
    """How the expert stacks are quantized (the model's ``Linear4bit`` settings)."""

    quant_type: str
    blocksize: int
    compress_statistics: bool

    @classmethod
    def like_model(cls, model: torch.nn.Module, quant_type: str, compress_statistics: bool) -> StackQuantization:
        """The settings of ``model``'s first bitsandbytes 4-bit weight, else ``quant_type`` / ``compress_statistics``
        (the bitsandbytes plugin's options) with bitsandbytes' default block size."""
        for param in model.parameters():
            if is_4bit_stack(param) or type(param).__name__ == "Params4bit":
                state = getattr(param, "quant_state", None)
                if state is not None:
                    return cls(str(state.quant_type), int(state.blocksize), bool(state.nested))
        return cls(quant_type, DEFAULT_BLOCKSIZE, compress_statistics)


def is_4bit_stack(value: Any) -> bool:
    """Whether ``value`` is a 4-bit expert stack (a bitsandbytes ``Params4bit`` whose quant state is 3-D)."""
    state = getattr(value, "quant_state", None)
    return type(value).__name__ == "Params4bit" and state is not None and len(state.shape) == 3


def stack_shape(value: torch.Tensor) -> torch.Size:
    """The logical ``(E, rows, cols)`` shape of an expert stack, 4-bit or not."""
    return torch.Size(value.quant_state.shape) if is_4bit_stack(value) else value.shape


def stack_dtype(value: torch.Tensor) -> torch.dtype:
    """The dtype an expert stack computes in (a 4-bit stack's original dtype)."""
    return value.quant_state.dtype if is_4bit_stack(value) else value.dtype


def quantize_stack(weight: torch.Tensor, settings: StackQuantization, path: str) -> torch.nn.Parameter:
    """``weight`` (E, rows, cols) as a frozen 4-bit ``Params4bit`` on its device, storage in its own dtype.

    Raises:
        ValueError: an expert's size is not a multiple of the block size (a block would straddle two experts).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    if weight.dim() != 3:
        raise ValueError(f"{path}: expected a 3-D expert stack, got shape {tuple(weight.shape)}")
    per_expert = weight.shape[1] * weight.shape[2]
    if per_expert % settings.blocksize:
        raise ValueError(
            f"{path}: an expert holds {per_expert} weights, not a multiple of the 4-bit block size "
            f"{settings.blocksize}, so a quantization block would straddle two experts"
        )
    packed, state = bnb_functional.quantize_4bit(
        weight.detach().contiguous(),
        blocksize=settings.blocksize,
        compress_statistics=settings.compress_statistics,
        quant_type=settings.quant_type,
        quant_storage=weight.dtype,
    )
    return bnb.nn.Params4bit(
        data=packed,
        requires_grad=False,
        quant_state=state,
        blocksize=settings.blocksize,
        compress_statistics=settings.compress_statistics,
        quant_type=settings.quant_type,
        quant_storage=weight.dtype,
        bnb_quantized=True,
    )


def dequantize_stack(value: torch.Tensor) -> torch.Tensor:
    """A new ``(E, rows, cols)`` tensor of a 4-bit stack's weights in its original dtype (one bitsandbytes call)."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(value.data, value.quant_state)


class _PackedRef:
    """What the saved-tensor hook keeps instead of (a view of) a dequantized buffer: the packed stack and the view's
    geometry. The first unpack of one stack of one call dequantizes it into ``cache``, shared by that call's refs of
    the stack; the buffer goes when the last of them does (the graph nodes that saved them have run their backward),
    so a backward that reads many views of a stack (the torch reference's per-expert GEMMs) dequantizes it once."""

    __slots__ = ("cache", "offset", "size", "stack", "stride")

    def __init__(self, stack: torch.Tensor, view: torch.Tensor, cache: list[torch.Tensor | None]) -> None:
        self.stack = stack
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()
        self.cache = cache

    def unpack(self) -> torch.Tensor:
        if self.cache[0] is None:
            self.cache[0] = dequantize_stack(self.stack)
        return self.cache[0].as_strided(self.size, self.stride, self.offset)


def _outer_saved_tensor_hooks() -> bool:
    """Whether a saved-tensor hook (activation checkpointing, CPU offload) is active around this call."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@contextmanager
def dequantized_stacks(*stacks: torch.Tensor | None) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """The compute tensors of ``stacks`` for one experts call: 4-bit stacks dequantized into transient buffers, the
    others (16-bit stacks, ``None``) as they are.

    While the block runs, tensors that autograd saves and that are (views of) those buffers are kept as references to
    the packed stacks and dequantized again in the backward (see the module docstring). Not installed where it would
    not help: no 4-bit stack, no autograd graph being recorded, inside a backward (activation checkpointing's
    recomputation, whose saved tensors live only for that backward), under an outer saved-tensor hook, or while
    ``torch.compile`` traces.
    """
    out = tuple(dequantize_stack(s) if s is not None and is_4bit_stack(s) else s for s in stacks)
    pairs = [(s, b) for s, b in zip(stacks, out, strict=True) if s is not None and b is not s]
    record = (
        bool(pairs)
        and torch.is_grad_enabled()
        and not _in_backward()
        and not torch.compiler.is_compiling()
        and not _outer_saved_tensor_hooks()
    )
    if not record:
        yield out
        return
    keys = [(b.untyped_storage().data_ptr(), b.dtype, s, [None]) for s, b in pairs]

    def pack(tensor: torch.Tensor) -> Any:
        if type(tensor) is not torch.Tensor or tensor.device.type == "meta" or tensor.layout != torch.strided:
            return tensor  # the buffers and their views are plain strided tensors; subclasses have other storage
        pointer = tensor.untyped_storage().data_ptr()
        for key, dtype, stack, cache in keys:
            if pointer == key and tensor.dtype == dtype:
                return _PackedRef(stack, tensor, cache)
        return tensor

    def unpack(saved: Any) -> torch.Tensor:
        return saved.unpack() if isinstance(saved, _PackedRef) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield out


def peft_shape_patch(patches: Any, description: str) -> bool:
    """Make PEFT's ``ParamWrapper`` read a 4-bit stack's logical ``(E, rows, cols)`` shape (a recorded, revertible
    patch of ``ParamWrapper._get_in_out_features``); other parameters keep PEFT's own reading.

    Returns:
        ``True`` when installed now; ``False`` when PEFT is not installed or the patch is in place already.
    """
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    if any(r.owner is ParamWrapper and r.attribute == "_get_in_out_features" for r in patches.records):
        return False
    original = vars(ParamWrapper)["_get_in_out_features"]

    def _get_in_out_features(self: Any, module: Any) -> Any:
        param = self.get_param()
        if not is_4bit_stack(param):
            return original(self, module)
        num_experts, in_features, out_features = stack_shape(param)
        self.num_experts = num_experts
        self._param_ndim = 3
        return in_features, out_features

    patches.patch(
        ParamWrapper,
        "_get_in_out_features",
        _get_in_out_features,
        target="peft ParamWrapper._get_in_out_features (4-bit expert stacks)",
        description=description,
        keep_later=True,
    )
    return True


def frozen_check(stacks: tuple[torch.Tensor | None, ...], layer: str) -> None:
    """Refuse a 4-bit stack set to train (its packed codes have no gradient)."""
    for stack in stacks:
        if stack is not None and is_4bit_stack(stack) and stack.requires_grad:
            raise RuntimeError(
                f"{layer}: a 4-bit expert stack requires grad, but 4-bit expert weights are frozen; train them "
                "through LoRA (PEFT target_parameters), or set quantize_experts: false to keep them in 16 bit"
            )


def stacks_context(stacks: tuple[torch.Tensor | None, ...]) -> Any:
    """:func:`dequantized_stacks` when one of ``stacks`` is 4-bit, else a context yielding them unchanged."""
    if any(s is not None and is_4bit_stack(s) for s in stacks):
        return dequantized_stacks(*stacks)
    return nullcontext(stacks)


__all__ = [
    "StackQuantization",
    "dequantize_stack",
    "dequantized_stacks",
    "frozen_check",
    "is_4bit_stack",
    "peft_shape_patch",
    "quantize_stack",
    "stack_dtype",
    "stack_shape",
    "stacks_context",
]
