"""The fused-ops-and-kernels plugin: patches Triton kernels into model instances, driven by the model specs.

Which hook does what
--------------------
Each kind of patch is made in one phase; :mod:`.phases` decides (``PATCH_PHASES``, ``fused_phase``):

* ``check_compatibility`` / ``check_model_type`` / ``check_run_settings`` (before any model): refuse option,
  architecture and run combinations the kernels cannot serve.
* ``augmentation`` (after any LoRA-adding plugin, which runs earlier in the order), or, when a script never
  calls it (the section came with the Accelerate config and the script only calls ``Accelerator.prepare``),
  ``prepare_contribution`` just before wrapping -- phase ``MODEL``: RMSNorm, RoPE, the gated-MLP activation and
  the loss. Their replacement forwards read only the weights of the module they replace (or none), so FSDP
  wrapping before or after makes no difference.
* Fused LoRA / fused dequant read the weights of *sub-modules* (``q_proj.lora_A.default.weight`` inside the
  patched ``q_proj``, the three MLP projections inside the patched MLP). ``fused_phase`` puts them

  - in ``after_prepare`` when the run context says FSDP (phase ``AFTER_WRAP``; the context comes from the
    launcher's environment, the training arguments' ``fsdp`` or the ``Accelerator``).
    ``prepare_contribution`` declares every attention and MLP module a *fused scope*, so no FSDP unit is created
    inside them and the decoder-layer unit's all-gather covers every weight the kernels read; ``after_prepare``
    checks that no unit ended up inside a patched module.
  - when LoRA is not on the model yet but a ``LoraConfig`` is among the modifiable arguments (the trainer adds it
    later), in ``get_callbacks_and_ready_for_train`` (given the PEFT model) or ``after_prepare``, whichever comes
    first (phase ``LORA_ADDED``; under DeepSpeed in ``prepare_contribution`` at the latest, before the engine
    exists);
  - otherwise with the other kernels (phase ``MODEL``).

  Under DeepSpeed ZeRO-3 the same fused scopes get their inner parameters gathered by DeepSpeed at their own
  forward and backward (the framework registers them as the scopes' ZeRO-3 external parameters before Accelerate
  builds the engine), so the fused kernels read whole weights. Under ZeRO-0/1/2 parameters are whole on every
  rank and nothing is needed. The other kernels read only the weights of the module whose forward they replace
  (RMSNorm), or call the modules (SwiGLU's projections, ``lm_head`` for the
  fused linear cross-entropy), so DeepSpeed's own hooks gather what they read.
* ``check_prepared_model``: at ``Accelerator.prepare``, refuse a model on which fused kernels still to be patched
  would find nothing (no LoRA layers, no 4-bit layers).
* ``after_prepare`` and ``get_callbacks_and_ready_for_train`` (phase ``TRAINER_READY``, idempotent): the second
  phase of ``fast_loss`` -- a TRL trainer puts its fused LM head on the model while it is built, after the loss
  was patched, and the loss kernels then serve that head too -- and the recompute context of ``lean_recompute``
  / ``checkpoint_keep_attention`` (checkpointing is usually enabled after patching).

No silent no-ops: every requested kernel must patch at least one module, or the hook raises an error naming the
architecture, the option and the modules it checked. Unsupported architectures and options an architecture
cannot use (RoPE on GPTBigCode, ...) are refused in ``check_model_type``, before the model is loaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fms_acceleration_accelerate.dequant import DequantBackend, DequantBackendRegistry
from fms_acceleration_accelerate.distributed import PrepareContribution, RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.model_specs import (
    ARCHITECTURE_SPECS,
    ArchitectureSpec,
    ModelMatch,
    ModelStructureError,
    architecture_spec,
    check_spec_classes,
    match_model,
)
from fms_acceleration_accelerate.plugin import AccelerationPlugin

from .config import FusedOpsAndKernelsConfig
from .fast_loss import FastLoss
from .fused_lora import FusedLoraReport, fsdp_units_inside, is_peft_lora_layer, patch_fused_lora
from .patches import (
    patch_glu_mlps,
    patch_rms_norms,
    patch_rotary,
)
from .phases import Phase, fused_phase
from .recompute import RecomputeState, install_attention_scopes, install_recompute_context

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from torch import nn
    from transformers import TrainerCallback

_NOT_STARTED, _PENDING, _DONE = "not started", "pending", "done"

logger = logging.getLogger("fms_acceleration_accelerate_foak")

_NO_LORA_FIX = (
    "add LoRA before the kernels are patched: a peft LoraConfig as the trainer's peft_config or in "
    "framework.augmentation(model, args, modifiable_args=(lora_config,)), or get_peft_model(model, lora_config) "
    "before Accelerator.prepare; for full fine-tuning set fused_lora: false"
)
_NO_4BIT_FIX = (
    "load the model in 4 bit through the bitsandbytes plugin (peft.quantization.bitsandbytes with "
    "framework.model_loader, or from_pretrained / a trainer given the model path under 'accelerate launch' with "
    "the section); for a 16/32-bit model set fused_dequant: false and remove base_layer"
)


_GPTQ_FIX = (
    "load the GPTQ checkpoint through the GPTQ plugin (peft.quantization.auto_gptq with framework.model_loader, or "
    "from_pretrained / a trainer given the checkpoint path under 'accelerate launch' with the section); for a "
    "16/32-bit model set fused_dequant: false and remove base_layer"
)
_FORMAT_WORDS = {"bitsandbytes": "bitsandbytes 4-bit", "auto_gptq": "GPTQ"}
"""``base_layer`` value -> the storage format in words, for messages."""


def _is_4bit(module: Any, registry: DequantBackendRegistry, base_layer: str = "bitsandbytes") -> bool:
    """A layer that a dequant backend of storage format ``base_layer`` reads (bitsandbytes' ``Linear4bit``, the
    bitsandbytes plugin's FSDP2 packed form of one, the GPTQ plugin's ``GPTQLinear``, ...); PEFT's LoRA wrapper of
    one is not such a layer itself."""
    return any(b.handles(module) for b in registry.for_base_layer(base_layer))


def _no_lora_problem(model: Any, when: str) -> str:
    return (
        f"fused_lora needs PEFT LoRA layers to fuse, but the model has none {when} "
        f"({type(model).__name__} without adapters: LoRA was not added, or is added only later)"
    )


def _no_4bit_problem(option: str, base_layer: str | None = "bitsandbytes") -> str:
    if base_layer == "auto_gptq":
        what = "adapter-less GPTQ projections" if option == "fused_dequant" else "GPTQ base layers"
        return (
            f"{option} needs {what}, but the model has no GPTQ layer: it was not loaded by the GPTQ plugin "
            "(peft.quantization.auto_gptq)"
        )
    what = "adapter-less 4-bit projections" if option == "fused_dequant" else "4-bit bitsandbytes base layers"
    return (
        f"{option} needs {what}, but the model has no 4-bit layer: it was loaded unquantized (a 4-bit model comes "
        "from the bitsandbytes plugin's loader, or from_pretrained with a BitsAndBytesConfig)"
    )


def _loads_bitsandbytes_layers(plugin: AccelerationPlugin, registry: DequantBackendRegistry) -> bool:
    """Whether ``plugin`` loads the model with bitsandbytes-format 4-bit layers (it loads models and contributes a
    dequant backend whose ``base_layer`` is ``"bitsandbytes"``, as the bitsandbytes plugin does)."""
    return "bitsandbytes" in _loaded_formats(plugin, registry)


def _loaded_formats(plugin: AccelerationPlugin, registry: DequantBackendRegistry) -> list[str]:
    """The quantized storage formats (``base_layer`` values) of the layers ``plugin`` loads: those of the dequant
    backends it contributes, when it loads models (the bitsandbytes plugin: ``bitsandbytes``; the GPTQ plugin:
    ``auto_gptq``)."""
    if not plugin.requires_custom_loading:
        return []
    found = (b.base_layer for b in registry.contributed_by(plugin.plugin_name()) if b.base_layer is not None)
    return list(dict.fromkeys(found))


def _unwrap_data_parallel(model: Any) -> Any:
    """The module inside DDP / DataParallel wrappers and DeepSpeed's engine (``Accelerator.prepare`` returns DDP on
    several processes, a ``DeepSpeedEngine`` under DeepSpeed; FSDP wrappers need no unwrapping: they expose the
    model's attributes)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)) or _is_deepspeed_engine(model):
        model = model.module
    return model


