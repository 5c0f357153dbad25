"""Options of the padding-free plugin (section ``training.attention.padding_free``; upstream fms-acceleration's key
``method: huggingface`` is kept)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError

AttentionBackendName = Literal["auto", "flash_attn", "varlen", "flex", "sdpa", "eager"]

SECTION = "training.attention.padding_free"

BACKEND_NAMES: tuple[str, ...] = ("flash_attn", "varlen", "flex", "sdpa", "eager")
"""The attention backends, in the order ``auto`` tries them."""


@dataclass(frozen=True)
class PaddingFreeConfig:
    """How padding-free batches are built and which attention kernel honours their example boundaries."""

    method: Literal["huggingface"] = option(
        "huggingface",
        help="upstream fms-acceleration's key: 'huggingface' (batches in Hugging Face's flattened layout: one row, "
        "position_ids restarting at 0 for each example, optional cu_seq_lens_q/k); the only method",
    )
    attention_backend: Literal["auto", "flash_attn", "varlen", "flex", "sdpa", "eager"] = option(
        "auto",
        help="attention kernel over the flattened examples: 'flash_attn' (flash-attn's varlen kernel; CUDA, "
        "fp16/bf16), 'varlen' (torch.nn.attention.varlen.varlen_attn; CUDA, fp16/bf16, no soft-capping, no "
        "attention dropout), 'flex' (flex_attention with a document mask; CUDA for training, no attention "
        "dropout), 'sdpa' (scaled_dot_product_attention with a block-diagonal mask; any device, no "
        "soft-capping), 'eager' (explicit softmax attention with the same mask; any device, everything the "
        "model needs, slowest); 'auto' takes the first of these in that order that is installed and can honour "
        "the model and the run (device, dtype, sliding windows, soft-capping, dropout)",
    )
    flatten_batches: bool = option(
        True,
        help="flatten the batches of every DataLoader given to Accelerator.prepare (and of the HF Trainer's "
        "training DataLoader): padded batches (DataCollatorForSeq2Seq, DataCollatorWithPadding, a plain "
        "collate) become one row without pad tokens, with position_ids restarting per example, cu_seq_lens and "
        "each example's first label ignored; batches already flattened (DataCollatorWithFlattening, TRL's "
        "padding_free=True) get their boundary labels checked. false: batches are left as the collator "
        "builds them (the attention still keeps examples apart, but pad tokens are computed)",
    )
    pad_to_multiple_of: int = option(
        0,
        help="round the flattened row's length up to a multiple of this many tokens (0 or 1: off): one filler "
        "example is appended (pad tokens, position_ids from 0, labels -100, its own cu_seq_lens entry, so no "
        "attention crosses into or out of it and the loss is the real examples' loss). Rows then come in a few "
        "lengths instead of a new one every step, which lets GPU libraries reuse what they chose for a shape; "
        "costs up to this many - 1 extra tokens of compute per batch. Needs flatten_batches: true",
    )

    def __post_init__(self) -> None:
        value = self.pad_to_multiple_of
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AccelerationConfigError(
                f"pad_to_multiple_of must be a whole number of tokens >= 1 (0 or 1: off), got {value!r}",
                path=f"{SECTION}.pad_to_multiple_of",
                fix="set pad_to_multiple_of to e.g. 64 or 128, or remove it",
            )
        if value > 1 and not self.flatten_batches:
            raise AccelerationConfigError(
                f"pad_to_multiple_of: {value} rounds up the rows that the plugin flattens, but flatten_batches is "
                "false, so no row would be touched",
                path=f"{SECTION}.pad_to_multiple_of",
                fix="set flatten_batches: true, or remove pad_to_multiple_of",
            )

    @property
    def bucket(self) -> int:
        """The multiple the flattened row's length is rounded up to (1: not rounded)."""
        return max(1, self.pad_to_multiple_of)

    @property
    def backend_preference(self) -> tuple[str, ...]:
        """The backends to consider, in order (one for an explicit choice)."""
        return BACKEND_NAMES if self.attention_backend == "auto" else (self.attention_backend,)


__all__ = ["BACKEND_NAMES", "SECTION", "AttentionBackendName", "PaddingFreeConfig"]
