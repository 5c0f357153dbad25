"""The ``peft.quantization.bitsandbytes`` plugin: 4-bit QLoRA that loads, augments and shards.

Which hook does what (each change is made in one phase):

* ``model_loader`` (loading): the model with 4-bit bitsandbytes linear layers, storage in the training dtype
  (:mod:`.loader`; rank 0 loads and broadcasts with ``low_cpu_mem_usage=True`` under a process group);
  its 4-bit layers accept full checkpoints (``Accelerator.load_state``), see :mod:`.checkpoint`. Where the
  weights are quantized and staged follows ``self.run_context`` (its device and FSDP version, see
  ``load_staging``).
* ``augmentation`` (after loading): LoRA from the user's ``peft.LoraConfig`` (``modifiable_args[0]``, as
  upstream), frozen base without the fp32 upcast of ``prepare_model_for_kbit_training`` (:mod:`.augmentation`);
  the ``fp32_norm_compute`` norm patches. Returns ``modifiable_args`` with the LoRA config replaced by ``None`` so
  a trainer does not add adapters twice. With ``no_peft_model: true`` no adapters are added.
* ``check_prepared_model`` (``Accelerator.prepare``, first): the model must have this plugin's 4-bit layers.
* ``prepare_contribution`` (``Accelerator.prepare``, before wrapping): FSDP1/FSDP2 handling of the packed weights
  (:mod:`.sharding`): under FSDP2 the 4-bit layers are replaced by ``Packed4bitLinear``; under FSDP1 a
  host-staged model goes to ``context.device``.
* ``after_prepare`` (after wrapping): release the replaced layers' full packed bytes.
* DeepSpeed: ``check_run_settings`` refuses ``load_staging: cpu`` (FSDP2 only) and the loader refuses a training
  dtype other than DeepSpeed's bf16 / fp16 compute dtype before loading (DeepSpeed casts every floating
  parameter to it, the packed storage included); ``prepare_contribution`` declares the packed storage
  keep-dtype, so the framework checks it again before the engine is built. The storage stays in the training
  dtype (``bnb_4bit_quant_storage``), so ZeRO-3 partitions and gathers it like any other parameter, never cast.
* ``dequant_backends``: contributes the ``bnb_4bit_packed`` dequant backend to the framework's registry, so
  fused kernels (the fused-ops plugin's fused LoRA / fused dequant) read ``Packed4bitLinear`` bases
  (:mod:`.dequant_backend`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fms_acceleration_accelerate.dequant import DequantBackend
from fms_acceleration_accelerate.distributed import PrepareContribution
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.plugin import AccelerationPlugin

from .augmentation import augment_quantized_model
from .checkpoint import checked_quant_stats_loader
from .config import CONFIG_PATH, BnbQuantizationConfig
from .loader import INSTALL_HINT, load_quantized_causal_lm
from .sharding import PackedSwap, convert_linear4bit_for_fsdp2, is_params4bit, packed_bytes_per_rank

if TYPE_CHECKING:  # pragma: no cover
    from fms_acceleration_accelerate.distributed import RunContext

logger = logging.getLogger("fms_acceleration_accelerate_peft")


def is_4bit_layer(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` or its FSDP2 packed form ``Packed4bitLinear`` (not PEFT's LoRA wrapper of one,
    which has the same class name)."""
    cls = type(module)
    if cls.__name__ == "Packed4bitLinear":
        return True
    return cls.__name__ == "Linear4bit" and any(
        c.__module__.startswith("bitsandbytes") for c in cls.__mro__ if c.__name__ == "Linear4bit"
    )


def _count_4bit(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_4bit_layer(m))


