"""Example boundaries of a batch: which tokens belong to which example.

A padding-free batch is one row holding several examples one after the other; Hugging Face's layout marks them
by ``position_ids`` that restart at 0 for each example, and optionally by cumulative lengths
(``cu_seq_lens_q`` / ``cu_seq_lens_k``, ``max_length_q`` / ``max_length_k``, as ``DataCollatorWithFlattening``
and TRL's ``padding_free=True`` give them). A padded batch marks its pad tokens with ``attention_mask == 0``.
:func:`segments_of_batch` reads any of these into one :class:`Segments`, the one description every attention
backend works from. It is computed once per model forward (the decoder stack's forward is wrapped, see
:mod:`.attention`) and handed to every attention layer.

Rules, per row of the batch (rows never share an example):

* a token whose position is not the previous token's position + 1 starts a new example (the rule of
  transformers' ``find_packed_sequence_indices``);
* with ``cu_seq_lens_q`` (one row only), the examples are exactly those it lists;
* a pad token (``attention_mask == 0``) belongs to no example: it is a segment of its own, which no other token
  attends to, and the token after a pad starts a new example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fms_acceleration_accelerate.errors import AccelerationConfigError


@dataclass(frozen=True)
class Segments:
    """Examples of a batch of ``batch`` rows of ``length`` tokens.

    Attributes:
        batch: rows.
        length: tokens per row.
        doc_ids: ``(batch, length)`` int64: the example of each token, unique across the batch and non-decreasing in
            row-major order; every pad token has an id of its own.
        cu_seqlens: ``(examples + 1,)`` int32 cumulative lengths of the examples over the real (non-pad) tokens in
            row-major order (the varlen kernels' ``cu_seqlens``).
        max_len: longest example (tokens).
        real_index: ``(real tokens,)`` int64 indices of the real tokens in the ``batch * length`` flattened stream;
            ``None`` when every token is real.
        source: what the boundaries were read from (``cu_seq_lens``, ``position_ids``, ``attention_mask``, ``rows``).
    """

    batch: int
    length: int
    doc_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    real_index: torch.Tensor | None
    source: str

    @property
    def num_examples(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def real_tokens(self) -> int:
        return self.batch * self.length if self.real_index is None else int(self.real_index.numel())

    def allowed(self, sliding_window: int | None = None) -> torch.Tensor:
        """``(batch, 1, length, length)`` bool: query ``i`` may attend key ``j`` (same example, ``j <= i``, and
        ``i - j < sliding_window`` when given). A pad token attends only to itself (its output is never used), so no
        row of the mask is empty."""
        idx = torch.arange(self.length, device=self.doc_ids.device)
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        mask = same & (idx[None, :, None] >= idx[None, None, :])
        if sliding_window is not None:
            mask = mask & ((idx[:, None] - idx[None, :]) < sliding_window)[None]
        return mask[:, None]


def _as_2d(tensor: torch.Tensor, batch: int, length: int, what: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[-1] != length or tensor.shape[0] not in (1, batch):
        raise AccelerationConfigError(
            f"padding-free attention got {what} of shape {tuple(tensor.shape)} for a batch of {batch} x {length} tokens",
            fix=f"give {what} as a (batch, sequence) tensor matching input_ids",
        )
    return tensor.expand(batch, length)


def segments_of_batch(
    *,
    batch: int,
    length: int,
    device: torch.device,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    max_length: int | None = None,
) -> Segments:
    """The examples of a batch, from whatever marks them (see the module docstring).

    Args:
        batch: rows of the batch.
        length: tokens per row.
        device: where the tensors are.
        position_ids: ``(batch, length)`` or ``(1, length)`` positions.
        attention_mask: ``(batch, length)`` padding mask (1/True: real token); a 4-D mask is refused.
        cu_seq_lens: ``(examples + 1,)`` cumulative lengths over the one row (``cu_seq_lens_q``).
        max_length: longest example, when the collator gave it (``max_length_q``).

    Raises:
        AccelerationConfigError: a 4-D attention mask, ``cu_seq_lens`` with several rows or a padding mask, or
            ``cu_seq_lens`` that do not cover the row.
    """
    real: torch.Tensor | None = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise AccelerationConfigError(
                f"padding-free attention got a {attention_mask.dim()}-D attention mask; it keeps examples apart from "
                "position_ids, cu_seq_lens or a 2-D padding mask, and cannot follow a custom mask",
                fix="pass a 2-D padding mask (or none) with the batch, or remove training.attention.padding_free",
            )
        real = _as_2d(attention_mask, batch, length, "attention_mask").to(device=device, dtype=torch.bool)
        if bool(real.all()):
            real = None
    if cu_seq_lens is not None and real is None:
        if batch != 1:
            raise AccelerationConfigError(
                f"cu_seq_lens_q describe one flattened row, but the batch has {batch} rows",
                fix="flatten every example into one row (DataCollatorWithFlattening), or leave cu_seq_lens out",
            )
        cu = cu_seq_lens.to(device=device, dtype=torch.int32).flatten()
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != length:
            raise AccelerationConfigError(
                f"cu_seq_lens_q must start at 0 and end at the row's length {length}, got {cu.tolist()[:8]}",
                fix="build the batch with DataCollatorWithFlattening(return_flash_attn_kwargs=True) or leave "
                "cu_seq_lens_q out (position_ids restarting at 0 are enough)",
            )
        lengths = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.long(), output_size=length)
        max_len = int(max_length) if max_length is not None else int(lengths.max())
        return Segments(1, length, doc[None], cu, max_len, None, "cu_seq_lens")

    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    source = "rows"
    if position_ids is not None:
        pos = _as_2d(position_ids, batch, length, "position_ids").to(device)
        starts[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
        source = "position_ids"
    if real is not None:
        starts |= ~real
        starts[:, 1:] |= ~real[:, :-1]
        source = "attention_mask" if source == "rows" else f"{source} + attention_mask"
    doc = torch.cumsum(starts.flatten().long(), 0).view(batch, length) - 1
    flat_doc = doc.flatten()
    if real is None:
        real_index = None
        real_docs = flat_doc
    else:
        real_index = real.flatten().nonzero().flatten()
        real_docs = flat_doc[real_index]
    if real_docs.numel() == 0:
        raise AccelerationConfigError(
            "padding-free attention got a batch without a single real token (attention_mask is all 0)",
            fix="drop empty examples from the dataset",
        )
    _, counts = torch.unique_consecutive(real_docs, return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(counts, 0)
    return Segments(batch, length, doc, cu, int(counts.max()), real_index, source)


SEGMENT_KWARGS = ("position_ids", "attention_mask", "cu_seq_lens_q", "max_length_q")
"""Forward keyword arguments :func:`segments_from_kwargs` reads."""


def segments_from_kwargs(batch: int, length: int, device: torch.device, kwargs: dict[str, Any]) -> Segments:
    """:func:`segments_of_batch` over a model forward's keyword arguments (``position_ids``, ``attention_mask``,
    ``cu_seq_lens_q``, ``max_length_q``)."""
    return segments_of_batch(
        batch=batch,
        length=length,
        device=device,
        position_ids=kwargs.get("position_ids"),
        attention_mask=kwargs.get("attention_mask"),
        cu_seq_lens=kwargs.get("cu_seq_lens_q"),
        max_length=kwargs.get("max_length_q"),
    )


__all__ = ["SEGMENT_KWARGS", "Segments", "segments_from_kwargs", "segments_of_batch"]
