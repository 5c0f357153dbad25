"""Loading GPTQ checkpoints natively: every format variant gives the logits of the dense model built from the
dequantized weights, and ``save_pretrained`` of the loaded model writes a checkpoint that loads again to the same
logits."""

from __future__ import annotations

import json

import pytest
import torch
from fms_acceleration_accelerate_peft.gptq.config import GPTQLoraConfig
from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear
from fms_acceleration_accelerate_peft.gptq.loader import load_gptq_causal_lm

from .gptq_helpers import PROJECTIONS, GPTQCase, make_gptq_checkpoint, token_batch

LAYERS = 2

CASES = [
    GPTQCase(bits=4, group_size=32, sym=False, checkpoint_format="gptq"),
    GPTQCase(bits=4, group_size=32, sym=True, desc_act=True, checkpoint_format="gptq", sharded=True),
    GPTQCase(bits=4, group_size=-1, sym=False, checkpoint_format="gptq_v2"),
    GPTQCase(bits=4, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2", sharded=True),
    GPTQCase(bits=8, group_size=32, sym=True, checkpoint_format="gptq_v2"),
    GPTQCase(bits=8, group_size=-1, sym=False, desc_act=True, checkpoint_format="gptq", sharded=True),
    GPTQCase(bits=2, group_size=32, sym=False, checkpoint_format="gptq"),
    GPTQCase(bits=4, group_size=32, legacy_config=True, checkpoint_format="gptq_v2"),
    GPTQCase(bits=4, group_size=32, drop_g_idx=True),
    GPTQCase(bits=4, group_size=32, tie=True, bias=True, sharded=True),
    GPTQCase(bits=4, group_size=32, lm_head=True, checkpoint_format="gptq_v2"),
]


def _load(path, dtype=torch.float32, **kwargs):
    return load_gptq_causal_lm(str(path), GPTQLoraConfig(), dtype=dtype, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_logits_equal_the_dense_model_of_the_dequantized_weights(tmp_path, case):
    path, dense = make_gptq_checkpoint(tmp_path / "ckpt", case)
    model = _load(path)
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == LAYERS * len(PROJECTIONS) + case.lm_head
    assert isinstance(model.lm_head, GPTQLinear) == case.lm_head
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight is None and (layer.bits, layer.group_size) == (case.bits, case.group_size)
    assert layer.checkpoint_format == case.checkpoint_format
    assert {b.dtype for b in (layer.qweight, layer.qzeros, layer.g_idx)} == {torch.int32}
    assert layer.scales.dtype == torch.float16  # as stored
    assert {n for n, _ in layer.named_buffers()} == {"qweight", "qzeros", "scales", "g_idx"}
    if case.tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if case.bias:
        assert layer.bias is not None and layer.bias.dtype == torch.float32 and not layer.bias.requires_grad
    assert not model.training  # as from_pretrained returns it
    assert model.quantization_method == "gptq"
    ids = token_batch()
    with torch.no_grad():
        got = model(ids).logits
        want = dense(ids).logits
    # float32: the dequantized weight is exact (fp16 scale times a small integer), so only matmul order differs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_match_the_dense_model_in_that_dtype(tmp_path, dtype):
    path, dense = make_gptq_checkpoint(tmp_path / "ckpt", GPTQCase(desc_act=True))
    model = _load(path, dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == dtype
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == dtype
    ids = token_batch()
    with torch.no_grad():
        got = model(ids).logits.float()
        want = dense.to(dtype)(ids).logits.float()
        exact = dense.float()(ids).logits
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert (got - exact).abs().max() < 0.1


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}, "cpu"])
def test_single_device_maps_load_on_the_process_device(tmp_path, device_map):
    """TRL passes device_map="auto" when it loads a model on a GPU: the whole model goes to the process's device."""
    path, _ = make_gptq_checkpoint(tmp_path / "ckpt", GPTQCase())
    model = _load(path, device_map=device_map)
    assert {b.device.type for b in model.buffers()} == {"cpu"}


def test_default_training_dtype_is_the_checkpoints(tmp_path):
    path, _ = make_gptq_checkpoint(tmp_path / "ckpt", GPTQCase())
    model = load_gptq_causal_lm(str(path), GPTQLoraConfig())  # config.json says float16
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.model.layers[0].self_attn.o_proj.compute_dtype == torch.float16


@pytest.mark.parametrize(
    "case",
    [GPTQCase(desc_act=True, sharded=True, checkpoint_format="gptq_v2"), GPTQCase(legacy_config=True, bias=True)],
    ids=lambda c: c.id,
)
def test_save_pretrained_round_trip(tmp_path, case):
    """The loaded model keeps ``quantization_config``: ``save_pretrained`` writes a GPTQ checkpoint (packed tensors
    and scales bit for bit) that loads again to the same logits."""
    path, _ = make_gptq_checkpoint(tmp_path / "ckpt", case)
    model = _load(path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "gptq" and saved["checkpoint_format"] == case.checkpoint_format
    assert (saved["bits"], saved["group_size"], saved["desc_act"]) == (case.bits, case.group_size, case.desc_act)
    again = _load(tmp_path / "again", dtype=torch.bfloat16)
    first, second = model.model.layers[1].mlp.down_proj, again.model.layers[1].mlp.down_proj
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
