"""Shared helpers for the bitsandbytes QLoRA plugin tests (tiny random Llama, training loops)."""

from __future__ import annotations

import os
import socket
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
