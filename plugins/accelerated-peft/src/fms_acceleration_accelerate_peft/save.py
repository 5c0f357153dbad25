"""Saving: LoRA adapters in standard PEFT format, and full state dicts gathered from FSDP.

Adapters are written by peft itself (``PeftModel.save_pretrained`` with the gathered adapter tensors), so
the directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` and loads with plain
``peft.PeftModel.from_pretrained`` on an unquantized or a 4-bit base, without this package.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from .packed4bit import Packed4bitWeight

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def find_peft_model(model: nn.Module) -> nn.Module:
    """The ``peft.PeftModel`` inside ``model`` (itself, or under FSDP1/DDP/compile wrappers)."""
    from peft import PeftModel

    seen = model
    for _ in range(8):
        if isinstance(seen, PeftModel):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            break
        seen = inner
    raise TypeError(f"no peft.PeftModel found in {type(model).__name__}; adapters can only be saved from one")


def _is_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def gather_packed(local: Packed4bitWeight, dtensor: Any) -> Packed4bitWeight:
    """All-gather a row-sharded :class:`Packed4bitWeight` DTensor into the full packed weight (every rank)."""
    import torch.distributed as dist

    group = dtensor.device_mesh.get_group()
    world = dist.get_world_size(group)
    parts = []
    for inner in (local.packed, local.absmax):
        out = torch.empty(inner.numel() * world, dtype=inner.dtype, device=inner.device)
        dist.all_gather_into_tensor(out, inner.contiguous(), group=group)
        parts.append(out)
    return Packed4bitWeight(
        parts[0], parts[1], tuple(dtensor.shape), local.dtype, local.blocksize, local.quant_type, local.row_numel
    )


def gather_full_state_dict(
    model: nn.Module, *, trainable_only: bool = False, dequantize: bool = True, cpu: bool = True
) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) parameters of ``model`` on every rank, names without FSDP prefixes.

    Works for unsharded models, FSDP2 (DTensors, including packed 4-bit weights, gathered as packed bytes)
    and FSDP1 (through ``summon_full_params``). Every rank must call it.

    Args:
        model: the model (wrapped or not).
        trainable_only: only parameters with ``requires_grad`` (the adapters).
        dequantize: packed 4-bit weights as dense tensors in their logical dtype (else as
            :class:`Packed4bitWeight`).
        cpu: move the results to CPU.

    Returns:
        ``{qualified_name: tensor}``.
    """
    from torch.distributed.tensor import DTensor

    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        if _is_fsdp1(model):
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(model, writeback=False))
        for name, param in model.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            tensor: Any = param.detach()
            if isinstance(tensor, DTensor):
                local = tensor._local_tensor
                tensor = gather_packed(local, tensor) if isinstance(local, Packed4bitWeight) else tensor.full_tensor()
            if isinstance(tensor, Packed4bitWeight) and dequantize:
                tensor = tensor.dequantize()
            if cpu:
                tensor = tensor.cpu()
            state[_clean(name)] = tensor.clone() if not isinstance(tensor, Packed4bitWeight) else tensor
    return state


def save_lora_adapters(model: nn.Module, output_dir: str | os.PathLike, *, is_main_process: bool | None = None) -> None:
    """Collective: write the LoRA adapters of ``model`` in standard PEFT format to ``output_dir``.

    Every rank must call it (the adapters are gathered from FSDP shards); the main process writes.

    Args:
        model: a ``PeftModel``, possibly wrapped/sharded by FSDP1 or FSDP2.
        output_dir: target directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        is_main_process: who writes (default: global rank 0).
    """
    import torch.distributed as dist

    peft_model = find_peft_model(model)
    state = gather_full_state_dict(model, trainable_only=True)
    prefix_len = 0
    names = list(state)
    own = {_clean(n) for n, _ in peft_model.named_parameters()}
    if names and names[0] not in own:  # gathered through an outer wrapper: strip its leading path
        for candidate in own:
            if names[0].endswith(candidate):
                prefix_len = len(names[0]) - len(candidate)
                break
    state = {n[prefix_len:]: t for n, t in state.items()}
    if is_main_process is None:
        is_main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if is_main_process:
        peft_model.save_pretrained(os.fspath(output_dir), state_dict=state, safe_serialization=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
