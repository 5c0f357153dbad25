"""Tiny MoE models saved and loaded locally, the plugin's framework, and gradient comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fms_acceleration_accelerate_moe import ScatterMoEPlugin, moe_model_types

from tests.plugins.fused_ops.tiny_models import tiny_batch, tiny_model

MOE_TYPES = moe_model_types()


def save_tiny(model_type: str, directory: Path, **overrides: Any) -> Path:
    """Save a tiny random-init model of ``model_type`` (every layer sparse unless ``overrides`` say otherwise)."""
    model = tiny_model(model_type, **overrides)
    with torch.no_grad():  # routers start at zero in some architectures (Qwen, OLMoE): give them real routing
        for name, p in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")):
                p.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


def load(directory: Path, experts_implementation: str | None = None, dtype: torch.dtype = torch.float32):
    """The saved model in train mode (eager attention; the experts implementation given, else transformers')."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation="eager")
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).train()


def make_framework(section: dict[str, Any] | None = None, **kwargs: Any):
    """An AccelerationFramework with only the MoE plugin, configured at ``training.moe.scattermoe``."""
    from fms_acceleration_accelerate.framework import AccelerationFramework
    from fms_acceleration_accelerate.registry import PluginRegistry

    body = {"training": {"moe": {"scattermoe": {"ep_degree": 1} if section is None else section}}}
    return AccelerationFramework(body, registry=PluginRegistry([ScatterMoEPlugin]), **kwargs)


def loss_and_grads(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {name: grad}) of one forward/backward; grads are cleared afterwards."""
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_grads_close(expected: dict, actual: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert expected.keys() == actual.keys() and expected
    for name, g in expected.items():
        torch.testing.assert_close(actual[name], g, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def batch(seed: int = 1, rows: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    return tiny_batch(batch=rows, seq=seq, seed=seed)
