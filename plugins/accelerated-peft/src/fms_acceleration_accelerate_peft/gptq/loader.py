"""Loading a causal LM from a Hugging Face GPTQ checkpoint, natively (no auto-gptq, gptqmodel or optimum).

Order of work, so that every problem is reported before memory is spent:

1. ``config.json`` (or the ``config`` argument) and the ``quantization_config`` (or ``quantize_config.json``) are
   read and validated (:func:`.checkpoint.parse_gptq_format`); the training dtype is resolved and checked;
2. the safetensors headers are read: every quantized module's tensors are checked against each other and the
   config (:func:`.checkpoint.inspect_gptq_checkpoint`);
3. the model's module tree is built on the ``meta`` device (no memory), its linears are compared with the
   checkpoint's quantized modules (:func:`.checkpoint.check_against_model`) and replaced by empty
   :class:`~.layer.GPTQLinear` layers;
4. the tensors are read one at a time onto ``run_context.device``: packed integers as they are, ``scales`` in the
   checkpoint's dtype, every other floating-point tensor in the training dtype; tied weights are re-tied and the
   generation config is read. Each layer's ``sequential_g_idx`` (``g_idx[k] == k // group_size``: no act-order, so
   the kernels compute groups from ``k``) is checked on its ``g_idx`` as read, in host memory (True for a
   checkpoint without ``g_idx``).

The model keeps ``config.quantization_config`` (the validated keys) and ``quantization_method = "gptq"``, so
``save_pretrained`` writes a GPTQ checkpoint this loader (and any GPTQ loader) reads again, and PEFT refuses to
merge adapters into the packed weights.

Several processes (an initialised process group of more than one rank): with ``low_cpu_mem_usage=True`` only
global rank 0 reads the tensors (step 4); every other rank builds the same skeleton (steps 1 to 3 run on every rank,
so a bad checkpoint fails everywhere before any collective) and receives the tensors by broadcast, as raw bytes
(packed int32 words, scales, every other parameter and buffer), with each layer's ``sequential_g_idx``, then
re-ties. Without it every rank reads the files itself.

Staging (``load_staging``): under FSDP2 with several processes on GPUs the model waits in host memory until FSDP2
moves and shards it one unit at a time (``auto``/``cpu``), so no GPU ever holds the whole packed model; otherwise
it is loaded onto the process's device.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError

from ..staging import staging_device
from .checkpoint import (
    GPTQCheckpoint,
    GPTQFormat,
    check_against_model,
    inspect_gptq_checkpoint,
    not_gptq_error,
    parse_gptq_format,
    read_quantization_config,
)
from .config import CONFIG_PATH, TRAINING_DTYPES, GPTQLoraConfig, check_training_dtype
from .layer import GPTQLinear

logger = logging.getLogger("fms_acceleration_accelerate_peft")

_DTYPE_NAMES = MappingProxyType({name: dtype for dtype, name in TRAINING_DTYPES.items()})
_PASSED_THROUGH = ("revision", "token", "cache_dir", "local_files_only", "use_safetensors")
"""``from_pretrained`` arguments that change nothing for a local safetensors checkpoint read here."""


def resolve_training_dtype(value: Any, checkpoint_dtype: Any) -> torch.dtype:
    """The training dtype from a ``torch_dtype`` / ``dtype`` argument (a dtype, its name, ``"auto"`` or ``None``).

    ``None`` / ``"auto"`` take the checkpoint's ``dtype`` (float16 for a GPTQ checkpoint that names none, the
    dtype of its scales). The result must be bfloat16, float16 or float32, whatever it came from.

    Raises:
        AccelerationConfigError: a name that is not a dtype, or a dtype GPTQ-LoRA does not train in.
    """
    if value is None or value == "auto":
        value = checkpoint_dtype if checkpoint_dtype is not None else torch.float16
    if isinstance(value, str):
        name = value.replace("torch.", "")
        if name not in _DTYPE_NAMES:
            raise AccelerationConfigError(
                f"torch_dtype {value!r} is not a training dtype",
                path=CONFIG_PATH,
                fix="pass torch_dtype=torch.bfloat16 (or float16 / float32)",
            )
        value = _DTYPE_NAMES[name]
    if not isinstance(value, torch.dtype):
        raise AccelerationConfigError(
            f"torch_dtype {value!r} is not a torch dtype",
            path=CONFIG_PATH,
            fix="pass torch_dtype=torch.bfloat16 (or float16 / float32)",
        )
    return check_training_dtype(value)


_WHOLE_MODEL_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _load_device(kwargs: dict[str, Any], context: RunContext) -> torch.device:
    """``run_context.device``, or the one device a ``device_map`` names (a mapping of ``""`` to a device, a device,
    its name or index). ``"auto"`` (what TRL passes on a GPU) and the other placement strategies mean the process's
    device: the plugin puts the whole model on one device. Per-module maps over several devices are refused."""
    device_map = kwargs.pop("device_map", None)
    if device_map is None:
        return context.device
    if isinstance(device_map, str) and device_map in _WHOLE_MODEL_MAPS:
        logger.info(
            "GPTQ: device_map %r: the whole model goes to %s (the process's device)", device_map, context.device
        )
        return context.device
    if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) == 1 and device_map:
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        try:
            return torch.device(device_map)
        except RuntimeError:
            pass
    raise AccelerationConfigError(
        f"device_map {device_map!r} places the model over several devices, which the GPTQ loader does not do",
        path=CONFIG_PATH,
        fix="drop device_map (the model goes to the process's device) or pass one device, e.g. device_map={'': 0}",
    )


def load_gptq_causal_lm(
    model_name_or_path: str | Path,
    config: GPTQLoraConfig,
    /,
    *,
    run_context: RunContext | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a causal LM from a GPTQ checkpoint folder with :class:`~.layer.GPTQLinear` layers.

    Args:
        model_name_or_path: local folder with ``config.json`` (+ ``quantize_config.json``) and safetensors files.
        config: the plugin configuration.
        run_context: the run's shape; the model goes to its ``device`` (default: one process, the current CUDA
            device or the CPU).
        **kwargs: ``from_pretrained`` arguments: ``torch_dtype`` / ``dtype`` (training dtype of the non-quantized
            weights and the matmul; default the checkpoint's), ``config`` (a ``PretrainedConfig`` with the
            caller's overrides), ``trust_remote_code``, ``attn_implementation``, ``device_map`` (one device);
            ``low_cpu_mem_usage=True`` under a process group of more than one rank: rank 0 reads, the others
            receive (see the module docstring); ``revision`` / ``token`` / ``cache_dir`` are accepted and change
            nothing; any other name that is an attribute of the model config overrides it (as ``from_pretrained``
            does).

    Returns:
        The model in eval mode (as ``from_pretrained`` returns it), on the run's device, or in host memory when
        ``load_staging`` says so (see :func:`resolve_load_staging`).

    Raises:
        AccelerationConfigError: anything wrong with the arguments or the checkpoint, before the model is built.
    """
    from transformers import AutoConfig, PretrainedConfig

    if not config.from_quantized:  # the config class refuses it; kept for configs built around the parser
        raise not_gptq_error(model_name_or_path, "from_quantized is false")
    kwargs = dict(kwargs)
    if kwargs.pop("quantization_config", None) is not None:
        raise AccelerationConfigError(
            "model_loader got a quantization_config argument, but the GPTQ plugin reads the checkpoint's own",
            path=CONFIG_PATH,
            fix="drop quantization_config from the call",
        )
    root = Path(model_name_or_path)
    if not root.is_dir():
        raise AccelerationConfigError(
            f"GPTQ checkpoint {str(model_name_or_path)!r} is not a local folder",
            path=CONFIG_PATH,
            fix="download the checkpoint first (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and pass DIR",
        )
    dtype_arg = kwargs.pop("torch_dtype", None)
    dtype_arg = kwargs.pop("dtype", dtype_arg)
    trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
    attn_implementation = kwargs.pop("attn_implementation", None)
    given_config = kwargs.pop("config", None)
    low_cpu_mem_usage = bool(kwargs.pop("low_cpu_mem_usage", False))
    context = run_context if run_context is not None else _standalone_context()
    device_map_given = kwargs.get("device_map") is not None
    device = _load_device(kwargs, context)
    for key in _PASSED_THROUGH:
        kwargs.pop(key, None)
    rank, world = _dist_world()
    staging = resolve_load_staging(
        config, world_size=max(world, context.world_size), device=device, fsdp_version=context.fsdp_version
    )
    if device_map_given and staging != device:
        logger.warning("GPTQ: a device_map was passed, so the model is loaded onto it (load_staging ignored)")
        staging = device

    # 1. configs: no tensor read yet
    if isinstance(given_config, PretrainedConfig):
        model_config = copy.deepcopy(given_config)
    else:
        model_config = AutoConfig.from_pretrained(given_config or str(root), trust_remote_code=trust_remote_code)
    unknown = sorted(k for k in kwargs if not hasattr(model_config, k))
    if unknown:
        raise AccelerationConfigError(
            f"model_loader got arguments the GPTQ loader does not take: {', '.join(unknown)}",
            path=CONFIG_PATH,
            fix="pass only from_pretrained arguments (torch_dtype, config, attn_implementation, trust_remote_code, "
            "device_map) or model config attributes",
        )
    for key, value in kwargs.items():
        setattr(model_config, key, value)
    found = read_quantization_config(root, model_config)
    if found is None:
        raise not_gptq_error(root, "its config.json has no quantization_config and there is no quantize_config.json")
    fmt = parse_gptq_format(*found)
    checkpoint_dtype = model_config.__dict__.get("dtype", model_config.__dict__.get("torch_dtype"))
    training_dtype = resolve_training_dtype(dtype_arg, checkpoint_dtype)

    # 2. safetensors headers
    checkpoint = inspect_gptq_checkpoint(root, fmt)

    # 3. module tree on meta, compared with the checkpoint
    model_config.quantization_config = fmt.as_quantization_config()
    model = build_skeleton(model_config, training_dtype, attn_implementation, trust_remote_code)
    check_against_model(checkpoint, model)
    install_gptq_layers(model, checkpoint, training_dtype)

    # 4. tensors: read here, or (ranks > 0 of a rank-0 load) received from rank 0
    rank0_only = low_cpu_mem_usage and world > 1
    if rank0_only and rank > 0:
        receive_gptq_model(model, staging, context.device)
        _finish(model, root)
    else:
        load_tensors(model, checkpoint, training_dtype, staging)
        _finish(model, root)  # tied weights tied: sent once
        if rank0_only:
            broadcast_gptq_model(model, context.device)
    logger.info(
        "GPTQ: %d quantized linears (%d-bit, group_size %d, desc_act %s, %s) %s %s, training dtype %s",
        len(checkpoint.modules),
        fmt.bits,
        fmt.group_size,
        fmt.desc_act,
        fmt.checkpoint_format,
        "received from rank 0 on" if rank0_only and rank > 0 else "loaded on",
        staging,
        str(training_dtype).replace("torch.", ""),
    )
    return model


