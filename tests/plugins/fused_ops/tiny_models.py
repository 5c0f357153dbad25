"""Tiny random-initialised causal LMs of every architecture with a spec, built from configs in code."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 64
SEQ = 12

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# model_type -> config overrides (on top of _COMMON, except GPTBigCode which has its own names)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "granite": dict(logits_scaling=2.0, attention_multiplier=0.2, residual_multiplier=0.5, embedding_multiplier=2.0),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=2.0),
    "gpt_bigcode": dict(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=VOCAB,
        multi_query=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=None),
    "phi3": dict(partial_rotary_factor=0.5),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    # GPT-OSS: attention sinks, q/k/v/o biases, YaRN rotary with half-width cos/sin, layers alternating sliding and
    # full attention (the window longer than the test rows here; the padding-free tests shorten it)
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=16,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
    ),
}


def tiny_config(model_type: str, **overrides: Any):
    from transformers import AutoConfig

    kwargs = {} if model_type == "gpt_bigcode" else dict(_COMMON)
    kwargs.update(TINY_CONFIGS[model_type])
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    for attr in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout"):
        if hasattr(config, attr):
            setattr(config, attr, 0.0)
    return config


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny random causal LM in train mode (no dropout anywhere)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    # make Gemma's zero-initialised (1 + w) norm weights and other constant inits non-trivial
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def tiny_batch(batch: int = 2, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids and labels (some positions ignored)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, :2] = -100
    return {"input_ids": input_ids, "labels": labels}


def supported_kernel_options(model_type: str) -> dict[str, Any]:
    """Every non-LoRA kernel option the architecture supports, switched on (fast_loss left to the caller)."""
    from fms_acceleration_accelerate.model_specs import architecture_spec

    spec = architecture_spec(model_type)
    return {
        "fast_rms_layernorm": spec.has_rms_norm,
        "fast_rope_embeddings": spec.rotary is not None,
        "fast_swiglu": spec.has_glu_mlp,
    }


def make_framework(section: dict[str, Any], path: str = "training"):
    """An AccelerationFramework with only the fused-ops plugin, configured at ``<path>.fused_ops_and_kernels``."""
    from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin

    from fms_acceleration_accelerate.framework import AccelerationFramework
    from fms_acceleration_accelerate.registry import PluginRegistry

    body: dict[str, Any] = {"fused_ops_and_kernels": section}
    for part in reversed(path.split(".")):
        body = {part: body}
    return AccelerationFramework(body, registry=PluginRegistry([FusedOpsAndKernelsPlugin]))


def loss_and_grads(model, batch: dict[str, torch.Tensor], **kwargs: Any):
    """(loss, {name: grad}) of one forward/backward; grads are cleared afterwards."""
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_grads_close(expected: dict, actual: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert expected.keys() == actual.keys() and expected
    for name, g in expected.items():
        torch.testing.assert_close(actual[name], g, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
