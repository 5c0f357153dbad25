"""LoRA on the experts (PEFT ``target_parameters``) computed in the expert kernels, without merged weights.

PEFT wraps each targeted 3-D expert parameter in a ``ParamWrapper`` (nested: one per parameter) whose adapter is one
``lora_A`` of ``r * E`` rows and one ``lora_B`` of ``r * E`` columns, i.e. an ``r``-rank pair per expert
(``A[e]`` = rows ``e r .. e r + r - 1`` of ``lora_A``, ``B[e]`` = columns ``e, e + E, e + 2E, ..`` of ``lora_B``), and
scaling ``lora_alpha / r`` (or ``/ sqrt(r)``). For every call of the wrapped experts module it registers a
parametrization that hands the module ``W + scaling * B A`` (a tensor the size of the whole expert stack, rebuilt
on every forward, with a gradient of that size in the backward).

Here, for the experts modules this plugin patched, a recorded, revertible patch of ``ParamWrapper._activate_lora``
hands the experts forward the factors instead (:class:`ExpertAdapters`, for the duration of the call), and the
forward computes ``x W^T + s (x A^T) B^T`` per expert with
:func:`fms_acceleration_accelerate_kernels.moe_lora.moe_experts_lora` on the untouched base weights. The adapters
stay PEFT's own modules and parameters, so ``save_pretrained`` / ``PeftModel.from_pretrained`` are unchanged.
PEFT's own route (the parametrization) still runs whenever this one does not apply: adapters disabled or merged
(PEFT then calls the module without activating them, and the experts run the plain kernels), expert weights that
train themselves, low-precision storage PEFT upcasts for the merge, a single expert, ``torch.compile`` tracing, or
a PEFT whose adapter layout differs from the one described above (checked once, on a tiny wrapper of PEFT's own).
For 4-bit expert stacks (see :mod:`.quantized_experts`) PEFT's route would merge into packed codes, so there
active adapters that this route cannot take raise an error instead.
PEFT refuses ``lora_dropout``, ``lora_bias`` and DoRA on ``target_parameters`` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

import torch

from .quantized_experts import frozen_check, is_4bit_stack, stack_dtype, stack_shape

logger = logging.getLogger("fms_acceleration_accelerate_moe")

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertAdapters:
    """The LoRA factors active on each experts module during its call, set by the patched
    ``ParamWrapper._activate_lora`` (a weak map: modules that go away take theirs along).

    Attributes:
        factored_calls: experts forwards that computed their adapters from the factors (for tests and logs).
    """

    def __init__(self) -> None:
        self._active: WeakKeyDictionary[Any, dict[str, Any]] = WeakKeyDictionary()
        self.factored_calls = 0

    def factors(self, module: Any) -> dict[str, Any] | None:
        """``{parameter name: ExpertLoRA}`` active on ``module`` now, or ``None``."""
        return self._active.get(module) or None

    @contextmanager
    def active(self, module: Any, parameter: str, lora: Any) -> Iterator[None]:
        """Make ``lora`` the adapter of ``module.<parameter>`` for the duration of the block."""
        current = self._active.setdefault(module, {})
        if parameter in current:
            raise RuntimeError(f"an adapter is already active on {type(module).__name__}.{parameter}")
        current[parameter] = lora
        try:
            yield
        finally:
            del current[parameter]
            if not current:
                del self._active[module]


def _factors_of(wrapper: Any, adapter: str, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (E, r, in), B (E, out, r), scaling) of one adapter of a ``ParamWrapper``: views of its own parameters."""
    weight_a = wrapper.lora_A[adapter].weight  # (E r, in), expert-major rows
    weight_b = wrapper.lora_B[adapter].weight  # (out, r E), expert-minor columns
    a = weight_a.reshape(n_experts, -1, weight_a.shape[-1])
    b = weight_b.reshape(weight_b.shape[0], -1, n_experts).permute(2, 0, 1)
    return a, b, float(wrapper.scaling[adapter])


def peft_layout_matches(param_wrapper_class: type) -> bool:
    """Whether PEFT's ``ParamWrapper`` builds its merged delta from the per-expert factors as :func:`_factors_of`
    reads them (``delta[e] = scaling * B[e] A[e]`` in the weight's (out, in) or, transposed, (in, out)
    orientation): checked on tiny wrappers of PEFT's own, both orientations."""
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=3, target_parameters=["weight"], init_lora_weights=False)
    generator = torch.Generator().manual_seed(0)
    for transposed in (False, True):
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(torch.zeros(3, 5, 4), requires_grad=False)
        holder.is_transposed = transposed
        wrapper = param_wrapper_class(holder, "default", parameter_name="weight", config=config, r=2, lora_alpha=3)
        with torch.no_grad():
            for p in (wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=generator))
            a, b, scaling = _factors_of(wrapper, "default", 3)
            ours = scaling * torch.bmm(b, a)  # (E, out, in)
            if transposed:
                ours = ours.transpose(1, 2)
            if ours.shape != holder.weight.shape:
                return False
            if not torch.allclose(wrapper.get_delta_weight("default"), ours, rtol=1e-5, atol=1e-6):
                return False
    return True