def resolve_load_staging(
    config: GPTQLoraConfig, *, world_size: int, device: torch.device, fsdp_version: int | None
) -> torch.device:
    """Where the loaded GPTQ model waits for sharding (option ``load_staging``).

    Args:
        config: the plugin configuration.
        world_size: number of processes.
        device: the process's training device.
        fsdp_version: the FSDP version of the coming prepare, ``None`` when not FSDP or not known yet.

    Raises:
        AccelerationConfigError: ``cpu`` staging under FSDP1 (the framework moves units to the device only in its
            FSDP2 path).
    """
    return staging_device(
        config.load_staging,
        world_size=world_size,
        device=device,
        fsdp_version=fsdp_version,
        config_path=CONFIG_PATH,
        fsdp1_problem="load_staging: cpu needs FSDP2, but this run uses FSDP1",
    )


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _comm_device(device: torch.device) -> torch.device:
    """Where broadcast tensors travel: the process's device under NCCL, else the host."""
    return device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def _payload(model: nn.Module) -> list[tuple[str, str, torch.Tensor, bool]]:
    """``(kind, name, tensor, requires_grad)`` in a fixed order: parameters (tied ones once), then buffers."""
    items = [("param", name, p.data, p.requires_grad) for name, p in model.named_parameters()]
    return items + [("buffer", name, b, False) for name, b in model.named_buffers()]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def broadcast_gptq_model(model: nn.Module, device: torch.device) -> None:
    """On rank 0: send every parameter and buffer of the loaded model to the other ranks (raw bytes, one tensor
    at a time); see :func:`receive_gptq_model`. ``device``: the process's device (NCCL sends from it)."""
    comm = _comm_device(device)
    payload = _payload(model)
    manifest = [(kind, name, tuple(t.shape), t.dtype, grad) for kind, name, t, grad in payload]
    flags = {name: m.sequential_g_idx for name, m in model.named_modules() if isinstance(m, GPTQLinear)}
    torch.distributed.broadcast_object_list([(manifest, flags)], src=0)
    for _, _, tensor, _ in payload:
        torch.distributed.broadcast(_as_bytes(tensor).to(comm), src=0)