class BitsAndBytesAccelerationPlugin(AccelerationPlugin):
    """4-bit (nf4/fp4) bitsandbytes QLoRA; see the module docstring."""

    name: ClassVar[str] = "bitsandbytes"
    configuration_and_paths: ClassVar[tuple[str, ...]] = (CONFIG_PATH,)
    config_class: ClassVar[type] = BnbQuantizationConfig
    required_packages: ClassVar[tuple[str, ...]] = ("bitsandbytes>=0.45",)
    install_hint: ClassVar[str] = INSTALL_HINT
    order: ClassVar[int] = 100

    config: BnbQuantizationConfig

    def __init__(self, config: Any, *, matched_paths: tuple[str, ...], patches: Any) -> None:
        super().__init__(config, matched_paths=matched_paths, patches=patches)
        # the Linear4bit -> Packed4bitLinear swaps of this plugin's model (released after FSDP2 sharding)
        self._packed_swaps: list[PackedSwap] = []

    # ---------------------------------------------------------------------------------------------- loading
    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> nn.Module:
        """Load ``model_name_or_path`` with 4-bit weights on ``self.run_context``'s device, staged for its FSDP
        version; see :func:`.loader.load_quantized_causal_lm`."""
        model = load_quantized_causal_lm(model_name_or_path, self.config, run_context=self.run_context, **kwargs)
        for name, module in model.named_modules():
            if type(module).__name__ == "Linear4bit":
                self.patches.patch(
                    module,
                    "_load_from_state_dict",
                    checked_quant_stats_loader(module, module._load_from_state_dict),
                    target=f"{name}._load_from_state_dict",
                    description="consume + check 4-bit stats on checkpoint load",
                )
        return model

    # ---------------------------------------------------------------------------------------------- augmentation
    @property
    def requires_augmentation(self) -> bool:
        return not self.config.no_peft_model or self.config.fp32_norm_compute

    def augmentation(
        self, model: nn.Module, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[nn.Module, tuple[Any, ...]]:
        """Add LoRA adapters (unless ``no_peft_model``) and the configured stable-training options.

        Args:
            model: the 4-bit model from :meth:`model_loader`.
            train_args: training arguments (``gradient_checkpointing`` is read), or ``None``.
            modifiable_args: ``(peft_config, ...)`` as upstream.

        Returns:
            ``(model, modifiable_args)`` with the LoRA config replaced by ``None`` once applied.
        """
        if _count_4bit(model) == 0:
            raise AccelerationConfigError(
                f"augmentation got a model without 4-bit layers although {CONFIG_PATH} is active: it was loaded "
                "outside the plugin",
                path=CONFIG_PATH,
                fix="load the model with framework.model_loader(...) when framework.requires_custom_loading is "
                "True (or with from_pretrained after creating AccelerationKwargs / under 'accelerate launch' with "
                "the section, which goes through the plugin)",
            )
        return augment_quantized_model(
            model,
            train_args,
            modifiable_args,
            self.config,
            self.patches,
            config_path=CONFIG_PATH,
            plugin_label="the bitsandbytes plugin",
            missing_lora_path=f"plugins.{CONFIG_PATH}",
        )

    # ---------------------------------------------------------------------------------------------- prepare
    def check_prepared_model(self, model: nn.Module, context: RunContext) -> None:
        """The model must have 4-bit layers of this plugin's kind (bitsandbytes ``Linear4bit`` with the configured
        quant type, or its FSDP2 ``Packed4bitLinear``). LoRA may come from anywhere (this plugin's augmentation,
        a trainer's ``peft_config``, ``get_peft_model``).

        Raises:
            AccelerationConfigError: no 4-bit layer (the model was loaded outside this plugin), or 4-bit layers of
                another quant type (quantized by a ``BitsAndBytesConfig`` of the script's own).
        """
        layers = [m for m in model.modules() if is_4bit_layer(m)]
        if not layers:
            name = type(_inner_model(model)).__name__
            raise AccelerationConfigError(
                f"the model has no 4-bit layers although {CONFIG_PATH} is active: it was loaded outside the plugin "
                f"({name} built by transformers' own from_pretrained / from_config, e.g. in a process without the "
                "acceleration config when it loaded, or with a class the plugin does not route), so it would train "
                "unquantized",
                path=CONFIG_PATH,
                fix="load the model through the plugin: framework.model_loader(path) (framework API), or "
                "from_pretrained(path) / a trainer given the model path in a script run by 'accelerate launch' with "
                "this section or after creating AccelerationKwargs; or remove the bitsandbytes section to train "
                "in 16/32 bit",
            )
        kinds = sorted(
            {
                str(getattr(getattr(m, "weight", None), "quant_type", self.config.quant_type))
                for m in layers
                if type(m).__name__ != "Packed4bitLinear"
            }
        )
        if kinds and kinds != [self.config.quant_type]:
            raise AccelerationConfigError(
                f"the model's 4-bit layers are {'/'.join(kinds)}, but {CONFIG_PATH}.quant_type is "
                f"{self.config.quant_type!r}: it was quantized outside the plugin (a BitsAndBytesConfig of the "
                "script's own)",
                path=f"{CONFIG_PATH}.quant_type",
                fix="let the plugin load the model (no quantization_config in the script), or set quant_type to "
                "the model's",
            )

    def check_run_settings(self, context: RunContext) -> None:
        """Under DeepSpeed: ``load_staging: cpu`` is refused (it stages for FSDP2, which DeepSpeed does not use)."""
        if context.is_deepspeed and self.config.load_staging == "cpu":
            raise AccelerationConfigError(
                "load_staging: cpu stages the 4-bit model in host memory for FSDP2 to shard unit by unit; under "
                "DeepSpeed the whole model goes to the device when the engine is built",
                path=f"{CONFIG_PATH}.load_staging",
                fix="set load_staging: auto (or device) for DeepSpeed runs",
            )

    def describe_run(self, context: RunContext) -> list[str]:
        """Under DeepSpeed: how the packed 4-bit storage and the adapters are handled."""
        if not context.is_deepspeed:
            return []
        compute = {"bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}.get(context.mixed_precision)
        stage = context.zero_stage
        lines = [
            (
                f"DeepSpeed {context.mixed_precision}: load the model in {compute} (torch_dtype / dtype), checked "
                f"before loading: DeepSpeed casts every floating parameter to {compute}, a no-op for the packed "
                f"storage kept in {compute}"
            )
            if compute
            else "DeepSpeed without bf16 / fp16: parameters keep the training dtype, the packed storage included",
            (
                "ZeRO-3: the packed 4-bit storage is partitioned and gathered like any other parameter (in the "
                "training dtype, never cast); its quantization state stays whole on every rank"
                if stage == 3
                else f"ZeRO-{stage if stage is not None else '?'}: 4-bit weights stay whole on every rank (frozen)"
            ),
        ]
        if compute and self.config.fp32_lora_params:
            lines.append(
                f"fp32_lora_params: DeepSpeed keeps fp32 master weights of the adapters in its optimizer and "
                f"computes with {compute} copies"
            )
        if self.config.fsdp2_packed_all_gather:
            lines.append("fsdp2_packed_all_gather: FSDP2 only, unused under DeepSpeed")
        from fms_acceleration_accelerate.deepspeed_offload import describe_offload

        lines += describe_offload(
            context,
            "the packed 4-bit storage's partitions are moved there as the raw bytes they are (in the storage dtype, "
            "never cast) and fetched back when ZeRO-3 gathers a layer; the quantization state (no parameter) stays "
            "on the compute device",
        )
        return lines

    def prepare_contribution(self, model: nn.Module, context: RunContext) -> PrepareContribution | None:
        """FSDP handling of the packed weights (see :mod:`.sharding`); under DeepSpeed the packed storage is declared
        keep-dtype (the framework checks DeepSpeed would not cast it); ``None`` otherwise."""
        if context.is_deepspeed:
            return PrepareContribution(
                keep_dtype_params=(is_params4bit,),
                notes=(f"DeepSpeed: packed 4-bit storage kept in {_training_dtype(model)} (never cast)",),
            )
        if not context.is_fsdp:
            return None
        training_dtype = _training_dtype(model)
        lora_dtype = torch.float32 if self.config.fp32_lora_params else training_dtype
        reduce_dtype = torch.float32 if self.config.fp32_lora_params else None
        if context.fsdp_version == 1:
            _move_host_staged_model(model, context.device)
            return PrepareContribution(
                keep_dtype_params=(is_params4bit,),
                trainable_dtype=lora_dtype,
                reduce_dtype=reduce_dtype,
                notes=(f"FSDP1: packed 4-bit storage kept in {training_dtype}; LoRA in {lora_dtype}",),
            )
        notes = []
        release = None
        world = context.world_size
        if self.config.fsdp2_packed_all_gather and world == 1:
            # FSDP2 on one rank skips the all-gather and reads one input per parameter (torch 2.11), which a
            # packed weight (codes + scales) is not; with nothing to shard, bitsandbytes' layers stay as they are
            notes.append("FSDP2 on one rank: 4-bit layers left as bitsandbytes layers (nothing to shard)")
        elif self.config.fsdp2_packed_all_gather:
            names = {id(m): n for n, m in model.named_modules()}

            def record_replacement(parent: torch.nn.Module, child: str, new: torch.nn.Module) -> None:
                swap = PackedSwap(parent, child, getattr(parent, child))
                self._packed_swaps.append(swap)
                self.patches.replace_child(
                    parent,
                    child,
                    new,
                    target=f"{names[id(parent)]}.{child}".lstrip("."),
                    description="Packed4bitLinear (FSDP2 packed 4-bit all-gather)",
                    restore=swap.restore,
                )

            report = convert_linear4bit_for_fsdp2(model, training_dtype, world, replace=record_replacement)
            release = self._release_sharded_swaps if report.converted else None
            notes.append(
                f"FSDP2: {len(report.converted)} 4-bit layers sharded as packed bytes (Packed4bitLinear)"
                + (
                    f"; {len(report.kept)} left to FSDP2's default (rows do not split): {report.kept[:3]}"
                    if report.kept
                    else ""
                )
            )
        return PrepareContribution(
            # packed weights ignore param_dtype themselves; only bnb layers left as they are need keep-dtype
            keep_dtype_params=(is_params4bit,),
            trainable_dtype=lora_dtype,
            reduce_dtype=reduce_dtype,
            after_unit_sharded=release,
            notes=tuple(notes),
        )

    def _release_sharded_swaps(self, unit_name: str, unit: nn.Module) -> None:
        """``after_unit_sharded``: free the full packed bytes of every replaced layer whose replacement is now
        sharded, before the next unit is sharded. Otherwise a rank holds the whole 4-bit model *and* all its shards
        until ``after_prepare``: at the 70B layer shape, a full packed layer (0.45 GiB with its float32 scales)
        next to its shard, per decoder layer."""
        for swap in self._packed_swaps:
            swap.release()

    def dequant_backends(self) -> tuple[DequantBackend, ...]:
        """Contributes the backend that reads :class:`~.packed4bit.Packed4bitLinear` weights (the FSDP2 packed
        layers) for fused kernels, dequantised by our own 4-bit kernels; see :mod:`.dequant_backend`."""
        from .dequant_backend import PACKED4BIT_BACKEND

        return (PACKED4BIT_BACKEND,)

    def after_prepare(self, model: nn.Module, context: RunContext) -> None:
        """Release the full packed bytes of the layers replaced for FSDP2 once their replacements are sharded
        (see :class:`.sharding.PackedSwap`); log how many bytes of 4-bit weights this rank holds."""
        for swap in self._packed_swaps:  # those of units sharded by someone else (e.g. Accelerate's root)
            swap.release()
        released = sum(swap.released for swap in self._packed_swaps)
        if context.is_fsdp:
            logger.info(
                "bitsandbytes: this rank holds %d bytes of packed 4-bit weights (%d replaced layers released)",
                packed_bytes_per_rank(model),
                released,
            )

    def describe(self) -> list[str]:
        c = self.config
        lines = [
            f"load: 4-bit {c.quant_type} bitsandbytes weights (double quant {c.bnb_4bit_use_double_quant}), "
            f"storage {c.bnb_4bit_quant_storage}, compute {c.bnb_4bit_compute_dtype}",
            "augment: "
            + ("no adapters (no_peft_model)" if c.no_peft_model else "LoRA from the given LoraConfig")
            + f"; LoRA params {'float32' if c.fp32_lora_params else 'training dtype'}; no fp32 upcast of frozen params",
        ]
        if c.fp32_norm_compute:
            lines.append("patch: norms computed in float32")
        lines.append(
            "FSDP2: " + ("4-bit weights sharded/gathered as packed bytes" if c.fsdp2_packed_all_gather else "default")
        )
        staging = {"auto": "host memory under FSDP2 with several processes, else the GPU", "cpu": "host memory"}
        lines.append(f"load staging until sharded: {staging.get(c.load_staging, 'the GPU')}")
        return lines


def _move_host_staged_model(model: nn.Module, device: torch.device) -> bool:
    """FSDP1 flattens 4-bit layers where they are: a model staged on the host (``load_staging: cpu`` when FSDP1
    could not be foreseen at load time) goes to the device whole, as ``load_staging: device`` would have put it."""
    if device.type == "cpu" or not any(p.device.type == "cpu" for p in model.parameters()):
        return False
    logger.warning(
        "bitsandbytes: the 4-bit model was staged in host memory for FSDP2, but this run uses FSDP1; moving it to "
        "%s whole (set load_staging: auto or device for FSDP1 runs)",
        device,
    )
    model.to(device)
    return True


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP wrappers (for messages)."""
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("ForCausalLM", "LMHeadModel")) and not name.startswith("Peft"):
            return module
    return model


def _training_dtype(model: nn.Module) -> torch.dtype:
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.weight.dtype
    return torch.float32
