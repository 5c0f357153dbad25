"""Loading a Hugging Face causal LM with 4-bit bitsandbytes weights.

Everything a user can get wrong is checked *before* any weight is read: the bitsandbytes install, the
quant type, the storage dtype (must equal the training dtype, or FSDP cannot flatten/shard the packed
weights next to the other parameters), and whether the architecture has linear layers to quantize (the
check builds the model on the ``meta`` device, which costs no memory).

Distributed loading (``low_cpu_mem_usage=True`` with an initialised process group of more than one rank):
only global rank 0 reads and quantizes the checkpoint; every other rank builds the same module tree on the
``meta`` device and receives the quantized tensors (packed 4-bit bytes, scales, and the non-quantized
parameters and buffers) by broadcast, so the checkpoint is read and quantized once per job instead of once
per rank. Tied weights are re-tied afterwards on every rank.

Staging on the host (``load_staging``, FSDP2): bitsandbytes quantizes a weight when it moves to the GPU, so its
own loader leaves the whole 4-bit model on the GPU until FSDP2 shards it; at the 70B shape that is 35 GiB per
GPU before a single unit is sharded. With ``cpu`` staging the plugin reads a local safetensors checkpoint itself,
one tensor at a time: each weight goes to the GPU, is quantized there, and its packed bytes and scales go back
to host memory at once. Ranks that receive the broadcast keep what they receive on the host too. FSDP2's
``fully_shard`` then moves one unit at a time to the GPU and shards it, so the GPU never holds more than one
unsharded unit. Checkpoints the plugin cannot read that way (no local safetensors files, parameters missing under
the model's own names, modules kept in float32) are loaded by transformers onto the GPU as before, with a warning
that says why.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .config import CONFIG_PATH, BnbQuantizationConfig
from .staging import staging_device

logger = logging.getLogger("fms_acceleration_accelerate_peft")

INSTALL_HINT = "pip install 'fms-acceleration-accelerate-peft[bitsandbytes]'  (or: pip install 'bitsandbytes>=0.45')"

_DTYPE_NAMES = MappingProxyType({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32})


def require_bitsandbytes() -> None:
    """Raise :class:`AccelerationConfigError` naming the pip command when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AccelerationConfigError(
            "bitsandbytes is not installed; the 4-bit QLoRA plugin needs it",
            path=f"plugins.{CONFIG_PATH}",
            fix=INSTALL_HINT,
        )


def resolve_training_dtype(value: Any, checkpoint_dtype: Any = None) -> torch.dtype:
    """The training dtype from a ``torch_dtype``/``dtype`` argument (dtype, name, ``"auto"`` or ``None``).

    ``None``/``"auto"`` take the checkpoint's ``torch_dtype`` (transformers 5 behaviour), else float32.
    """
    if value is None or value == "auto":
        value = checkpoint_dtype if checkpoint_dtype is not None else torch.float32
    if isinstance(value, str):
        name = value.replace("torch.", "")
        if name not in _DTYPE_NAMES:
            raise AccelerationConfigError(
                f"torch_dtype {value!r} is not a floating-point training dtype",
                fix="pass torch_dtype=torch.bfloat16 (or float16 / float32)",
            )
        return _DTYPE_NAMES[name]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise AccelerationConfigError(
            f"torch_dtype {value!r} is not a floating-point training dtype",
            fix="pass torch_dtype=torch.bfloat16 (or float16 / float32)",
        )
    return value


def check_storage_dtype(config: BnbQuantizationConfig, training_dtype: torch.dtype) -> torch.dtype:
    """Return the storage dtype, or raise when FSDP could not shard it alongside ``training_dtype`` params."""
    storage = config.storage_dtype(training_dtype)
    if storage != training_dtype:
        raise AccelerationConfigError(
            f"bnb_4bit_quant_storage {config.bnb_4bit_quant_storage!r} differs from the training dtype "
            f"{str(training_dtype).replace('torch.', '')}: FSDP flattens and shards all parameters of a unit "
            "in one dtype, and a cast of packed 4-bit storage scrambles the weights",
            path=f"plugins.{CONFIG_PATH}.bnb_4bit_quant_storage",
            fix="set bnb_4bit_quant_storage: auto (or equal to torch_dtype)",
        )
    return storage


