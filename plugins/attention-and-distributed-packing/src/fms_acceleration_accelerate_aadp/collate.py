"""The data side of padding-free training: every batch becomes one row of real tokens.

:func:`flatten_batch` turns what a collator returns into Hugging Face's flattened layout (the layout of
``DataCollatorWithFlattening`` with ``return_flash_attn_kwargs=True`` and of TRL's ``padding_free=True``):

* ``input_ids`` ``(1, T)``: the real tokens of every example, one example after the other (pad tokens, i.e.
  ``attention_mask == 0``, removed; left or right padding alike);
* ``position_ids`` ``(1, T)``: restarting at 0 for each example;
* ``labels`` ``(1, T)``: the examples' labels with each example's first label set to -100, so the loss never
  scores a token from the previous example's last one;
* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, ``(examples + 1,)``) and ``max_length_q`` / ``max_length_k``:
  the boundaries, computed here on the CPU so the model needs no device-to-host copies to find them;
* every other ``(B, L)`` tensor (``token_type_ids``, completion masks, ...) flattened the same way; the
  ``attention_mask`` is dropped (every remaining token is real).

With ``pad_to_multiple_of`` (the plugin's option of that name), the row is then extended to a multiple of that many
tokens by one filler example of its own (:func:`append_filler`): rows come in a few lengths instead of a new one
every step, and the loss and gradients stay those of the real examples.

Where an example starts: at the first real token of each row, after a pad token, and (when the batch has
``position_ids``) wherever a position is not the previous one + 1 (rows that already hold several examples). A
batch that is already flat (one row, no padding) keeps its tokens; its boundary labels are set to -100 and the
``cu_seq_lens`` are added when missing. A batch that is not a mapping with a 2-D ``input_ids`` tensor is left
unchanged (the attention still keeps its rows and padding apart), with one warning per collator.

:class:`FlatteningCollator` wraps a DataLoader's ``collate_fn`` with it; the plugin installs it on every DataLoader
given to ``Accelerator.prepare`` and on the HF Trainer's training DataLoader (see :mod:`.padding_free`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

logger = logging.getLogger("fms_acceleration_accelerate_aadp")

IGNORE_INDEX = -100
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _starts(real: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """``(B, L)`` bool: the token starts an example (pad tokens are never starts)."""
    starts = torch.zeros(batch, length, dtype=torch.bool)
    if position_ids is not None:
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if real is None:
        starts[:, 0] = True
        return starts
    previous_real = torch.zeros(batch, length, dtype=torch.bool)
    previous_real[:, 1:] = real[:, :-1]
    return real & (starts | ~previous_real)


def _boundaries(starts: torch.Tensor, total: int) -> dict[str, Any]:
    """``cu_seq_lens_q/k`` and ``max_length_q/k`` of a flat row whose example starts are ``starts`` ``(T,)``."""
    first = starts.nonzero().flatten()
    cu = torch.cat([first, torch.tensor([total])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _restarting_positions(starts: torch.Tensor) -> torch.Tensor:
    """Positions ``(T,)`` that restart at 0 at every start."""
    index = torch.arange(starts.numel())
    start_of = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
    return index - start_of


def flatten_batch(batch: Any, pad_to_multiple_of: int = 1, pad_token_id: int = 0) -> tuple[Any, str]:
    """The flattened form of ``batch`` (see the module docstring) and what was done: ``"flattened"``,
    ``"already flat"`` or ``"unchanged: <why>"``.

    Args:
        batch: what a collator returned.
        pad_to_multiple_of: round the flattened row's length up to a multiple of this (0 or 1: as it is) by
            appending one filler example (:func:`append_filler`).
        pad_token_id: the filler's token id.

    Raises:
        ValueError: ``labels`` (or ``position_ids``) whose shape differs from ``input_ids``.
    """
    if not isinstance(batch, Mapping):
        return batch, f"unchanged: the batch is a {type(batch).__name__}, not a mapping with input_ids"
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return batch, "unchanged: the batch has no 2-D input_ids tensor"
    if input_ids.device.type != "cpu":
        return batch, "unchanged: the collator returned tensors on a device (flattening runs on the CPU)"
    batch_size, length = input_ids.shape
    for key in ("labels", "position_ids", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.shape[-1] != length:
            raise ValueError(
                f"padding-free flattening: the batch's {key} has shape {tuple(value.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; labels, position_ids and attention_mask must match input_ids token for "
                "token (a causal LM's labels are the input_ids with ignored positions set to -100)"
            )
    mask = batch.get("attention_mask")
    real = None
    if isinstance(mask, torch.Tensor):
        real = mask.to(torch.bool).expand(batch_size, length)
        if bool(real.all()):
            real = None
    positions = batch.get("position_ids")
    if isinstance(positions, torch.Tensor):
        positions = positions.expand(batch_size, length)
    else:
        positions = None
    starts = _starts(real, positions, batch_size, length)

    if batch_size == 1 and real is None:
        out = dict(batch)
        flat_starts = starts[0]
        status = "already flat"
    else:
        keep = real.flatten() if real is not None else None
        out = {}
        for key, value in batch.items():
            if key == "attention_mask":
                continue
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch_size, length):
                flat = value.reshape(batch_size * length, *value.shape[2:])
                out[key] = (flat if keep is None else flat[keep])[None]
            elif key in BOUNDARY_KEYS or key == "seq_idx":
                continue  # recomputed below
            else:
                out[key] = value
        flat_starts = starts.flatten() if keep is None else starts.flatten()[keep]
        status = "flattened"
    total = int(flat_starts.numel())
    if total == 0:
        return batch, "unchanged: the batch has no real token"
    if status == "flattened" or "position_ids" not in out:
        out["position_ids"] = _restarting_positions(flat_starts)[None].to(input_ids.device)
    labels = out.get("labels")
    if isinstance(labels, torch.Tensor):
        labels = labels.clone()
        labels[0, flat_starts] = IGNORE_INDEX
        out["labels"] = labels
    if status == "flattened" or not all(k in out for k in BOUNDARY_KEYS):
        out.update(_boundaries(flat_starts, total))
    if "seq_idx" in batch and "seq_idx" not in out:
        out["seq_idx"] = (torch.cumsum(flat_starts.long(), 0) - 1).to(torch.int32)[None]
    if pad_to_multiple_of > 1:
        out = append_filler(out, pad_to_multiple_of, pad_token_id)
    return out, status


FILLER_VALUES = {"input_ids": None, "labels": IGNORE_INDEX, "attention_mask": 1}
"""The filler's value per key (``None``: the pad token id); position_ids and seq_idx are computed, every other
token-aligned tensor (token_type_ids, completion masks, ...) gets zeros."""


def append_filler(flat: dict[str, Any], multiple: int, pad_token_id: int = 0) -> dict[str, Any]:
    """A flattened batch (one row, with ``cu_seq_lens``, as :func:`flatten_batch` returns it) whose row is extended to
    a multiple of ``multiple`` tokens by one filler example: ``pad_token_id`` tokens, ``position_ids`` from 0,
    labels -100, an ``attention_mask`` of ones where the batch has one (the filler is an example of its own, not
    padding), zeros in any other token-aligned tensor, the next ``seq_idx``, and one more ``cu_seq_lens`` entry.
    Attention stays inside each example, so no real token attends to the filler and the filler attends to no real
    token; its labels score nothing, and the previous example's last token predicts nothing across the boundary
    (the filler's first label is -100 too). The batch is returned as it is when the row is a multiple already."""
    input_ids = flat["input_ids"]
    total = int(input_ids.shape[1])
    extra = -total % multiple
    if extra == 0:
        return flat
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not (isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (1, total)):
            out[key] = value
            continue
        shape = (1, extra, *value.shape[2:])
        if key == "position_ids":
            tail = torch.arange(extra, dtype=value.dtype, device=value.device).view(1, extra).expand(shape)
        elif key == "seq_idx":
            tail = torch.full(shape, int(value.max()) + 1, dtype=value.dtype, device=value.device)
        else:
            fill = FILLER_VALUES.get(key, 0)
            tail = torch.full(shape, pad_token_id if fill is None else fill, dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, tail], dim=1)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = out.get(key)
        if isinstance(cu, torch.Tensor):
            out[key] = torch.cat([cu.flatten(), cu.new_tensor([total + extra])])
    for key in ("max_length_q", "max_length_k"):
        if key in out:
            out[key] = max(int(out[key]), extra)
    return out


