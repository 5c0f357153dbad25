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
them; this module is for them. Its effect on one H100 is measured by the ablation row
``qlora-bnb-foak-flce-no-lean-recompute`` of ``benchmarks/scenarios.yaml`` (see ``benchmarks/README.md``).

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

The same ``context_fn`` carries ``checkpoint_keep_attention`` (off by default): PyTorch's selective activation
checkpointing (``create_selective_checkpoint_contexts``) keeps the outputs of the attention block's projection
GEMMs and of the fused attention kernel from the forward, so the recomputation reuses them instead of running
q/k/v/o and SDPA again. Which ops count as "in the attention block" is decided by a scope flag that a wrapper
around each attention module's ``forward`` sets (recorded and reverted through the patcher). The cost is those
outputs per layer (bf16 Llama 8B shape: q, k, v, attention output and o, 7 bytes per token per hidden unit,
235 MB per layer at 8192 tokens); the gain is the attention block's share of the recomputation, exact (the kept tensors are the
ones the recomputation would have produced).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from fms_acceleration_accelerate.model_specs import ModelMatch
from fms_acceleration_accelerate.patching import PluginPatcher

#: aten ops whose outputs ``checkpoint_keep_attention`` keeps inside an attention module: the projection GEMMs
#: and every fused SDPA backend (cuDNN / flash / memory-efficient on CUDA, flash on CPU).
KEPT_ATTENTION_OPS = (
    "mm",
    "addmm",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def _kept_op_overloads() -> frozenset:
    import torch

    ops = (getattr(torch.ops.aten, name, None) for name in KEPT_ATTENTION_OPS)
    return frozenset(op.default for op in ops if op is not None and hasattr(op, "default"))


class RecomputeState:
    """Whether the running forward is activation checkpointing's recomputation (per model, per thread).

    Args:
        keep_attention: keep the attention block's GEMM / SDPA outputs for the recomputation
            (``checkpoint_keep_attention``).

    Attributes:
        skipped: how many MLP output projections were skipped so far (for tests and the run summary).
        kept: how many attention op outputs the forwards kept for their recomputation (the recomputation
            replays the forward's decisions, so each is reused, not re-run).
    """

    def __init__(self, keep_attention: bool = False) -> None:
        self._local = threading.local()
        self.keep_attention = keep_attention
        self._kept_ops: frozenset | None = None
        self.skipped = 0
        self.kept = 0
        self.warned_inactive = False

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

    @property
    def in_checkpointed_forward(self) -> bool:
        return getattr(self._local, "forward", 0) > 0

    @contextlib.contextmanager
    def checkpointed_forward(self) -> Iterator[None]:
        self._local.forward = getattr(self._local, "forward", 0) + 1
        try:
            yield
        finally:
            self._local.forward -= 1

    @property
    def in_attention(self) -> bool:
        return getattr(self._local, "attention", 0) > 0

    @contextlib.contextmanager
    def attention_scope(self) -> Iterator[None]:
        """Entered by the wrapped attention forwards: ops run inside are the ones ``keep_attention`` keeps."""
        self._local.attention = getattr(self._local, "attention", 0) + 1
        try:
            yield
        finally:
            self._local.attention -= 1

    def _policy(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import CheckpointPolicy

        if self._kept_ops is None:
            self._kept_ops = _kept_op_overloads()
        if self.in_attention and op in self._kept_ops:
            if not ctx.is_recompute:  # (torch < 2.12 also asks during the recomputation)
                self.kept += 1
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def context_fn(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``torch.utils.checkpoint``'s ``context_fn``: (forward context, recomputation context)."""
        if not self.keep_attention:
            return contextlib.nullcontext(), self.recomputation()
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        # a fresh pair per checkpointed call: the two share the cache of that call's kept outputs
        forward, recompute = create_selective_checkpoint_contexts(self._policy)
        return _entered_together(self.checkpointed_forward(), forward), _entered_together(
            self.recomputation(), recompute
        )

    def compute_output(self) -> bool:
        """False inside a recomputation (the caller then skips its output projection); counts the skips."""
        if self.recomputing:
            self.skipped += 1
            return False
        return True


@contextlib.contextmanager
def _entered_together(*contexts: contextlib.AbstractContextManager) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


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
            description="recomputation context (lean_recompute / checkpoint_keep_attention)",
        )
        wrapped += 1
    return wrapped, "; ".join(sorted(reasons))


def install_attention_scopes(match: ModelMatch, patches: PluginPatcher, state: RecomputeState) -> int:
    """Wrap each attention module's ``forward`` so the ops it runs happen inside ``state.attention_scope()``.

    Idempotent (wrapped modules carry the state on their forward). Returns how many modules were wrapped now.
    """
    import torch

    wrapped = 0
    for attention in match.attentions:
        module = attention.module
        original = module.forward
        if getattr(original, "_foak_attention_scope", None) is state:
            continue

        def forward(*args: Any, _original: Any = original, _module: Any = module, **kwargs: Any) -> Any:
            if not state.warned_inactive and _module.training and torch.is_grad_enabled():
                if not (state.in_checkpointed_forward or state.recomputing):
                    state.warned_inactive = True
                    warnings.warn(
                        "checkpoint_keep_attention has no effect: this attention forward does not run under the "
                        "plugin's checkpoint context (activation checkpointing off, reentrant, or applied by "
                        "another wrapper); enable it with gradient_checkpointing_enable(gradient_checkpointing_"
                        "kwargs={'use_reentrant': False}) before training, or set checkpoint_keep_attention: false",
                        stacklevel=2,
                    )
            with state.attention_scope():
                return _original(*args, **kwargs)

        forward._foak_attention_scope = state  # type: ignore[attr-defined]
        patches.patch_forward(
            module,
            forward,
            target=attention.path,
            description="checkpoint_keep_attention: marks the attention block's ops for selective checkpointing",
        )
        wrapped += 1
    return wrapped