def receive_gptq_model(model: nn.Module, staging: torch.device, device: torch.device) -> None:
    """On ranks > 0: fill ``model`` (the skeleton, tensors on ``meta``) with the tensors rank 0 broadcasts, onto
    ``staging``. ``device``: the process's device (NCCL receives on it).

    Raises:
        RuntimeError: rank 0 sent tensors this rank's skeleton does not have (the ranks built different models);
            a tensor it did not send is reported by the meta-device check after re-tying.
    """
    holder: list[Any] = [None]
    torch.distributed.broadcast_object_list(holder, src=0)
    manifest, flags = holder[0]
    own = {(kind, name) for kind, name, _, _ in _payload(model)}
    sent = {(kind, name) for kind, name, _, _, _ in manifest}
    comm = _comm_device(device)
    received = []
    for kind, name, shape, dtype, requires_grad in manifest:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        raw = torch.empty(nbytes, dtype=torch.uint8, device=comm)
        torch.distributed.broadcast(raw, src=0)
        received.append((kind, name, raw.to(staging).view(dtype).reshape(shape), requires_grad))
    # names this skeleton has but rank 0 did not send are tied weights (re-tied next; anything else is left on
    # meta and reported by _finish)
    if not sent <= own:
        extra = sorted(n for _, n in sent - own)[:3]
        raise RuntimeError(
            f"rank 0 loaded a different model than this rank built (tensors this rank lacks: {extra}); every rank "
            "must load the same checkpoint with the same arguments"
        )
    for kind, name, tensor, requires_grad in received:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if kind == "buffer":
            owner._buffers[leaf] = tensor
        else:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)
    for name, flag in flags.items():  # rank 0 checked each g_idx as it read it: no device read here
        model.get_submodule(name).sequential_g_idx = flag