class FlatteningCollator:
    """A ``collate_fn`` that flattens what ``collate_fn`` returns (:func:`flatten_batch`). Picklable when the
    wrapped function is (DataLoader workers).

    Args:
        collate_fn: the DataLoader's own ``collate_fn``.
    """

    def __init__(
        self, collate_fn: Callable[[Any], Any], pad_to_multiple_of: int = 1, pad_token_id: int | None = None
    ) -> None:
        self.collate_fn = collate_fn
        self._collate = padding_for_flattening(collate_fn)
        self._warned = False
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))
        self.pad_token_id = pad_token_id_of(collate_fn) if pad_token_id is None else int(pad_token_id)

    def __call__(self, features: Any) -> Any:
        batch, status = flatten_batch(self._collate(features), self.pad_to_multiple_of, self.pad_token_id)
        if status.startswith("unchanged") and not self._warned:
            self._warned = True
            logger.warning(
                "padding-free: a batch of %s was not flattened (%s); the attention still keeps its rows and padding "
                "apart, but pad tokens are computed",
                _describe(self.collate_fn),
                status.removeprefix("unchanged: "),
            )
        return batch

    def __repr__(self) -> str:
        bucket = f", pad_to_multiple_of={self.pad_to_multiple_of}" if self.pad_to_multiple_of > 1 else ""
        return f"FlatteningCollator({_describe(self.collate_fn)}{bucket})"


