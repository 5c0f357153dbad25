"""When the fused-ops plugin patches what: the one place that decides.

Every patch the plugin makes belongs to one :class:`Phase`. :data:`PATCH_PHASES` names the phase of each kind of
patch (and the legitimate later phase of the few that have one); :func:`fused_phase` decides the phase of the
fused LoRA / fused dequant kernels, the only kind whose phase depends on the run
(:class:`~fms_acceleration_accelerate.distributed.RunContext`) and on the model.

=====================================  =========================================================================
phase                                  hook that runs it
=====================================  =========================================================================
``MODEL``                              ``augmentation``; ``prepare_contribution`` when a script never calls
                                       ``augmentation`` (the section came with the Accelerate config)
``AFTER_WRAP``                         ``after_prepare`` (the model FSDP wrapped)
``LORA_ADDED``                         ``get_callbacks_and_ready_for_train`` (given the trainer's PEFT model) or
                                       ``after_prepare``, whichever comes first; under DeepSpeed
                                       ``prepare_contribution`` at the latest (before the engine is built)
``TRAINER_READY``                      ``after_prepare`` and ``get_callbacks_and_ready_for_train`` (each time;
                                       idempotent): what a trainer puts on the model after it is patched
=====================================  =========================================================================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from fms_acceleration_accelerate.distributed import RunContext


class Phase(enum.Enum):
    """When a kind of patch is made (see the module docstring for the hook of each)."""

    MODEL = "augmentation, else prepare_contribution"
    AFTER_WRAP = "after_prepare"
    LORA_ADDED = (
        "get_callbacks_and_ready_for_train or after_prepare, whichever comes first (under DeepSpeed: "
        "prepare_contribution at the latest)"
    )
    TRAINER_READY = "after_prepare and get_callbacks_and_ready_for_train (idempotent)"


PATCH_PHASES: Mapping[str, tuple[Phase, ...]] = MappingProxyType(
    {
        # forwards that read only the weights of the module they replace (or none): FSDP wrapping before or after
        # makes no difference, so they are patched as soon as the model is there
        "fast_rms_layernorm": (Phase.MODEL,),
        "fast_rope_embeddings": (Phase.MODEL,),
        "fast_swiglu": (Phase.MODEL,),
        # second phase: a TRL trainer puts its fused LM head on the model while it is built, after the loss was
        # patched; the loss kernels then serve that head too (FastLoss.adopt_trl_head)
        "fast_loss": (Phase.MODEL, Phase.TRAINER_READY),
        # kernels that read the weights of sub-modules (q_proj.lora_A..., the three MLP projections), patched
        # together in the one phase fused_phase() chooses
        "fused_lora": (Phase.MODEL, Phase.LORA_ADDED, Phase.AFTER_WRAP),
        "fused_dequant": (Phase.MODEL, Phase.LORA_ADDED, Phase.AFTER_WRAP),
        # gradient checkpointing is usually enabled after patching: the recompute context is installed right after
        # the patches and again in every later phase (it finds the checkpointed layers once they exist)
        "lean_recompute": (Phase.MODEL, Phase.TRAINER_READY),
        "checkpoint_keep_attention": (Phase.MODEL, Phase.TRAINER_READY),
    }
)
"""Option -> the phases its patches are made in: one phase, or, where a kind of patch has a legitimate later
phase, the first phase followed by it; for ``fused_lora`` / ``fused_dequant`` the candidates of
:func:`fused_phase`."""


def fused_phase(context: RunContext, *, has_lora: bool, lora_config_pending: bool, fused_lora: bool) -> Phase:
    """The phase in which the fused LoRA / fused dequant kernels are patched.

    * ``AFTER_WRAP`` under FSDP: ``prepare_contribution`` makes every attention and MLP module a fused scope (no
      FSDP unit inside it), so the decoder-layer unit's all-gather covers every weight the kernels read, and the
      kernels are patched on the wrapped model (layers another plugin replaces in ``prepare`` included).
    * Under DeepSpeed (never ``AFTER_WRAP``: the engine is built inside ``prepare``, and under ZeRO-3 its
      parameters are partitioned from then on) as without it; DeepSpeed gathers what the fused scopes read.
    * ``LORA_ADDED`` when LoRA is not on the model yet but a ``LoraConfig`` is among the modifiable arguments (the
      trainer adds the adapters later).
    * ``MODEL`` otherwise.

    Args:
        context: the run's shape when the decision is made (``plugin.run_context`` at ``augmentation``, the
            ``context`` of ``prepare_contribution``).
        has_lora: the model has PEFT LoRA layers now.
        lora_config_pending: a ``LoraConfig`` is among the modifiable arguments (applied later by a trainer).
        fused_lora: the ``fused_lora`` option is on.
    """
    if context.is_fsdp:
        return Phase.AFTER_WRAP
    if fused_lora and not has_lora and lora_config_pending:
        return Phase.LORA_ADDED
    return Phase.MODEL


__all__ = ["PATCH_PHASES", "Phase", "fused_phase"]
