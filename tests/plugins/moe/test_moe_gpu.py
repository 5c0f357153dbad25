"""GPU tier: the MoE plugin with the Triton expert kernels on CUDA, on a small model of every MoE architecture of
the spec table (8 experts, top-2, fp32 and bf16): loss and gradients against transformers' eager experts, and a
few optimizer steps that lower the loss. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from .moe_helpers import MOE_TYPES, make_framework

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 256


def _model(model_type: str, dtype: torch.dtype, experts_implementation: str | None = None, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from tests.plugins.fused_ops.tiny_models import tiny_config

    config = tiny_config(
        model_type,
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        **{"num_local_experts" if model_type in ("mixtral", "granitemoe") else "num_experts": 8},
        num_experts_per_tok=2,
        **({"moe_intermediate_size": 96} if model_type in ("qwen2_moe", "qwen3_moe") else {}),
        **({"head_dim": 32} if model_type == "qwen3_moe" else {}),
    )
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).cuda().train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")):
                p.normal_(0.0, 0.5)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model


def _batch(seed: int = 1, rows: int = 4, seq: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g).cuda()
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_cuda_kernels_match_eager_experts(model_type, dtype):
    reference = _model(model_type, dtype, experts_implementation="eager")
    out = reference(**_batch())
    out.loss.backward()
    want = {n: p.grad.float() for n, p in reference.named_parameters() if p.grad is not None}

    model = _model(model_type, dtype)
    framework = make_framework()
    framework.augmentation(model)
    got_out = model(**_batch())
    got_out.loss.backward()
    got = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_out.loss.float(), out.loss.float(), **tol)
    for name, g in want.items():
        scale = g.abs().max().clamp_min(1e-6)
        err = (got[name] - g).abs().max() / scale
        assert err < (1e-3 if dtype == torch.float32 else 6e-2), f"{name}: relative max error {err:.3g}"
    stats = framework.plugins[0].routing_stats.totals()
    assert len(stats) == model.config.num_hidden_layers
    assert all(int(c.sum()) == 2 * _batch()["input_ids"].numel() for c in stats.values())
    framework.revert()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_cuda_training_lowers_the_loss(model_type):
    model = _model(model_type, torch.bfloat16)
    framework = make_framework()
    framework.augmentation(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = _batch(seed=5)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    framework.revert()