def _standalone_context() -> RunContext:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return RunContext(device=device)


def build_skeleton(
    model_config: Any, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool
) -> nn.Module:
    """The causal-LM module tree of ``model_config``: parameters on ``meta``, buffers built on the host (so
    non-persistent ones, e.g. rotary ``inv_freq``, get their computed values)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    build: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        build["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        try:
            return AutoModelForCausalLM.from_config(model_config, dtype=dtype, **build)
        except ValueError as exc:
            raise AccelerationConfigError(
                f"model type {getattr(model_config, 'model_type', '?')!r} is not a causal LM that transformers can "
                f"build ({exc})",
                path=CONFIG_PATH,
                fix="use a GPTQ checkpoint of a causal language model (AutoModelForCausalLM)",
            ) from None


def install_gptq_layers(model: nn.Module, checkpoint: GPTQCheckpoint, compute_dtype: torch.dtype) -> None:
    """Replace each quantized module's ``nn.Linear`` (on ``meta``) by an empty :class:`GPTQLinear` on ``meta``."""
    fmt: GPTQFormat = checkpoint.format
    for name, spec in checkpoint.modules.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = GPTQLinear.from_format(
            fmt,
            spec.in_features,
            spec.out_features,
            bias=spec.has_bias,
            compute_dtype=compute_dtype,
            scales_dtype=spec.scales_dtype,
            device="meta",
        )
        setattr(parent, leaf, layer)


