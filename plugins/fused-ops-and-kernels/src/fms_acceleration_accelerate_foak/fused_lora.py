"""Fused LoRA and fused dequant patches over the projections named by the architecture spec.

Per attention / MLP module the projections are classified as

* ``lora``: a PEFT LoRA layer (one active adapter, plain LoRA, ``lora_dropout=0``) over any base a dequant
  backend of the framework's registry handles (this plugin's: bf16/fp16/fp32 ``nn.Linear``, bitsandbytes
  ``Linear4bit``; other plugins contribute theirs, e.g. the bitsandbytes plugin's FSDP2 packed layer);
* ``quantized``: a frozen quantized layer without adapter (e.g. the MLP of a QLoRA model whose LoRA targets
  only q, k, v, o);
* ``dense``: a plain floating-point linear layer without adapter (left alone unless it is part of a group).

and replaced as follows:

* **q, k, v** (separate projections) of an attention with at least one fused member: one ``lora_qkv`` call
  computes all three; it runs in ``q_proj``'s forward and hands k and v to ``k_proj``/``v_proj``'s forwards,
  which the attention forward calls next with the same input tensor (checked by identity; any other call
  computes on its own). The attention forward itself is not replaced, so every transformers version and
  attention backend keeps working.
* **gate, up, down** of a SwiGLU MLP with separate gate and up projections and at least one fused member: the
  MLP's forward becomes one ``lora_mlp_swiglu`` / ``lora_mlp_geglu`` call (activation included).
* **every other projection** (o, Phi-3's fused qkv and gate_up, GPTBigCode's, GeGLU MLPs): its own forward
  becomes ``lora_linear`` (``lora``) or ``quantized_linear`` (``quantized``).

This module is where PEFT layers and base layers are read: ``peft_lora_projection`` turns a PEFT LoRA layer into
the tensors the kernels take (``LoraProjection``: the base weight read by the first matching dequant backend,
A, B, scaling, bias), ``fused_lora_unsupported_reason`` says why a layer cannot be fused. Every replacement reads
them inside a forward of a module that contains them (never at patch time), so under FSDP they are the gathered
tensors as long as no FSDP unit lies strictly inside the attention / MLP module (the plugin declares those
modules as fused scopes and checks it after wrapping).
When a layer cannot be fused at run time (adapters disabled or merged, several active adapters, extra forward
arguments such as ``adapter_names``), the forward it replaced runs instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fms_acceleration_accelerate.dequant import DequantBackendRegistry, base_layer_of
from fms_acceleration_accelerate.model_specs import (
    ArchitectureSpec,
    MatchedModule,
    ModelMatch,
    ModelStructureError,
    activation_of,
)
from fms_acceleration_accelerate.patching import PluginPatcher

from .recompute import RecomputeState

ProjectionKind = Literal["lora", "quantized", "dense"]


def is_peft_lora_layer(module: nn.Module) -> bool:
    """True for a PEFT LoRA tuner layer (it has ``lora_A`` adapters and a ``base_layer``)."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(module, "base_layer", None), nn.Module
    )


@dataclass(frozen=True)
class Projection:
    """One projection of an attention or MLP module.

    Attributes:
        path: dotted path in the model.
        module: the projection module (a PEFT LoRA layer, a quantized layer, or ``nn.Linear``).
        kind: ``"lora"``, ``"quantized"`` or ``"dense"``.
        backend: name of the dequant backend that reads its base weight (``"dense"``, ``"bnb_4bit"``, ...).
        base_layer: that backend's storage format (``"bitsandbytes"``, ...), ``None`` for a float weight.
    """

    path: str
    module: nn.Module
    kind: ProjectionKind
    backend: str
    base_layer: str | None = None


# --------------------------------------------------------------------------------------- reading PEFT layers


