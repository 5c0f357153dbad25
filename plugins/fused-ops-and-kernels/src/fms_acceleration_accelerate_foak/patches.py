"""Forward replacements for norms, rotary embedding, gated MLPs and the causal-LM loss.

Each ``patch_*`` function applies one kernel to the modules a :class:`~fms_acceleration_accelerate.model_specs.
ModelMatch` found, through the plugin's :class:`~fms_acceleration_accelerate.patching.PluginPatcher` (so every
change is recorded and revertible), and returns how many patches it made. Replacement forwards read parameters
(``norm.weight``, ``lm_head.weight``) from the module *when called*, never at patch time, so they see what FSDP
has gathered.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fms_acceleration_accelerate.model_specs import ArchitectureSpec, ModelMatch, ModelStructureError, activation_of
from fms_acceleration_accelerate.patching import PatchRecord, PluginPatcher

IGNORE_INDEX = -100


class CallCounter:
    """How many times a patched loss callable ran its kernel (not its fall-back to the original).

    One per patch (no shared state); the patched callable also carries it as ``kernel_calls``.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def hit(self) -> None:
        self.count += 1

    def __repr__(self) -> str:
        return f"CallCounter({self.count})"


# ------------------------------------------------------------------------------------------------- RMSNorm


def _rms_norm_forward(norm: nn.Module, eps_attribute: str, offset: float) -> Callable[[torch.Tensor], torch.Tensor]:
    from fms_acceleration_accelerate_kernels.rms_norm import rms_norm

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, norm.weight, float(getattr(norm, eps_attribute)), offset)

    return forward


def patch_rms_norms(match: ModelMatch, patches: PluginPatcher) -> int:
    """Replace the forward of every RMSNorm of the model by the RMSNorm kernel.

    Returns:
        Number of norms patched.
    """
    spec = match.spec.norm
    if spec.kind != "rms":
        raise ModelStructureError(
            f"{match.spec.model_type}: its norms are {spec.kind}, not RMSNorm",
            fix="set fast_rms_layernorm: false for this model",
        )
    for norm in match.norms:
        patches.patch_forward(
            norm.module,
            _rms_norm_forward(norm.module, spec.eps_attribute, spec.weight_offset),
            target=norm.path,
            description=f"kernels.rms_norm(offset={spec.weight_offset:g})",
        )
    return len(match.norms)


# ------------------------------------------------------------------------------------------------- RoPE


def patch_rotary(spec: ArchitectureSpec, patches: PluginPatcher) -> int:
    """Replace the architecture's module-level rotary function (``apply_rotary_pos_emb``) by the RoPE kernel.

    The attention forwards of transformers call this function by its global name, so this is the one patch
    of a library module that the plugin makes (the attention forwards stay untouched); it applies to every
    model of the architecture in the process until the framework reverts it.

    Returns:
        1 (the function patched).
    """
    if spec.rotary is None:
        raise ModelStructureError(
            f"{spec.model_type} has no rotary embedding (learned absolute positions)",
            fix="set fast_rope_embeddings: false for this model",
        )
    from fms_acceleration_accelerate_kernels.rope import apply_rotary_pos_emb

    module = importlib.import_module(spec.rotary.module)
    function: Callable[..., Any] = apply_rotary_pos_emb
    note = " (partial rotary)" if spec.rotary.partial else ""
    if spec.rotary.half_width:
        function, note = _half_width_rotary(apply_rotary_pos_emb), " (half-width cos/sin, repeated to the head)"
    patches.patch(
        module,
        spec.rotary.function,
        function,
        target=f"{spec.rotary.module}.{spec.rotary.function}",
        description="kernels.apply_rotary_pos_emb" + note,
    )
    return 1


def _half_width_rotary(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """The RoPE kernel for rotary functions whose cos/sin are ``head_dim / 2`` wide, one value per rotated pair
    (GPT-OSS): repeating them gives the usual ``head_dim``-wide tables, which rotate the two halves of the head the
    same way (``x1 * cos - x2 * sin``, ``x2 * cos + x1 * sin``). The copy is (B, S, head_dim) per call, small next
    to q and k."""

    @functools.wraps(kernel)
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):  # type: ignore[no-untyped-def]
        return kernel(q, k, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1), position_ids, unsqueeze_dim)

    return apply_rotary_pos_emb


# ------------------------------------------------------------------------------------------------- GLU MLP


