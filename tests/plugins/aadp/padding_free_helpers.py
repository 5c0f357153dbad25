"""Tiny models, batches and references of the padding-free tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fms_acceleration_accelerate import AccelerationFramework
from fms_acceleration_accelerate.registry import PluginRegistry
from tests.plugins.fused_ops.tiny_models import TINY_CONFIGS, VOCAB, tiny_config

ARCHITECTURES = tuple(TINY_CONFIGS)
"""Every architecture of the model-spec table (the fused-ops tests' tiny configurations)."""

# where the architecture has them, the features padding-free attention must honour are switched on, with windows
# shorter than the examples so that they matter
FEATURES: dict[str, dict[str, Any]] = {
    "mistral": dict(sliding_window=4),
    "mixtral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "gemma2": dict(attn_logit_softcapping=20.0, sliding_window=4),
    "phi3": dict(sliding_window=6),
    "gpt_oss": dict(sliding_window=4),  # sliding layers alternate with full ones; attention sinks in every layer
}

LENGTHS = (9, 5, 7)
"""Example lengths of the test batch (padded to 9)."""


def save_tiny(model_type: str, folder: Path, **overrides: Any) -> Path:
    """Save a random-initialised tiny model of ``model_type`` (fp32, norms perturbed) to ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(model_type, **{**FEATURES.get(model_type, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def load_tiny(folder: Path, attn_implementation: str = "eager") -> Any:
    """The saved model, in train mode (no dropout: the tiny configs have none)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.train()


def padded_batch(lengths: tuple[int, ...] = LENGTHS, seed: int = 3, left: bool = False) -> dict[str, torch.Tensor]:
    """Right- (or left-) padded ``input_ids`` / ``attention_mask`` / ``labels`` (pad id 0, the first two labels of
    each example ignored)."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, n in enumerate(lengths):
        span = slice(length - n, length) if left else slice(0, n)
        ids[row, span] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, span] = 1
        labels[row, span] = ids[row, span]
        labels[row, span.start : span.start + 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_free_framework(**options: Any) -> AccelerationFramework:
    """A framework with only the padding-free plugin, ``options`` in its section."""
    from fms_acceleration_accelerate_aadp import PaddingFreePlugin

    body = {"training": {"attention": {"padding_free": dict(options)}}}
    return AccelerationFramework({"plugins": body}, registry=PluginRegistry([PaddingFreePlugin]))


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of position ``t``'s logits against label ``t + 1`` (``NaN``-free: ignored labels give 0)."""
    logits, labels = logits[..., :-1, :].float(), labels[..., 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)


def loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def tiny_tokenizer() -> Any:
    """A real fast tokenizer over the tiny models' vocabulary: words ``w3`` ... ``w63`` (pad 0, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def instruction_examples(count: int = 9, seed: int = 5) -> list[dict[str, list[int]]]:
    """Pre-tokenized examples of uneven lengths (3 to 12 tokens), the first tokens of each a prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        n = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=g))
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples
