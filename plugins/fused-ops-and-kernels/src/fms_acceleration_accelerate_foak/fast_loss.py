"""``fast_loss`` under the trainers that call the model: HF ``Trainer`` and TRL's fused LM head.

HF ``Trainer`` calls ``model(**inputs, labels=..., num_items_in_batch=...)`` and reads ``outputs.loss``: the
loss kernels are patched as the model's ``loss_function`` (``fast_loss: true``) or as a forward that computes
lm_head + loss in chunks (``fast_loss: fused_linear``); both divide the summed loss by ``num_items_in_batch``
when it is given, as transformers' ``ForCausalLMLoss`` does.

TRL's trainers (SFTTrainer, DPO, GRPO, ...) do not read ``outputs.loss`` of that call. At construction they
give the causal LM a *fused LM head* (``trl.trainer.utils.add_fused_lm_head`` replaces ``model.forward``):
called with ``fused_lm_head=True``, the forward runs the backbone and returns a ``FusedCausalLMOutput`` of
per-token ``log_probs`` (with gradient) and, on request, ``entropy`` / ``is_top1``, plus ``label_mask`` and
``loss``; the trainer builds its loss from ``-log_probs`` and ``num_items_in_batch`` and its metrics from the
rest. That forward never calls ``loss_function``, and it wraps whatever forward was there, so neither loss patch
would ever run (and a forward patched *over* TRL's returns no ``log_probs``).

So when the causal LM carries TRL's fused head, this module serves TRL's contract itself: the forward is
replaced (recorded, revertible) by one that, with ``fused_lm_head=True``, computes the same outputs with this
package's kernels — the chunked per-token fused linear cross-entropy, no logits, for ``fused_linear`` and
also for ``true`` (TRL's own head never builds the full logits, so reading them would cost memory; ``true``
falls back to the lm_head module's logits and the per-token cross-entropy kernel only for a head the fused
kernel cannot read) — and otherwise behaves as TRL's forward. Loss
patches TRL's head made unreachable are reverted, so the patch table lists only what runs. TRL's head is
recognised by what it is: a bound forward taking ``fused_lm_head`` whose defining module is in ``trl`` and
whose settings (``outputs``, ``temperature``, ``cast_lm_head_to_fp32``, logit scale and soft-capping) can be
read and are ones these kernels compute. Anything else with a ``fused_lm_head`` parameter is refused with the
reason and the installed TRL version, before training starts.

Where it happens: when patching (the forward is already TRL's, e.g. kernels patched at ``Accelerator.prepare``
inside ``trainer.train()``), and again in ``get_callbacks_and_ready_for_train`` / ``after_prepare`` (the trainer
was built after ``augmentation``: TRL's head now wraps the forward this plugin patched).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from torch import nn

from fms_acceleration_accelerate.model_specs import ModelMatch, ModelStructureError
from fms_acceleration_accelerate.patching import PatchRecord, PluginPatcher

from .patches import (
    IGNORE_INDEX,
    CallCounter,
    _fused_linear_forward,
    logits_transform,
    patch_fused_linear_forward,
    patch_fused_loss_head,
    patch_loss_function,
    router_aux_loss_function,
)

logger = logging.getLogger("fms_acceleration_accelerate_foak")

# per-token fields of TRL's FusedCausalLMOutput that the kernels compute
SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy", "is_top1"})
# fields the returned output must have
_OUTPUT_FIELDS = frozenset({"loss", "log_probs", "entropy", "is_top1", "label_mask", "aux_loss"})
# closure variables of TRL's fused forward that hold its settings
_SETTINGS = ("outputs", "temperature", "cast_lm_head_to_fp32")
_FIX = "set fast_loss: false (TRL's own fused LM head then computes the loss and its metrics without full logits)"


def _trl_version() -> str:
    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:  # a fused_lm_head forward from a trl not installed as a distribution
        return "unknown"


@dataclass(frozen=True)
class TrlFusedHead:
    """TRL's fused LM head as found on a causal LM (``model.forward`` set by ``add_fused_lm_head``).

    Attributes:
        forward: the bound forward found on the model.
        outputs: per-token fields it computes besides ``log_probs``'s companions (``"entropy"``, ``"is_top1"``).
        temperature: divisor of the (scaled, soft-capped) logits.
        output_class: TRL's ``FusedCausalLMOutput``.
        version: installed TRL version.
    """

    forward: Any
    outputs: tuple[str, ...]
    temperature: float
    output_class: type
    version: str


def _refuse(lm: nn.Module, why: str) -> ModelStructureError:
    return ModelStructureError(
        f"fast_loss: {type(lm).__name__}.forward was replaced by a fused LM head (trl {_trl_version()}) that the "
        f"loss kernels cannot serve: {why}",
        fix=_FIX,
    )


def find_trl_fused_head(lm: nn.Module, match: ModelMatch | None = None) -> TrlFusedHead | None:
    """TRL's fused LM head on ``lm``, or None when ``lm.forward`` is not one (this module's own forward is not).

    Raises:
        ModelStructureError: ``lm.forward`` takes ``fused_lm_head`` but is not a TRL head these kernels can serve
            (unknown provider, settings that cannot be read, or outputs / temperature / fp32 head they do not
            compute); the message names the TRL version and the fix.
    """
    forward = lm.__dict__.get("forward")
    if forward is None or getattr(forward, "serves_fused_lm_head", False):
        return None
    function = getattr(forward, "__func__", forward)
    try:
        parameters = inspect.signature(function, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        return None
    if "fused_lm_head" not in parameters:
        return None
    module = getattr(function, "__globals__", {}).get("__name__", "")
    if not (module == "trl" or module.startswith("trl.")):
        raise _refuse(lm, f"it is defined in {module or 'an unknown module'!r}, not in trl")
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or ()))
    settings: dict[str, Any] = {}
    for name in (*_SETTINGS, "logit_scale", "final_logit_softcapping"):
        try:
            settings[name] = cells[name].cell_contents
        except (KeyError, ValueError):
            if name in _SETTINGS:
                raise _refuse(lm, f"its setting {name!r} cannot be read (an unknown TRL layout)") from None
    output_class = function.__globals__.get("FusedCausalLMOutput")
    fields = set(getattr(output_class, "__dataclass_fields__", ()))
    if not _OUTPUT_FIELDS <= fields:
        raise _refuse(lm, f"its output class lacks {sorted(_OUTPUT_FIELDS - fields)} (an unknown TRL layout)")
    outputs = tuple(settings["outputs"])
    unsupported = sorted(set(outputs) - SUPPORTED_OUTPUTS)
    if unsupported:
        raise _refuse(lm, f"it returns {unsupported}, which the kernels do not compute (they compute log_probs, "
                      "entropy and is_top1)")  # fmt: skip
    if settings["cast_lm_head_to_fp32"]:
        raise _refuse(lm, "it runs the LM head in float32 (cast_lm_head_to_fp32=True)")
    temperature = float(settings["temperature"])
    if match is not None:
        softcap, scaling = logits_transform(match)
        if not temperature > 0 or (softcap is not None and temperature != 1.0):
            raise _refuse(lm, f"temperature {temperature} with logit soft-capping is not computed by the kernels")
        trl_scale = settings.get("logit_scale", 1.0 / scaling)
        trl_softcap = settings.get("final_logit_softcapping", softcap)
        if trl_scale is None or abs(float(trl_scale) * scaling - 1.0) > 1e-6 or trl_softcap != softcap:
            raise _refuse(lm, f"its logit scale {trl_scale} / soft-capping {trl_softcap} differ from the model's "
                          f"(1 / {scaling} and {softcap})")  # fmt: skip
    return TrlFusedHead(forward, outputs, temperature, output_class, _trl_version())


def _trl_contract_forward(
    match: ModelMatch,
    trl: TrlFusedHead,
    mode: str,
    previous: Any,
    counter: CallCounter,
    chunked: bool,
) -> Any:
    """Forward serving TRL's ``fused_lm_head=True`` contract with the loss kernels.

    Args:
        match: the model's matched modules.
        trl: the TRL head it replaces (settings, output class).
        mode: the plugin's ``fast_loss`` mode, for calls without ``fused_lm_head`` (``"fused_linear"``: the fused
            linear loss of the HF contract; ``"cross_entropy"``: ``previous`` as it is).
        previous: the forward to run without ``fused_lm_head`` (TRL's own, or the model's when TRL's head wrapped
            a forward of this plugin that was reverted).
        counter: counts the ``fused_lm_head=True`` calls.
        chunked: ``fused_lm_head=True`` calls run the per-token fused linear cross-entropy through ``lm_head``'s
            patched forward (no logits); otherwise ``lm_head``'s logits and the per-token cross-entropy kernel.
    """
    from fms_acceleration_accelerate_kernels.cross_entropy import cross_entropy_per_token

    spec = match.spec
    lm = match.causal_lm.module
    config = lm.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap, scaling = logits_transform(match)
    scaling *= trl.temperature  # z / T = x / (scaling * T) without soft-capping (refused with it)
    aux_loss_fn = router_aux_loss_function(match)
    want_entropy = "entropy" in trl.outputs
    want_top1 = "is_top1" in trl.outputs
    # without fused_lm_head: in training with labels the fused linear loss (HF contract), else ``previous``
    plain = _fused_linear_forward(match, previous, counter) if mode == "fused_linear" else previous

    @functools.wraps(previous)
    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return plain(*args, **kwargs)
        counter.hit()
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or pre-shifted shift_labels)")
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(lm, spec.base_model_attribute)(*args, **kwargs)
        hidden = backbone_outputs[0]
        if shift_labels is None:
            hidden, target = hidden[:, :-1], labels[:, 1:]
        else:
            target = shift_labels
        head = getattr(lm, spec.lm_head_attribute)
        device = head.weight.device
        hidden, target = hidden.to(device), target.to(device)
        mask = target != IGNORE_INDEX
        # only the scored positions go through the head (a device-to-host read for their count, as TRL's)
        rows, row_targets = hidden[mask], target[mask]
        if chunked:
            options = {"target": row_targets, "softcap": softcap, "logits_scaling": scaling, "per_token": True}
            nll, entropy, is_top1 = head(rows, fused_loss=options)  # lm_head's own call: FSDP gathers its weight
        else:
            nll, entropy, is_top1 = cross_entropy_per_token(head(rows), row_targets, IGNORE_INDEX, softcap, scaling)
        # masked_scatter keeps a batch without scored positions connected to the graph (a zero loss)
        log_probs = nll.new_zeros(mask.shape).masked_scatter(mask, -nll)
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / divisor
        aux_loss = None
        if aux_loss_fn is not None and kwargs.get("output_router_logits"):
            aux_loss = aux_loss_fn(
                backbone_outputs.router_logits, lm.num_experts, lm.num_experts_per_tok, kwargs.get("attention_mask")
            )
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return trl.output_class(
            loss=loss,
            log_probs=log_probs,
            entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy) if want_entropy else None,
            is_top1=is_top1.new_zeros(mask.shape).masked_scatter(mask, is_top1) if want_top1 else None,
            label_mask=mask,
            aux_loss=aux_loss,
        )

    forward.serves_fused_lm_head = True  # type: ignore[attr-defined]
    forward.kernel_calls = counter  # type: ignore[attr-defined]
    return forward


class FastLoss:
    """The ``fast_loss`` patches of one plugin: which ran, their call counters, TRL's head when served.

    Args:
        mode: ``"cross_entropy"`` or ``"fused_linear"`` (``FusedOpsAndKernelsConfig.loss_mode``).
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("cross_entropy", "fused_linear"):
            raise ValueError(f"fast_loss mode must be 'cross_entropy' or 'fused_linear', got {mode!r}")
        self.mode = mode
        self._counted: list[tuple[PatchRecord, CallCounter]] = []
        self._lm_records: list[PatchRecord] = []  # loss_function / forward patches of the causal LM
        self._head_patched = False  # lm_head computes the fused linear loss when called with fused_loss=
        self.trl_head: TrlFusedHead | None = None
        """TRL's fused head this plugin's forward serves, once found."""

    def _record(self, record: PatchRecord, counter: CallCounter, on_lm: bool = True) -> None:
        self._counted.append((record, counter))
        if on_lm:
            self._lm_records.append(record)

    def patch(self, match: ModelMatch, patches: PluginPatcher) -> int:
        """Patch the loss kernels for the trainer the model is ready for (TRL's head if present, else HF's
        contract). Returns 1."""
        lm = match.causal_lm.module
        trl = find_trl_fused_head(lm, match)
        if self.mode == "fused_linear":
            counter = CallCounter()
            self._record(patch_fused_loss_head(match, patches, counter), counter, on_lm=False)
            self._head_patched = True
        if trl is not None:
            self._serve_trl(match, patches, trl)
        elif self.mode == "cross_entropy":
            counter = CallCounter()
            self._record(patch_loss_function(match, patches, counter), counter)
        else:
            counter = CallCounter()
            self._record(patch_fused_linear_forward(match, patches, counter), counter)
        return 1

    def adopt_trl_head(self, match: ModelMatch, patches: PluginPatcher) -> bool:
        """Serve TRL's fused head if one was put on the model after the loss was patched (the trainer was built
        after ``augmentation``); the loss patches it made unreachable are reverted. Returns whether it did."""
        trl = find_trl_fused_head(match.causal_lm.module, match)
        if trl is None:
            return False
        self._serve_trl(match, patches, trl)
        return True

    def _serve_trl(self, match: ModelMatch, patches: PluginPatcher, trl: TrlFusedHead) -> None:
        lm = match.causal_lm.module
        # the loss_function / forward patched before TRL's head would never run now: revert them (a forward of
        # this plugin under TRL's head goes with it; the new forward below does both jobs)
        for record in reversed(self._lm_records):
            patches.revert_record(record)
        self._counted = [(r, c) for r, c in self._counted if r not in self._lm_records]
        self._lm_records.clear()
        chunked = self._head_patched or self._patch_head_for_trl(match, patches)
        counter = CallCounter()
        # TRL's head if it is still there; the model's own forward if it went with a reverted patch under it
        previous = lm.forward
        kernel = "fused_linear_cross_entropy_per_token" if chunked else "cross_entropy_per_token"
        note = "; chunked, as TRL's own head: no full logits" if chunked and self.mode != "fused_linear" else ""
        record = patches.patch_forward(
            lm,
            _trl_contract_forward(match, trl, self.mode, previous, counter, chunked),
            target=match.causal_lm.path or type(lm).__name__,
            description=f"kernels.{kernel} (TRL fused_lm_head=True: {', '.join(trl.outputs)}{note})",
        )
        self._record(record, counter)
        self.trl_head = trl

    def _patch_head_for_trl(self, match: ModelMatch, patches: PluginPatcher) -> bool:
        """``fast_loss: true`` under TRL's head: TRL's own head never builds the full logits, so the per-token loss
        runs chunked through ``lm_head`` too (measured on one H100 at the 8B shape, QLoRA: the logits path peaked
        1.1 GiB above plain TRL). Falls back to the logits path, returning ``False``, for a head the fused linear
        kernel cannot read (the reason is logged)."""
        try:
            counter = CallCounter()
            self._record(patch_fused_loss_head(match, patches, counter), counter, on_lm=False)
        except ModelStructureError as exc:
            logger.info("fast_loss under TRL's fused head: lm_head's logits + per-token kernel (%s)", exc)
            return False
        self._head_patched = True
        return True

    def kernel_calls(self, patches: PluginPatcher) -> dict[str, int]:
        """``{target: kernel calls}`` of the loss patches currently in the patch table."""
        held = {id(r) for r in patches.records}
        return {record.target: counter.count for record, counter in self._counted if id(record) in held}