def fused_lora_unsupported_reason(module: nn.Module, adapter_name: str | None = None) -> str | None:
    """Why a PEFT LoRA layer cannot use the fused kernels right now, or None when it can.

    Refused: several active adapters, DoRA or another LoRA variant, a bias on ``lora_B`` (``lora_bias``),
    merged or disabled adapters, and active dropout (``lora_dropout`` > 0 while the module is training).

    Args:
        module: a PEFT LoRA layer (``peft.tuners.lora.LoraLayer``).
        adapter_name: adapter to use; defaults to the single active adapter.
    """
    if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
        return f"{type(module).__name__} is not a PEFT LoRA layer (no lora_A / base_layer)"
    if getattr(module, "disable_adapters", False):
        return "adapters are disabled on this layer"
    if getattr(module, "merged", False):
        return "the adapter is merged into the base weight"
    if adapter_name is None:
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) != 1:
            return f"the fused kernels handle exactly one active LoRA adapter, this layer has {active}"
        adapter_name = active[0]
    if adapter_name not in module.lora_A:
        return f"adapter {adapter_name!r} not found (have {list(module.lora_A.keys())})"
    if adapter_name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter_name):
        return "DoRA and other LoRA variants are not fused; use plain LoRA or leave fused_lora off"
    if module.lora_B[adapter_name].bias is not None:
        return "lora_bias=True is not supported by the fused kernels"
    dropout = module.lora_dropout[adapter_name]
    p = getattr(dropout, "p", 0.0)
    if module.training and dropout.training and p > 0:
        return (
            f"lora_dropout={p} is active; the fused kernels implement dropout 0 only. Set lora_dropout=0 in the "
            "LoraConfig (the usual QLoRA setting) or leave fused_lora off for this model"
        )
    return None


def base_projection(module: nn.Module, registry: DequantBackendRegistry) -> Any:
    """A ``LoraProjection`` without adapter of a frozen linear layer (or a PEFT layer's base layer): its weight
    read by the first matching dequant backend, and its bias. Call it inside a forward (FSDP gathering)."""
    from fms_acceleration_accelerate_kernels.lora import LoraProjection

    base = base_layer_of(module)
    return LoraProjection(base=registry.read(base), bias=getattr(base, "bias", None))


def peft_lora_projection(module: nn.Module, registry: DequantBackendRegistry, adapter_name: str | None = None) -> Any:
    """The ``LoraProjection`` (tensors only) of a PEFT LoRA layer; call it inside that layer's forward (FSDP).

    Args:
        module: a PEFT LoRA layer wrapping a linear (e.g. ``peft.tuners.lora.bnb.Linear4bit``).
        registry: dequant backends that read the base layer's weight (first match wins).
        adapter_name: adapter to use; defaults to the single active adapter.

    Returns:
        ``LoraProjection(base=<weight format of module.base_layer>, lora_A=A.weight, lora_B=B.weight,
        scaling=..., bias=<base layer's bias>)``.

    Raises:
        ValueError: the layer cannot be fused (see ``fused_lora_unsupported_reason``).
        TypeError: no dequant backend reads the base layer.
    """
    from fms_acceleration_accelerate_kernels.lora import LoraProjection

    reason = fused_lora_unsupported_reason(module, adapter_name)
    if reason is not None:
        raise ValueError(f"cannot fuse LoRA layer {type(module).__name__}: {reason}")
    if adapter_name is None:
        adapter_name = next(a for a in module.active_adapters if a in module.lora_A)
    base = base_projection(module.get_base_layer(), registry)
    return LoraProjection(
        base=base.base,
        lora_A=module.lora_A[adapter_name].weight,
        lora_B=module.lora_B[adapter_name].weight,
        scaling=float(module.scaling[adapter_name]),
        bias=base.bias,
    )


def classify_projection(path: str, module: nn.Module, registry: DequantBackendRegistry) -> Projection:
    """Classify one projection and check that the fused kernels can handle it.

    Raises:
        ModelStructureError: a LoRA layer the kernels cannot fuse (DoRA, dropout > 0, several adapters,
            ``lora_bias``), or a base layer type no dequant backend handles; the message names the module.
    """
    try:
        backend = registry.backend_for(module)
    except TypeError as exc:
        raise ModelStructureError(f"projection {path}: {exc}", fix="set fused_lora/fused_dequant: false") from None
    if not is_peft_lora_layer(module):
        kind = "dense" if backend.base_layer is None else "quantized"
        return Projection(path, module, kind, backend.name, backend.base_layer)
    reason = fused_lora_unsupported_reason(module)
    if reason is None:
        active = [a for a in module.active_adapters if a in module.lora_A]
        p = float(getattr(module.lora_dropout[active[0]], "p", 0.0))
        if p > 0:
            reason = f"lora_dropout={p}; the fused kernels implement dropout 0 only"
    if reason is not None:
        raise ModelStructureError(
            f"LoRA layer {path} cannot be fused: {reason}",
            fix="use a LoraConfig with lora_dropout=0, one adapter and no DoRA / lora_bias, or set fused_lora: false",
        )
    return Projection(path, module, "lora", backend.name, backend.base_layer)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class FusedLoraReport:
    """What :func:`patch_fused_lora` did.

    Attributes:
        lora: paths of LoRA projections now computed by fused kernels.
        quantized: paths of adapter-less quantized projections now computed by fused dequant kernels.
        scopes: attention / MLP modules whose sub-module weights the patched forwards read (for FSDP checks).
        backends: dequant backend names seen on fused projections.
        base_layers: storage formats (``DequantBackend.base_layer``) seen on fused projections; empty when every
            fused base is a float weight.
        whole_mlps: ``id()`` of MLP modules whose whole forward (activation included) a fused kernel replaced.
    """

    lora: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    scopes: list[MatchedModule] = field(default_factory=list)
    backends: set[str] = field(default_factory=set)
    base_layers: set[str] = field(default_factory=set)
    whole_mlps: set[int] = field(default_factory=set)

    def add(self, projection: Projection) -> None:
        if projection.kind == "lora":
            self.lora.append(projection.path)
        elif projection.kind == "quantized":
            self.quantized.append(projection.path)
        self.backends.add(projection.backend)
        if projection.base_layer is not None:
            self.base_layers.add(projection.base_layer)


class ProjectionReader:
    """Reads one projection's ``LoraProjection`` inside a forward, with as little Python as each call needs.

    A patched forward runs at every training step (and again in checkpoint recomputation), so the decisions that
    depend only on the layer are taken once and taken again only when their inputs change:

    * per module object and base layer object (both held by weak reference, never kept alive): whether the module is
      a PEFT LoRA layer and which dequant backend reads its base layer (the backend's ``weight_format`` is checked
      on that first read);
    * per adapter state of a LoRA layer, the key ``(disable_adapters, merged, active_adapters, training)``: whether
      the layer can be fused now (:func:`fused_lora_unsupported_reason`) and which adapter it uses.

    The tensors (base weight, bias, ``lora_A`` / ``lora_B`` weights) and the scaling are read at every call, so
    the parameters FSDP gathered for this forward and PEFT's ``set_scale`` are always the ones used.
    """

    __slots__ = ("_adapter", "_backend", "_base", "_lora", "_module", "_state", "registry")

    def __init__(self, registry: DequantBackendRegistry) -> None:
        self.registry = registry
        self._module: Any = None
        self._base: Any = None
        self._lora = False
        self._backend: Any = None
        self._state: tuple | None = None
        self._adapter: str | None = None

    def _bind(self, module: nn.Module, base: nn.Module) -> None:
        backend = self.registry.backend_for(base)
        backend.read_weight(base)  # checks once that the backend returns its declared weight format
        self._lora = is_peft_lora_layer(module)
        self._backend = backend
        self._state = None
        self._adapter = None
        self._module = weakref.ref(module)
        self._base = weakref.ref(base)

    def read(self, module: nn.Module) -> Any | None:
        """The ``LoraProjection`` of ``module`` (tensors read now), or None when its LoRA layer cannot be fused in
        its current state (disabled / merged adapters, several active adapters, active dropout, ...)."""
        from fms_acceleration_accelerate_kernels.lora import LoraProjection

        base = base_layer_of(module)
        if self._module is None or self._module() is not module or self._base() is not base:
            self._bind(module, base)
        if not self._lora:
            return LoraProjection(base=self._backend.read(base), bias=getattr(base, "bias", None))
        state = (
            getattr(module, "disable_adapters", False),
            getattr(module, "merged", False),
            tuple(module.active_adapters),
            module.training,
        )
        if state != self._state:
            reason = fused_lora_unsupported_reason(module)
            self._adapter = next(a for a in module.active_adapters if a in module.lora_A) if reason is None else None
            self._state = state
        adapter = self._adapter
        if adapter is None:
            return None
        return LoraProjection(
            base=self._backend.read(base),
            lora_A=module.lora_A[adapter].weight,
            lora_B=module.lora_B[adapter].weight,
            scaling=float(module.scaling[adapter]),
            bias=getattr(base, "bias", None),
        )


