"""The experts forward this plugin registers in transformers' ``ExpertsInterface``.

transformers 5 decorates every experts class with ``use_experts_implementation``: the class's forward looks
``config._experts_implementation`` up in ``ExpertsInterface`` and calls the function registered there as
``fn(experts_module, hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``. The plugin
registers :func:`make_experts_forward`'s function under a key of its own and points the model's config at it, so
every MoE layer computes its experts with the grouped kernels of
:func:`fms_acceleration_accelerate_kernels.moe.moe_experts` (Triton on CUDA or with ``TRITON_INTERPRET=1``, its
torch reference otherwise), reading the module's own 3-D parameters: the weights, their names and their layout stay
the model's, so checkpoints do too. Both changes (the registry entry and the config value) are recorded patches.
A module whose PEFT ``target_parameters`` adapters are active calls
:func:`fms_acceleration_accelerate_kernels.moe_lora.moe_experts_lora` with their factors instead (see
:mod:`.expert_lora`). Expert stacks held in 4-bit (``quantize_experts``) are dequantized for the call and again in
the backward, never kept in 16 bit in between (see :mod:`.quantized_experts`).

Where the weights are and how they are laid out comes from the architecture's
:class:`~fms_acceleration_accelerate.model_specs.MoESpec` (an :class:`ExpertsPlan` per experts module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch

from fms_acceleration_accelerate.model_specs import MoESpec, experts_activation
from fms_acceleration_accelerate.patching import patch_mapping_entry

from .expert_lora import ExpertAdapters
from .expert_parallel import ExpertParallel
from .quantized_experts import frozen_check, stack_shape, stacks_context
from .routing import RoutingStats

EXPERTS_PREFIX = "fms_scattermoe"
"""Prefix of the keys this plugin registers in ``ExpertsInterface`` (``fms_scattermoe_<id>``)."""


@dataclass(frozen=True)
class ExpertsPlan:
    """How to call the expert kernels for one experts module (from its spec, checked against the module).

    Attributes:
        layer: name of the module for the routing statistics (its path in the model).
        gate_up_proj / down_proj / gate_up_bias / down_bias: attribute names on the module (biases may be None).
        act: the kernel's activation name.
        act_parameters: keyword arguments of the activation's constants (``alpha``, ``limit`` for GPT-OSS).
        gate_first / interleaved / transposed: the weight layout (see ``moe_experts``).
    """

    layer: str
    gate_up_proj: str
    down_proj: str
    gate_up_bias: str | None
    down_bias: str | None
    act: str
    act_parameters: tuple[tuple[str, float], ...]
    gate_first: bool
    interleaved: bool
    transposed: bool

    @classmethod
    def for_module(cls, module: Any, spec: MoESpec, layer: str) -> ExpertsPlan:
        return cls(
            layer=layer,
            gate_up_proj=spec.gate_up_proj,
            down_proj=spec.down_proj,
            gate_up_bias=spec.gate_up_bias,
            down_bias=spec.down_bias,
            act=experts_activation(module, spec, path=layer),
            act_parameters=tuple((arg, float(getattr(module, attr))) for arg, attr in spec.activation_parameters),
            gate_first=spec.gate_first,
            interleaved=spec.interleaved,
            transposed=spec.transposed,
        )


class ExpertsPlans:
    """The plans of the experts modules one plugin patched (a weak map: modules that go away take theirs along);
    a module the plugin did not see when patching (a copy of the model) gets one from its class' spec on its first
    call."""

    def __init__(self, spec_of: Callable[[Any], MoESpec]) -> None:
        self._plans: WeakKeyDictionary[Any, ExpertsPlan] = WeakKeyDictionary()
        self._spec_of = spec_of
        self._unnamed = 0

    def add(self, module: Any, spec: MoESpec, layer: str) -> ExpertsPlan:
        plan = ExpertsPlan.for_module(module, spec, layer)
        self._plans[module] = plan
        return plan

    def get(self, module: Any) -> ExpertsPlan:
        plan = self._plans.get(module)
        if plan is None:
            self._unnamed += 1
            plan = self.add(module, self._spec_of(module), f"{type(module).__name__}#{self._unnamed}")
        return plan

    def __len__(self) -> int:
        return len(self._plans)


def _in_backward() -> bool:
    """True inside an autograd backward pass (e.g. the forward activation checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


def make_experts_forward(
    plans: ExpertsPlans,
    stats: RoutingStats | None,
    ep: ExpertParallel | None = None,
    adapters: ExpertAdapters | None = None,
) -> Callable[..., torch.Tensor]:
    """The experts forward to register in ``ExpertsInterface``.

    Args:
        plans: where each experts module keeps its weights and how they are laid out.
        stats: where to count the tokens per expert (training forwards only), or ``None``.
        ep: the expert parallelism whose sharded modules dispatch their tokens over the EP group
            (:meth:`~.expert_parallel.ExpertParallel.experts_forward`), or ``None``.
        adapters: where PEFT's ``target_parameters`` adapters active on a module's expert stacks are found
            (:mod:`.expert_lora`); a module with some computes them with ``moe_experts_lora`` on its untouched
            weights. ``None``: none are.

    Returns:
        ``forward(experts_module, hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`` in
        ``hidden_states``' dtype; expert ids ``>= E`` (expert-parallel sentinels) contribute nothing.
    """
    from fms_acceleration_accelerate_kernels.moe import moe_experts, moe_route
    from fms_acceleration_accelerate_kernels.moe_lora import moe_experts_lora

    def scattermoe_experts_forward(
        self: torch.nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # GPT-OSS-style experts name the routing arguments router_indices / routing_weights
        if top_k_index is None:
            top_k_index = kwargs.pop("router_indices")
        if top_k_weights is None:
            top_k_weights = kwargs.pop("routing_weights")
        if kwargs:
            raise TypeError(f"scattermoe experts forward got unexpected arguments: {', '.join(kwargs)}")
        plan = plans.get(self)
        gate_up = getattr(self, plan.gate_up_proj)
        down = getattr(self, plan.down_proj)
        gate_up_bias = getattr(self, plan.gate_up_bias) if plan.gate_up_bias else None
        down_bias = getattr(self, plan.down_bias) if plan.down_bias else None
        shard = ep.shard_of(self) if ep is not None else None
        counting = stats is not None and self.training and not torch.compiler.is_compiling() and not _in_backward()
        lora = adapters.factors(self) if adapters is not None else None
        if lora is not None:
            if shard is not None:
                raise RuntimeError(f"{plan.layer}: LoRA on experts is not supported with expert parallelism")
            assert adapters is not None
            adapters.factored_calls += 1

        frozen_check((gate_up, down), plan.layer)

        def local_experts(rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, routing: Any = None):
            # 4-bit stacks: dequantized for this call only, and again in the backward (see .quantized_experts)
            with stacks_context((gate_up, down)) as (gate_up_w, down_w):
                return experts_call(rows, index, weights, gate_up_w, down_w, routing)

        def experts_call(rows, index, weights, gate_up_w, down_w, routing):
            common = dict(
                act=plan.act,
                gate_first=plan.gate_first,
                gate_up_bias=gate_up_bias,
                down_bias=down_bias,
                transposed=plan.transposed,
                interleaved=plan.interleaved,
                routing=routing,
                **dict(plan.act_parameters),
            )
            if lora is not None:
                return moe_experts_lora(
                    rows,
                    index,
                    weights,
                    gate_up_w,
                    down_w,
                    gate_up_lora=lora.get(plan.gate_up_proj),
                    down_lora=lora.get(plan.down_proj),
                    **common,
                )
            return moe_experts(rows, index, weights, gate_up_w, down_w, **common)

        if shard is not None:
            assert ep is not None
            if counting:
                assert stats is not None
                stats.add(plan.layer, moe_route(top_k_index, shard.total).tokens_per_expert)

            def zero_terms() -> torch.Tensor:
                weights = [w for w in (gate_up, down, gate_up_bias, down_bias) if w is not None]
                return sum(w.sum() * 0 for w in weights)  # type: ignore[return-value]

            return ep.experts_forward(shard, hidden_states, top_k_index, top_k_weights, local_experts, zero_terms)
        routing = None
        if counting:
            assert stats is not None
            routing = moe_route(top_k_index, stack_shape(gate_up)[0])
            stats.add(plan.layer, routing.tokens_per_expert)
        return local_experts(hidden_states, top_k_index, top_k_weights, routing)

    return scattermoe_experts_forward


def register_experts_function(patches: Any, key: str, function: Callable[..., Any], description: str) -> None:
    """Add ``key -> function`` to transformers' ``ExpertsInterface`` registry as a recorded patch (see
    :func:`~fms_acceleration_accelerate.patching.patch_mapping_entry`: reverts in any order with other frameworks)."""
    from transformers.integrations.moe import ExpertsInterface

    patch_mapping_entry(
        patches,
        ExpertsInterface,
        "_global_mapping",
        key,
        function,
        target=f"transformers ExpertsInterface[{key!r}]",
        description=description,
    )


__all__ = ["EXPERTS_PREFIX", "ExpertsPlan", "ExpertsPlans", "make_experts_forward", "register_experts_function"]