@dataclass(frozen=True)
class QuantizationPlan:
    """What will be quantized, decided before loading.

    Attributes:
        training_dtype: dtype of the non-quantized parameters and of the packed storage.
        compute_dtype: matmul dtype.
        quantized_modules: qualified names of the linear layers that become 4-bit.
        skipped_modules: names kept in full precision (output embedding, ``_keep_in_fp32_modules``).
    """

    training_dtype: torch.dtype
    compute_dtype: torch.dtype
    quantized_modules: tuple[str, ...]
    skipped_modules: tuple[str, ...]


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - very old transformers
        pass
    return tuple(types)


def _outside_zero3_init() -> Any:
    """A context in which transformers builds a model without ``deepspeed.zero.Init``, as it does for a model it
    quantizes: under DeepSpeed ZeRO-3 (a live ``HfDeepSpeedConfig``, as Accelerate and the HF Trainer create)
    ``from_config`` would otherwise partition the skeleton and initialise it through gathers, which the meta device
    cannot serve; DeepSpeed partitions the 4-bit model when it builds its engine."""
    from transformers import modeling_utils
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    quantized_state = getattr(modeling_utils, "set_quantized_state", None)
    if quantized_state is None:
        raise AccelerationConfigError(
            "under DeepSpeed ZeRO-3 the bitsandbytes plugin builds the model skeleton the way transformers builds a "
            "model it quantizes (transformers.modeling_utils.set_quantized_state), which this transformers lacks",
            path=f"plugins.{CONFIG_PATH}",
            fix="install a transformers release with modeling_utils.set_quantized_state (5.x), or use ZeRO-2",
        )
    return quantized_state()


def build_meta_model(
    model_config: Any, training_dtype: torch.dtype, *, host_buffers: bool = False, **kwargs: Any
) -> nn.Module:
    """Build the causal-LM module tree for ``model_config`` on the meta device (no memory, no weights).

    With ``host_buffers`` only the parameters are on ``meta``; buffers are built for real on the host, so the
    ones no checkpoint holds (non-persistent, e.g. rotary ``inv_freq``) get their computed values.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with _outside_zero3_init(), init_empty_weights(include_buffers=False) if host_buffers else torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(model_config, dtype=training_dtype, **kwargs)
        except ValueError as exc:
            raise AccelerationConfigError(
                f"model type {getattr(model_config, 'model_type', '?')!r} is not a causal LM that transformers "
                f"can build ({exc})",
                path=f"plugins.{CONFIG_PATH}",
                fix="use a causal language model (AutoModelForCausalLM), or remove the bitsandbytes section",
            ) from None


def plan_quantization(
    model_config: Any, config: BnbQuantizationConfig, training_dtype: torch.dtype, **build_kwargs: Any
) -> QuantizationPlan:
    """Check that the model can be 4-bit quantized and list what will be; raises before any loading.

    Raises:
        AccelerationConfigError: already quantized checkpoint, not a causal LM, or no linear layer to quantize.
    """
    existing = getattr(model_config, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "?")
        raise AccelerationConfigError(
            f"the checkpoint is already quantized (quant_method={method!s}); bitsandbytes cannot re-quantize it",
            path=f"plugins.{CONFIG_PATH}",
            fix="load an unquantized checkpoint, or use the plugin for that quantization format",
        )
    check_storage_dtype(config, training_dtype)
    meta = build_meta_model(model_config, training_dtype, **build_kwargs)
    skip: set[str] = set()
    output = meta.get_output_embeddings() if hasattr(meta, "get_output_embeddings") else None
    keep_fp32 = tuple(getattr(meta, "_keep_in_fp32_modules", None) or ())
    linear_types = _linear_types()
    quantized: list[str] = []
    for name, module in meta.named_modules():
        if not isinstance(module, linear_types):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if module is output or any(k == leaf or name.startswith(k) for k in keep_fp32):
            skip.add(name)
            continue
        quantized.append(name)
    if not quantized:
        raise AccelerationConfigError(
            f"model type {getattr(model_config, 'model_type', '?')!r} has no linear layer that bitsandbytes can "
            "quantize (found " + (f"only the skipped {', '.join(sorted(skip))}" if skip else "no nn.Linear") + ")",
            path=f"plugins.{CONFIG_PATH}",
            fix="remove the bitsandbytes section for this model (use plain LoRA), or pick a transformer LM",
        )
    return QuantizationPlan(
        training_dtype=training_dtype,
        compute_dtype=config.compute_dtype(training_dtype),
        quantized_modules=tuple(quantized),
        skipped_modules=tuple(sorted(skip)),
    )


def make_hf_bnb_config(config: BnbQuantizationConfig, plan: QuantizationPlan) -> Any:
    """The ``transformers.BitsAndBytesConfig`` equivalent to ``config`` for ``plan``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        bnb_4bit_quant_storage=plan.training_dtype,
        llm_int8_skip_modules=list(plan.skipped_modules) or None,
    )


