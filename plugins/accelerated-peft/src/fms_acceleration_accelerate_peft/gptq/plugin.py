"""The ``peft.quantization.auto_gptq`` plugin: LoRA on GPTQ checkpoints, read natively.

Which hook does what (each change is made in one phase):

* ``model_loader`` (loading): the model from a Hugging Face GPTQ checkpoint folder, its quantized linears as
  :class:`~.layer.GPTQLinear` (packed int32 buffers, our own dequant kernels), every problem with the checkpoint
  reported before the model is built (:mod:`.loader`, :mod:`.checkpoint`). Neither auto-gptq, gptqmodel, optimum
  nor bitsandbytes is needed. Under ``accelerate launch`` with the section, a script's or trainer's own
  ``from_pretrained`` of the checkpoint is routed here.
* ``augmentation`` (after loading): LoRA from the user's ``peft.LoraConfig`` (``modifiable_args[0]``, as upstream)
  through PEFT's ordinary ``lora.Linear`` (``GPTQLinear`` is an ``nn.Linear`` without a dense weight), frozen base
  in the training dtype, adapters in float32 (``fp32_lora_params``) or the training dtype; the
  ``fp32_norm_compute`` norm patches. Returns ``modifiable_args`` with the LoRA config replaced by ``None`` so a
  trainer does not add adapters twice. With ``no_peft_model: true`` no adapters are added.
* ``check_prepared_model`` (``Accelerator.prepare``, first): the model must have ``GPTQLinear`` layers.
* ``prepare_contribution`` (``Accelerator.prepare``, before wrapping): FSDP handling of the packed tensors
  (:mod:`.sharding`): under FSDP2 with several processes ``GPTQLinear`` layers are replaced by
  :class:`~.packed.PackedGPTQLinear` (one packed parameter sharded by output channels, all-gathered as packed
  bytes); under FSDP1 by the same layer holding its packed tensors as frozen parameters viewed as the training
  dtype (flattened and sharded by FSDP1, never cast). Adapter dtype and fp32 gradient reduction as the
  bitsandbytes plugin.
* ``after_prepare`` (after wrapping): log the packed bytes this rank holds.
* ``check_run_settings``: DeepSpeed is refused (not verified; its bf16 / fp16 mode casts the GPTQ scales).
* ``dequant_backends``: contributes the ``gptq`` dequant backend (storage format ``auto_gptq``), so the fused-ops
  plugin's fused LoRA / fused dequant kernels (``base_layer: auto_gptq``) read ``GPTQLinear`` bases and their
  FSDP forms (:mod:`.dequant_backend`).
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

from ..augmentation import augment_quantized_model
from .config import CONFIG_PATH, QUANTIZE_COMMAND, GPTQLoraConfig
from .layer import GPTQLinear
from .packed import PackedGPTQLinear

if TYPE_CHECKING:  # pragma: no cover
    from fms_acceleration_accelerate.distributed import RunContext

    from .sharding import GPTQSwap

INSTALL_HINT = "pip install fms-acceleration-accelerate-peft fms-acceleration-accelerate-kernels"

logger = logging.getLogger("fms_acceleration_accelerate_peft")


def gptq_layers(model: nn.Module) -> list[nn.Module]:
    """The GPTQ layers of ``model`` (:class:`GPTQLinear` and its FSDP2 form :class:`PackedGPTQLinear`; PEFT / DDP
    / FSDP wrappers included)."""
    return [m for m in model.modules() if isinstance(m, (GPTQLinear, PackedGPTQLinear))]


class AutoGPTQAccelerationPlugin(AccelerationPlugin):
    """GPTQ-LoRA on standard Hugging Face GPTQ checkpoints; see the module docstring."""

    name: ClassVar[str] = "auto_gptq"
    configuration_and_paths: ClassVar[tuple[str, ...]] = (CONFIG_PATH,)
    config_class: ClassVar[type] = GPTQLoraConfig
    required_packages: ClassVar[tuple[str, ...]] = (
        "fms-acceleration-accelerate-kernels",
        "peft>=0.17",
        "safetensors>=0.4",
    )
    install_hint: ClassVar[str] = INSTALL_HINT
    order: ClassVar[int] = 100

    config: GPTQLoraConfig

    def __init__(self, config: Any, *, matched_paths: tuple[str, ...], patches: Any) -> None:
        super().__init__(config, matched_paths=matched_paths, patches=patches)
        # the GPTQLinear replacements made for FSDP (undo information; the originals hold no packed bytes)
        self._swaps: list[GPTQSwap] = []

    # ---------------------------------------------------------------------------------------------- loading
    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> nn.Module:
        """Load the GPTQ checkpoint at ``model_name_or_path`` onto ``self.run_context``'s device; see
        :func:`.loader.load_gptq_causal_lm`."""
        from .loader import load_gptq_causal_lm

        return load_gptq_causal_lm(model_name_or_path, self.config, run_context=self.run_context, **kwargs)

    # ---------------------------------------------------------------------------------------------- augmentation
    @property
    def requires_augmentation(self) -> bool:
        return not self.config.no_peft_model or self.config.fp32_norm_compute

    def augmentation(
        self, model: nn.Module, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[nn.Module, tuple[Any, ...]]:
        """Add LoRA adapters (unless ``no_peft_model``) and the configured stable-training options.

        Args:
            model: the GPTQ model from :meth:`model_loader`.
            train_args: training arguments (``gradient_checkpointing`` is read), or ``None``.
            modifiable_args: ``(peft_config, ...)`` as upstream.

        Returns:
            ``(model, modifiable_args)`` with the LoRA config replaced by ``None`` once applied.
        """
        if not gptq_layers(model):
            raise AccelerationConfigError(
                f"augmentation got a model without GPTQ layers although {CONFIG_PATH} is active: it was loaded "
                "outside the plugin",
                path=CONFIG_PATH,
                fix="load the model with framework.model_loader(path) when framework.requires_custom_loading is "
                "True (or with from_pretrained under 'accelerate launch' with the section / after creating "
                "AccelerationKwargs, which goes through the plugin)",
            )
        return augment_quantized_model(
            model,
            train_args,
            modifiable_args,
            self.config,
            self.patches,
            config_path=CONFIG_PATH,
            plugin_label="the GPTQ plugin",
            missing_lora_path=CONFIG_PATH,
        )

    # ---------------------------------------------------------------------------------------------- prepare
    def check_run_settings(self, context: RunContext) -> None:
        """DeepSpeed is refused: its bf16 / fp16 mode casts every floating tensor of the model, the fp16 GPTQ scales
        among them, and GPTQ-LoRA under DeepSpeed has not been verified."""
        if context.is_deepspeed:
            raise AccelerationConfigError(
                "GPTQ-LoRA is not supported under DeepSpeed: DeepSpeed's bf16 / fp16 mode casts every floating tensor "
                "of the model (the GPTQ scales included) and this combination is not verified",
                path=CONFIG_PATH,
                fix="use FSDP (distributed_type: FSDP, e.g. launch_configs/accelerate-fsdp2-gptq-lora-foak.yaml) or "
                "plain data parallel for GPTQ-LoRA, or the bitsandbytes plugin (peft.quantization.bitsandbytes) "
                "under DeepSpeed",
            )

    def check_prepared_model(self, model: nn.Module, context: RunContext) -> None:
        """The model must have :class:`GPTQLinear` layers (LoRA may come from anywhere).

        Raises:
            AccelerationConfigError: no GPTQ layer: the model was loaded outside this plugin.
        """
        if gptq_layers(model):
            return
        raise AccelerationConfigError(
            f"the model has no GPTQ layers although {CONFIG_PATH} is active: it was loaded outside the plugin "
            f"({type(model).__name__}, e.g. by transformers' own from_pretrained in a process without the "
            "acceleration config), so the GPTQ plugin has no effect on it",
            path=CONFIG_PATH,
            fix="load the GPTQ checkpoint through the plugin: framework.model_loader(path) (framework API), or "
            "from_pretrained(path) / a trainer given the path in a script run by 'accelerate launch' with this "
            "section or after creating AccelerationKwargs; or remove the auto_gptq section",
        )

    def prepare_contribution(self, model: nn.Module, context: RunContext) -> PrepareContribution | None:
        """FSDP handling of the packed tensors (see :mod:`.sharding`); ``None`` when not under FSDP.

        FSDP1: every ``GPTQLinear`` holds its packed tensors as frozen parameters viewed as the training dtype
        (keep-dtype: the framework refuses a mixed-precision ``param_dtype`` that differs). FSDP2 with several
        processes: ``GPTQLinear`` layers whose output channels split evenly into whole zero-point words become
        :class:`PackedGPTQLinear`; the others keep their (replicated) buffers. FSDP2 on one process: nothing to
        shard, layers left as they are. LoRA weights in float32 with float32 gradient reduction when
        ``fp32_lora_params`` (else the training dtype).
        """
        from .sharding import convert_gptq_for_fsdp1, convert_gptq_for_fsdp2, is_gptq_storage

        if not context.is_fsdp:
            return None
        training_dtype = _training_dtype(model)
        lora_dtype = torch.float32 if self.config.fp32_lora_params else training_dtype
        reduce_dtype = torch.float32 if self.config.fp32_lora_params else None
        names = {id(m): n for n, m in model.named_modules()}

        def record(parent: nn.Module, child: str, new: nn.Module, swap: GPTQSwap) -> None:
            self._swaps.append(swap)
            self.patches.replace_child(
                parent,
                child,
                new,
                target=f"{names[id(parent)]}.{child}".lstrip("."),
                description=description,
                restore=swap.restore,
            )

        if context.fsdp_version == 1:
            description = f"GPTQLinear, packed tensors as {_name(training_dtype)} parameters (FSDP1 flat sharding)"
            report = convert_gptq_for_fsdp1(model, training_dtype, replace=record)
            return PrepareContribution(
                keep_dtype_params=(is_gptq_storage,),
                trainable_dtype=lora_dtype,
                reduce_dtype=reduce_dtype,
                notes=(
                    f"FSDP1: {len(report.converted)} GPTQ layers hold their packed tensors as frozen "
                    f"{_name(training_dtype)} parameters (int32/float16 bytes viewed, never cast), flattened and "
                    f"sharded with their unit; LoRA in {_name(lora_dtype)}",
                ),
            )
        world = context.world_size
        if world == 1:
            # FSDP2 on one rank skips the all-gather and reads one input per parameter (torch 2.11), which a packed
            # weight (codes, zeros and scales) is not; with nothing to shard, the layers stay as they are
            notes = ("FSDP2 on one rank: GPTQ layers left as they are (nothing to shard)",)
        else:
            description = "PackedGPTQLinear (FSDP2 packed GPTQ all-gather)"
            report = convert_gptq_for_fsdp2(model, world, replace=record)
            kept = (
                f"; {len(report.kept)} left replicated (output channels do not split into whole zero-point words "
                f"over {world} ranks): {list(report.kept[:3])}"
                if report.kept
                else ""
            )
            notes = (f"FSDP2: {len(report.converted)} GPTQ layers sharded as packed bytes (PackedGPTQLinear){kept}",)
        return PrepareContribution(trainable_dtype=lora_dtype, reduce_dtype=reduce_dtype, notes=notes)

    def after_prepare(self, model: nn.Module, context: RunContext) -> None:
        """Log how many bytes of packed GPTQ tensors this rank holds."""
        if context.is_fsdp and context.fsdp_version == 2:
            from .sharding import packed_bytes_per_rank

            logger.info(
                "GPTQ: this rank holds %d bytes of packed GPTQ tensors (%d layers replaced for FSDP)",
                packed_bytes_per_rank(model),
                len(self._swaps),
            )

    def dequant_backends(self) -> tuple[DequantBackend, ...]:
        """Contributes the ``gptq`` backend (``GPTQLinear`` -> ``GPTQWeight``, storage format ``auto_gptq``) for
        fused kernels; see :mod:`.dequant_backend`."""
        from .dequant_backend import GPTQ_BACKEND

        return (GPTQ_BACKEND,)

    def describe(self) -> list[str]:
        c = self.config
        return [
            "load: a Hugging Face GPTQ checkpoint (quantization_config in config.json or quantize_config.json; 2/4/8 "
            "bits, any group_size, sym/asym, desc_act with g_idx, checkpoint_format gptq or gptq_v2; one or sharded "
            "safetensors files), read natively: no auto-gptq / gptqmodel",
            f"layers: GPTQLinear (packed int32 buffers, scales as stored), kernel {c.kernel}: this project's "
            "dequant + matmul, backward dequantizes again (no dense weight kept)",
            "augment: "
            + ("no adapters (no_peft_model)" if c.no_peft_model else "LoRA from the given LoraConfig")
            + f"; LoRA params {'float32' if c.fp32_lora_params else 'training dtype'}; frozen base not upcast",
            *(["patch: norms computed in float32"] if c.fp32_norm_compute else []),
            "fused kernels: contributes the 'gptq' dequant backend (fused_ops_and_kernels base_layer: auto_gptq)",
            "FSDP2: packed tensors sharded by output channels and all-gathered as packed bytes; FSDP1: packed tensors "
            "flattened and sharded as training-dtype views (never cast)",
            "load staging until sharded: "
            + {"auto": "host memory under FSDP2 with several processes, else the GPU", "cpu": "host memory"}.get(
                c.load_staging, "the GPU"
            ),
            f"checkpoint: make one from a Hugging Face model with `{QUANTIZE_COMMAND}`",
        ]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _training_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of the model's GPTQ layers (the training dtype)."""
    for module in model.modules():
        if isinstance(module, (GPTQLinear, PackedGPTQLinear)):
            return module.compute_dtype
    return torch.float32