def _read_all(readers: Sequence[ProjectionReader], modules: Sequence[nn.Module]) -> list[Any] | None:
    """Every module's projection, or None when one of them cannot be fused now."""
    projections = []
    for reader, module in zip(readers, modules):
        projection = reader.read(module)
        if projection is None:
            return None
        projections.append(projection)
    return projections


def _single_forward(
    module: nn.Module, previous: Callable[..., Any], registry: DequantBackendRegistry
) -> Callable[..., Any]:
    reader = ProjectionReader(registry)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        from fms_acceleration_accelerate_kernels.lora import lora_linear

        p = None if (args or kwargs) else reader.read(module)
        if p is None:
            return previous(x, *args, **kwargs)
        return lora_linear(x, p.base, p.lora_A, p.lora_B, p.scaling, p.bias)

    return forward


class QKVGroup:
    """One fused q/k/v computation shared by the forwards of the three projections of one attention module.

    ``q_forward`` computes q, k and v with ``lora_qkv`` and keeps k and v for ``k_forward`` / ``v_forward``,
    which return them only when called with the very same input tensor (the attention forward calls
    ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` in that order); anything else runs the projection's previous
    forward. Each kept tensor is dropped as soon as it is handed out. The three modules are read from the
    attention module by ``names`` at every call (another plugin may replace one after this patch; see
    ``_glu_mlp_forward``).
    """

    def __init__(self, attention: nn.Module, names: Sequence[str], registry: DequantBackendRegistry) -> None:
        assert len(names) == 3
        self.attention = attention
        self.names = tuple(names)
        self.previous = tuple(getattr(attention, n).forward for n in names)
        self.registry = registry
        self.readers = tuple(ProjectionReader(registry) for _ in names)
        self._kept: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        return tuple(getattr(self.attention, n) for n in self.names)

    def q_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        from fms_acceleration_accelerate_kernels.lora import lora_qkv

        self._kept = [None, None]
        projections = None if (args or kwargs) else _read_all(self.readers, self.modules)
        if projections is None:
            return self.previous[0](x, *args, **kwargs)
        q, k, v = lora_qkv(x, *projections)
        self._kept = [(x, k), (x, v)]
        return q

    def _take(self, index: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        kept = self._kept[index]
        self._kept[index] = None
        if kept is not None and kept[0] is x and not args and not kwargs:
            return kept[1]
        return self.previous[index + 1](x, *args, **kwargs)

    def k_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._take(0, x, args, kwargs)

    def v_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._take(1, x, args, kwargs)


def _glu_mlp_forward(
    mlp: nn.Module,
    names: Sequence[str],
    previous: Callable[..., Any],
    registry: DequantBackendRegistry,
    activation: tuple[str, str | None],
    recompute: RecomputeState | None = None,
) -> Callable[..., Any]:
    """Whole gated-MLP forward as one fused kernel: ``lora_mlp_swiglu`` (SiLU) or ``lora_mlp_geglu`` (GELU).

    The gate/up/down modules are read from ``mlp`` by ``names`` at every call, never captured: another plugin
    may replace them after this patch (the bitsandbytes plugin swaps 4-bit layers for FSDP2-shardable ones in
    ``prepare``), and a captured module would keep the replaced layer and its full weight alive and in use.
    With ``recompute``, a checkpoint recomputation skips the down projection (see ``recompute.py``).
    """
    kind, approximate = activation
    readers = tuple(ProjectionReader(registry) for _ in names)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        from fms_acceleration_accelerate_kernels.lora import lora_mlp_geglu, lora_mlp_swiglu

        projections = None if (args or kwargs) else _read_all(readers, [getattr(mlp, n) for n in names])
        if projections is None:
            return previous(x, *args, **kwargs)
        compute_output = recompute.compute_output() if recompute is not None else True
        if kind == "silu":
            return lora_mlp_swiglu(x, *projections, compute_output=compute_output)
        return lora_mlp_geglu(x, *projections, approximate=approximate or "none", compute_output=compute_output)

    return forward


def _wanted(projection: Projection, fused_lora: bool, fused_dequant: bool) -> bool:
    return (projection.kind == "lora" and fused_lora) or (projection.kind == "quantized" and fused_dequant)


def patch_fused_lora(
    match: ModelMatch,
    patches: PluginPatcher,
    *,
    fused_lora: bool,
    fused_dequant: bool,
    registry: DequantBackendRegistry,
    recompute: RecomputeState | None = None,
) -> FusedLoraReport:
    """Patch the fused LoRA / fused dequant kernels into every attention and MLP of the model.

    Args:
        match: the model's matched modules.
        patches: the plugin's patcher.
        fused_lora: fuse PEFT LoRA projections.
        fused_dequant: fuse adapter-less quantized projections.
        registry: the framework's dequant backends, which read every base layer (first match wins).
        recompute: when given, whole fused MLPs skip their down projection in checkpoint recomputations
            (only pass it for architectures whose spec has ``mlp_output_only_to_residual``).

    Returns:
        A :class:`FusedLoraReport` (empty lists mean nothing was patched; the caller decides if that is an error).
    """
    spec: ArchitectureSpec = match.spec
    report = FusedLoraReport()

    def projections(owner: MatchedModule, names: Sequence[str]) -> list[Projection]:
        return [classify_projection(_join(owner.path, n), getattr(owner.module, n), registry) for n in names]

    def patch_single(p: Projection) -> None:
        patches.patch_forward(
            p.module,
            _single_forward(p.module, p.module.forward, registry),
            target=p.path,
            description=f"kernels.{'lora_linear' if p.kind == 'lora' else 'quantized_linear'} [{p.backend}]",
        )
        report.add(p)

    for attention in match.attentions:
        before = len(report.lora) + len(report.quantized)
        inputs = projections(attention, spec.attention.input_projections)
        if len(inputs) == 3 and any(_wanted(p, fused_lora, fused_dequant) for p in inputs):
            group = QKVGroup(attention.module, spec.attention.input_projections, registry)
            for p, fn in zip(inputs, (group.q_forward, group.k_forward, group.v_forward)):
                patches.patch_forward(
                    p.module, fn, target=p.path, description=f"kernels.lora_qkv [{p.backend}] ({p.kind})"
                )
                report.add(p)
        else:
            for p in inputs:
                if _wanted(p, fused_lora, fused_dequant):
                    patch_single(p)
        (o_proj,) = projections(attention, (spec.attention.o_proj,))
        if _wanted(o_proj, fused_lora, fused_dequant):
            patch_single(o_proj)
        if len(report.lora) + len(report.quantized) > before:
            report.scopes.append(attention)

    mlp_spec = spec.mlp
    for mlp in match.mlps:
        assert mlp_spec is not None
        before = len(report.lora) + len(report.quantized)
        members = projections(mlp, mlp_spec.projections)
        glu_group = mlp_spec.kind == "glu" and mlp_spec.gate_up_proj is None
        if glu_group and any(_wanted(p, fused_lora, fused_dequant) for p in members):
            activation = activation_of(mlp.module, mlp_spec)
            kernel = "lora_mlp_swiglu" if activation[0] == "silu" else "lora_mlp_geglu"
            patches.patch_forward(
                mlp.module,
                _glu_mlp_forward(mlp.module, mlp_spec.projections, mlp.module.forward, registry, activation, recompute),
                target=mlp.path,
                description=f"kernels.{kernel} [" + ",".join(sorted({p.backend for p in members})) + "]",
            )
            for p in members:
                report.add(p)
            report.whole_mlps.add(id(mlp.module))
        else:
            for p in members:
                if _wanted(p, fused_lora, fused_dequant):
                    patch_single(p)
        if len(report.lora) + len(report.quantized) > before:
            report.scopes.append(mlp)
    return report


def fsdp_units_inside(module: nn.Module) -> list[str]:
    """Names of FSDP units (FSDP1 ``FullyShardedDataParallel`` or FSDP2 ``fully_shard`` modules) strictly
    inside ``module``."""
    unit_types: list[type] = []
    try:
        from torch.distributed.fsdp import FSDPModule

        unit_types.append(FSDPModule)
    except ImportError:  # pragma: no cover - torch < 2.6
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        unit_types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    if not unit_types:
        return []
    return [n for n, m in module.named_modules() if n and isinstance(m, tuple(unit_types))]