def glu_activation(mlp: nn.Module, spec: ArchitectureSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The gated-activation kernel ``(gate, up) -> act(gate) * up`` matching the MLP's activation module."""
    from fms_acceleration_accelerate_kernels.glu import geglu, swiglu

    assert spec.mlp is not None
    kind, approximate = activation_of(mlp, spec.mlp)
    if kind == "silu":
        return swiglu
    return functools.partial(geglu, approximate=approximate or "none")


def _glu_forward(mlp: nn.Module, spec: ArchitectureSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    mlp_spec = spec.mlp
    assert mlp_spec is not None and mlp_spec.kind == "glu"
    act = glu_activation(mlp, spec)
    # the projections are looked up at every call, not when patching: LoRA added after the patch (get_peft_model,
    # a trainer's peft_config) replaces them with its wrappers, which must be the ones called
    down = mlp_spec.down_proj
    if mlp_spec.gate_up_proj is not None:
        gate_up = mlp_spec.gate_up_proj

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            gate, up = getattr(mlp, gate_up)(hidden_states).chunk(2, dim=-1)
            return getattr(mlp, down)(act(gate, up))

        return forward
    gate_proj, up_proj = mlp_spec.gate_proj, mlp_spec.up_proj

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return getattr(mlp, down)(act(getattr(mlp, gate_proj)(hidden_states), getattr(mlp, up_proj)(hidden_states)))

    return forward


def patch_glu_mlps(
    match: ModelMatch,
    patches: PluginPatcher,
    skip: set[int] = frozenset(),  # type: ignore[assignment]
) -> int:
    """Replace the forward of every gated MLP by one that applies the SwiGLU/GeGLU kernel.

    The projections are still called as modules (PEFT, bitsandbytes and FSDP see their normal calls).

    Args:
        match: the model's matched modules.
        patches: the plugin's patcher.
        skip: ``id()`` of MLP modules to leave alone (those a fused LoRA kernel replaces as a whole).

    Returns:
        Number of MLPs patched.
    """
    spec = match.spec
    if not spec.has_glu_mlp:
        why = "MoE experts (3-D parameter tensors)" if spec.mlp is None else "a plain (non-gated) MLP"
        raise ModelStructureError(
            f"{spec.model_type} has {why}, so there is no gated activation to replace",
            fix="set fast_swiglu: false for this model",
        )
    count = 0
    for mlp in match.mlps:
        if id(mlp.module) in skip:
            continue
        kind, approximate = activation_of(mlp.module, spec.mlp)  # type: ignore[arg-type]
        name = "swiglu" if kind == "silu" else f"geglu({approximate})"
        patches.patch_forward(
            mlp.module, _glu_forward(mlp.module, spec), target=mlp.path, description=f"kernels.{name}"
        )
        count += 1
    return count


# ------------------------------------------------------------------------------------------------- loss


def causal_lm_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Drop-in for transformers' ``ForCausalLMLoss`` using the cross-entropy kernel.

    The logits are read in their own dtype (no fp32 copy); the result equals HF's (fp32 math) up to rounding.

    Args:
        logits: (B, S, V) logits (after any soft-capping / scaling the model applies).
        labels: (B, S) token ids, ``ignore_index`` for positions without a target; shifted here unless
            ``shift_labels`` is given.
        vocab_size: V.
        num_items_in_batch: divisor of the summed loss (HF's gradient-accumulation-correct normalisation);
            ``None``: mean over the valid targets.
        ignore_index: label value to skip.
        shift_labels: (B, S) already shifted labels (context parallelism), used as given.
        **kwargs: other loss kwargs transformers passes along (ignored, as HF's loss ignores them).

    Returns:
        fp32 scalar loss.
    """
    from fms_acceleration_accelerate_kernels.cross_entropy import cross_entropy

    if shift_labels is None:
        padded = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    flat_logits = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(flat_logits.device)
    return cross_entropy(flat_logits, target, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)


def patch_loss_function(match: ModelMatch, patches: PluginPatcher, counter: CallCounter | None = None) -> PatchRecord:
    """Set the causal LM's ``loss_function`` (a transformers property) to :func:`causal_lm_cross_entropy`.

    Args:
        counter: counts the calls (default: a new one); also the replacement's ``kernel_calls``.

    Returns:
        The patch record.
    """
    lm = match.causal_lm.module
    if not isinstance(type(lm).__dict__.get("loss_function") or getattr(type(lm), "loss_function", None), property):
        raise ModelStructureError(
            f"{match.causal_lm.path or '<root>'} ({type(lm).__name__}) has no loss_function property; the "
            "installed transformers computes the loss differently",
            fix="use transformers >= 4.46, or set fast_loss: false",
        )
    had_own = "_loss_function" in lm.__dict__
    previous = lm.__dict__.get("_loss_function")

    def undo() -> None:
        if had_own:
            lm._loss_function = previous
        else:
            del lm._loss_function

    counter = counter if counter is not None else CallCounter()

    @functools.wraps(causal_lm_cross_entropy)
    def loss_function(*args: Any, **kwargs: Any) -> torch.Tensor:
        counter.hit()
        return causal_lm_cross_entropy(*args, **kwargs)

    loss_function.kernel_calls = counter  # type: ignore[attr-defined]
    return patches.patch(
        lm,
        "loss_function",
        loss_function,
        target=f"{match.causal_lm.path or type(lm).__name__}.loss_function",
        description="kernels.cross_entropy",
        undo=undo,
    )


# -------------------------------------------------------------------------------------- fused linear CE


def _var_keyword_name(signature: inspect.Signature) -> str | None:
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return parameter.name
    return None


def check_lm_head_for_fused_loss(match: ModelMatch) -> nn.Linear:
    """The ``lm_head`` the fused linear cross-entropy reads; it must be a plain linear layer."""
    spec = match.spec
    head = getattr(match.causal_lm.module, spec.lm_head_attribute)
    if type(head) is not nn.Linear and not (isinstance(head, nn.Linear) and type(head).__name__.startswith("FSDP")):
        raise ModelStructureError(
            f"{match.causal_lm.path + '.' if match.causal_lm.path else ''}{spec.lm_head_attribute} is "
            f"{type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear (a PEFT adapter, "
            "modules_to_save copy or quantized head cannot be fused with the loss)",
            fix="use fast_loss: true (cross-entropy kernel on the logits) for this model",
        )
    return head


def logits_transform(match: ModelMatch) -> tuple[float | None, float]:
    """``(softcap, logits_scaling)`` of the model's logits as its config sets them (Gemma2's final soft-capping,
    Granite's divisor), read from the spec's config names."""
    spec = match.spec
    config = match.causal_lm.module.config
    softcap = getattr(config, spec.logits.softcap_config) if spec.logits.softcap_config else None
    scaling = getattr(config, spec.logits.scaling_config) if spec.logits.scaling_config else None
    return (float(softcap) if softcap is not None else None), (float(scaling) if scaling is not None else 1.0)


def router_aux_loss_function(match: ModelMatch) -> Callable[..., torch.Tensor] | None:
    """The architecture's MoE load-balancing loss function, or None for a dense model."""
    spec = match.spec
    if not spec.logits.router_aux_loss:
        return None
    aux_loss_fn = getattr(importlib.import_module(spec.modeling_module), "load_balancing_loss_func", None)
    if aux_loss_fn is None:
        raise ModelStructureError(
            f"{spec.modeling_module} has no load_balancing_loss_func",
            fix="set fast_loss: true instead of 'fused_linear'",
        )
    return aux_loss_fn


def _fused_linear_forward(
    match: ModelMatch, original: Callable[..., Any], counter: CallCounter | None = None
) -> Callable[..., Any]:
    """Causal-LM forward computing the training loss with the fused linear cross-entropy kernel."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    spec = match.spec
    lm = match.causal_lm.module
    signature = inspect.signature(original)
    var_keyword = _var_keyword_name(signature)
    if "labels" not in signature.parameters or var_keyword is None:
        raise ModelStructureError(
            f"{type(lm).__name__}.forward has no 'labels' / '**kwargs' parameters; the installed transformers "
            "does not match the spec",
            fix="set fast_loss: true instead of 'fused_linear'",
        )
    aux_loss_fn = router_aux_loss_function(match)
    counter = counter if counter is not None else CallCounter()
    output_class = MoeCausalLMOutputWithPast if spec.logits.router_aux_loss else CausalLMOutputWithPast
    output_fields = set(output_class.__dataclass_fields__)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        labels = arguments.get("labels")
        if labels is None or not lm.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        counter.hit()
        extra = dict(arguments.pop(var_keyword, {}))
        arguments.pop("labels")
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError(
                "fast_loss: fused_linear computes the training loss over every position; logits_to_keep must be 0 "
                f"in training, got {logits_to_keep!r}"
            )
        config = lm.config
        return_dict = extra.pop("return_dict", None)
        if return_dict is None:  # PEFT passes return_dict=None explicitly; None means the config's choice
            return_dict = getattr(config, "return_dict", True)
        if spec.logits.router_aux_loss and arguments.get("output_router_logits") is None:
            arguments["output_router_logits"] = bool(getattr(config, "output_router_logits", False))
        outputs = getattr(lm, spec.base_model_attribute)(**arguments, **extra)
        hidden = outputs[0]

        shift_labels = extra.get("shift_labels")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        softcap, scaling = logits_transform(match)
        # through lm_head's own call, so FSDP (lm_head in a unit of its own or grouped with the final norm)
        # gathers its weight and reduces its gradient as for any module forward
        loss = getattr(lm, spec.lm_head_attribute)(
            hidden.reshape(-1, hidden.shape[-1]),
            fused_loss={
                "target": shift_labels.reshape(-1).to(hidden.device),
                "ignore_index": extra.get("ignore_index", IGNORE_INDEX),
                "num_items_in_batch": extra.get("num_items_in_batch"),
                "softcap": softcap,
                "logits_scaling": scaling,
            },
        )
        result: dict[str, Any] = {"loss": loss, "logits": None}
        if spec.logits.router_aux_loss and arguments["output_router_logits"]:
            aux = aux_loss_fn(  # type: ignore[misc]
                outputs.router_logits, lm.num_experts, lm.num_experts_per_tok, arguments.get("attention_mask")
            )
            result["aux_loss"] = aux
            result["loss"] = loss + lm.router_aux_loss_coef * aux.to(loss.device)
        for key, value in outputs.items():
            if key != "last_hidden_state" and key in output_fields:
                result[key] = value
        output = output_class(**result)
        return output if return_dict else output.to_tuple()

    forward.kernel_calls = counter  # type: ignore[attr-defined]
    return forward


def _fused_loss_head_forward(
    head: nn.Linear, original: Callable[..., Any], where: str, counter: CallCounter | None = None
) -> Callable[..., Any]:
    """lm_head forward: ``head(hidden)`` as before; ``head(hidden2d, fused_loss={...})`` returns the fused linear
    cross-entropy of ``hidden2d @ weight.T + bias`` (the weight read here, inside lm_head's own call); with
    ``fused_loss["per_token"]`` true, the per-token ``(loss, entropy, is_top1)`` of
    ``fused_linear_cross_entropy_per_token`` instead."""
    from fms_acceleration_accelerate_kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_per_token,
    )

    counter = counter if counter is not None else CallCounter()

    def forward(hidden: torch.Tensor, fused_loss: dict[str, Any] | None = None) -> Any:
        if fused_loss is None:
            return original(hidden)
        counter.hit()
        weight = head.weight
        if type(weight).__name__ == "DTensor" or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise RuntimeError(
                f"fast_loss: fused_linear: {where}.weight is not gathered inside its own forward "
                f"({type(weight).__name__} of shape {tuple(weight.shape)}); an FSDP unit wraps it in an unsupported "
                "way — use fast_loss: true"
            )
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        elif weight.dtype != hidden.dtype:
            hidden = hidden.to(weight.dtype)
        bias = head.bias
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
        options = dict(fused_loss)
        target = options.pop("target")
        if options.pop("per_token", False):
            return fused_linear_cross_entropy_per_token(hidden, weight, target, bias, **options)
        return fused_linear_cross_entropy(hidden, weight, target, bias, **options)

    forward.kernel_calls = counter  # type: ignore[attr-defined]
    return forward


def patch_fused_loss_head(match: ModelMatch, patches: PluginPatcher, counter: CallCounter | None = None) -> PatchRecord:
    """Let ``lm_head`` compute the fused linear cross-entropy when called with ``fused_loss=`` (see
    :func:`_fused_loss_head_forward`); plain calls run its original forward.

    Returns:
        The patch record.
    """
    check_lm_head_for_fused_loss(match)
    lm = match.causal_lm.module
    spec = match.spec
    if spec.logits.router_aux_loss and not hasattr(lm, "router_aux_loss_coef"):
        raise ModelStructureError(
            f"{type(lm).__name__} has no router_aux_loss_coef; the installed transformers does not match the spec",
            fix="set fast_loss: true instead of 'fused_linear'",
        )
    head = getattr(lm, spec.lm_head_attribute)
    head_path = f"{match.causal_lm.path + '.' if match.causal_lm.path else ''}{spec.lm_head_attribute}"
    return patches.patch_forward(
        head,
        _fused_loss_head_forward(head, head.forward, head_path, counter),
        target=head_path,
        description="kernels.fused_linear_cross_entropy when called with fused_loss=",
    )


def patch_fused_linear_forward(
    match: ModelMatch, patches: PluginPatcher, counter: CallCounter | None = None
) -> PatchRecord:
    """Replace the causal LM's forward: in training with labels, lm_head + loss run as the fused linear
    cross-entropy (logits never materialised; ``outputs.logits`` is ``None``); otherwise the original forward.
    Needs :func:`patch_fused_loss_head` first.

    Returns:
        The patch record.
    """
    lm = match.causal_lm.module
    return patches.patch_forward(
        lm,
        _fused_linear_forward(match, lm.forward, counter),
        target=match.causal_lm.path or type(lm).__name__,
        description="kernels.fused_linear_cross_entropy (training with labels)",
    )


def patch_fused_linear_loss(match: ModelMatch, patches: PluginPatcher) -> int:
    """:func:`patch_fused_loss_head` then :func:`patch_fused_linear_forward`.

    Returns:
        1.
    """
    patch_fused_loss_head(match, patches)
    patch_fused_linear_forward(match, patches)
    return 1