def pad_token_id_of(collate_fn: Any) -> int:
    """The pad token id a collator pads with (its ``pad_token_id``, as TRL's collators hold it, or its tokenizer's /
    processing class's), else 0. Only the filler of :func:`append_filler` uses it: the filler is never attended to
    and never scored, so its token id changes no result."""
    candidates = [getattr(collate_fn, "pad_token_id", None)]
    for attribute in ("tokenizer", "processing_class"):
        owner = getattr(collate_fn, attribute, None)
        candidates.append(getattr(getattr(owner, "tokenizer", owner), "pad_token_id", None))
    return next((int(c) for c in candidates if isinstance(c, int) and not isinstance(c, bool)), 0)


def _is_non_padding_seq2seq_collator(collate_fn: Any) -> bool:
    if not any(
        c.__name__ == "DataCollatorForSeq2Seq" and c.__module__.startswith("transformers")
        for c in type(collate_fn).__mro__
    ):
        return False
    padding = getattr(collate_fn, "padding", True)
    return padding is False or str(getattr(padding, "value", padding)) == "do_not_pad"


def padding_for_flattening(collate_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The collator to call before flattening: ``collate_fn`` itself, except for a Hugging Face
    ``DataCollatorForSeq2Seq`` told not to pad (what fms-hf-tuning hands its trainer for padding-free runs). That
    one cannot stack examples of different lengths into tensors, so the same collator padding to the longest
    example is called instead (its label padding, ``max_length`` and tokenizer kept); flattening then removes the
    padding again, which gives the same tokens, positions and labels as flattening the examples directly."""
    if _is_non_padding_seq2seq_collator(collate_fn) and dataclasses.is_dataclass(collate_fn):
        return dataclasses.replace(collate_fn, padding="longest")
    return collate_fn


def _describe(collate_fn: Any) -> str:
    return str(getattr(collate_fn, "__qualname__", None) or type(collate_fn).__name__)


def wrap_collate_fn(collate_fn: Callable[[Any], Any], pad_to_multiple_of: int = 1) -> tuple[Callable[[Any], Any], bool]:
    """``(FlatteningCollator(collate_fn, pad_to_multiple_of), True)``, or ``(collate_fn, False)`` when it already
    flattens."""
    if isinstance(collate_fn, FlatteningCollator):
        return collate_fn, False
    return FlatteningCollator(collate_fn, pad_to_multiple_of), True


__all__ = [
    "IGNORE_INDEX",
    "FlatteningCollator",
    "append_filler",
    "flatten_batch",
    "pad_token_id_of",
    "padding_for_flattening",
    "wrap_collate_fn",
]
