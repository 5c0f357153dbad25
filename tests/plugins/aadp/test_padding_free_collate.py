"""The data side: batches flattened by the collate wrapper, and the framework's ``prepare_dataloader`` hook.

Real collators build the batches: transformers' ``DataCollatorForSeq2Seq`` (padded) flattened by the plugin must
equal transformers' own ``DataCollatorWithFlattening`` on the same examples; TRL's padding-free collator and HF's
flattening collator pass through with their boundary labels checked.
"""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from accelerate import Accelerator
from fms_acceleration_accelerate_aadp import PaddingFreePlugin
from fms_acceleration_accelerate_aadp.collate import FlatteningCollator, flatten_batch
from torch.utils.data import DataLoader

from fms_acceleration_accelerate import AccelerationFramework
from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs
from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.plugin import AccelerationPlugin
from fms_acceleration_accelerate.registry import PluginRegistry

from .padding_free_helpers import padded_batch

FEATURES = [
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    {"input_ids": [9, 10], "labels": [-100, 10]},
    {"input_ids": [11, 12, 13], "labels": [11, 12, 13]},
]


class _Tokenizer:
    """The little DataCollatorForSeq2Seq needs of a tokenizer: ``pad`` (right padding with id 0)."""

    pad_token_id = 0
    padding_side = "right"

    def pad(self, features, padding=True, max_length=None, pad_to_multiple_of=None, return_tensors="pt", **kw):
        length = max(len(f["input_ids"]) for f in features)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        ids = [f["input_ids"] + [0] * (length - len(f["input_ids"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
        out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if "labels" in features[0]:
            out["labels"] = torch.tensor([f["labels"] for f in features])
        return out


def _seq2seq(features, **kwargs):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(_Tokenizer(), padding=True, **kwargs)([dict(f) for f in features])


def test_seq2seq_batch_flattens_to_what_hf_flattening_gives():
    from transformers import DataCollatorWithFlattening

    padded = _seq2seq(FEATURES, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (3, 8)
    flat, status = flatten_batch(padded)
    hf = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([dict(f) for f in FEATURES])
    assert status == "flattened" and "attention_mask" not in flat
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(flat[key], hf[key]), key
    assert flat["labels"].tolist() == [[-100, -100, 7, 8, -100, 10, -100, 12, 13]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert torch.equal(flat["cu_seq_lens_q"], torch.as_tensor(hf["cu_seq_lens_q"]).to(torch.int32).flatten())
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and flat["max_length_q"] == int(hf["max_length_q"]) == 4


def test_a_seq2seq_collator_told_not_to_pad_is_flattened_like_hf_flattening():
    """fms-hf-tuning's padding-free runs hand the trainer DataCollatorForSeq2Seq(padding=False), which cannot stack
    examples of different lengths by itself; wrapped, it gives what HF's flattening collator gives."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    plain = DataCollatorForSeq2Seq(_Tokenizer(), padding=False)
    with pytest.raises(ValueError):  # what the trainer would hit without the plugin's wrapper
        plain([dict(f) for f in FEATURES])
    flat = FlatteningCollator(plain)([dict(f) for f in FEATURES])
    hf = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([dict(f) for f in FEATURES])
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(flat[key], hf[key]), key
    assert plain.padding is False  # the user's collator object is left as it was


def test_left_and_right_padding_flatten_alike_and_extra_columns_follow():
    right, left = padded_batch(), padded_batch(left=True)
    for batch in (right, left):
        batch["token_type_ids"] = batch["input_ids"] % 2
        batch["num_items"] = 42
    flat_right, _ = flatten_batch(right)
    flat_left, _ = flatten_batch(left)
    for key in ("input_ids", "labels", "position_ids", "token_type_ids", "cu_seq_lens_q"):
        assert torch.equal(flat_right[key], flat_left[key]), key
    assert torch.equal(flat_right["token_type_ids"], flat_right["input_ids"] % 2)
    assert flat_right["num_items"] == 42
    assert flat_right["cu_seq_lens_q"].tolist() == [0, 9, 14, 21]


def test_rows_that_already_hold_several_examples_keep_their_boundaries():
    batch = {
        "input_ids": torch.arange(1, 13).view(2, 6),
        "labels": torch.arange(1, 13).view(2, 6),
        # row 0: two examples; row 1 continues an example whose positions go on (it is a new example here)
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 7, 8]]),
    }
    flat, status = flatten_batch(batch)
    assert status == "flattened" and flat["cu_seq_lens_q"].tolist() == [0, 3, 6, 12]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert flat["labels"][0, [0, 3, 6]].tolist() == [-100, -100, -100]


def test_already_flat_batches_get_their_boundary_labels_checked():
    from transformers import DataCollatorWithFlattening

    hf = DataCollatorWithFlattening()([dict(f) for f in FEATURES])  # no cu_seq_lens
    flat, status = flatten_batch(hf)
    assert status == "already flat" and torch.equal(flat["input_ids"], hf["input_ids"])
    assert flat["cu_seq_lens_q"].tolist() == [0, 4, 6, 9] and flat["max_length_q"] == 4
    unsafe = dict(hf, labels=hf["input_ids"].clone())  # a collator that left the boundary labels on
    fixed, _ = flatten_batch(unsafe)
    assert fixed["labels"][0, [0, 4, 6]].tolist() == [-100, -100, -100]
    assert fixed["labels"][0, 7] == 12 and unsafe["labels"][0, 4] == 9  # the caller's batch is not changed


def test_trl_padding_free_batches_pass_through():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=4)
    trl = collator([{"input_ids": f["input_ids"]} for f in FEATURES])
    flat, status = flatten_batch(trl)
    assert status == "already flat"
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "max_length_q"):
        assert torch.equal(torch.as_tensor(flat[key]), torch.as_tensor(trl[key])), key


def test_batches_that_cannot_be_flattened_are_left_alone_with_one_warning(caplog):
    collate = FlatteningCollator(lambda features: (torch.tensor(features), torch.tensor(features)))
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate_aadp"):
        first = collate([[1, 2], [3, 4]])
        collate([[1, 2], [3, 4]])
    assert isinstance(first, tuple) and torch.equal(first[0], torch.tensor([[1, 2], [3, 4]]))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "not a mapping with input_ids" in warnings[0]


def test_labels_that_do_not_match_input_ids_are_refused():
    batch = padded_batch()
    batch["labels"] = batch["labels"][:, :5]
    with pytest.raises(ValueError, match="labels has shape"):
        flatten_batch(batch)


def test_the_wrapper_pickles_for_dataloader_workers():
    from transformers import DataCollatorWithFlattening

    collate = pickle.loads(pickle.dumps(FlatteningCollator(DataCollatorWithFlattening())))
    assert collate([dict(f) for f in FEATURES])["input_ids"].shape == (1, 9)


# ------------------------------------------------------------------------------------ through Accelerator.prepare


def _loader(batch_size: int = 3) -> DataLoader:
    return DataLoader(FEATURES, batch_size=batch_size, collate_fn=lambda f: _seq2seq(f))


def _accelerator(**options) -> Accelerator:
    config = {"plugins": {"training": {"attention": {"padding_free": options}}}}
    return Accelerator(
        cpu=True, kwargs_handlers=[AccelerationKwargs(config=config, registry=PluginRegistry([PaddingFreePlugin]))]
    )


def test_accelerator_prepare_flattens_the_dataloader_and_revert_restores_it():
    accelerator = _accelerator()
    loader = _loader()
    original = loader.collate_fn
    prepared = accelerator.prepare(loader)
    (batch,) = list(prepared)
    assert batch["input_ids"].shape == (1, 9) and "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 6, 9]
    framework = accelerator._fms_acceleration_framework
    (record,) = framework.patches.records
    assert record.target == "DataLoader.collate_fn" and "FlatteningCollator" in record.replacement
    accelerator.prepare(loader)  # a second prepare of the same DataLoader wraps nothing twice
    assert len(framework.patches.records) == 1
    framework.revert()
    assert loader.collate_fn is original


def test_flatten_batches_false_leaves_the_dataloader_alone():
    accelerator = _accelerator(flatten_batches=False)
    (batch,) = list(accelerator.prepare(_loader()))
    assert batch["input_ids"].shape == (3, 4) and "attention_mask" in batch


class _SwapsLoaders(AccelerationPlugin):
    name = "swaps_loaders"
    configuration_and_paths = ("test.swap",)

    def prepare_dataloader(self, dataloader, context):
        return DataLoader([{"x": 1}], batch_size=1) if self.config is not None and context.world_size == 1 else None


def test_prepare_dataloader_hook_returns_a_dataloader():
    framework = AccelerationFramework({"plugins": {"test": {"swap": {}}}}, registry=PluginRegistry([_SwapsLoaders]))
    new = framework.prepare_dataloader(_loader(), RunContext())
    assert isinstance(new, DataLoader) and list(new) == [{"x": torch.tensor([1])}]
    with pytest.raises(TypeError, match="prepare_dataloader must return a torch DataLoader, got NoneType"):
        framework.prepare_dataloader(_loader(), RunContext(world_size=2))
