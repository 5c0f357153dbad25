"""Lean recomputation: skip the MLP output projection when activation checkpointing recomputes a layer.

With non-reentrant activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``: what HF's
``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` use in transformers 5) every decoder
layer's forward runs twice: once normally, once during backward to regain the tensors autograd saved. The
second run's outputs are discarded. In Llama-style layers (``residual + mlp(x)``), the MLP output feeds only
that residual sum, so nothing saved depends on it and the down projection's GEMM (plus its dequant for a 4-bit
base) is wasted work in the recomputation: one of the layer's seven projection GEMMs, ~1/7 of its recompute.

PyTorch's checkpoint "early stop" (on by default) ends a recomputation once the last needed tensor is saved
again. A plain ``nn.Linear`` down projection saves its *inputs* before its GEMM runs, so early stop already skips
that GEMM. The fused MLP kernels (``lora_mlp_swiglu`` / ``lora_mlp_geglu``: one autograd function for gate, up,
activation and down) save their tensors only after their whole forward ran, so early stop cannot cut inside
them; this module is for them. On an H100 at the DESIGN §7 shape the QLoRA step went from 0.1995 s to 0.181 s
with it (together with the second session's kernel changes; the ablation row of ``benchmarks/scenarios.yaml``
separates the two).

This module wires that skip without replacing the checkpoint machinery:

* :class:`RecomputeState` (one per model) says whether the current forward is a recomputation; it is set by
  the recomputation context manager that ``torch.utils.checkpoint`` accepts as ``context_fn``.
* :func:`install_recompute_context` wraps each decoder layer's ``_gradient_checkpointing_func`` (through the
  plugin's patcher, so it is recorded and reverted) to pass that ``context_fn``. It only does so where it is
  safe: checkpointing enabled on the layer, non-reentrant, no ``context_fn`` of the user's, and an
  architecture whose spec says the MLP output is not saved by anything after it in the layer.
* the fused MLP forwards patched by the plugin call ``state.compute_output()`` and ask the kernels for no
  output during a recomputation.

Checkpointing applied any other way (e.g. FSDP's ``activation_checkpointing`` wrapper) never sets the state,
so the MLP computes normally there.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

from fms_acceleration_accelerate.model_specs import ModelMatch
from fms_acceleration_accelerate.patching import PluginPatcher


class RecomputeState:
    """Whether the running forward is activation checkpointing's recomputation (per model, per thread).

    Attributes:
        skipped: how many MLP output projections were skipped so far (for tests and the run summary).
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self.skipped = 0

    @property
    def recomputing(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def recomputation(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def context_fn(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``torch.utils.checkpoint``'s ``context_fn``: (forward context, recomputation context)."""
        return contextlib.nullcontext(), self.recomputation()

    def compute_output(self) -> bool:
        """False inside a recomputation (the caller then skips its output projection); counts the skips."""
        if self.recomputing:
            self.skipped += 1
            return False
        return True


def _non_reentrant_without_context(func: Any) -> bool:
    keywords = getattr(func, "keywords", None)
    return (
        isinstance(func, functools.partial) and keywords.get("use_reentrant") is False and "context_fn" not in keywords
    )


def install_recompute_context(match: ModelMatch, patches: PluginPatcher, state: RecomputeState) -> tuple[int, str]:
    """Make every eligible decoder layer's checkpointing run its recomputation under ``state``.

    Idempotent (layers already wrapped with ``state`` are left alone).

    Args:
        match: the model's matched modules.
        patches: the plugin's patcher (records the wrapper, so ``revert`` restores the original function).
        state: the model's recompute state, read by the patched MLP forwards.

    Returns:
        ``(number of layers wrapped now, reason when none could be)``.
    """
    wrapped, reasons = 0, set()
    for layer in match.decoder_layers:
        module = layer.module
        func = getattr(module, "_gradient_checkpointing_func", None)
        if not getattr(module, "gradient_checkpointing", False) or func is None:
            reasons.add("activation checkpointing is not enabled on the decoder layers")
            continue
        if getattr(func, "keywords", {}).get("context_fn") == state.context_fn:
            continue
        if not _non_reentrant_without_context(func):
            reasons.add("checkpointing is reentrant or has its own context_fn")
            continue
        patches.patch(
            module,
            "_gradient_checkpointing_func",
            functools.partial(func, context_fn=state.context_fn),
            target=f"{layer.path}._gradient_checkpointing_func",
            description="recomputation skips the MLP output projection",
        )
        wrapped += 1
    return wrapped, "; ".join(sorted(reasons))