def check_deepspeed_dtype(context: RunContext, training_dtype: torch.dtype) -> None:
    """Under DeepSpeed with bf16 / fp16 on, the engine casts every floating parameter to that dtype when it is built:
    the packed storage (held in the training dtype) must already be it, or the cast scrambles the 4-bit codes.

    Raises:
        AccelerationConfigError: the training dtype differs from DeepSpeed's compute dtype (before loading).
    """
    compute = context.compute_dtype if context.is_deepspeed else None
    if compute is None or training_dtype == compute:
        return
    name, want = str(training_dtype).replace("torch.", ""), str(compute).replace("torch.", "")
    raise AccelerationConfigError(
        f"the model would load in {name} (its 4-bit storage too), but DeepSpeed runs in {context.mixed_precision} "
        f"and casts every floating parameter to {want} when it builds its engine, which would scramble the packed "
        "4-bit weights",
        path=f"plugins.{CONFIG_PATH}",
        fix=f"load the model in {want} (from_pretrained / model_loader with dtype=torch.{want}), or turn DeepSpeed's "
        f"{context.mixed_precision} mode off",
    )


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _standalone_context() -> RunContext:
    """The run's shape for a call without one (outside a framework): one process, no FSDP, the current CUDA
    device or the CPU."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return RunContext(device=device)


def load_quantized_causal_lm(
    model_name_or_path: str, config: BnbQuantizationConfig, /, *, run_context: RunContext | None = None, **kwargs: Any
) -> nn.Module:
    """Load a causal LM with 4-bit bitsandbytes linear layers.

    Args:
        model_name_or_path: local directory or hub name.
        config: the plugin configuration.
        run_context: the run's shape (the plugin passes its ``run_context``): ``device`` is where the weights are
            quantized, ``fsdp_version`` chooses the staging (see :func:`resolve_load_staging`). Without one: one
            process, no FSDP, the current CUDA device or the CPU.
        **kwargs: ``from_pretrained`` arguments. ``torch_dtype``/``dtype`` is the training dtype
            (default: the checkpoint's). ``low_cpu_mem_usage=True`` under an initialised process group of
            more than one rank makes rank 0 load and broadcast (see the module docstring). ``device_map``
            defaults to ``run_context.device``. ``config`` (a ``PretrainedConfig``,
            e.g. the one ``AutoModelForCausalLM`` passes with the caller's overrides) is used instead of the
            checkpoint's. A ``quantization_config`` argument is refused (the plugin builds it).

    Returns:
        The model, with ``nn.Linear`` layers (except the output embedding) replaced by
        ``bitsandbytes.nn.Linear4bit`` holding packed weights in the training dtype.

    Raises:
        AccelerationConfigError: any problem found before loading (see :func:`plan_quantization`).
    """
    require_bitsandbytes()
    # imported here first when nothing imported it yet (transformers would, while loading), leaving out
    # bitsandbytes' notice about its optional CPU kernel from the Hugging Face hub (see import_bitsandbytes)
    from _fms_acceleration_startup import import_bitsandbytes

    import_bitsandbytes()
    from transformers import AutoConfig, PretrainedConfig

    kwargs = dict(kwargs)
    if "quantization_config" in kwargs:
        raise AccelerationConfigError(
            "model_loader got a quantization_config argument, but the bitsandbytes plugin builds its own",
            path=f"plugins.{CONFIG_PATH}",
            fix="drop quantization_config and set the options in the acceleration config section",
        )
    dtype_arg = kwargs.pop("torch_dtype", None)
    dtype_arg = kwargs.pop("dtype", dtype_arg)
    low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", None)
    trust_remote_code = kwargs.get("trust_remote_code", False)
    config_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    given_config = kwargs.pop("config", None)  # e.g. from AutoModelForCausalLM, with the caller's overrides
    if isinstance(given_config, PretrainedConfig):
        model_config = copy.deepcopy(given_config)  # the plan and the skeleton mark it quantized
    else:
        model_config = AutoConfig.from_pretrained(
            given_config or model_name_or_path, trust_remote_code=trust_remote_code, **config_kwargs
        )
    if isinstance(given_config, PretrainedConfig):
        kwargs["config"] = copy.deepcopy(given_config)  # transformers' own load gets the caller's config unchanged
    checkpoint_dtype = model_config.__dict__.get("dtype", model_config.__dict__.get("torch_dtype"))
    training_dtype = resolve_training_dtype(dtype_arg, checkpoint_dtype)
    context = run_context if run_context is not None else _standalone_context()
    check_deepspeed_dtype(context, training_dtype)
    build_kwargs = {"trust_remote_code": trust_remote_code}
    if "attn_implementation" in kwargs:
        build_kwargs["attn_implementation"] = kwargs["attn_implementation"]
    plan = plan_quantization(model_config, config, training_dtype, **build_kwargs)
    bnb_config = make_hf_bnb_config(config, plan)

    rank, world = _dist_world()
    rank0_only = bool(low_cpu_mem_usage) and world > 1
    device = context.device
    staging = resolve_load_staging(config, world_size=world, device=device, fsdp_version=context.fsdp_version)
    if rank0_only and rank > 0:
        return receive_quantized_model(model_config, bnb_config, plan, device, build_kwargs)
    model = None
    if staging != device and "device_map" not in kwargs:
        model = stream_quantized_causal_lm(
            model_name_or_path, model_config, bnb_config, plan, device, staging, build_kwargs
        )
    elif staging != device:
        logger.warning("bitsandbytes: a device_map was passed, so the model is loaded onto it (load_staging ignored)")
    if model is None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():  # transformers refuses a device_map under ZeRO-3; its quantizer places
            kwargs.setdefault("device_map", {"": device})  # the model on the current device itself
        model = _from_pretrained(model_name_or_path, bnb_config, training_dtype, kwargs)
    if rank0_only:
        broadcast_quantized_model(model, device)
    return model


def resolve_load_staging(
    config: BnbQuantizationConfig, *, world_size: int, device: torch.device, fsdp_version: int | None
) -> torch.device:
    """Where the loaded 4-bit model waits for sharding (option ``load_staging``, see the module docstring).

    Args:
        config: the plugin configuration.
        world_size: number of processes.
        device: the local training device.
        fsdp_version: the FSDP version the coming prepare will use, ``None`` when not FSDP or not known yet.

    Raises:
        AccelerationConfigError: ``cpu`` staging under FSDP1, which cannot move 4-bit layers unit by unit.
    """
    return staging_device(
        config.load_staging,
        world_size=world_size,
        device=device,
        fsdp_version=fsdp_version,
        config_path=CONFIG_PATH,
        fsdp1_problem="load_staging: cpu needs FSDP2, but this run uses FSDP1 (FSDP1 flattens bitsandbytes layers "
        "on the device they were loaded on)",
    )


def _from_pretrained(name: str, bnb_config: Any, dtype: torch.dtype, kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, quantization_config=bnb_config, dtype=dtype, **kwargs)
    _retie(model)
    return model


def _retie(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None and out.weight is not inp.weight:
            raise RuntimeError("tie_word_embeddings is set but the output and input embeddings could not be tied")


# --------------------------------------------------------------------------------------------- streamed load
def safetensors_files(model_name_or_path: str) -> list[Path] | str:
    """The safetensors files of a local checkpoint directory, or why there are none (a reason string)."""
    root = Path(model_name_or_path)
    if not root.is_dir():
        return f"{model_name_or_path!r} is not a local directory"
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({root / name for name in weight_map.values()})
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    return f"no model.safetensors or model.safetensors.index.json in {model_name_or_path}"


def _skeleton(model_config: Any, bnb_config: Any, plan: QuantizationPlan, build_kwargs: dict[str, Any]) -> nn.Module:
    """The module tree with parameters on ``meta`` (buffers real, on the host) and ``Linear4bit`` layers in place
    of the planned linears."""
    model_config.quantization_config = bnb_config
    model = build_meta_model(model_config, plan.training_dtype, host_buffers=True, **build_kwargs)
    specs = []
    for name in plan.quantized_modules:
        linear = model.get_submodule(name)
        specs.append((name, linear.in_features, linear.out_features, linear.bias is not None))
    _install_linear4bit(model, specs, bnb_config, plan)
    return model


def stream_quantized_causal_lm(
    model_name_or_path: str,
    model_config: Any,
    bnb_config: Any,
    plan: QuantizationPlan,
    quant_device: torch.device,
    staging: torch.device,
    build_kwargs: dict[str, Any],
) -> nn.Module | None:
    """Load a local safetensors checkpoint tensor by tensor: quantize each planned weight on ``quant_device`` and
    keep everything on ``staging`` (see the module docstring).

    Returns:
        The model, or ``None`` (with a warning naming the reason) when the checkpoint cannot be read this way:
        no local safetensors files, parameters of the model that the checkpoint lacks under their own names, or
        modules the model keeps in float32 (``_keep_in_fp32_modules``).
        Checkpoint tensors the model has no place for are skipped with a warning, as transformers does.
    """
    from safetensors import safe_open

    files = safetensors_files(model_name_or_path)
    if isinstance(files, str):
        logger.warning("bitsandbytes: load_staging %s not possible (%s); loading onto %s", staging, files, quant_device)
        return None
    model = _skeleton(model_config, bnb_config, plan, build_kwargs)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if plan.training_dtype == torch.float16:  # transformers keeps these in float32 only for float16 training
        keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if keep_fp32:
        logger.warning(
            "bitsandbytes: load_staging %s not possible (the model keeps %s in float32, which only transformers' "
            "loader reproduces); loading onto %s",
            staging,
            sorted(keep_fp32),
            quant_device,
        )
        return None
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys.update(handle.keys())
    missing = sorted(set(params) - keys - _tied_names(model))
    if missing:
        logger.warning(
            "bitsandbytes: load_staging %s not possible (the checkpoint lacks %d of the model's parameters, e.g. %s; "
            "transformers may rename them); loading onto %s",
            staging,
            len(missing),
            missing[:3],
            quant_device,
        )
        return None
    unexpected = keys - set(params) - set(buffers)
    if unexpected:  # as transformers does: tensors the model has no place for are not read
        logger.warning(
            "bitsandbytes: %d checkpoint tensors not used by the model, e.g. %s",
            len(unexpected),
            sorted(unexpected)[:3],
        )
    quantized = {f"{name}.weight" for name in plan.quantized_modules}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key in unexpected:
                    continue
                owner, leaf = _owner(model, key)
                tensor = handle.get_tensor(key)
                if key in quantized:
                    owner._parameters[leaf] = _quantize_to(owner, tensor, plan.training_dtype, quant_device, staging)
                elif key in params:
                    target = params[key]
                    owner._parameters[leaf] = nn.Parameter(
                        tensor.to(staging, dtype=target.dtype), requires_grad=target.requires_grad
                    )
                else:
                    owner._buffers[leaf] = tensor.to(staging, dtype=buffers[key].dtype)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary inv_freq), built on the host
        if buf.device != staging:
            owner, leaf = _owner(model, name)
            owner._buffers[leaf] = buf.to(staging)
    _finish_quantized_model(model, bnb_config)
    _load_generation_config(model, model_name_or_path)
    logger.info("bitsandbytes: %d weights quantized on %s and staged on %s", len(quantized), quant_device, staging)
    return model


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, attribute)`` of the parameter, buffer or sub-module called ``name`` in ``model``."""
    owner_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), leaf


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names a checkpoint may omit because they are tied to another (the output embedding)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return set()
    output = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is output and output is not None}