def _is_deepspeed_engine(model: Any) -> bool:
    """A ``deepspeed.DeepSpeedEngine`` (found by class, without importing deepspeed)."""
    return any(
        c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed") for c in type(model).__mro__
    ) and hasattr(model, "module")


def _has_unapplied_lora_config(modifiable_args: Sequence[Any]) -> bool:
    return any(type(a).__name__ == "LoraConfig" for a in modifiable_args)


class FusedOpsAndKernelsPlugin(AccelerationPlugin):
    """Patches the kernels of ``fms-acceleration-accelerate-kernels`` into a causal LM (see the module doc)."""

    name = "fused_ops_and_kernels"
    configuration_or_paths = ("training.fused_ops_and_kernels", "peft.quantization.fused_ops_and_kernels")
    config_class = FusedOpsAndKernelsConfig
    required_packages = ("fms-acceleration-accelerate-kernels", "triton>=3.6")
    install_hint = "pip install fms-acceleration-accelerate-foak fms-acceleration-accelerate-kernels 'triton>=3.6'"
    supported_model_types = tuple(ARCHITECTURE_SPECS)
    order = 300
    config: FusedOpsAndKernelsConfig

    def __init__(self, config: FusedOpsAndKernelsConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._active: tuple[AccelerationPlugin, ...] = ()  # the other active plugins (check_compatibility)
        self._augmented = False
        self._fused_state = _NOT_STARTED if (config.fused_lora or config.fused_dequant) else _DONE
        self._fused_report: FusedLoraReport | None = None
        self._fused_phase: Phase | None = None
        """When the fused LoRA / dequant kernels are patched (:func:`.phases.fused_phase`; ``None``: not chosen)."""
        self.patch_counts: dict[str, int] = {}
        """Option name -> how many patches it made (filled as the hooks run)."""
        self.fast_loss = FastLoss(config.loss_mode) if config.loss_mode != "none" else None
        """The loss patches (HF Trainer or TRL fused-head contract) and their kernel call counts."""
        self.recompute = RecomputeState(keep_attention=config.checkpoint_keep_attention)
        """Set during checkpoint recomputations (``lean_recompute``, ``checkpoint_keep_attention``);
        ``recompute.skipped`` / ``.kept`` count what they did."""
        self.recompute_status = "not installed yet"
        """``lean_recompute``'s state: on for N layers, inactive (why), or not applicable."""
        self.keep_attention_status = "on request only" if not config.checkpoint_keep_attention else "not installed yet"
        """``checkpoint_keep_attention``'s state: on for N layers, or inactive (why)."""

    # ------------------------------------------------------------------------------------------- checks
    def _path(self, key: str | None = None) -> str:
        base = self.matched_paths[0] if self.matched_paths else "fused_ops_and_kernels"
        return f"{base}.{key}" if key else base

    def check_compatibility(self, active: Sequence[AccelerationPlugin]) -> None:
        """Refuse combinations whose fused kernels would stop the run after the model is loaded:

        * ``base_layer: auto_gptq`` without a plugin contributing a GPTQ dequant backend (``base_layer``
          ``"auto_gptq"``) to the framework's registry;
        * fused kernels with ``base_layer: bitsandbytes`` while a plugin that loads no bitsandbytes 4-bit layers
          loads the model;
        * fused LoRA without ``base_layer`` while the bitsandbytes plugin loads a 4-bit model.

        (``base_layer: bitsandbytes`` with no loading plugin is accepted: the script may load the model in 4 bit
        itself, with transformers' ``BitsAndBytesConfig``; see :meth:`describe`.)

        Plugins contribute dequant backends through the ``dequant_backends()`` hook; the framework's registry
        orders them by plugin run order (loaders before this plugin, whose own backends come last).
        """
        self._active = tuple(p for p in active if p is not self)
        registry = self._registry()
        c = self.config
        if c.base_layer == "auto_gptq" and not registry.for_base_layer("auto_gptq"):
            raise AccelerationConfigError(
                "base_layer: auto_gptq needs a GPTQ dequant backend, which the GPTQ plugin provides; no active plugin "
                "provides one (the peft.quantization.auto_gptq section is missing)",
                path=self._path("base_layer"),
                fix="add the peft.quantization.auto_gptq section (the GPTQ plugin loads the GPTQ checkpoint), or use "
                "a bitsandbytes QLoRA model with base_layer: bitsandbytes, or remove base_layer and fused_lora for "
                "this model",
            )
        if not (c.fused_lora or c.fused_dequant):
            return
        loaders = [p for p in active if p is not self and p.requires_custom_loading]
        formats = [f for p in loaders for f in _loaded_formats(p, registry)]
        if c.base_layer is not None and loaders and c.base_layer not in formats:
            plugin = {"bitsandbytes": "bitsandbytes plugin (peft.quantization.bitsandbytes)"}.get(
                c.base_layer, "GPTQ plugin (peft.quantization.auto_gptq)"
            )
            raise AccelerationConfigError(
                f"base_layer: {c.base_layer}, but the model is loaded by plugin {loaders[0].plugin_name()!r}, which "
                f"loads no {_FORMAT_WORDS[c.base_layer]} layers, so the fused kernels would find none after loading",
                path=self._path("base_layer"),
                fix=f"load the model with the {plugin}, or set the base_layer of the loading plugin's format"
                + (f" (base_layer: {formats[0]})" if formats else ""),
            )
        if c.base_layer is None and formats:
            quantized_loader = next(p for p in loaders if _loaded_formats(p, registry))
            what = "4-bit" if formats[0] == "bitsandbytes" else _FORMAT_WORDS.get(formats[0], formats[0])
            raise AccelerationConfigError(
                f"fused_lora over the {what} layers that plugin {quantized_loader.plugin_name()!r} loads needs "
                f"base_layer: {formats[0]} (without it the run stops after the model is loaded)",
                path=self._path("base_layer"),
                fix=f"set base_layer: {formats[0]}",
            )

    def check_model_type(self, model_type: str | None) -> None:
        """Refuse architectures without a spec, specs the installed transformers does not match, and options
        the architecture cannot use (raised before the model is loaded)."""
        super().check_model_type(model_type)
        spec = architecture_spec(model_type, path=self._path())
        check_spec_classes(spec)
        self._check_options(spec)

    def _check_options(self, spec: ArchitectureSpec) -> None:
        c = self.config
        problems: list[tuple[str, str]] = []
        if c.fast_rms_layernorm and not spec.has_rms_norm:
            problems.append(("fast_rms_layernorm", f"its norms are {spec.norm.kind}, not RMSNorm"))
        if c.fast_rope_embeddings and spec.rotary is None:
            problems.append(("fast_rope_embeddings", "it has no rotary embedding (learned absolute positions)"))
        if c.fast_swiglu and not spec.has_glu_mlp:
            why = "its MoE experts are 3-D parameter tensors" if spec.mlp is None else "its MLP is not gated"
            problems.append(("fast_swiglu", why))
        if problems:
            option, why = problems[0]
            raise AccelerationConfigError(
                f"{option} cannot be used with {spec.model_type}: {why}",
                path=self._path(option),
                fix=f"set {option}: false for {spec.model_type} models",
            )

    # ------------------------------------------------------------------------------------------- hooks
    def augmentation(
        self, model: nn.Module, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[nn.Module, tuple[Any, ...]]:
        """Phase ``MODEL``: patch the kernels (fused LoRA possibly later, as :func:`.phases.fused_phase` decides from
        ``self.run_context``, which the framework refined with ``train_args``); returns the same model."""
        if self._augmented:
            raise RuntimeError(
                f"{self.plugin_name()}: augmentation already ran on this framework; revert it first "
                "(framework.revert()) before patching another model"
            )
        self._patch_model(model, modifiable_args, self.run_context)
        return model, modifiable_args

    def _patch_model(self, model: nn.Module, modifiable_args: Sequence[Any], context: RunContext) -> None:
        """The ``MODEL`` phase (see :mod:`.phases`), from ``augmentation`` or ``prepare_contribution``."""
        self._augmented = True
        spec, match = self._match(model)
        c = self.config
        if c.fast_rms_layernorm:
            self._count("fast_rms_layernorm", patch_rms_norms(match, self.patches), spec)
        if c.fast_rope_embeddings:
            self._count("fast_rope_embeddings", patch_rotary(spec, self.patches), spec)

        if self._fused_state == _NOT_STARTED:
            self._fused_phase = fused_phase(
                context,
                has_lora=any(is_peft_lora_layer(m) for _, m in model.named_modules()),
                lora_config_pending=_has_unapplied_lora_config(modifiable_args),
                fused_lora=c.fused_lora,
            )
            if self._fused_phase is Phase.MODEL:
                self._apply_fused(model)
            else:
                self._fused_state = _PENDING

        if c.fast_swiglu:
            skip = self._fused_report.whole_mlps if self._fused_report is not None else set()
            count = patch_glu_mlps(match, self.patches, skip=skip)
            if self._fused_report is not None and self._fused_report.whole_mlps:
                count += len(self._fused_report.whole_mlps)  # the fused MLP kernel includes the activation
            self._count("fast_swiglu", count, spec)
        if self.fast_loss is not None:
            self._count("fast_loss", self.fast_loss.patch(match, self.patches), spec)
        self._install_recompute(model)

    def _recompute_for(self, spec: ArchitectureSpec) -> RecomputeState | None:
        """The recompute state to hand to MLP patches, or None when lean recomputation does not apply."""
        return self.recompute if self.config.lean_recompute and spec.mlp_output_only_to_residual else None

    def _install_recompute(self, model: Any) -> None:
        """Route the decoder layers' checkpoint recomputation through ``self.recompute`` (idempotent).

        Runs after patching and again after ``Accelerator.prepare`` / at ``get_callbacks_and_ready_for_train``,
        because checkpointing is usually enabled after the model is patched.
        """
        keep = self.config.checkpoint_keep_attention
        lean_requested = self.config.lean_recompute and self._patched_mlps
        if not (lean_requested or keep):
            return
        model = _unwrap_data_parallel(model)
        spec, match = self._match(model)
        lean = lean_requested and self._recompute_for(spec) is not None
        if lean_requested and not lean:
            self.recompute_status = f"not applicable to {spec.model_type} (an op after the MLP saves its output)"
        if not (lean or keep):
            return
        wrapped, reason = install_recompute_context(match, self.patches, self.recompute)
        if keep:
            install_attention_scopes(match, self.patches, self.recompute)
        for wanted, attribute in ((lean, "recompute_status"), (keep, "keep_attention_status")):
            if not wanted:
                continue
            if wrapped:
                setattr(self, attribute, f"on for {wrapped} decoder layers")
            elif reason and not getattr(self, attribute).startswith("on"):
                setattr(self, attribute, f"inactive: {reason}")

    @property
    def _patched_mlps(self) -> bool:
        """Whether a fused kernel computes some MLP as a whole (one autograd function whose saved tensors are
        packed after its forward ran, so checkpoint early stop cannot skip its down projection; a plain
        ``nn.Linear`` down projection saves its inputs before its GEMM and early stop already skips it)."""
        return self._fused_report is not None and bool(self._fused_report.whole_mlps)

    def check_prepared_model(self, model: nn.Module, context: RunContext) -> None:
        """Refuse, at ``Accelerator.prepare``, a model on which the fused LoRA / dequant kernels still to be patched
        would have nothing to do: ``fused_lora`` needs PEFT LoRA layers on the model (added by a plugin's
        augmentation, a trainer's ``peft_config`` or ``get_peft_model`` before prepare), ``fused_dequant`` and
        ``base_layer: bitsandbytes`` need 4-bit layers. Kernels already patched in ``augmentation`` were checked
        there."""
        if self._fused_state == _DONE:
            return
        model = _unwrap_data_parallel(model)
        modules = list(model.modules())
        c = self.config
        if c.fused_lora and not any(is_peft_lora_layer(m) for m in modules):
            raise AccelerationConfigError(
                _no_lora_problem(model, "at Accelerator.prepare"),
                path=self._path("fused_lora"),
                fix=_NO_LORA_FIX,
            )
        quantized = c.fused_dequant or (c.base_layer is not None and c.fused_lora)
        base_layer = c.base_layer or "bitsandbytes"
        if quantized and not any(_is_4bit(m, self._registry(), base_layer) for m in modules):
            option = "fused_dequant" if c.fused_dequant else "base_layer"
            raise AccelerationConfigError(
                _no_4bit_problem(option, base_layer),
                path=self._path(option),
                fix=_GPTQ_FIX if base_layer == "auto_gptq" else _NO_4BIT_FIX,
            )

    def prepare_contribution(self, model: nn.Module, context: RunContext) -> PrepareContribution | None:
        """Phase ``MODEL`` if ``augmentation`` never ran (an Accelerate-only script: the section came with the
        Accelerate config), then, for fused LoRA, declare attention and MLP modules fused scopes (no FSDP
        unit inside them)."""
        if not self._augmented:
            self._patch_model(model, (), context)
        if context.is_deepspeed and self._fused_state == _PENDING:
            # DeepSpeed never hands the model back before training: patch now, before the engine exists (its
            # ZeRO-3 parameters are then still whole; the fused scopes below get what the kernels read gathered)
            self._apply_fused(_unwrap_data_parallel(model))
        if not (self.config.fused_lora or self.config.fused_dequant):
            return None

        spec = architecture_spec(model.config.model_type, path=self._path())
        scopes = [*spec.attention.class_names, *(spec.mlp.class_names if spec.mlp is not None else ())]
        if context.is_deepspeed:
            note = (
                f"fused LoRA kernels read q/k/v and MLP projection weights inside {', '.join(scopes)}; under "
                "ZeRO-3 DeepSpeed gathers them at these modules' forward and backward (external parameters)"
            )
        else:
            note = (
                f"fused LoRA kernels read q/k/v and MLP projection weights inside {', '.join(scopes)}; no FSDP unit "
                "may be created inside them"
            )
        return PrepareContribution(fused_scopes=tuple(scopes), notes=(f"{self.plugin_name()}: {note}",))

    def check_run_settings(self, context: RunContext) -> None:
        """FSDP1 + mixed precision + fused LoRA over 4-bit bases: the fused scopes keep adapters and packed storage
        in one FSDP1 unit, whose flat parameter Accelerate upcasts to fp32 under mixed precision (casting the
        packed bytes). Refused here, before loading; ``Accelerator.prepare`` checks the unit plan itself too."""
        quantized = self.config.base_layer is not None and (self.config.fused_lora or self.config.fused_dequant)
        if context.fsdp_version == 1 and context.mixed_precision != "no" and quantized:
            raise AccelerationConfigError(
                f"FSDP1 with mixed_precision {context.mixed_precision!r} and fused kernels over "
                f"{self.config.base_layer} 4-bit bases: Accelerate upcasts the FSDP1 unit holding the adapters to "
                "fp32, and the fused kernels keep the packed 4-bit storage in that same unit",
                path=self._path("fused_lora"),
                fix="use fsdp_version: 2 (recommended), or mixed_precision: 'no' with the adapters in the storage "
                "dtype (bitsandbytes: fp32_lora_params: false), as launch_configs/accelerate-fsdp1-qlora-foak.yaml",
            )

    def describe_run(self, context: RunContext) -> list[str]:
        """Under DeepSpeed: what ZeRO does with the patched modules."""
        if not context.is_deepspeed:
            return []
        from fms_acceleration_accelerate.deepspeed_offload import describe_offload

        stage = context.zero_stage
        fused = self.config.fused_lora or self.config.fused_dequant
        offload = describe_offload(
            context,
            "the weights the kernels read are fetched from there whenever ZeRO-3 gathers them"
            + (" (each attention / MLP module's, at its forward and backward)" if fused else "")
            + "; the kernels only ever see whole weights on the compute device",
        )
        if stage == 3 and fused:
            return [
                "DeepSpeed ZeRO-3: kernels patched before the engine is built; the parameters inside every attention "
                "and MLP module (LoRA and base weights) are registered as that module's external parameters, so "
                "DeepSpeed gathers them at its forward and backward and the fused LoRA / dequant kernels read whole "
                "weights; the other kernels read only weights that DeepSpeed's own hooks gather",
                *offload,
            ]
        where = "parameters stay whole on every rank" if stage in (0, 1, 2) else "DeepSpeed's hooks gather weights"
        return [
            f"DeepSpeed ZeRO-{stage if stage is not None else '?'}: {where}; kernels patched before the engine is built",
            *offload,
        ]

    def contributes_under_fsdp2(self) -> bool:
        """Fused scopes (no FSDP unit inside attention / MLP modules) only with fused LoRA / dequant."""
        return self.config.fused_lora or self.config.fused_dequant

    def after_prepare(self, model: nn.Module, context: RunContext) -> None:
        """Phase ``AFTER_WRAP`` (and ``LORA_ADDED`` when ``get_callbacks_and_ready_for_train`` did not come first):
        apply pending fused LoRA kernels on the wrapped model; check FSDP units against patched modules. Then
        phase ``TRAINER_READY``."""
        model = _unwrap_data_parallel(model)
        if self._fused_state == _PENDING:
            self._apply_fused(model)
        if context.is_fsdp:
            self._check_fsdp(model)
        self._warn_detached_patches(model)
        self._install_recompute(model)
        self._adopt_trl_head(model)

    def _warn_detached_patches(self, model: Any) -> None:
        """Warn when a projection whose forward this plugin patched is no longer part of the model (another
        plugin replaced the layer in ``prepare``, e.g. bitsandbytes' FSDP2 conversion): that projection now runs
        its own, unfused forward. Happens when the kernels were patched before it was known that FSDP comes."""
        from torch import nn

        attached = {id(m) for m in model.modules()}
        detached = [
            r.target
            for r in self.patches.records
            if r.attribute == "forward" and isinstance(r.owner, nn.Module) and id(r.owner) not in attached
        ]
        if detached:
            warnings.warn(
                f"{self.plugin_name()}: {len(detached)} patched projections were replaced after patching and run "
                f"unfused (e.g. {', '.join(detached[:3])}); set ACCELERATE_USE_FSDP=true (as `accelerate launch` "
                "does) or pass training arguments with `fsdp` to augmentation, so that fused kernels are patched "
                "after FSDP preparation",
                stacklevel=2,
            )

    def get_callbacks_and_ready_for_train(
        self, model: nn.Module | None = None, accelerator: Accelerator | None = None
    ) -> list[TrainerCallback]:
        """Phase ``LORA_ADDED``: apply fused LoRA kernels left pending because the trainer added LoRA after
        augmentation (under FSDP they wait for ``after_prepare``). Then phase ``TRAINER_READY``."""
        if model is not None:
            model = _unwrap_data_parallel(model)
        if self._fused_state == _PENDING and model is not None and self._fused_phase is Phase.LORA_ADDED:
            self._apply_fused(model)
        if model is not None:
            self._install_recompute(model)
            self._adopt_trl_head(model)
        return []

    def _adopt_trl_head(self, model: Any) -> None:
        """Phase ``TRAINER_READY``, the second phase of ``fast_loss``: serve TRL's fused LM head with the loss kernels
        when a TRL trainer put one on the model after the loss was patched (see ``fast_loss.py``)."""
        if self.fast_loss is not None and self._augmented and getattr(model, "config", None) is not None:
            self.fast_loss.adopt_trl_head(self._match(model)[1], self.patches)

    def loss_kernel_calls(self) -> dict[str, int]:
        """``{patched target: calls that ran a loss kernel}`` for the loss patches in the patch table."""
        return self.fast_loss.kernel_calls(self.patches) if self.fast_loss is not None else {}

    # ------------------------------------------------------------------------------------------- helpers
    def _match(self, model: Any) -> tuple[ArchitectureSpec, ModelMatch]:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        self.check_model_type(model_type)
        spec = architecture_spec(model_type, path=self._path())
        return spec, match_model(model, spec)

    def _count(self, option: str, count: int, spec: ArchitectureSpec, checked: str = "") -> None:
        self.patch_counts[option] = self.patch_counts.get(option, 0) + count
        if count == 0:
            raise ModelStructureError(
                f"{option} patched nothing in this {spec.model_type} model{checked}",
                path=self._path(option),
                fix=f"set {option}: false, or check the model against its spec in "
                "fms_acceleration_accelerate/model_specs.py",
            )

    def dequant_backends(self) -> tuple[DequantBackend, ...]:
        """Contributes the backends of bitsandbytes' ``Linear4bit`` (``bnb_4bit``) and of float ``nn.Linear``
        layers (``dense``); see :mod:`.dequant_backends`."""
        from .dequant_backends import FOAK_DEQUANT_BACKENDS

        return FOAK_DEQUANT_BACKENDS

    def _registry(self) -> DequantBackendRegistry:
        """The framework's dequant backends (every active plugin's, in run order); this plugin's own when it was
        created outside a framework."""
        if self.dequant_registry is None:
            self.dequant_registry = DequantBackendRegistry.from_plugins((self,))
        return self.dequant_registry

    def _apply_fused(self, model: Any) -> None:
        spec, match = self._match(model)
        c = self.config
        report = patch_fused_lora(
            match,
            self.patches,
            fused_lora=c.fused_lora,
            fused_dequant=c.fused_dequant,
            registry=self._registry(),
            recompute=self._recompute_for(spec),
        )
        self._fused_report = report
        self._fused_state = _DONE
        checked = ", ".join(f"{a.path}.{n}" for a in match.attentions[:1] for n in spec.attention.projections) + (
            ", ..." if match.attentions else ""
        )
        if c.fused_lora and not report.lora:
            self.patch_counts["fused_lora"] = self.patch_counts.get("fused_lora", 0)
            lora = [n for n, m in model.named_modules() if is_peft_lora_layer(m)]
            if not lora:
                problem = _no_lora_problem(model, "when the kernels were patched")
            else:
                problem = (
                    f"fused_lora found no LoRA layer on the projections the {spec.model_type} spec names ({checked}); "
                    f"the model's LoRA layers are elsewhere, e.g. {', '.join(lora[:3])}"
                )
            raise ModelStructureError(problem, path=self._path("fused_lora"), fix=_NO_LORA_FIX)
        if c.fused_lora:
            self._count("fused_lora", len(report.lora), spec)
        if c.fused_dequant and not report.quantized:
            self.patch_counts["fused_dequant"] = self.patch_counts.get("fused_dequant", 0)
            base_layer = c.base_layer or "bitsandbytes"
            if not any(_is_4bit(m, self._registry(), base_layer) for m in model.modules()):
                raise ModelStructureError(
                    _no_4bit_problem("fused_dequant", base_layer),
                    path=self._path("fused_dequant"),
                    fix=_GPTQ_FIX if base_layer == "auto_gptq" else _NO_4BIT_FIX,
                )
            if not (c.fused_lora and report.base_layers):
                raise ModelStructureError(
                    "fused_dequant found no adapter-less 4-bit projection among the attention / MLP projections of "
                    f"this {spec.model_type} model (its 4-bit layers are elsewhere)",
                    path=self._path("fused_dequant"),
                    fix="set fused_dequant: false",
                )
            # every 4-bit projection has a LoRA adapter, and fused_lora computes those over their 4-bit bases
            logger.info(
                "%s: fused_dequant has nothing left to do: every 4-bit projection carries a LoRA adapter, which "
                "fused_lora computes over its 4-bit base",
                self.plugin_name(),
            )
        elif c.fused_dequant:
            self._count("fused_dequant", len(report.quantized), spec)
        registry = self._registry()
        quantized = sorted(n for n in report.backends if registry[n].base_layer is not None)
        if c.base_layer is not None and c.base_layer not in report.base_layers:
            raise ModelStructureError(
                f"base_layer: {c.base_layer}, but no fused projection has a {_FORMAT_WORDS[c.base_layer]} base "
                f"(found: {', '.join(sorted(report.backends)) or 'none'})",
                path=self._path("base_layer"),
                fix="load the GPTQ checkpoint through the GPTQ plugin (peft.quantization.auto_gptq), or remove "
                "base_layer for a bf16 model"
                if c.base_layer == "auto_gptq"
                else "load the model in 4 bit (BitsAndBytesConfig(load_in_4bit=True) or the bitsandbytes plugin), "
                "or remove base_layer for a bf16 model",
            )
        if c.base_layer is None and quantized:
            formats = sorted({str(registry[n].base_layer) for n in quantized})
            raise ModelStructureError(
                f"the fused projections have quantized bases ({', '.join(quantized)}) but base_layer is not set",
                path=self._path("base_layer"),
                fix=f"set base_layer: {formats[0]}",
            )

    def _check_fsdp(self, model: Any) -> None:
        report = self._fused_report
        if report is not None:
            for scope in report.scopes:
                inside = fsdp_units_inside(scope.module)
                if inside:
                    raise ModelStructureError(
                        f"FSDP units {', '.join(inside[:3])} were created inside {scope.path}, whose patched forward "
                        "reads their weights directly; they would be read sharded",
                        path=self._path("fused_lora"),
                        fix="let the framework choose the FSDP units (it honours this plugin's fused scopes), or "
                        "wrap whole decoder layers only",
                    )

    def describe(self) -> list[str]:
        """What will be patched (no model needed)."""
        c = self.config
        lines = [
            "kernels run in Triton on CUDA tensors (in the Triton interpreter with TRITON_INTERPRET=1), else as "
            "their pure-torch references",
        ]
        if c.fast_rms_layernorm:
            lines.append("fast_rms_layernorm: forward of every RMSNorm module (spec norm classes) -> kernels.rms_norm")
        if c.fast_rope_embeddings:
            lines.append(
                "fast_rope_embeddings: the architecture's module-level apply_rotary_pos_emb -> "
                "kernels.apply_rotary_pos_emb (process-wide for that architecture until revert)"
            )
        if c.fast_swiglu:
            lines.append("fast_swiglu: forward of every gated MLP -> projections + kernels.swiglu / kernels.geglu")
        if c.loss_mode == "cross_entropy":
            lines.append("fast_loss: causal LM loss_function -> kernels.cross_entropy (num_items_in_batch aware)")
        elif c.loss_mode == "fused_linear":
            lines.append(
                "fast_loss: causal LM forward in training with labels -> kernels.fused_linear_cross_entropy "
                "(logits not materialised, outputs.logits is None); otherwise the original forward"
            )
        if c.loss_mode != "none":
            per_token = {"fused_linear": "fused_linear_cross_entropy_per_token"}
            kernel = per_token.get(c.loss_mode, "cross_entropy_per_token on lm_head's logits")
            lines.append(
                "fast_loss under a TRL trainer (its fused LM head on the model): the forward's fused_lm_head=True "
                f"path -> kernels.{kernel} (log_probs, entropy, is_top1), replacing the loss patch above"
            )
        if c.lean_recompute and (c.fused_lora or c.fused_dequant):
            lines.append(
                "lean_recompute: each decoder layer's _gradient_checkpointing_func gets a context_fn; in the "
                "recomputation the down projection of fused MLPs is skipped (non-reentrant checkpointing, Llama-style layers)"
            )
        if c.checkpoint_keep_attention:
            lines.append(
                "checkpoint_keep_attention: each decoder layer's _gradient_checkpointing_func gets a selective "
                "checkpointing context_fn and each attention forward a scope wrapper; the recomputation reuses the "
                "forward's q/k/v/o GEMM and SDPA outputs"
            )
        if c.fused_lora or c.fused_dequant:
            what = [w for w, on in (("LoRA", c.fused_lora), ("adapter-less quantized", c.fused_dequant)) if on]
            base = {
                "bitsandbytes": "bitsandbytes 4-bit (own Triton nf4/fp4 dequant)",
                "auto_gptq": "GPTQ (own GPTQ dequant, from the GPTQ plugin's gptq backend)",
            }.get(c.base_layer or "", "bf16/fp16/fp32")
            lines.append(
                f"fused_lora/fused_dequant: {' and '.join(what)} projections over {base} bases: q/k/v -> "
                "kernels.lora_qkv, SwiGLU MLP -> kernels.lora_mlp_swiglu, other projections -> kernels.lora_linear / "
                "quantized_linear; patched in augmentation, or after Accelerator.prepare under FSDP"
            )
            loads_4bit = any(_loads_bitsandbytes_layers(p, self._registry()) for p in self._active)
            if c.base_layer == "bitsandbytes" and not loads_4bit:
                lines.append(
                    "note: no active plugin loads the model in 4 bit (no peft.quantization.bitsandbytes section): "
                    "the script must load it with transformers' BitsAndBytesConfig(load_in_4bit=True), else the "
                    "fused kernels find no 4-bit layer and the run stops after the model is loaded"
                )
        return lines
