"""Padding-free attention on every architecture of the model-spec table (tiny random models, fp32, CPU).

A padded batch through the model's own eager attention is the reference; the same examples flattened into one row
through the plugin's attention must give the same logits at every real token, the same per-token losses, the same
loss and the same gradients. Examples must never see each other: changing one example's tokens leaves every other
example's logits unchanged (and the same check catches transformers' own SDPA path over a flattened batch with the
model's default ``use_cache``, which lets them see each other).
"""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_aadp.collate import flatten_batch

from fms_acceleration_accelerate.model_specs import ARCHITECTURE_SPECS

from .padding_free_helpers import (
    ARCHITECTURES,
    LENGTHS,
    load_tiny,
    loss_and_grads,
    padded_batch,
    padding_free_framework,
    per_token_losses,
    save_tiny,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> folder of its saved tiny model (written once per module)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {model_type: save_tiny(model_type, root / model_type) for model_type in ARCHITECTURES}


def _examples_logits(logits_flat: torch.Tensor, lengths=LENGTHS) -> list[torch.Tensor]:
    return list(torch.split(logits_flat[0], list(lengths)))


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_padded_and_padding_free_match(model_type, backend, saved):
    model = load_tiny(saved[model_type])
    batch = padded_batch()
    ref, ref_grads = loss_and_grads(model, batch)
    real = batch["attention_mask"].bool()
    ref_token_losses = per_token_losses(ref.logits, batch["labels"])

    framework = padding_free_framework(attention_backend=backend)
    with framework:
        framework.augmentation(model)
        choice = framework.plugin("padding_free").backend_of(model)
        expected = {"auto": "eager" if model_type == "gemma2" else "sdpa"}.get(backend, backend)
        assert choice.name == expected  # CPU: flash_attn / varlen / flex passed over; Gemma 2 soft-caps
        assert model.config._attn_implementation.startswith(f"fms_padding_free_{expected}")
        flat, status = flatten_batch(batch)
        assert status == "flattened" and flat["input_ids"].shape == (1, sum(LENGTHS))
        out, grads = loss_and_grads(model, flat)

    torch.testing.assert_close(out.logits[0], ref.logits[real], rtol=1e-5, atol=1e-5)
    flat_token_losses = per_token_losses(out.logits, flat["labels"])[0]
    # position t of the padded row scores label t + 1; in the flat row the same pairs sit inside each example, and
    # the pair across each boundary is ignored (the example's first label is -100)
    expected_losses = torch.cat([ref_token_losses[row, : n - 1] for row, n in enumerate(LENGTHS)])
    starts = torch.tensor([0, *torch.cumsum(torch.tensor(LENGTHS), 0)[:-1].tolist()])
    within = torch.ones(sum(LENGTHS) - 1, dtype=torch.bool)
    within[starts[1:] - 1] = False
    torch.testing.assert_close(flat_token_losses[within], expected_losses, rtol=1e-5, atol=1e-6)
    assert (flat_token_losses[~within] == 0).all()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # reverted: the model's own attention and cache setting again
    assert model.config._attn_implementation == "eager" and model.config.use_cache is True
    assert "forward" not in vars(model)


def _contamination(model, flat: dict[str, torch.Tensor], **forward_kwargs) -> list[float]:
    """Largest change of each example's logits when the middle example's tokens are replaced."""
    other = dict(flat)
    ids = flat["input_ids"].clone()
    lo, hi = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    ids[0, lo:hi] = (ids[0, lo:hi] + 7) % 60 + 3
    other["input_ids"] = ids
    with torch.no_grad():
        a = _examples_logits(model(**flat, **forward_kwargs).logits)
        b = _examples_logits(model(**other, **forward_kwargs).logits)
    return [float((x - y).abs().max()) for x, y in zip(a, b)]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_no_example_sees_another(model_type, saved):
    model = load_tiny(saved[model_type])
    flat, _ = flatten_batch(padded_batch())
    with padding_free_framework() as framework:
        framework.augmentation(model)
        first, middle, last = _contamination(model, flat)
        _, _, last_with_cache = _contamination(model, flat, use_cache=True)  # asked for explicitly: still kept apart
    assert middle > 1e-3  # the change is visible where it should be
    # Dense models: bit-identical. MoE models: the changed tokens change which rows each expert's GEMM gets, and a
    # GEMM over other rows may round the same row's products in another order (float32: ~1e-8 on these logits);
    # a leak across examples moves logits by the order of `middle`, five orders of magnitude above the bound.
    bound = 0.0 if ARCHITECTURE_SPECS[model_type].moe is None else 1e-6
    assert first <= bound and last <= bound and last_with_cache <= bound, (first, last, last_with_cache, middle)


def test_the_check_fails_without_boundaries(saved):
    """The same check on transformers' own SDPA path over the flattened batch with the model's default
    ``use_cache``: the examples after the changed one move (no padding-free plugin)."""
    model = load_tiny(saved["llama"], attn_implementation="sdpa")
    assert model.config.use_cache is True
    flat, _ = flatten_batch(padded_batch())
    flat.pop("cu_seq_lens_q"), flat.pop("cu_seq_lens_k"), flat.pop("max_length_q"), flat.pop("max_length_k")
    _, _, last = _contamination(model, flat)
    assert last > 1e-3
    _, _, last_without_cache = _contamination(model, flat, use_cache=False)  # HF's packed mask then holds
    assert last_without_cache < 1e-5


def test_left_padding_and_several_rows_without_flattening(saved):
    """Batches the plugin did not flatten (left padding, rows of one example each): the attention keeps rows and
    padding apart too, and agrees with the padded eager reference."""
    model = load_tiny(saved["qwen2"])
    batch = padded_batch(left=True)
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(**batch, position_ids=position_ids).logits
        with padding_free_framework() as framework:
            framework.augmentation(model)
            got = model(**batch, position_ids=position_ids).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt_oss"])
def test_generation_with_a_cache_matches_the_model_s_own_attention(model_type, saved):
    """Greedy generation from left-padded prompts (prefill over a padding mask, then decoding with a key/value
    cache) gives the same tokens with the plugin as with the model's own attention."""
    model = load_tiny(saved[model_type]).eval()
    batch = padded_batch(lengths=(6, 4), left=True)
    prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    reference = model.generate(**prompt, **kwargs)
    with padding_free_framework() as framework:
        framework.augmentation(model)
        generated = model.generate(**prompt, **kwargs)
    assert torch.equal(generated, reference)