def _quantize_to(
    module: nn.Module, tensor: torch.Tensor, dtype: torch.dtype, quant_device: torch.device, staging: torch.device
) -> nn.Parameter:
    """``tensor`` as the 4-bit weight of ``module`` (a meta ``Linear4bit``): quantized on ``quant_device``, kept
    on ``staging`` (the quantization state moves with it; ``module.quant_state`` is the same object)."""
    import bitsandbytes as bnb

    template = module.weight
    weight = bnb.nn.Params4bit(
        tensor.to(quant_device, dtype=dtype),
        requires_grad=False,
        blocksize=template.blocksize,
        compress_statistics=template.compress_statistics,
        quant_type=template.quant_type,
        quant_storage=template.quant_storage,
        module=module,
    ).to(quant_device)
    if staging != quant_device:
        weight = weight.to(staging)
        weight.module = module
    return weight


def _load_generation_config(model: nn.Module, model_name_or_path: str) -> None:
    if not (Path(model_name_or_path) / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(model_name_or_path)


# ------------------------------------------------------------------------------------------------- broadcast
_QS_KIND = "qs"


def _comm_device(device: torch.device) -> torch.device:
    """Where broadcast tensors travel: the training ``device`` under NCCL, else the CPU."""
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return device
    return torch.device("cpu")


def _iter_payload(model: nn.Module) -> Iterable[tuple[str, str, torch.Tensor, bool]]:
    """``(kind, name, tensor, requires_grad)`` in a fixed order: params, 4-bit stats, then buffers."""
    import bitsandbytes as bnb

    for name, param in model.named_parameters():
        yield "param", name, param.data, param.requires_grad
        if isinstance(param, bnb.nn.Params4bit):
            assert param.quant_state is not None, f"{name} is a Params4bit without quant_state"
            for key, value in param.quant_state.as_dict(packed=True).items():
                yield _QS_KIND, f"{name}\x00{key}", value, False
    for name, buf in model.named_buffers():
        yield "buffer", name, buf, False


def broadcast_quantized_model(model: nn.Module, training_device: torch.device) -> None:
    """On rank 0: send the quantized model's tensors to every other rank (see :func:`receive_quantized_model`);
    ``training_device`` is the process's device (the run context's)."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    comm = _comm_device(training_device)
    payload = list(_iter_payload(model))
    manifest = {
        "entries": [(kind, name, tuple(t.shape), t.dtype, rg) for kind, name, t, rg in payload],
        "quantized": [
            (name, m.in_features, m.out_features, m.bias is not None)
            for name, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)
        ],
        "config": model.config.to_dict(),
        "device_type": device.type,
    }
    torch.distributed.broadcast_object_list([manifest], src=0)
    for _, _, tensor, _ in payload:
        torch.distributed.broadcast(tensor.detach().contiguous().to(comm), src=0)


def receive_quantized_model(
    model_config: Any, bnb_config: Any, plan: QuantizationPlan, device: torch.device, build_kwargs: dict[str, Any]
) -> nn.Module:
    """On ranks > 0: build the module tree on meta and fill it with the tensors rank 0 broadcasts."""
    import bitsandbytes as bnb

    holder: list[Any] = [None]
    torch.distributed.broadcast_object_list(holder, src=0)
    manifest = holder[0]
    target = device if manifest["device_type"] == device.type else torch.device(manifest["device_type"])
    comm = _comm_device(device)
    model_config.quantization_config = bnb_config
    model = build_meta_model(model_config, plan.training_dtype, **build_kwargs)
    _install_linear4bit(model, manifest["quantized"], bnb_config, plan)
    received: dict[str, tuple[torch.Tensor, bool]] = {}
    quant_stats: dict[str, dict[str, torch.Tensor]] = {}
    for kind, name, shape, dtype, requires_grad in manifest["entries"]:
        tensor = torch.empty(shape, dtype=dtype, device=comm)
        torch.distributed.broadcast(tensor, src=0)
        tensor = tensor.to(target)
        if kind == _QS_KIND:
            pname, key = name.split("\x00")
            quant_stats.setdefault(pname, {})[key] = tensor
        else:
            received[f"{kind}\x00{name}"] = (tensor, requires_grad)
    for key, (tensor, requires_grad) in received.items():
        kind, name = key.split("\x00")
        owner, leaf = _owner(model, name)
        if kind == "buffer":
            owner._buffers[leaf] = tensor
        elif name in quant_stats:
            owner._parameters[leaf] = bnb.nn.Params4bit.from_prequantized(
                data=tensor, quantized_stats=quant_stats[name], requires_grad=False, device=target, module=owner
            )
        else:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)
    _finish_quantized_model(model, bnb_config)
    return model


def _install_linear4bit(
    model: nn.Module, specs: Iterable[tuple[str, int, int, bool]], bnb_config: Any, plan: QuantizationPlan
) -> None:
    """Replace each ``(name, in_features, out_features, has_bias)`` linear by an empty (meta) ``Linear4bit``."""
    import bitsandbytes as bnb

    for name, in_features, out_features, has_bias in specs:
        parent, leaf = _owner(model, name)
        new = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=plan.compute_dtype,
            compress_statistics=bnb_config.bnb_4bit_use_double_quant,
            quant_type=bnb_config.bnb_4bit_quant_type,
            quant_storage=plan.training_dtype,
            device="meta",
        )
        setattr(parent, leaf, new)


def _finish_quantized_model(model: nn.Module, bnb_config: Any) -> None:
    """Re-tie, check that nothing is left on ``meta``, and mark the model as transformers marks a 4-bit model."""
    from transformers.quantizers import AutoHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    _retie(model)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [
        n for n, b in model.named_buffers() if b.is_meta
    ]
    if leftover:
        raise RuntimeError(f"the 4-bit load left tensors on the meta device: {leftover[:5]}")
    model.is_quantized = True
    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.hf_quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    model.eval()
