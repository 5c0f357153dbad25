"""``pad_to_multiple_of``: the flattened row rounded up to a multiple of N tokens by one filler example.

The filler must change nothing but the row's length: the same loss and gradients as the row without it (tiny
Llama, fp32, CPU, the SDPA and eager backends), the real tokens' logits unchanged, and the filler's own logits those
of a forward of the filler alone (it sees no real token). The checks are shown to fail on fillers built wrong (a
label scored across the boundary, the filler merged into the last example).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from fms_acceleration_accelerate_aadp import PaddingFreePlugin
from fms_acceleration_accelerate_aadp.collate import (
    FlatteningCollator,
    append_filler,
    flatten_batch,
    pad_token_id_of,
)
from torch.utils.data import DataLoader

from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.registry import PluginRegistry

from .padding_free_helpers import LENGTHS, load_tiny, loss_and_grads, padded_batch, padding_free_framework, save_tiny

KEY = "training.attention.padding_free.pad_to_multiple_of"
FEATURES = [
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    {"input_ids": [9, 10], "labels": [-100, 10]},
    {"input_ids": [11, 12, 13], "labels": [11, 12, 13]},
]


# ------------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("value", [-1, -128])
def test_a_negative_multiple_is_refused_naming_the_key(value):
    with pytest.raises(AccelerationConfigError, match="pad_to_multiple_of must be a whole number") as info:
        padding_free_framework(pad_to_multiple_of=value)
    assert info.value.path == KEY and "64 or 128" in info.value.fix


def test_a_multiple_without_flattening_is_refused():
    with pytest.raises(AccelerationConfigError, match="flatten_batches is false") as info:
        padding_free_framework(pad_to_multiple_of=64, flatten_batches=False)
    assert info.value.path == KEY and "flatten_batches: true" in info.value.fix


def test_a_multiple_that_is_not_a_number_is_refused():
    with pytest.raises(AccelerationConfigError, match="pad_to_multiple_of"):
        padding_free_framework(pad_to_multiple_of="128")


@pytest.mark.parametrize(("value", "bucket"), [(0, 1), (1, 1), (128, 128)])
def test_off_and_on_and_described(value, bucket):
    framework = padding_free_framework(pad_to_multiple_of=value)
    plugin = framework.plugin("padding_free")
    assert plugin.config.bucket == bucket
    text = "\n".join(plugin.describe())
    assert ("multiple of 128 tokens by one filler example" in text) == (bucket == 128)
    assert ("pad_to_multiple_of: off" in text) == (bucket == 1)


# ------------------------------------------------------------------------------------------------ the batch
def test_a_padded_batch_gets_one_filler_example():
    flat, status = flatten_batch(padded_batch(), pad_to_multiple_of=8, pad_token_id=7)
    total, extra = sum(LENGTHS), 8 * 3 - sum(LENGTHS)  # 21 -> 24
    assert status == "flattened" and flat["input_ids"].shape == (1, total + extra)
    assert flat["input_ids"][0, total:].tolist() == [7] * extra
    assert flat["labels"][0, total:].tolist() == [-100] * extra
    assert flat["position_ids"][0, total:].tolist() == list(range(extra))
    assert flat["cu_seq_lens_q"].tolist() == [0, 9, 14, 21, 24] and flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["cu_seq_lens_k"].tolist() == flat["cu_seq_lens_q"].tolist()
    assert flat["max_length_q"] == flat["max_length_k"] == 9
    unbucketed, _ = flatten_batch(padded_batch())
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(flat[key][:, :total], unbucketed[key]), key


def test_a_row_that_is_a_multiple_already_is_left_as_it_is():
    flat, _ = flatten_batch(padded_batch(), pad_to_multiple_of=7)  # 21 tokens
    assert flat["input_ids"].shape == (1, 21) and flat["cu_seq_lens_q"].tolist() == [0, 9, 14, 21]
    assert append_filler(flat, 3) is flat


def test_a_filler_longer_than_every_example_sets_max_length():
    flat, _ = flatten_batch(padded_batch(), pad_to_multiple_of=32)
    assert flat["cu_seq_lens_q"].tolist() == [0, 9, 14, 21, 32] and flat["max_length_q"] == 11


def test_hf_flattening_batches_get_the_filler_with_seq_idx_and_extra_columns():
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    hf = collator([dict(f) for f in FEATURES])
    hf["token_type_ids"] = torch.ones_like(hf["input_ids"])
    flat, status = flatten_batch(hf, pad_to_multiple_of=4)
    assert status == "already flat" and flat["input_ids"].shape == (1, 12)
    assert flat["cu_seq_lens_q"].tolist() == [0, 4, 6, 9, 12]
    assert flat["seq_idx"][0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert flat["position_ids"][0, 9:].tolist() == [0, 1, 2]
    assert flat["token_type_ids"][0, 9:].tolist() == [0, 0, 0]
    assert flat["labels"][0, 9:].tolist() == [-100] * 3


def test_trl_padding_free_batches_get_the_filler():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trl = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)
    batch = trl([{"input_ids": f["input_ids"]} for f in FEATURES])
    assert pad_token_id_of(trl) == 3
    collated = FlatteningCollator(trl, pad_to_multiple_of=16)([{"input_ids": f["input_ids"]} for f in FEATURES])
    assert collated["input_ids"].shape == (1, 16) and collated["input_ids"][0, 9:].tolist() == [3] * 7
    assert collated["cu_seq_lens_q"].tolist() == [0, 4, 6, 9, 16] and collated["max_length_q"] == 7
    assert torch.equal(collated["input_ids"][:, :9], batch["input_ids"])
    assert collated["seq_idx"][0, 9:].tolist() == [3] * 7


def test_the_pad_id_comes_from_the_collator_s_tokenizer():
    from transformers import DataCollatorForSeq2Seq

    from .padding_free_helpers import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    assert pad_token_id_of(DataCollatorForSeq2Seq(tokenizer)) == tokenizer.pad_token_id == 0
    tokenizer.pad_token = "w9"
    assert pad_token_id_of(DataCollatorForSeq2Seq(tokenizer)) == 9
    assert pad_token_id_of(lambda features: features) == 0


def test_accelerator_prepare_rounds_the_rows_up():
    from transformers import DataCollatorWithFlattening

    config = {"plugins": {"training": {"attention": {"padding_free": {"pad_to_multiple_of": 8}}}}}
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[AccelerationKwargs(config=config, registry=PluginRegistry([PaddingFreePlugin]))]
    )
    loader = DataLoader(FEATURES, batch_size=3, collate_fn=DataCollatorWithFlattening(return_flash_attn_kwargs=True))
    (batch,) = list(accelerator.prepare(loader))
    assert batch["input_ids"].shape == (1, 16) and batch["cu_seq_lens_q"].tolist() == [0, 4, 6, 9, 16]
    framework = accelerator._fms_acceleration_framework
    assert any("pad_to_multiple_of=8" in r.replacement for r in framework.patches.records)
    framework.revert()


# ------------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama") / "llama")


def _filler_alone(model, flat, total):
    ids = flat["input_ids"][:, total:]
    with torch.no_grad():
        return model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_the_filler_changes_neither_loss_nor_gradients(backend, llama):
    model = load_tiny(llama)
    total = sum(LENGTHS)
    plain, _ = flatten_batch(padded_batch())
    bucketed, _ = flatten_batch(padded_batch(), pad_to_multiple_of=16, pad_token_id=5)  # 21 -> 32: 11 filler tokens
    assert bucketed["input_ids"].shape == (1, 32)
    with padding_free_framework(attention_backend=backend) as framework:
        framework.augmentation(model)
        assert framework.plugin("padding_free").backend_of(model).name == backend
        ref, ref_grads = loss_and_grads(model, plain)
        out, grads = loss_and_grads(model, bucketed)
        alone = _filler_alone(model, bucketed, total)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logits[0, :total], ref.logits[0], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # the filler is an example of its own: its logits are those of the filler alone
    torch.testing.assert_close(out.logits[0, total:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_the_checks_catch_a_filler_built_wrong(backend, llama):
    """A filler whose first label is scored (the last real token would predict the pad token), and a filler merged
    into the last example (it would attend to that example): both must be visible to the checks above."""
    model = load_tiny(llama)
    total = sum(LENGTHS)
    plain, _ = flatten_batch(padded_batch())
    good, _ = flatten_batch(padded_batch(), pad_to_multiple_of=16, pad_token_id=5)
    scored = dict(good, labels=good["labels"].clone())
    scored["labels"][0, total] = 5
    merged = dict(good, position_ids=torch.arange(32)[None].clone())
    merged["position_ids"][0, :total] = good["position_ids"][0, :total]
    merged["position_ids"][0, total:] += LENGTHS[-1] - total  # the last example's positions go on
    last_start = total - LENGTHS[-1]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        merged[key] = torch.tensor([0, LENGTHS[0], LENGTHS[0] + LENGTHS[1], 32], dtype=torch.int32)
    for key in ("max_length_q", "max_length_k"):
        merged[key] = 32 - last_start
    with padding_free_framework(attention_backend=backend) as framework:
        framework.augmentation(model)
        with torch.no_grad():
            ref = model(**plain)
            wrong_label = model(**scored)
            wrong_boundary = model(**merged)
        alone = _filler_alone(model, good, total)
    # a near-uniform tiny model: one extra scored label moves the mean loss by ~1e-3, far beyond the 1e-6 the
    # equality check allows
    assert abs(float(wrong_label.loss) - float(ref.loss)) > 1e-4
    assert float((wrong_boundary.logits[0, total:] - alone).abs().max()) > 1e-3
    # the real tokens come before the filler: causal attention keeps them as they were even then
    torch.testing.assert_close(wrong_boundary.logits[0, :total], ref.logits[0], rtol=1e-5, atol=1e-6)