def install_peft_route(patches: Any, adapters: ExpertAdapters, plan_of: Callable[[Any], Any], description: str) -> bool:
    """Patch ``peft``'s ``ParamWrapper._activate_lora`` (recorded, revertible) so that wrappers around the experts
    ``plan_of`` knows hand their factors to ``adapters`` instead of merging them into the weights.

    Args:
        patches: the plugin's patcher.
        adapters: where the experts forward finds the active factors.
        plan_of: ``plan_of(experts_module)`` -> the module's ``ExpertsPlan`` when this plugin's experts forward
            computes it (and may take its adapters), else ``None``.
        description: the patch table's text.

    Returns:
        ``True`` when installed now; ``False`` when PEFT is not installed, its adapter layout is not the one this
        route reads (PEFT's own route then stays), or this plugin installed it already.
    """
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    if any(r.owner is ParamWrapper and r.attribute == "_activate_lora" for r in patches.records):
        return False
    try:
        matches = peft_layout_matches(ParamWrapper)
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # a PEFT whose wrapper API moved
        logger.warning(
            "scattermoe: LoRA on experts keeps PEFT's merged-weight route (%s: %s)", type(error).__name__, error
        )
        return False
    if not matches:
        logger.warning(
            "scattermoe: this PEFT lays out target_parameters adapters differently from what the expert kernels "
            "read; LoRA on experts keeps PEFT's merged-weight route"
        )
        return False
    original = vars(ParamWrapper)["_activate_lora"]

    def factored(wrapper: Any, active_adapters: list[str]) -> Any:
        """The ``ExpertLoRA`` to hand to the experts forward, or ``None`` for PEFT's own route."""
        from fms_acceleration_accelerate_kernels.moe_lora import ExpertLoRA

        if torch.compiler.is_compiling():
            return None
        base = wrapper.get_base_layer()
        plan = plan_of(base)
        if plan is None or wrapper.parameter_name not in (plan.gate_up_proj, plan.down_proj):
            return None
        names = [a for a in active_adapters if a in wrapper.lora_A]
        n_experts = getattr(wrapper, "num_experts", 0)
        if not names or n_experts < 2:
            return None
        for name in (plan.gate_up_proj, plan.down_proj):  # both stacks must stay plain frozen weights
            weight = getattr(base, name)
            shape, dtype = stack_shape(weight), stack_dtype(weight)  # 4-bit stacks: their logical shape and dtype
            if len(shape) != 3 or shape[0] != n_experts or dtype not in _COMPUTE_DTYPES:
                return None
            if weight.requires_grad:
                return None
        if getattr(wrapper, "_did_swap_in_out_features", not plan.transposed) == plan.transposed:
            return None  # PEFT sees the weight in the other orientation than the spec: leave it to PEFT
        factors = [_factors_of(wrapper, name, n_experts) for name in names]
        if len(factors) == 1:
            return ExpertLoRA(*factors[0])
        # several active adapters: one of the summed ranks, each scaling folded into its B
        return ExpertLoRA(torch.cat([a for a, _, _ in factors], 1), torch.cat([b * s for _, b, s in factors], 2), 1.0)

    def _activate_lora(self: Any, active_adapters: list[str]) -> Any:
        lora = factored(self, active_adapters)
        if lora is None and is_4bit_stack(self.get_param()) and any(a in self.lora_A for a in active_adapters or ()):
            base = self.get_base_layer()
            frozen_check(tuple(p for p in base.parameters(recurse=False)), type(base).__name__)
            raise RuntimeError(
                f"LoRA on the 4-bit expert stack {type(self.get_base_layer()).__name__}.{self.parameter_name} can only "
                "be computed from the adapters' factors in the scattermoe experts forward (PEFT's own route would add "
                "the merged adapters to the packed 4-bit codes); keep the model's experts implementation the "
                "plugin's, one adapter layout PEFT's, and do not torch.compile the experts"
            )
        if lora is None:
            return original(self, active_adapters)
        return adapters.active(self.get_base_layer(), self.parameter_name, lora)

    patches.patch(
        ParamWrapper,
        "_activate_lora",
        _activate_lora,
        target="peft ParamWrapper._activate_lora (LoRA target_parameters on experts)",
        description=description,
        keep_later=True,  # a later wrapper over this one stays; it calls this one, which is inert once reverted
    )
    return True


__all__ = ["ExpertAdapters", "install_peft_route", "peft_layout_matches"]
