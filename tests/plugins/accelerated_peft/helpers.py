"""Shared helpers for the bitsandbytes QLoRA plugin tests (tiny random Llama, training loops)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HIDDEN = 128
VOCAB = 96


def tiny_llama(path: Path, *, tie: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a random-init 2-layer Llama (hidden 128) to ``path`` and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


def lora_config(target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r: int = 8):
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def batches(n: int, *, batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """``n`` deterministic token batches ``[batch, seq]`` drawn from a small repeating pattern (learnable)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, VOCAB, (8, seq), generator=g)
    return [base[torch.randint(0, 8, (batch,), generator=g)] for _ in range(n)]


def train(model: torch.nn.Module, data: list[torch.Tensor], *, lr: float = 1e-2) -> list[float]:
    """Plain AdamW loop over ``data``; returns the losses."""
    torch.manual_seed(0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import datetime

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def prepare_fsdp2(fw, model: torch.nn.Module, world: int, *, shard: bool):
    """The framework's FSDP2 prepare flow without Accelerate: contributions, unit plan, our own ``fully_shard``
    (when ``shard``), then every plugin's ``after_prepare``. Returns the merged contribution."""
    from fms_acceleration_accelerate.distributed import (
        PrepareContext,
        apply_fsdp2_plan,
        collect_contributions,
        fully_shard_kwargs_from_policy,
        plan_fsdp_units,
    )

    context = PrepareContext(distributed_type="FSDP", fsdp_version=2, world_size=world)
    merged = collect_contributions(fw.plugins, model, context)
    if shard:
        plan = plan_fsdp_units(model, merged, 2)
        apply_fsdp2_plan(model, plan, merged, fully_shard_kwargs_from_policy(), shard_root=True)
    for plugin in fw.plugins:
        plugin.after_prepare(model, context)
    return merged


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) gradients of the trainable parameters, keyed by name without checkpoint wrappers."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    return out


def train_sharded(
    model: torch.nn.Module, data: Sequence[torch.Tensor], rank: int, world: int, *, grads_at_step: int = 0
) -> tuple[list[float], dict[str, torch.Tensor] | None]:
    """AdamW steps where each rank takes its slice of every batch. Returns the global (rank-mean) losses and the
    gradients of step ``grads_at_step`` (negative: from the end)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads_step = grads_at_step % len(data)
    losses, grads = [], None
    for step, ids in enumerate(data):
        part = ids.chunk(world)[rank]
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        if step == grads_step:
            grads = trainable_grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses, grads


def spawn_workers(worker: Callable[..., None], args: tuple, nprocs: int, timeout: float) -> None:
    """Start ``worker(rank, *args)`` in ``nprocs`` spawned processes; kill them and fail after ``timeout`` s."""
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout}s")


BNB = {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}}
"""Default section. CPU tests train in float32 (bf16 matmuls are ~10x slower on CPUs without bf16 units)."""


def framework(section: dict | None = None):
    from fms_acceleration_accelerate import AccelerationFramework

    body = section if section is not None else BNB["peft"]["quantization"]["bitsandbytes"]
    return AccelerationFramework({"peft": {"quantization": {"bitsandbytes": body}}})


def plugin_model(path: Path, section: dict | None = None, *, dtype: torch.dtype = torch.float32, lora=None, **kw):
    """Load + augment through the framework API (the seed's integration)."""
    fw = framework(section)
    model = fw.model_loader(str(path), dtype=dtype, **kw)
    model, args = fw.augmentation(model, None, (lora or lora_config(),))
    assert args == (None,)
    return fw, model


def quantized_base(path: Path, *, quant_type: str = "nf4", dtype: torch.dtype = torch.float32):
    """A 4-bit model loaded by plain transformers (BitsAndBytesConfig), no plugin code."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb, dtype=dtype)


def reference_model(path: Path, *, quant_type: str = "nf4", dtype: torch.dtype = torch.float32, lora=None):
    """The plain Hugging Face path: BitsAndBytesConfig + get_peft_model."""
    from peft import get_peft_model

    return get_peft_model(quantized_base(path, quant_type=quant_type, dtype=dtype), lora or lora_config())
