"""``GPTQLinear``: a frozen linear layer holding a GPTQ-packed weight.

It subclasses ``torch.nn.Linear`` (so PEFT's default LoRA dispatcher wraps it in its ordinary ``lora.Linear``, and
code that asks ``isinstance(m, nn.Linear)`` for ``in_features`` / ``out_features`` keeps working) but has no
dense weight: ``weight`` is registered as ``None`` and ``nn.Linear.__init__`` is not called. PEFT then places the
adapters on the device of ``qweight`` (its GPTQ convention) in ``compute_dtype`` (the convention of quantized bases
with a compute dtype), and the plugin casts them to their configured dtype.

Storage, chosen for the checkpoint format and for FSDP:

* ``qweight`` / ``qzeros`` / ``g_idx`` (int32) and ``scales`` are **buffers**, as in gptqmodel: ``state_dict`` and
  ``save_pretrained`` write them under the checkpoint's own names, ``model.parameters()`` (optimizers, parameter
  counts, FSDP1's flattening of one dtype per unit, mixed-precision casts) never sees an integer tensor, and FSDP
  replicates buffers as they are, so a GPTQ model runs under FSDP unchanged, each rank holding the whole packed
  weights (a quarter of bf16 at 4 bits). Sharding them as packed bytes is a separate step (a layer whose packed
  tensors are parameters of a tensor subclass, as the bitsandbytes plugin's ``Packed4bitLinear`` under FSDP2).
* ``scales`` keep the checkpoint's dtype (float16 in standard checkpoints) instead of the compute dtype: the
  dequantised weight is then ``round(fp32(scale) * (q - zero))``, rounded once to the compute dtype, exactly as
  the checkpoint defines it (a bf16 copy of the scales would round twice), it costs the same two bytes, and
  ``save_pretrained`` writes the checkpoint's scales back bit for bit.
* ``bias`` (when the checkpoint has one) is an ordinary frozen ``nn.Parameter`` in the training dtype, like every
  other non-quantized weight (PEFT's ``bias="all"`` can train it).

Under FSDP the plugin changes where the packed tensors live (the layer computes the same thing either way):

* FSDP1 flattens *parameters* of one dtype per unit and replicates buffers (and, under mixed precision, casts
  floating-point buffers to its ``buffer_dtype``, which would round float16 ``scales`` to bfloat16). The plugin
  therefore replaces each layer by one in **parameter storage** (:meth:`GPTQLinear.with_parameter_storage`): the
  same four tensors as frozen parameters *viewed* as the training dtype (int32 words and float16 scales
  reinterpreted, bit for bit, as e.g. bfloat16), which FSDP1 flattens, shards and all-gathers next to the unit's
  other frozen weights without a cast (the framework checks that the mixed-precision ``param_dtype`` equals that
  dtype). :meth:`GPTQLinear.packed_tensors` views them back as int32 / float16 for the kernels.
* FSDP2 shards parameters one by one along their first dimension; the plugin replaces the layer by
  :class:`~.packed.PackedGPTQLinear`, whose packed tensors form one tensor-subclass parameter sharded by output
  channels (see :mod:`.packed`).

The forward is ``gptq_linear(x, self.quantized_weight(), self.bias)`` of ``fms_acceleration_accelerate_kernels.gptq``
in ``compute_dtype`` (or the autocast dtype): dequantise + matmul, whose backward dequantises again for the
input gradient and keeps no dense weight.

``sequential_g_idx`` (a plain Python bool on the layer, not a tensor) says whether ``g_idx[k] == k // group_size``
for every input channel (no act-order). The kernels then compute each tile's group from ``k`` instead of reading
``g_idx`` (faster dequantisation) and may run the fused dequant-matmul for few rows. The loader sets it once per
layer from the checkpoint's ``g_idx`` as it reads it (host memory, no device read); a layer built otherwise
computes it at its first use (one read of ``g_idx``) and keeps it. It is derived from ``g_idx``, so nothing of it
is saved: ``state_dict`` / ``save_pretrained`` write the checkpoint's tensors only, and loading a state dict with a
``g_idx`` forgets the flag until the next use.

Merging LoRA into this layer is impossible (there is no dense weight to add to): the loader marks the model with
``quantization_method = "gptq"``, so PEFT's ``merge_and_unload`` / ``merge_adapter`` refuse it up front; a direct
``LoraLayer.merge()`` fails on the missing ``weight`` before anything is changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import GPTQFormat


class GPTQComputeMixin:
    """``dequantize``, ``forward`` and ``extra_repr`` of the GPTQ layers (:class:`GPTQLinear` and
    :class:`~.packed.PackedGPTQLinear`): both compute through their own ``quantized_weight()`` in
    ``compute_dtype``."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    checkpoint_format: str
    compute_dtype: torch.dtype
    bias: Any

    def quantized_weight(self) -> Any:  # pragma: no cover - every GPTQ layer defines it
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default: ``compute_dtype``)."""
        return self.quantized_weight().dequantize(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fms_acceleration_accelerate_kernels.gptq import gptq_linear

        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.compute_dtype)
        return gptq_linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, checkpoint_format={self.checkpoint_format}, "
            f"compute_dtype={str(self.compute_dtype).replace('torch.', '')}"
        )


class GPTQLinear(GPTQComputeMixin, nn.Linear):
    """Frozen GPTQ linear layer ``y = x W^T + b`` (see the module docstring).

    Args:
        in_features: K.
        out_features: N.
        bits: 2, 4 or 8.
        group_size: input channels per group, or -1.
        checkpoint_format: ``"gptq"`` (v1 zero points) or ``"gptq_v2"``.
        bias: whether the layer has a bias.
        compute_dtype: dtype of the matmul and of the bias (the training dtype).
        scales_dtype: dtype of the stored scales (the checkpoint's; float16 in standard checkpoints).
        device: where the (empty) tensors are created; ``meta`` for a skeleton filled by the loader.

    Buffers: ``qweight`` int32 ``[K // pf, N]``, ``qzeros`` int32 ``[G, N // pf]``, ``scales`` ``[G, N]``,
    ``g_idx`` int32 ``[K]`` (pf = 32 // bits, G = ceil(K / group_size) or 1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        checkpoint_format: str,
        bias: bool,
        compute_dtype: torch.dtype,
        scales_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a dense weight
        if bits not in (2, 4, 8):
            raise ValueError(f"GPTQLinear supports 2, 4 or 8 bits, got {bits!r}")
        pf = 32 // bits
        if in_features % pf or out_features % pf:
            raise ValueError(
                f"a {bits}-bit GPTQ layer needs in_features and out_features divisible by {pf}, got "
                f"{in_features} and {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        self.compute_dtype = compute_dtype
        self.scales_dtype = scales_dtype
        self.storage_dtype: torch.dtype | None = None  # parameter storage (FSDP1): the dtype the tensors are viewed as
        # g_idx[k] == k // group_size for every k (no act-order); None: not known yet (see resolve_sequential_g_idx)
        self.sequential_g_idx: bool | None = None
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_parameter("weight", None)
        self.register_buffer("qweight", torch.empty(in_features // pf, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // pf, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_format(
        cls,
        fmt: GPTQFormat,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        compute_dtype: torch.dtype,
        scales_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> GPTQLinear:
        """An empty layer for a checkpoint of format ``fmt``."""
        return cls(
            in_features,
            out_features,
            bits=fmt.bits,
            group_size=fmt.group_size,
            checkpoint_format=fmt.checkpoint_format,
            bias=bias,
            compute_dtype=compute_dtype,
            scales_dtype=scales_dtype,
            device=device,
        )

    def reset_parameters(self) -> None:
        """Nothing to initialise: the packed weight comes from a checkpoint (``nn.Linear``'s re-initialisation,
        e.g. from ``model.init_weights()``, must not touch it)."""

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """``{"qweight", "qzeros", "g_idx"}`` as int32 and ``"scales"`` in ``scales_dtype``, in the checkpoint's
        layout, whichever storage holds them (views, no copies; see the module docstring)."""
        out = {}
        for name in PACKED_NAMES:
            tensor = getattr(self, name)
            dtype = self.scales_dtype if name == "scales" else torch.int32
            out[name] = tensor if tensor.dtype == dtype else _reinterpret(tensor, dtype)
        return out

    @classmethod
    def with_parameter_storage(cls, layer: GPTQLinear, dtype: torch.dtype) -> GPTQLinear:
        """A new layer sharing ``layer``'s tensors (no copy), held as frozen parameters viewed as ``dtype`` (for
        FSDP1, which flattens parameters of one dtype per unit). ``bias`` is the same parameter object."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key in ("in_features", "out_features", "bits", "group_size", "checkpoint_format", "compute_dtype"):
            setattr(new, key, getattr(layer, key))
        new.scales_dtype = layer.scales_dtype
        new.storage_dtype = dtype
        new.sequential_g_idx = layer.sequential_g_idx
        new.register_parameter("weight", None)
        for name, tensor in layer.packed_tensors().items():
            new.register_parameter(name, nn.Parameter(_reinterpret(tensor, dtype), requires_grad=False))
        new.bias = layer.bias
        return new

    @classmethod
    def with_buffer_storage(cls, layer: GPTQLinear) -> GPTQLinear:
        """The inverse of :meth:`with_parameter_storage`: a new layer holding ``layer``'s tensors as buffers in
        their own dtypes (views, no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key in ("in_features", "out_features", "bits", "group_size", "checkpoint_format", "compute_dtype"):
            setattr(new, key, getattr(layer, key))
        new.scales_dtype = layer.scales_dtype
        new.storage_dtype = None
        new.sequential_g_idx = layer.sequential_g_idx
        new.register_parameter("weight", None)
        for name, tensor in layer.packed_tensors().items():
            new.register_buffer(name, tensor)
        new.bias = layer.bias
        return new

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The packed tensors are saved in their own dtypes (int32 / the scales' dtype) whatever storage holds
        them, so a state dict (or ``save_pretrained``) stays a GPTQ checkpoint."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.storage_dtype is not None:
            for name, tensor in self.packed_tensors().items():
                if prefix + name in destination:
                    destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Packed tensors given in their own dtypes load into parameter storage bit for bit (viewed, not cast). A
        new ``g_idx`` makes ``sequential_g_idx`` unknown again (computed at the next use)."""
        if prefix + "g_idx" in state_dict:
            self.sequential_g_idx = None
        if self.storage_dtype is not None:
            for name in PACKED_NAMES:
                key = prefix + name
                if key in state_dict and state_dict[key].dtype != self.storage_dtype:
                    state_dict[key] = _reinterpret(state_dict[key], self.storage_dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def resolve_sequential_g_idx(self) -> bool:
        """``sequential_g_idx``, computed from ``g_idx`` and kept on the layer when not known yet (one read of
        ``g_idx``, a device synchronisation; the loader sets it without one). While ``torch.compile`` traces, an
        unknown flag counts as False (any ``g_idx`` is read correctly) and is not stored; so does one of a layer on
        ``meta``."""
        if self.sequential_g_idx is None:
            g_idx = self.packed_tensors()["g_idx"]
            if torch.compiler.is_compiling() or g_idx.is_meta:
                return False
            from fms_acceleration_accelerate_kernels.gptq import gptq_sequential_g_idx

            self.sequential_g_idx = gptq_sequential_g_idx(g_idx, self.group_size)
        return self.sequential_g_idx

    def quantized_weight(self) -> Any:
        """The layer's tensors as a ``fms_acceleration_accelerate_kernels.gptq.GPTQWeight`` (no copies), in
        ``compute_dtype``, flagged ``sequential_g_idx`` (:meth:`resolve_sequential_g_idx`). Call it inside a forward
        under FSDP."""
        from fms_acceleration_accelerate_kernels.gptq import GPTQWeight

        tensors = self.packed_tensors()
        return GPTQWeight(
            qweight=tensors["qweight"],
            qzeros=tensors["qzeros"],
            scales=tensors["scales"],
            g_idx=tensors["g_idx"],
            bits=self.bits,
            group_size=self.group_size,
            checkpoint_format=self.checkpoint_format,
            out_features=self.out_features,
            in_features=self.in_features,
            dtype=self.compute_dtype,
            sequential_g_idx=self.resolve_sequential_g_idx(),
        )

    def extra_repr(self) -> str:
        storage = "" if self.storage_dtype is None else f", storage={str(self.storage_dtype).replace('torch.', '')}"
        return super().extra_repr() + storage


PACKED_NAMES = ("qweight", "qzeros", "scales", "g_idx")
"""The checkpoint tensors of a GPTQ linear (besides ``bias``)."""


def _reinterpret(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor``'s bytes viewed as ``dtype`` (bit for bit; the last dimension changes by the size ratio).

    A view needs the storage offset aligned to the larger element size; FSDP1 (without ``use_orig_params``) lays
    parameters end to end in its flat parameter, so a 2-byte view may start on an odd element. Such a tensor is
    copied first (a fresh allocation is aligned); in practice every tensor of a decoder unit has an even number
    of 2-byte elements, so this does not happen."""
    if tensor.dtype == dtype:
        return tensor
    try:
        return tensor.view(dtype)
    except RuntimeError:
        return tensor.contiguous().clone().view(dtype)
