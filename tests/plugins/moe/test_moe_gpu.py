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


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**_batch())
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-6)) for n, g in want.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_cuda_kernels_match_eager_experts(model_type, dtype):
    """fp32: loss and every gradient as transformers' eager experts (relative 1e-3). bf16: both bf16 runs (HF eager
    experts and ours, same weights) are compared with an fp32 eager run of those weights; each of our gradients may
    be off by at most twice HF's own bf16 error (floor 2e-2), since routing near ties and bf16 rounding move both."""
    reference = _model(model_type, torch.float32, experts_implementation="eager")
    ref_loss, want = _loss_and_grads(reference)
    weights = {n: p.detach().to(dtype) for n, p in reference.named_parameters()}

    model = _model(model_type, dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    framework = make_framework()
    framework.augmentation(model)
    loss, got = _loss_and_grads(model)
    assert got.keys() == want.keys()
    errors = _relative_errors(got, want)
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
        assert max(errors.values()) < 1e-3, errors
    else:
        hf = _model(model_type, dtype, experts_implementation="eager")
        with torch.no_grad():
            for n, p in hf.named_parameters():
                p.copy_(weights[n])
        hf_loss, hf_grads = _loss_and_grads(hf)
        hf_errors = _relative_errors(hf_grads, want)
        assert abs(float(loss - ref_loss)) <= max(2 * abs(float(hf_loss - ref_loss)), 2e-2 * float(ref_loss))
        worse = {n: (e, hf_errors[n]) for n, e in errors.items() if e > max(2 * hf_errors[n], 2e-2)}
        assert not worse, f"gradients further from fp32 than twice HF's bf16 error (ours, HF): {worse}"
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
