"""Adding LoRA adapters to a 4-bit model without ``prepare_model_for_kbit_training``'s fp32 upcast.

``peft.prepare_model_for_kbit_training`` casts every non-quantized parameter (embeddings, lm_head, norms) to
float32: on an 8B model that is ~1 B frozen parameters stored twice as large for nothing, since they are
frozen. Here the base stays in the training dtype and frozen; what matters for stable training is kept as
options: LoRA weights in float32 (``fp32_lora_params``) and norms computed in float32 (``fp32_norm_compute``,
which upcasts activations inside the norm, not the stored weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fms_acceleration_accelerate.errors import AccelerationConfigError

from .config import CONFIG_PATH, BnbQuantizationConfig


def _lora_config_type() -> type:
    from peft import LoraConfig

    return LoraConfig


def add_lora_adapters(
    model: nn.Module,
    peft_config: Any,
    config: BnbQuantizationConfig | Any,
    *,
    config_path: str = CONFIG_PATH,
    plugin_label: str = "the bitsandbytes plugin",
) -> nn.Module:
    """Wrap ``model`` in a ``peft.PeftModel`` with the user's LoRA config; the base stays frozen, uncast.

    Args:
        model: the quantized model from the loader.
        peft_config: a ``peft.LoraConfig`` (``target_modules`` may be a list, a regex or ``"all-linear"``).
        config: the plugin configuration (any plugin config with ``fp32_lora_params``, e.g. the GPTQ plugin's).
        config_path: the plugin's config path, for the error message.
        plugin_label: the plugin's name in words, for the error message.

    Returns:
        The ``PeftModel``; LoRA parameters in float32 when ``config.fp32_lora_params``, else in the dtype
        of the model's non-quantized parameters.
    """
    from peft import get_peft_model

    if not isinstance(peft_config, _lora_config_type()):
        raise AccelerationConfigError(
            f"{plugin_label} adds LoRA adapters and needs a peft.LoraConfig, got {type(peft_config).__name__}",
            path=f"plugins.{config_path}.no_peft_model",
            fix="pass modifiable_args=(LoraConfig(...),) to augmentation, or set no_peft_model: true and add the "
            "adapters yourself",
        )
    base_dtype = _base_dtype(model)
    peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=config.fp32_lora_params)
    lora_dtype = torch.float32 if config.fp32_lora_params else base_dtype
    for name, param in peft_model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != lora_dtype:
            param.data = param.data.to(lora_dtype)
        if not param.requires_grad:
            continue
        if "lora_" not in name and "modules_to_save" not in name:
            raise AssertionError(f"unexpected trainable base parameter {name}")
    return peft_model


def augment_quantized_model(
    model: nn.Module,
    train_args: Any,
    modifiable_args: tuple[Any, ...],
    config: Any,
    patches: Any,
    *,
    config_path: str,
    plugin_label: str,
    missing_lora_path: str,
) -> tuple[nn.Module, tuple[Any, ...]]:
    """The ``augmentation`` of a quantized-LoRA plugin: the ``fp32_norm_compute`` norm patches, then LoRA adapters
    from ``modifiable_args[0]`` unless ``config.no_peft_model``.

    Args:
        model: the quantized model from the plugin's loader.
        train_args: training arguments (``gradient_checkpointing`` is read), or ``None``.
        modifiable_args: ``(peft_config, ...)`` as upstream.
        config: the plugin configuration (``no_peft_model``, ``fp32_lora_params``, ``fp32_norm_compute``).
        patches: the plugin's ``PatchRecorder`` (the norm patches are recorded there).
        config_path: the plugin's config path, for messages.
        plugin_label: the plugin's name in words, for messages.
        missing_lora_path: the key path named when no LoRA config was passed.

    Returns:
        ``(model, modifiable_args)`` with the LoRA config replaced by ``None`` once applied.

    Raises:
        AccelerationConfigError: no LoRA config passed (and ``no_peft_model`` is false), or not a ``LoraConfig``.
    """
    if config.fp32_norm_compute:
        for name, module in model.named_modules():
            if is_norm_module(module):
                patches.patch_forward(
                    module,
                    fp32_norm_forward(module, module.forward),
                    target=name or type(module).__name__,
                    description="fp32 norm compute",
                )
    args = tuple(modifiable_args)
    if config.no_peft_model:
        return model, args
    peft_config = args[0] if args else None
    if peft_config is None:
        raise AccelerationConfigError(
            "augmentation needs the LoRA config: pass modifiable_args=(peft.LoraConfig(...),)",
            path=missing_lora_path,
            fix="pass your LoraConfig as the first modifiable argument, or set no_peft_model: true",
        )
    model = add_lora_adapters(model, peft_config, config, config_path=config_path, plugin_label=plugin_label)
    enable_input_grads_for_checkpointing(model, train_args)
    return model, (None, *args[1:])


def _base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's non-quantized floating parameters (the training dtype)."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.weight.dtype
    for param in model.parameters():
        if param.is_floating_point() and type(param).__name__ != "Params4bit":
            return param.dtype
    return torch.float32


def enable_input_grads_for_checkpointing(model: nn.Module, train_args: Any) -> bool:
    """Make the embedding output require grad when gradient checkpointing is (or will be) on.

    With a frozen base, re-entrant checkpointing sees inputs that need no grad and would skip the backward
    of the checkpointed block; the HF hook ``enable_input_require_grads`` fixes that. Returns whether it was
    enabled.
    """
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else ("is_gradient_checkpointing")
    )
    wants = bool(getattr(train_args, "gradient_checkpointing", False)) or bool(getattr(model, flag, False))
    if wants and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return True
    return False


def is_norm_module(module: nn.Module) -> bool:
    """True for ``nn.LayerNorm`` and the RMSNorm classes of HF models (class name ends in ``RMSNorm``)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def fp32_norm_forward(module: nn.Module, original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A forward for ``module`` that normalises in float32 and returns the input dtype.

    ``x [..., hidden] -> [..., hidden]``. LayerNorm runs ``F.layer_norm`` on float32 copies of input, weight
    and bias; RMSNorm-like modules run their own forward on a float32 input (their weight is promoted to
    float32 in the product). Stored weights are not changed.
    """
    if isinstance(module, nn.LayerNorm):

        def layer_norm_fp32(x: torch.Tensor) -> torch.Tensor:
            weight = module.weight.float() if module.weight is not None else None
            bias = module.bias.float() if module.bias is not None else None
            return nn.functional.layer_norm(x.float(), module.normalized_shape, weight, bias, module.eps).to(x.dtype)

        return layer_norm_fp32

    def rms_norm_fp32(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return original(x.float(), *args, **kwargs).to(x.dtype)

    return rms_norm_fp32
