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
* ``dequant_backends``: contributes the ``gptq`` dequant backend (storage format ``auto_gptq``), so the fused-ops
  plugin's fused LoRA / fused dequant kernels (``base_layer: auto_gptq``) read ``GPTQLinear`` bases
  (:mod:`.dequant_backend`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from fms_acceleration_accelerate.dequant import DequantBackend
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.plugin import AccelerationPlugin

from ..augmentation import add_lora_adapters, enable_input_grads_for_checkpointing, fp32_norm_forward, is_norm_module
from .config import CONFIG_PATH, QUANTIZE_COMMAND, GPTQLoraConfig
from .layer import GPTQLinear

if TYPE_CHECKING:  # pragma: no cover
    from fms_acceleration_accelerate.distributed import RunContext

INSTALL_HINT = "pip install fms-acceleration-accelerate-peft fms-acceleration-accelerate-kernels"


def gptq_layers(model: nn.Module) -> list[GPTQLinear]:
    """The :class:`GPTQLinear` layers of ``model`` (PEFT / DDP wrappers included)."""
    return [m for m in model.modules() if isinstance(m, GPTQLinear)]


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
        if self.config.fp32_norm_compute:
            for name, module in model.named_modules():
                if is_norm_module(module):
                    self.patches.patch_forward(
                        module,
                        fp32_norm_forward(module, module.forward),
                        target=name or type(module).__name__,
                        description="fp32 norm compute",
                    )
        if self.config.no_peft_model:
            return model, tuple(modifiable_args)
        args = tuple(modifiable_args)
        peft_config = args[0] if args else None
        if peft_config is None:
            raise AccelerationConfigError(
                "augmentation needs the LoRA config: pass modifiable_args=(peft.LoraConfig(...),)",
                path=CONFIG_PATH,
                fix="pass your LoraConfig as the first modifiable argument, or set no_peft_model: true",
            )
        model = add_lora_adapters(
            model, peft_config, self.config, config_path=CONFIG_PATH, plugin_label="the GPTQ plugin"
        )
        enable_input_grads_for_checkpointing(model, train_args)
        return model, (None, *args[1:])

    # ---------------------------------------------------------------------------------------------- prepare
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
            f"checkpoint: make one from a Hugging Face model with `{QUANTIZE_COMMAND}`",
        ]