def load_tensors(
    model: nn.Module, checkpoint: GPTQCheckpoint, training_dtype: torch.dtype, device: torch.device
) -> None:
    """Fill ``model`` (a skeleton with :class:`GPTQLinear` layers) from the checkpoint's files onto ``device``.

    Packed integers keep their int32 words, ``scales`` the checkpoint's dtype, ``bias`` and every other
    floating-point tensor go to ``training_dtype`` (integer buffers keep theirs); a missing ``g_idx`` (no
    act-order) is ``k // group_size``. Each layer's ``sequential_g_idx`` is set from its ``g_idx`` as read (in
    host memory, before it moves to ``device``). Tensors the model has no place for are skipped with a warning.
    """
    from fms_acceleration_accelerate_kernels.gptq import gptq_sequential_g_idx
    from safetensors import safe_open

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    quantized = checkpoint.quantized_keys()
    unexpected = sorted(k for k in checkpoint.tensors if k not in params and k not in buffers and k not in quantized)
    if unexpected:
        logger.warning(
            "GPTQ: %d checkpoint tensors are not used by the model, e.g. %s", len(unexpected), unexpected[:3]
        )
    skip = set(unexpected)
    for file in checkpoint.files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key in skip:
                    continue
                owner_name, _, leaf = key.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                tensor = handle.get_tensor(key)
                if isinstance(owner, GPTQLinear) and leaf != "bias":
                    dtype = tensor.dtype if leaf == "scales" else torch.int32
                    if leaf == "g_idx":
                        owner.sequential_g_idx = gptq_sequential_g_idx(tensor, owner.group_size)
                    owner._buffers[leaf] = tensor.to(device=device, dtype=dtype)
                elif key in params:
                    target = params[key]
                    owner._parameters[leaf] = nn.Parameter(
                        tensor.to(device=device, dtype=training_dtype if tensor.is_floating_point() else tensor.dtype),
                        requires_grad=target.requires_grad and tensor.is_floating_point(),
                    )
                else:  # a persistent buffer of the model: the dtype the model gives it
                    owner._buffers[leaf] = tensor.to(device=device, dtype=buffers[key].dtype)
    for name, spec in checkpoint.modules.items():
        if not spec.has_g_idx:
            layer = model.get_submodule(name)
            groups = torch.arange(spec.in_features, dtype=torch.int32, device=device)
            layer._buffers["g_idx"] = (
                groups // checkpoint.format.group_size
                if checkpoint.format.group_size != -1
                else torch.zeros_like(groups)
            )
            layer.sequential_g_idx = True
    for name, buf in list(model.named_buffers()):  # non-persistent buffers built on the host (rotary inv_freq)
        if buf.device != device and not buf.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[leaf] = buf.to(device)


def _finish(model: nn.Module, root: Path) -> None:
    """Re-tie, check that nothing is left on ``meta``, read the generation config, mark the model GPTQ."""
    from transformers.utils.quantization_config import QuantizationMethod

    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [
        n for n, b in model.named_buffers() if b.is_meta
    ]
    if leftover:
        raise RuntimeError(f"the GPTQ load left tensors on the meta device: {leftover[:5]}")
    if (root / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(root))
    model.quantization_method = QuantizationMethod.GPTQ
    model.eval()
