"""Random-init tiny causal language models saved to a folder, shared by the integration tests (no hub download)."""

from __future__ import annotations

from pathlib import Path

import torch

# the special tokens of the tests' word-level tokenizers (<pad> 0, <unk> 1, <eos> 2; no separate <bos>)
WORD_TOKENIZER_IDS = {"pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 2}


def save_seeded(model_class, config, path: Path, seed: int = 0) -> Path:
    """Build ``model_class(config)`` after seeding torch with ``seed``, save it to ``path`` and return ``path``."""
    torch.manual_seed(seed)
    model_class(config).save_pretrained(path)
    return path


def tiny_llama(path: Path, vocab_size: int, *, num_hidden_layers: int = 2, **config) -> Path:
    """A random-init Llama (hidden 64, intermediate 128, 4 heads, 2 key-value heads) saved to ``path``; ``config``
    adds or overrides ``LlamaConfig`` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return save_seeded(LlamaForCausalLM, LlamaConfig(**{**fields, **config}), path)


def tiny_mixtral(path: Path, vocab_size: int = 96, **config) -> Path:
    """A random-init 2-layer Mixtral (hidden 32, 4 experts, top-2) saved to ``path``; ``config`` adds or overrides
    ``MixtralConfig`` fields."""
    from transformers import MixtralConfig, MixtralForCausalLM

    fields = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
    }
    return save_seeded(MixtralForCausalLM, MixtralConfig(**{**fields, **config}), path)
