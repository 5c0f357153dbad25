"""Model knowledge as data: one declarative spec per supported decoder architecture.

Every kernel plugin reads these specs instead of hard-coding architecture details: which module classes (by
class name, as transformers 5.x names them) are the decoder layer, the attention (its projection attribute names,
and its attention sinks where it has them), the MLP (gate/up/down names and activation kind), the norms, which
module-level function applies the rotary embedding (and the width of its cos/sin tables), what the causal-LM head
does to its logits (Gemma2's final soft-capping, Granite's
``logits_scaling``), the sparse mixture-of-experts block of MoE architectures (:class:`MoESpec`: router, routing
rule, expert weight layout, activation, shared expert), and the causal-LM class itself.

Adding an architecture is adding one :class:`ArchitectureSpec` to ``_SPECS`` below (and one tiny config to the
spec tests). Nothing here imports transformers at import time; :func:`check_spec_classes` imports the
architecture's modeling module to check that the named classes and functions exist in the installed version,
and :func:`match_model` checks a loaded model instance against its spec, naming the first module that does not
match.

Classes are matched by name along the MRO, so wrappers that subclass a model class (FSDP2's ``FSDP<Name>``)
still match.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from .errors import AccelerationConfigError

__all__ = [
    "ACTIVATION_CLASSES",
    "ARCHITECTURE_SPECS",
    "ArchitectureSpec",
    "AttentionSpec",
    "LogitsSpec",
    "MLPSpec",
    "MatchedModule",
    "MoESpec",
    "ModelMatch",
    "ModelStructureError",
    "NormSpec",
    "RotarySpec",
    "activation_of",
    "architecture_spec",
    "check_spec_classes",
    "class_names_of",
    "experts_activation",
    "has_class",
    "match_model",
    "supported_model_types",
]


class ModelStructureError(AccelerationConfigError):
    """A model (or the installed transformers) does not match the architecture spec; names the module."""


# Activation module classes of transformers (5.x and the late 4.x names) -> (activation, gelu approximation).
# ``approximate`` is ``None`` for SiLU and ``"tanh"``/``"none"`` for GELU, as in ``torch.nn.functional.gelu``.
ACTIVATION_CLASSES: Mapping[str, tuple[Literal["silu", "gelu"], str | None]] = MappingProxyType(
    {
        "SiLUActivation": ("silu", None),
        "SiLU": ("silu", None),
        "GELUTanh": ("gelu", "tanh"),
        "PytorchGELUTanh": ("gelu", "tanh"),
        "NewGELUActivation": ("gelu", "tanh"),
        "GELUActivation": ("gelu", "none"),
    }
)


@dataclass(frozen=True)
class AttentionSpec:
    """The self-attention module.

    Attributes:
        class_names: attention module class names.
        q_proj / k_proj / v_proj: attribute names of the separate projections (``None`` when fused).
        qkv_proj: attribute name of a fused q|k|v projection (Phi-3 ``qkv_proj``, GPTBigCode ``c_attn``).
        o_proj: attribute name of the output projection.
        sinks: attribute of a learned attention sink per query head (GPT-OSS ``sinks``, shape (heads,)), which the
            attention forward hands the attention function as ``s_aux``: one extra logit per head and query in
            every softmax, whose probability is dropped (the weights of the real keys sum to less than 1).
            An attention function that ignores it computes another model; ``None``: no sinks.
    """

    class_names: tuple[str, ...]
    q_proj: str | None = "q_proj"
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    qkv_proj: str | None = None
    o_proj: str = "o_proj"
    sinks: str | None = None

    def __post_init__(self) -> None:
        separate = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_proj is None and None in separate:
            raise TypeError("AttentionSpec needs q_proj, k_proj and v_proj, or qkv_proj")
        if self.qkv_proj is not None and any(p is not None for p in separate):
            raise TypeError("AttentionSpec: give either q_proj/k_proj/v_proj or qkv_proj, not both")

    @property
    def input_projections(self) -> tuple[str, ...]:
        """Attribute names of the projections that read the attention input (q, k, v or the fused one)."""
        if self.qkv_proj is not None:
            return (self.qkv_proj,)
        return (self.q_proj, self.k_proj, self.v_proj)  # type: ignore[return-value]

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.input_projections, self.o_proj)


@dataclass(frozen=True)
class MLPSpec:
    """The feed-forward module of a dense decoder layer.

    Attributes:
        class_names: MLP module class names.
        kind: ``"glu"`` (``down(act(gate(x)) * up(x))``, SwiGLU or GeGLU by the activation) or ``"mlp"``
            (``fc_out(act(fc_in(x)))``, GPTBigCode).
        gate_proj / up_proj: separate gate and up projections (``glu``), or ``fc_in`` in ``gate_proj`` for ``mlp``.
        gate_up_proj: a fused gate|up projection whose output is ``cat(gate, up)`` (Phi-3).
        down_proj: the output projection (``fc_out`` for ``mlp``).
        activation: attribute name of the activation module.
        dropout: attribute name of a dropout applied after ``down_proj`` (GPTBigCode), if any.
    """

    class_names: tuple[str, ...]
    kind: Literal["glu", "mlp"]
    down_proj: str
    activation: str
    gate_proj: str | None = None
    up_proj: str | None = None
    gate_up_proj: str | None = None
    dropout: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "glu" and self.gate_up_proj is None and (self.gate_proj is None or self.up_proj is None):
            raise TypeError("a glu MLPSpec needs gate_proj and up_proj, or gate_up_proj")
        if self.kind == "mlp" and (self.gate_proj is None or self.up_proj is not None or self.gate_up_proj):
            raise TypeError("an mlp MLPSpec names its input projection in gate_proj only")

    @property
    def input_projections(self) -> tuple[str, ...]:
        if self.gate_up_proj is not None:
            return (self.gate_up_proj,)
        return tuple(p for p in (self.gate_proj, self.up_proj) if p is not None)

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.input_projections, self.down_proj)


@dataclass(frozen=True)
class NormSpec:
    """The normalisation modules (every instance of these classes in the model is a norm).

    Attributes:
        class_names: norm module class names.
        kind: ``"rms"`` (RMSNorm) or ``"layernorm"`` (``torch.nn.LayerNorm``).
        eps_attribute: attribute holding epsilon (``variance_epsilon`` for Llama-style, ``eps`` for Gemma).
        weight_offset: added to the weight (1.0 for Gemma's ``x_hat * (1 + weight)``).
    """

    class_names: tuple[str, ...]
    kind: Literal["rms", "layernorm"]
    eps_attribute: str
    weight_offset: float = 0.0


@dataclass(frozen=True)
class RotarySpec:
    """The module-level rotary function the attention forward calls by its global name.

    Attributes:
        module: the modeling module, e.g. ``transformers.models.llama.modeling_llama``.
        function: the function's name in it (``apply_rotary_pos_emb``).
        partial: rotates only the first ``R < head_dim`` features (cos/sin narrower than the head).
        half_width: cos/sin hold one value per rotated pair, ``head_dim / 2`` wide, applied to both halves of the
            head (GPT-OSS: ``x1 * cos - x2 * sin`` and ``x2 * cos + x1 * sin`` with ``x1, x2`` the head's halves);
            the usual tables repeat them (``cat(cos, cos)``) and are ``head_dim`` wide. Not with ``partial``.
    """

    module: str
    function: str = "apply_rotary_pos_emb"
    partial: bool = False
    half_width: bool = False

    def __post_init__(self) -> None:
        if self.partial and self.half_width:
            raise TypeError("RotarySpec: partial and half_width exclude each other")


@dataclass(frozen=True)
class LogitsSpec:
    """What the causal-LM head does between ``lm_head`` and the loss.

    Attributes:
        softcap_config: config attribute of the final logit soft-capping ``c * tanh(logits / c)`` (Gemma2).
        scaling_config: config attribute the logits are divided by (Granite ``logits_scaling``).
        router_aux_loss: the head adds a router load-balancing loss when ``output_router_logits`` (MoE).
    """

    softcap_config: str | None = None
    scaling_config: str | None = None
    router_aux_loss: bool = False


RoutingKind = Literal["softmax_topk", "topk_softmax", "sigmoid_topk"]
"""How a router turns its logits (T, E) into the top-k weights: ``softmax_topk`` (softmax over all experts, then
the k largest probabilities), ``topk_softmax`` (the k largest logits, then a softmax over those k), ``sigmoid_topk``
(sigmoid scores, then the k largest)."""


@dataclass(frozen=True)
class MoESpec:
    """The sparse mixture-of-experts block of a decoder layer, as transformers 5 keeps it: a router module that
    returns ``(router_logits, top_k_weights, top_k_index)`` and an experts module holding every expert's weights as
    3-D parameters, whose forward ``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``
    transformers dispatches through its ``ExpertsInterface`` (``config._experts_implementation``).

    Routing (what the router computes, in :attr:`routing` order): ``logits = x W_r^T (+ b_r)``; the ``k`` experts
    and their weights by :attr:`routing`; with :attr:`normalize_top_k` the k weights are divided by their sum.

    Experts (``E`` experts, hidden size ``H``, expert intermediate size ``I``)::

        h = x W_gu[e]^T (+ b_gu[e])        # W_gu: gate_up_proj (E, 2I, H), or (E, H, 2I) when ``transposed``
        a = act(gate(h)) * up(h)           # gate/up halves of h: see gate_up_layout and gate_first
        y = a W_d[e]^T (+ b_d[e])          # W_d: down_proj (E, H, I), or (E, I, H) when ``transposed``
        out_t = sum_s top_k_weights[t, s] * y_{e = top_k_index[t, s]}

    Attributes:
        block_class_names: the sparse MoE block (``MixtralSparseMoeBlock``, ``GraniteMoeMoE``, ...).
        experts_class_names: the experts module (``MixtralExperts``, ...), decorated by transformers'
            ``use_experts_implementation``.
        router_class_names: the router module (``MixtralTopKRouter``, ...).
        router_attribute: attribute of the block holding the router (``gate`` / ``router``).
        experts_attribute: attribute of the block holding the experts.
        num_experts_config: config attribute with the number of routed experts E.
        top_k_config: config attribute with k, the experts per token.
        gate_up_proj / down_proj: attribute names of the experts' 3-D weights.
        gate_up_bias / down_bias: attribute names of their (E, 2I) / (E, H) biases, ``None`` without.
        gate_up_layout: ``"concatenated"`` (``[gate; up]`` halves along the 2I dimension) or ``"interleaved"``
            (gate and up rows alternate: ``gate = h[..., 0::2]``, ``up = h[..., 1::2]`` with ``gate_first``).
        gate_first: the gate half (or row) comes before the up half.
        transposed: the weights are stored (E, in, out) instead of (E, out, in).
        activation: the gated activation's kernel name when it is fixed by the architecture (``"gpt_oss"``);
            ``None``: the experts' activation module (:attr:`activation_attribute`), one of
            :data:`ACTIVATION_CLASSES`.
        activation_attribute: attribute of the experts module holding the activation module.
        activation_parameters: ``(kernel argument, experts attribute)`` pairs of activation constants the experts
            module holds (GPT-OSS's clamped SwiGLU: ``(("alpha", "alpha"), ("limit", "limit"))``).
        routing: how the router picks and weights the k experts (:data:`RoutingKind`).
        router_bias: the router's linear has a bias (``router.bias``).
        normalize_top_k: the k weights are renormalised to sum to 1: ``True``/``False`` for every model of the
            architecture, or the name of the config attribute that decides (``norm_topk_prob``).
        router_jitter_config: config attribute of a multiplicative input jitter applied in training before the
            router (Mixtral's ``router_jitter_noise``), if any.
        shared_expert: attribute of the block holding a dense MLP every token also goes through, if any.
        shared_expert_gate: attribute of the block holding the linear whose sigmoid scales the shared expert's
            output per token, if any.
        every_layer: every decoder layer has a MoE block; ``False`` when config options make some layers dense
            (Qwen2-MoE / Qwen3-MoE ``mlp_only_layers`` and ``decoder_sparse_step``).
    """

    block_class_names: tuple[str, ...]
    experts_class_names: tuple[str, ...]
    router_class_names: tuple[str, ...]
    router_attribute: str
    routing: RoutingKind
    normalize_top_k: bool | str
    experts_attribute: str = "experts"
    num_experts_config: str = "num_local_experts"
    top_k_config: str = "num_experts_per_tok"
    gate_up_proj: str = "gate_up_proj"
    down_proj: str = "down_proj"
    gate_up_bias: str | None = None
    down_bias: str | None = None
    gate_up_layout: Literal["concatenated", "interleaved"] = "concatenated"
    gate_first: bool = True
    transposed: bool = False
    activation: str | None = None
    activation_attribute: str = "act_fn"
    activation_parameters: tuple[tuple[str, str], ...] = ()
    router_bias: bool = False
    router_jitter_config: str | None = None
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    every_layer: bool = True

    def __post_init__(self) -> None:
        if self.routing not in ("softmax_topk", "topk_softmax", "sigmoid_topk"):
            raise TypeError(f"MoESpec.routing must be softmax_topk, topk_softmax or sigmoid_topk, got {self.routing!r}")
        if self.gate_up_layout not in ("concatenated", "interleaved"):
            raise TypeError(f"MoESpec.gate_up_layout must be concatenated or interleaved, got {self.gate_up_layout!r}")
        if self.shared_expert_gate is not None and self.shared_expert is None:
            raise TypeError("MoESpec.shared_expert_gate needs shared_expert")

    @property
    def class_names(self) -> tuple[str, ...]:
        return (*self.block_class_names, *self.experts_class_names, *self.router_class_names)

    @property
    def interleaved(self) -> bool:
        return self.gate_up_layout == "interleaved"

    def normalizes_top_k(self, config: Any) -> bool:
        """Whether the router of a model with ``config`` renormalises its k weights."""
        if isinstance(self.normalize_top_k, bool):
            return self.normalize_top_k
        return bool(getattr(config, self.normalize_top_k))

    def num_experts(self, config: Any) -> int:
        """E, the number of routed experts, from a model config."""
        return int(getattr(config, self.num_experts_config))

    def top_k(self, config: Any) -> int:
        """k, the experts per token, from a model config."""
        return int(getattr(config, self.top_k_config))


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything the kernel plugins need to know about one decoder-only architecture.

    Attributes:
        model_type: HF ``config.model_type``.
        modeling_module: module that defines the classes below.
        causal_lm_class: the ``...ForCausalLM`` class name.
        base_model_attribute: attribute of the causal LM holding the decoder stack (``model``/``transformer``).
        lm_head_attribute: attribute of the causal LM holding the output projection.
        decoder_layer_classes: decoder layer class names.
        attention: the attention spec.
        mlp: the dense MLP spec (``None`` for MoE layers, whose experts are 3-D parameter tensors).
        moe: the sparse mixture-of-experts block of MoE architectures (``None`` for dense ones).
        norm: the norm spec.
        rotary: the rotary function (``None``: learned absolute positions, GPTBigCode).
        logits: the head's logit transforms.
        mlp_output_only_to_residual: inside the decoder layer the MLP output goes only into the residual sum
            (``residual + mlp(x)``, possibly times a scalar): no later op of the layer saves it for backward, so
            activation checkpointing's recomputation may skip the MLP output projection. False when a norm,
            dropout or anything else follows the MLP (Gemma 2's post-feedforward norm, Phi-3's dropout).
    """

    model_type: str
    modeling_module: str
    causal_lm_class: str
    decoder_layer_classes: tuple[str, ...]
    attention: AttentionSpec
    norm: NormSpec
    mlp: MLPSpec | None = None
    moe: MoESpec | None = None
    rotary: RotarySpec | None = None
    logits: LogitsSpec = LogitsSpec()
    base_model_attribute: str = "model"
    lm_head_attribute: str = "lm_head"
    mlp_output_only_to_residual: bool = False

    def class_names(self) -> tuple[str, ...]:
        """Every class name the spec refers to."""
        names = [self.causal_lm_class, *self.decoder_layer_classes, *self.attention.class_names, *self.norm.class_names]
        if self.mlp is not None:
            names.extend(self.mlp.class_names)
        if self.moe is not None:
            names.extend(self.moe.class_names)
        return tuple(dict.fromkeys(names))

    @property
    def has_rms_norm(self) -> bool:
        return self.norm.kind == "rms"

    @property
    def has_glu_mlp(self) -> bool:
        return self.mlp is not None and self.mlp.kind == "glu"

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


def _llama_like(prefix: str, model_type: str, module: str, **overrides: Any) -> ArchitectureSpec:
    """Spec of a Llama-shaped architecture whose classes are ``<prefix>Attention``, ``<prefix>MLP``, ..."""
    fields: dict[str, Any] = dict(
        model_type=model_type,
        modeling_module=module,
        causal_lm_class=f"{prefix}ForCausalLM",
        decoder_layer_classes=(f"{prefix}DecoderLayer",),
        attention=AttentionSpec(class_names=(f"{prefix}Attention",)),
        mlp=MLPSpec(
            class_names=(f"{prefix}MLP",),
            kind="glu",
            gate_proj="gate_proj",
            up_proj="up_proj",
            down_proj="down_proj",
            activation="act_fn",
        ),
        norm=NormSpec(class_names=(f"{prefix}RMSNorm",), kind="rms", eps_attribute="variance_epsilon"),
        rotary=RotarySpec(module=module),
        mlp_output_only_to_residual=True,  # ``residual + self.mlp(x)`` ends the layer
    )
    fields.update(overrides)
    return ArchitectureSpec(**fields)


def _m(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


def _moe_llama_like(prefix: str, model_type: str, moe: MoESpec, **overrides: Any) -> ArchitectureSpec:
    """Spec of a Llama-shaped mixture-of-experts architecture (modeling module ``_m(model_type)``): its decoder
    layers hold the ``moe`` block instead of a dense MLP, and its head adds the router load-balancing loss unless
    ``logits`` says otherwise."""
    overrides.setdefault("logits", LogitsSpec(router_aux_loss=True))
    return _llama_like(prefix, model_type, _m(model_type), mlp=None, moe=moe, **overrides)


def _moe_block(prefix: str, block: str = "SparseMoeBlock", **fields: Any) -> MoESpec:
    """MoESpec of a ``<prefix><block>`` holding a ``<prefix>Experts`` and a ``<prefix>TopKRouter``."""
    return MoESpec(
        block_class_names=(f"{prefix}{block}",),
        experts_class_names=(f"{prefix}Experts",),
        router_class_names=(f"{prefix}TopKRouter",),
        **fields,
    )


def _norm_topk_prob_moe_block(prefix: str, **fields: Any) -> MoESpec:
    """:func:`_moe_block` of the Qwen-MoE router (OLMoE's too): ``gate``, softmax over the config's
    ``num_experts`` then top-k, renormalised when the config's ``norm_topk_prob`` says so."""
    return _moe_block(
        prefix,
        router_attribute="gate",
        num_experts_config="num_experts",
        routing="softmax_topk",
        normalize_top_k="norm_topk_prob",
        **fields,
    )


_SPECS: tuple[ArchitectureSpec, ...] = (
    _llama_like("Llama", "llama", _m("llama")),
    _llama_like("Mistral", "mistral", _m("mistral")),
    _moe_llama_like(
        "Mixtral",
        "mixtral",
        _moe_block(
            "Mixtral",
            router_attribute="gate",
            routing="softmax_topk",  # softmax in fp32 over all experts, then top-k
            normalize_top_k=True,  # always renormalised
            router_jitter_config="router_jitter_noise",
        ),
    ),
    _llama_like("Granite", "granite", _m("granite"), logits=LogitsSpec(scaling_config="logits_scaling")),
    _moe_llama_like(
        "GraniteMoe",
        "granitemoe",
        _moe_block(
            "GraniteMoe",
            "MoE",
            router_attribute="router",
            routing="topk_softmax",  # top-k of the fp32 logits, softmax over those k
            normalize_top_k=False,  # the softmax over k already sums to 1
        ),
        logits=LogitsSpec(scaling_config="logits_scaling", router_aux_loss=True),
    ),
    ArchitectureSpec(
        model_type="gpt_bigcode",
        modeling_module=_m("gpt_bigcode"),
        causal_lm_class="GPTBigCodeForCausalLM",
        decoder_layer_classes=("GPTBigCodeBlock",),
        attention=AttentionSpec(
            class_names=("GPTBigCodeAttention",),
            q_proj=None,
            k_proj=None,
            v_proj=None,
            qkv_proj="c_attn",
            o_proj="c_proj",
        ),
        mlp=MLPSpec(
            class_names=("GPTBigCodeMLP",),
            kind="mlp",
            gate_proj="c_fc",
            down_proj="c_proj",
            activation="act",
            dropout="dropout",
        ),
        norm=NormSpec(class_names=("LayerNorm",), kind="layernorm", eps_attribute="eps"),
        rotary=None,
        base_model_attribute="transformer",
    ),
    _llama_like("Qwen2", "qwen2", _m("qwen2")),
    _llama_like("Qwen3", "qwen3", _m("qwen3")),
    _moe_llama_like(  # dense Qwen2MoeMLP only as the shared expert and in mlp_only_layers
        "Qwen2Moe",
        "qwen2_moe",
        _norm_topk_prob_moe_block(
            "Qwen2Moe",
            shared_expert="shared_expert",
            shared_expert_gate="shared_expert_gate",
            every_layer=False,
        ),
        mlp_output_only_to_residual=False,
    ),
    _moe_llama_like(  # dense Qwen3MoeMLP only in mlp_only_layers
        "Qwen3Moe",
        "qwen3_moe",
        _norm_topk_prob_moe_block("Qwen3Moe", every_layer=False),
        mlp_output_only_to_residual=False,
    ),
    _moe_llama_like(  # OlmoeMLP is defined but not used by the decoder layers
        "Olmoe",
        "olmoe",
        _norm_topk_prob_moe_block("Olmoe"),
        mlp_output_only_to_residual=False,
    ),
    _moe_llama_like(
        "GptOss",
        "gpt_oss",
        _moe_block(
            "GptOss",
            "MLP",
            router_attribute="router",
            routing="topk_softmax",  # top-k of the logits (router bias included), softmax over those k
            normalize_top_k=False,  # the softmax over k already sums to 1
            router_bias=True,
            gate_up_bias="gate_up_proj_bias",
            down_bias="down_proj_bias",
            gate_up_layout="interleaved",  # gate = h[..., 0::2], up = h[..., 1::2]
            transposed=True,  # gate_up_proj (E, H, 2I) and down_proj (E, I, H), applied as x @ W
            activation="gpt_oss",  # (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
            activation_parameters=(("alpha", "alpha"), ("limit", "limit")),
        ),
        attention=AttentionSpec(class_names=("GptOssAttention",), sinks="sinks"),  # q/k/v/o with biases
        rotary=RotarySpec(module=_m("gpt_oss"), half_width=True),  # cos/sin head_dim / 2 wide
    ),
    _llama_like(
        "Gemma",
        "gemma",
        _m("gemma"),
        norm=NormSpec(class_names=("GemmaRMSNorm",), kind="rms", eps_attribute="eps", weight_offset=1.0),
    ),
    _llama_like(
        "Gemma2",
        "gemma2",
        _m("gemma2"),
        norm=NormSpec(class_names=("Gemma2RMSNorm",), kind="rms", eps_attribute="eps", weight_offset=1.0),
        logits=LogitsSpec(softcap_config="final_logit_softcapping"),
        mlp_output_only_to_residual=False,  # post_feedforward_layernorm saves the MLP output
    ),
    _llama_like(
        "Phi3",
        "phi3",
        _m("phi3"),
        attention=AttentionSpec(
            class_names=("Phi3Attention",),
            q_proj=None,
            k_proj=None,
            v_proj=None,
            qkv_proj="qkv_proj",
        ),
        mlp=MLPSpec(
            class_names=("Phi3MLP",),
            kind="glu",
            gate_up_proj="gate_up_proj",
            down_proj="down_proj",
            activation="activation_fn",
        ),
        rotary=RotarySpec(module=_m("phi3"), partial=True),
        mlp_output_only_to_residual=False,  # resid_mlp_dropout follows the MLP
    ),
)

ARCHITECTURE_SPECS: Mapping[str, ArchitectureSpec] = MappingProxyType({s.model_type: s for s in _SPECS})
"""``model_type`` -> spec, for every supported architecture (read-only)."""

assert len(ARCHITECTURE_SPECS) == len(_SPECS), "two specs share a model_type"


def supported_model_types() -> tuple[str, ...]:
    """The ``model_type`` values that have a spec, in declaration order."""
    return tuple(ARCHITECTURE_SPECS)


def architecture_spec(model_type: str | None, *, path: str | None = None) -> ArchitectureSpec:
    """The spec of ``model_type``.

    Args:
        model_type: HF ``config.model_type``.
        path: config key path to name in the error (the plugin section asking).

    Raises:
        ModelStructureError: no spec for ``model_type``.
    """
    spec = ARCHITECTURE_SPECS.get(model_type or "")
    if spec is None:
        raise ModelStructureError(
            f"architecture {model_type!r} has no model spec, so no kernel can be patched into it",
            path=path,
            fix=f"supported model types: {', '.join(supported_model_types())}; to add one, add an "
            "ArchitectureSpec entry to fms_acceleration_accelerate/model_specs.py",
        )
    return spec


# ---------------------------------------------------------------------------------------------------------------
# checks against the installed transformers and against a model instance


def check_spec_classes(spec: ArchitectureSpec) -> None:
    """Check that the installed transformers defines every class and function ``spec`` names (no model needed).

    Raises:
        ModelStructureError: the modeling module, a class, or the rotary function is missing, or the attention
            forward does not call the rotary function by its global name (so patching it would do nothing).
    """
    try:
        module = importlib.import_module(spec.modeling_module)
    except ImportError as exc:
        raise ModelStructureError(
            f"{spec.model_type}: cannot import {spec.modeling_module} ({exc})",
            fix="install a transformers version that has this architecture (pip install -U transformers)",
        ) from None
    # torch.nn's LayerNorm is referenced by GPTBigCode, not defined in its module
    import torch.nn as nn

    for name in spec.class_names():
        if not isinstance(getattr(module, name, None) or getattr(nn, name, None), type):
            raise ModelStructureError(
                f"{spec.model_type}: {spec.modeling_module} defines no class {name!r} (the installed transformers "
                "renamed or removed it)",
                fix="update the ArchitectureSpec in fms_acceleration_accelerate/model_specs.py for this "
                "transformers version",
            )
    if spec.attention.sinks is not None:
        for name in spec.attention.class_names:
            forward = inspect.unwrap(getattr(module, name).forward)
            if spec.attention.sinks not in forward.__code__.co_names:
                raise ModelStructureError(
                    f"{spec.model_type}: {name}.forward does not read the attention sinks {spec.attention.sinks!r} "
                    "the spec names (the installed transformers changed how this attention applies them)",
                    fix="update the AttentionSpec in fms_acceleration_accelerate/model_specs.py",
                )
    if spec.rotary is not None:
        rotary_module = importlib.import_module(spec.rotary.module)
        if not callable(getattr(rotary_module, spec.rotary.function, None)):
            raise ModelStructureError(
                f"{spec.model_type}: {spec.rotary.module} has no function {spec.rotary.function!r}",
                fix="update the RotarySpec in fms_acceleration_accelerate/model_specs.py",
            )
        for name in spec.attention.class_names:
            forward = inspect.unwrap(getattr(module, name).forward)
            if spec.rotary.function not in forward.__code__.co_names:
                raise ModelStructureError(
                    f"{spec.model_type}: {name}.forward does not call {spec.rotary.function} by its module-level "
                    "name, so replacing that function would not change the model",
                    fix="update the RotarySpec in fms_acceleration_accelerate/model_specs.py",
                )


def class_names_of(module: Any) -> tuple[str, ...]:
    """Names of every class in ``type(module).__mro__``."""
    return tuple(c.__name__ for c in type(module).__mro__)


def has_class(module: Any, names: tuple[str, ...]) -> bool:
    """True when ``module`` is an instance of a class named in ``names`` (matched along the MRO)."""
    return any(n in names for n in class_names_of(module))


@dataclass(frozen=True)
class MatchedModule:
    """One module of the model that a spec entry matched.

    Attributes:
        path: dotted path from the root that was matched (``model.layers.3.mlp``).
        module: the module instance.
    """

    path: str
    module: Any


@dataclass(frozen=True)
class ModelMatch:
    """The modules of a model instance, as its spec describes them (all checked).

    ``moe_blocks``, ``experts`` and ``routers`` are empty for dense architectures; for MoE ones they are in
    layer order, ``experts[i]`` and ``routers[i]`` belonging to ``moe_blocks[i]``.
    """

    spec: ArchitectureSpec
    causal_lm: MatchedModule
    decoder_layers: tuple[MatchedModule, ...]
    attentions: tuple[MatchedModule, ...]
    mlps: tuple[MatchedModule, ...]
    norms: tuple[MatchedModule, ...]
    moe_blocks: tuple[MatchedModule, ...] = ()
    experts: tuple[MatchedModule, ...] = ()
    routers: tuple[MatchedModule, ...] = ()


def _modules(root: Any) -> Iterator[tuple[str, Any]]:
    yield from root.named_modules(remove_duplicate=True)


def _child(parent: MatchedModule, attribute: str, what: str, spec: ArchitectureSpec) -> Any:
    import torch.nn as nn

    child = getattr(parent.module, attribute, None)
    if not isinstance(child, nn.Module):
        have = ", ".join(n for n, _ in parent.module.named_children()) or "none"
        raise ModelStructureError(
            f"{spec.model_type}: module {parent.path or '<root>'} ({type(parent.module).__name__}) has no "
            f"{what} sub-module {attribute!r} (its children: {have})",
            fix="the model does not match the transformers class its spec was written for; check the "
            "transformers version, or update the spec in fms_acceleration_accelerate/model_specs.py",
        )
    return child


def match_model(model: Any, spec: ArchitectureSpec) -> ModelMatch:
    """Find the spec's modules in ``model`` (a causal LM, or a wrapper such as a PEFT model) and check them.

    Args:
        model: the model (``torch.nn.Module``) to inspect.
        spec: its architecture spec.

    Returns:
        The matched modules, with their paths from ``model``.

    Raises:
        ModelStructureError: naming the module that does not match the spec.
    """
    import torch
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    causal = [MatchedModule(p, m) for p, m in _modules(model) if has_class(m, (spec.causal_lm_class,))]
    if len(causal) != 1:
        found = "none" if not causal else ", ".join(c.path or "<root>" for c in causal)
        raise ModelStructureError(
            f"{spec.model_type}: expected exactly one {spec.causal_lm_class} in the model "
            f"({type(model).__name__}), found {found}",
            fix=f"pass the {spec.causal_lm_class} (or a PEFT model wrapping it) loaded with AutoModelForCausalLM",
        )
    lm = causal[0]
    _child(lm, spec.base_model_attribute, "decoder stack", spec)
    head = _child(lm, spec.lm_head_attribute, "output projection", spec)
    if not hasattr(head, "weight"):
        raise ModelStructureError(
            f"{spec.model_type}: {_join(lm.path, spec.lm_head_attribute)} has no weight",
            fix="the output projection must be a linear layer",
        )

    layers, attentions, mlps, norms = [], [], [], []
    blocks, experts, routers = [], [], []
    for path, module in _modules(lm.module):
        matched = MatchedModule(_join(lm.path, path), module)
        if has_class(module, spec.decoder_layer_classes):
            layers.append(matched)
        if spec.moe is not None:
            if has_class(module, spec.moe.block_class_names):
                blocks.append(matched)
            if has_class(module, spec.moe.experts_class_names):
                experts.append(matched)
            if has_class(module, spec.moe.router_class_names):
                routers.append(matched)
        if has_class(module, spec.attention.class_names):
            attentions.append(matched)
        if spec.mlp is not None and has_class(module, spec.mlp.class_names):
            mlps.append(matched)
        if has_class(module, spec.norm.class_names):
            norms.append(matched)
    if not layers:
        raise ModelStructureError(
            f"{spec.model_type}: no decoder layer of class {' / '.join(spec.decoder_layer_classes)} found in "
            f"{lm.path or '<root>'} ({type(lm.module).__name__})",
            fix="check the transformers version against fms_acceleration_accelerate/model_specs.py",
        )
    expected = {"attention": (attentions, spec.attention.class_names)}
    if spec.mlp is not None:
        expected["MLP"] = (mlps, spec.mlp.class_names)
    for what, (found_modules, names) in expected.items():
        if len(found_modules) != len(layers):
            raise ModelStructureError(
                f"{spec.model_type}: found {len(layers)} decoder layers but {len(found_modules)} {what} modules of "
                f"class {' / '.join(names)}",
                fix="every decoder layer must hold one; check the transformers version against the spec",
            )
    for attention in attentions:
        for name in spec.attention.projections:
            _child(attention, name, "attention projection", spec)
        if spec.attention.sinks is not None:
            sinks = getattr(attention.module, spec.attention.sinks, None)
            if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1:
                raise ModelStructureError(
                    f"{spec.model_type}: attention {attention.path} ({type(attention.module).__name__}) has no 1-D "
                    f"tensor {spec.attention.sinks!r} (its attention sinks, one per head)",
                    fix="check the transformers version against the AttentionSpec in "
                    "fms_acceleration_accelerate/model_specs.py",
                )
    for mlp in mlps:
        assert spec.mlp is not None
        for name in spec.mlp.projections:
            _child(mlp, name, "MLP projection", spec)
        act = _child(mlp, spec.mlp.activation, "activation", spec)
        if spec.mlp.kind == "glu" and not any(n in ACTIVATION_CLASSES for n in class_names_of(act)):
            raise ModelStructureError(
                f"{spec.model_type}: activation {_join(mlp.path, spec.mlp.activation)} is "
                f"{type(act).__name__}, which no gated-MLP kernel implements",
                fix=f"supported activations: {', '.join(ACTIVATION_CLASSES)}; disable the MLP kernels "
                "(fast_swiglu: false) for this model",
            )
    for norm in norms:
        weight = getattr(norm.module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise ModelStructureError(
                f"{spec.model_type}: norm {norm.path} ({type(norm.module).__name__}) has no 1-D weight",
                fix="norms without an affine weight are not supported by the norm kernels",
            )
        if not hasattr(norm.module, spec.norm.eps_attribute):
            raise ModelStructureError(
                f"{spec.model_type}: norm {norm.path} ({type(norm.module).__name__}) has no attribute "
                f"{spec.norm.eps_attribute!r} (epsilon)",
                fix="update the NormSpec in fms_acceleration_accelerate/model_specs.py",
            )
    if spec.moe is not None:
        _check_moe(spec, lm, len(layers), blocks, experts, routers)
    return ModelMatch(
        spec=spec,
        causal_lm=lm,
        decoder_layers=tuple(layers),
        attentions=tuple(attentions),
        mlps=tuple(mlps),
        norms=tuple(norms),
        moe_blocks=tuple(blocks),
        experts=tuple(experts),
        routers=tuple(routers),
    )


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    """The shape ``tensor`` has in the model: a parameter DeepSpeed ZeRO-3 partitioned holds an empty local tensor
    between forwards and keeps its full shape in ``ds_shape``; a bitsandbytes 4-bit expert stack (the MoE plugin's
    ``quantize_experts``) holds packed codes and keeps its 3-D shape in its quantization state."""
    state = getattr(tensor, "quant_state", None)
    if type(tensor).__name__ == "Params4bit" and state is not None and len(getattr(state, "shape", ())) == 3:
        return tuple(state.shape)
    shape = getattr(tensor, "ds_shape", None)
    return tuple(shape if shape is not None else tensor.shape)


def _inside(parent: MatchedModule, found: list[MatchedModule]) -> list[MatchedModule]:
    return [m for m in found if m.path.startswith(parent.path + ".")]


def _check_moe(
    spec: ArchitectureSpec,
    lm: MatchedModule,
    n_layers: int,
    blocks: list[MatchedModule],
    experts: list[MatchedModule],
    routers: list[MatchedModule],
) -> None:
    """Check the MoE blocks of a model against ``spec.moe``; reorders nothing (``named_modules`` is layer order)."""
    import torch

    moe = spec.moe
    assert moe is not None
    fix = "the model does not match the transformers class its spec was written for; check the transformers version"
    fix += ", or update the MoESpec in fms_acceleration_accelerate/model_specs.py"
    names = " / ".join(moe.block_class_names)
    if not blocks or (moe.every_layer and len(blocks) != n_layers) or len(blocks) > n_layers:
        raise ModelStructureError(
            f"{spec.model_type}: found {n_layers} decoder layers but {len(blocks)} MoE blocks of class {names}"
            + (" (every layer has one in this architecture)" if moe.every_layer else ""),
            fix=fix,
        )
    config = getattr(lm.module, "config", None)
    for block in blocks:
        for what, found, attribute, classes in (
            ("experts", experts, moe.experts_attribute, moe.experts_class_names),
            ("router", routers, moe.router_attribute, moe.router_class_names),
        ):
            mine = _inside(block, found)
            if len(mine) != 1:
                raise ModelStructureError(
                    f"{spec.model_type}: MoE block {block.path} ({type(block.module).__name__}) holds {len(mine)} "
                    f"{what} modules of class {' / '.join(classes)}, expected one (attribute {attribute!r})",
                    fix=fix,
                )
            _child(block, attribute, what, spec)
        for attribute in (moe.shared_expert, moe.shared_expert_gate):
            if attribute is not None:
                _child(block, attribute, "shared expert", spec)
    for matched in experts:
        module = matched.module
        for attribute, dims in (
            (moe.gate_up_proj, 3),
            (moe.down_proj, 3),
            (moe.gate_up_bias, 2),
            (moe.down_bias, 2),
        ):
            if attribute is None:
                continue
            value = getattr(module, attribute, None)
            if not isinstance(value, torch.Tensor) or len(_logical_shape(value)) != dims:
                raise ModelStructureError(
                    f"{spec.model_type}: experts {matched.path} ({type(module).__name__}) has no {dims}-D tensor "
                    f"{attribute!r} (found {type(value).__name__}"
                    + (f" of shape {tuple(_logical_shape(value))}" if isinstance(value, torch.Tensor) else "")
                    + ")",
                    fix=fix,
                )
        gate_up = _logical_shape(getattr(module, moe.gate_up_proj))
        down = _logical_shape(getattr(module, moe.down_proj))
        two_i, hidden = (gate_up[2], gate_up[1]) if moe.transposed else gate_up[1:]
        d_hidden, inter = (down[2], down[1]) if moe.transposed else down[1:]
        n_experts = gate_up[0]
        expected_experts = moe.num_experts(config) if config is not None else n_experts
        if getattr(module, "_is_expert_parallel", False):  # transformers' own EP keeps only the local experts
            expected_experts = n_experts
        if two_i != 2 * inter or hidden != d_hidden or down[0] != n_experts or n_experts != expected_experts:
            layout = "(E, H, 2I) and (E, I, H)" if moe.transposed else "(E, 2I, H) and (E, H, I)"
            raise ModelStructureError(
                f"{spec.model_type}: experts {matched.path} hold {moe.gate_up_proj} {tuple(gate_up)} and "
                f"{moe.down_proj} {tuple(down)}, expected {layout} with E = {expected_experts} "
                f"({moe.num_experts_config})",
                fix=fix,
            )
        for flag in ("has_gate", "has_post_expert_norm"):
            if flag in vars(module) and bool(getattr(module, flag)) != (flag == "has_gate"):
                raise ModelStructureError(
                    f"{spec.model_type}: experts {matched.path} have {flag}={getattr(module, flag)!r}; the spec "
                    "describes gated experts without a post-expert norm",
                    fix=fix,
                )
        # the layout transformers' use_experts_implementation declares for the class must be the spec's
        declared = {
            "is_transposed": moe.transposed,
            "is_concatenated": not moe.interleaved,
            "has_bias": moe.gate_up_bias is not None,
        }
        for flag, expected in declared.items():
            if flag in vars(module) and bool(getattr(module, flag)) != expected:
                raise ModelStructureError(
                    f"{spec.model_type}: experts {matched.path} ({type(module).__name__}) declare {flag}="
                    f"{getattr(module, flag)!r} (transformers' use_experts_implementation), but the spec says "
                    f"{expected!r} (transposed={moe.transposed}, gate_up_layout={moe.gate_up_layout!r}, "
                    f"gate_up_bias={moe.gate_up_bias!r})",
                    fix=fix,
                )
        experts_activation(module, moe, path=matched.path)
        for _, attribute in moe.activation_parameters:
            if not isinstance(getattr(module, attribute, None), (int, float)):
                raise ModelStructureError(
                    f"{spec.model_type}: experts {matched.path} ({type(module).__name__}) hold no number "
                    f"{attribute!r} (an activation constant of the spec)",
                    fix=fix,
                )


_KERNEL_ACTIVATIONS = {("silu", None): "silu", ("gelu", "tanh"): "gelu_tanh", ("gelu", "none"): "gelu"}


def experts_activation(experts: Any, spec: MoESpec, *, path: str = "") -> str:
    """The gated activation of an experts module as a kernel name: ``"silu"``, ``"gelu_tanh"``, ``"gelu"`` (erf),
    or the fixed :attr:`MoESpec.activation` (``"gpt_oss"``).

    Raises:
        ModelStructureError: the experts' activation module is not one of :data:`ACTIVATION_CLASSES`.
    """
    if spec.activation is not None:
        return spec.activation
    act = getattr(experts, spec.activation_attribute, None)
    for name in class_names_of(act):
        if name in ACTIVATION_CLASSES:
            return _KERNEL_ACTIVATIONS[ACTIVATION_CLASSES[name]]
    where = _join(path, spec.activation_attribute) if path else spec.activation_attribute
    raise ModelStructureError(
        f"experts activation {where} is {type(act).__name__}, which no expert kernel implements",
        fix=f"supported activations: {', '.join(ACTIVATION_CLASSES)}",
    )


def activation_of(mlp: Any, spec: MLPSpec) -> tuple[Literal["silu", "gelu"], str | None]:
    """``(activation, gelu approximation)`` of an MLP instance (checked by :func:`match_model`)."""
    act = getattr(mlp, spec.activation)
    for name in class_names_of(act):
        if name in ACTIVATION_CLASSES:
            return ACTIVATION_CLASSES[name]
    raise ModelStructureError(f"unsupported activation {type(act).__name__}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
