"""The mixture-of-experts plugin (section ``training.moe.scattermoe``).

What it changes
---------------
Every MoE layer's experts compute with the grouped expert kernels
(:func:`fms_acceleration_accelerate_kernels.moe.moe_experts`: Triton on CUDA or with ``TRITON_INTERPRET=1``, its
torch reference otherwise) on the model's own 3-D expert parameters. Two recorded, revertible patches do it (see
:mod:`.experts`): an entry ``fms_scattermoe_<id>`` in transformers' ``ExpertsInterface`` registry, and the model
config's ``_experts_implementation`` pointing at it. Module classes, parameter names and the checkpoint format are
untouched: ``save_pretrained`` writes the model's own safetensors (the config's experts implementation is not
serialised), and the router, the shared experts and the load-balancing loss stay the model's. LoRA through PEFT's
``target_parameters`` on the expert weights is computed from the adapters' factors in the kernels
(:mod:`.expert_lora`: a recorded patch of PEFT's ``ParamWrapper._activate_lora``, once a patched model carries such
adapters), never as merged ``W + s B A`` stacks; the adapters stay PEFT's, in PEFT's format. With the bitsandbytes
plugin active (``quantize_experts``), the expert stacks are stored in its 4-bit format and dequantized per layer in
the experts forward and backward (:mod:`.quantized_experts`; recorded patches of the modules' parameters).

Where the experts are and how their weights are laid out comes from the architecture's
:class:`~fms_acceleration_accelerate.model_specs.MoESpec`; architectures without one are refused before loading.

Which hook does what
--------------------
* ``check_compatibility`` (the framework is created): whether the expert stacks go 4-bit (``quantize_experts``
  and the bitsandbytes plugin); refuse ``quantize_experts: true`` without it or with ``ep_degree > 1`` (``auto``
  keeps the experts in the training dtype there).
* ``check_model_type`` (before loading): refuse architectures without a MoE spec and specs the installed
  transformers does not match.
* ``check_run_settings`` (the ``Accelerator`` is created): refuse ``ep_degree`` values the run cannot honour (not
  dividing the world size; FSDP1 and DeepSpeed, which would shard the experts themselves), and 4-bit experts under
  FSDP or DeepSpeed ZeRO-3 (``quantize_experts: true`` refused, ``auto`` keeps the experts 16-bit).
* ``augmentation``, or ``prepare_contribution`` when a script never calls it (the section came with the Accelerate
  config), or ``get_callbacks_and_ready_for_train`` given a trainer's model: patch the model, once per causal LM
  (4-bit experts: quantize the stacks then, :meth:`ScatterMoEPlugin.quantize_experts`).
  The experts forward reads the module's parameters inside the module's own call, so FSDP wrapping before or after
  makes no difference, and under DeepSpeed ZeRO-3 the hooks of the experts module gather them.
* ``check_prepared_model``: refuse a model without MoE experts at ``Accelerator.prepare``.
* ``prepare_contribution`` with ``ep_degree > 1``: shard the experts over the expert-parallel groups
  (:meth:`ScatterMoEPlugin.shard_experts`, see :mod:`.expert_parallel`): each process keeps its slice of every
  layer's 3-D expert parameters, DDP ignores them and FSDP2 gets them as ignored parameters; tokens reach their
  experts by all-to-all. :meth:`ScatterMoEPlugin.full_state_dict` / :meth:`ScatterMoEPlugin.save_pretrained` (every
  process calls them) gather the experts back into an ordinary Hugging Face checkpoint. When an HF ``Trainer``
  prepares the model, :meth:`ScatterMoEPlugin.attach_trainer` makes its own saves (``save_steps`` checkpoints,
  ``save_model``) gather every expert first.
* ``after_prepare``: refuse a model whose experts implementation was switched away after patching.
* ``get_callbacks_and_ready_for_train``: the routing statistics callback (``routing_stats: true``); with
  ``ep_degree > 1`` and an ``Accelerator`` whose ``prepare`` runs no acceleration framework (the HF Trainer's own
  under the framework API), a patch of that instance's ``prepare`` that shards the experts and attaches the trainer
  (:meth:`ScatterMoEPlugin.shard_at_prepare`); FSDP there is refused, as Accelerate's ``fully_shard`` would shard the
  experts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import is_main_process
from fms_acceleration_accelerate.model_specs import (
    ARCHITECTURE_SPECS,
    ArchitectureSpec,
    ModelMatch,
    MoESpec,
    check_spec_classes,
    has_class,
    match_model,
)
from fms_acceleration_accelerate.plugin import AccelerationPlugin

from .config import ScatterMoEConfig
from .expert_lora import ExpertAdapters, install_peft_route
from .expert_parallel import ExpertParallel
from .experts import EXPERTS_PREFIX, ExpertsPlans, make_experts_forward, register_experts_function
from .quantized_experts import StackQuantization, dequantize_stack, is_4bit_stack, peft_shape_patch, quantize_stack
from .routing import RoutingStats

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

    from accelerate import Accelerator
    from torch import nn
    from transformers import TrainerCallback

    from fms_acceleration_accelerate.distributed import PrepareContribution, RunContext

logger = logging.getLogger("fms_acceleration_accelerate_moe")

BNB_PLUGIN = "bitsandbytes"
"""The name of the plugin whose 4-bit storage ``quantize_experts`` uses (section ``peft.quantization.bitsandbytes``)."""


def moe_model_types() -> tuple[str, ...]:
    """The ``model_type`` values whose spec describes a MoE block, in table order."""
    return tuple(t for t, s in ARCHITECTURE_SPECS.items() if s.moe is not None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _unwrap_data_parallel(model: Any) -> Any:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _trainer_on_stack(depth: int = 64) -> Any | None:
    """The HF ``Trainer`` (or subclass) instance whose method is on the call stack, else ``None`` (looks only when
    transformers' trainer module is imported)."""
    import sys

    base = getattr(sys.modules.get("transformers.trainer"), "Trainer", None)
    if base is None:
        return None
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, base):
            return candidate
        frame = frame.f_back
    return None


class ScatterMoEPlugin(AccelerationPlugin):
    """Grouped Triton expert kernels for the MoE layers of a causal LM (see the module docstring)."""

    name = "scattermoe"
    configuration_and_paths = ("training.moe.scattermoe",)
    config_class = ScatterMoEConfig
    required_packages = ("fms-acceleration-accelerate-kernels", "triton>=3.6", "transformers>=5.0")
    install_hint = "pip install fms-acceleration-accelerate-moe fms-acceleration-accelerate-kernels 'triton>=3.6'"
    supported_model_types = moe_model_types()
    order = 300  # after plugins that load the model or add adapters
    config: ScatterMoEConfig

    def __init__(self, config: ScatterMoEConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.routing_stats = RoutingStats()
        """Tokens per expert per MoE layer, counted on the device in training forwards (``routing_stats: true``);
        see :class:`~.routing.RoutingStats`."""
        self._plans = ExpertsPlans(self._spec_of_experts)
        self.expert_adapters = ExpertAdapters()
        self._expert_quantization: tuple[str, bool] | None = None
        """(quant type, double quantization) of the bitsandbytes plugin when the expert stacks go 4-bit
        (``quantize_experts``, decided in :meth:`check_compatibility`), else ``None``."""
        """PEFT ``target_parameters`` adapters active on the experts during their call (see :mod:`.expert_lora`);
        ``expert_adapters.factored_calls`` counts the experts forwards that computed them from the factors."""
        self._config_patches: list[Any] = []
        """The patch records of the config objects whose experts implementation this plugin set."""
        self._specs: dict[str, MoESpec] = {}
        """Experts class name -> MoE spec, of the architectures patched so far."""
        self.expert_parallel: ExpertParallel | None = (
            ExpertParallel(config.ep_degree, self.key_path("ep_degree")) if config.expert_parallel else None
        )
        """The expert parallelism (``ep_degree > 1``: process groups, the sharded experts modules), else ``None``;
        see :mod:`.expert_parallel`."""

    @property
    def experts_key(self) -> str:
        """This plugin's key in transformers' ``ExpertsInterface``."""
        return f"{EXPERTS_PREFIX}_{id(self):x}"

    # ------------------------------------------------------------------------------------------- checks
    def check_model_type(self, model_type: str | None) -> None:
        """Refuse architectures without a MoE spec (dense ones included) and specs the installed transformers does
        not match (before the model is loaded)."""
        self._spec(model_type)

    def _spec(self, model_type: str | None) -> ArchitectureSpec:
        spec = ARCHITECTURE_SPECS.get(model_type or "")
        if spec is None or spec.moe is None:
            what = (
                "a dense architecture (no mixture-of-experts layers)" if spec is not None else "not in the spec table"
            )
            raise AccelerationConfigError(
                f"model type {model_type!r} is {what}, so the scattermoe plugin has no experts to accelerate",
                path=self.key_path(),
                fix=f"MoE architectures with a spec: {', '.join(moe_model_types())}; remove this section for other "
                "models, or add a MoESpec for the architecture to fms_acceleration_accelerate/model_specs.py",
            )
        check_spec_classes(spec)
        return spec

    def check_compatibility(self, active: Sequence[AccelerationPlugin]) -> None:
        """Decide whether the expert stacks go 4-bit (``quantize_experts``, with the bitsandbytes plugin's settings)
        and refuse the combinations that cannot work: ``quantize_experts: true`` without the bitsandbytes plugin or
        with expert parallelism (``auto`` keeps the experts in the training dtype there)."""
        bnb = next((p for p in active if p.plugin_name() == BNB_PLUGIN), None)
        wanted = self.config.quantize_experts
        path = self.key_path("quantize_experts")
        if wanted is True and bnb is None:
            raise AccelerationConfigError(
                "quantize_experts: true stores the expert weights in the bitsandbytes plugin's 4-bit format, but "
                "peft.quantization.bitsandbytes is not active",
                path=path,
                fix="add the peft.quantization.bitsandbytes section (QLoRA), or set quantize_experts: auto / false",
            )
        if wanted is False or bnb is None:
            self._expert_quantization = None
            return
        bnb_config = bnb.config
        self._expert_quantization = (str(bnb_config.quant_type), bool(bnb_config.bnb_4bit_use_double_quant))
        if self.config.expert_parallel:
            self._decline_quantization(f"expert parallelism (ep_degree {self.config.ep_degree})", "set ep_degree: 1")

    def _decline_quantization(self, what: str, other_fix: str) -> None:
        """4-bit experts cannot work with ``what``: ``quantize_experts: true`` is refused, ``auto`` keeps the experts
        in the training dtype (with a log note)."""
        if self._expert_quantization is None:
            return
        if self.config.quantize_experts is True:
            raise AccelerationConfigError(
                f"4-bit expert weights (quantize_experts: true) are not supported with {what}",
                path=self.key_path("quantize_experts"),
                fix=f"set quantize_experts: auto or false (the experts stay in the training dtype), or {other_fix}",
            )
        self._expert_quantization = None
        if is_main_process():
            logger.info("scattermoe: quantize_experts: auto keeps the experts in the training dtype (%s)", what)

    def _check_quantization_run(self, context: RunContext) -> None:
        """4-bit experts are not for FSDP or DeepSpeed ZeRO-3, which would shard the packed stacks apart from their
        quantization state."""
        if context.is_fsdp:
            self._decline_quantization("FSDP (it would shard the packed expert stacks)", "train without FSDP")
        elif context.is_deepspeed and context.zero_stage == 3:
            self._decline_quantization(
                "DeepSpeed ZeRO-3 (it would partition the packed expert stacks)", "use ZeRO-2 or no DeepSpeed"
            )

    @property
    def quantizes_experts(self) -> bool:
        """Whether this plugin stores the expert stacks in 4-bit (decided when the framework is created)."""
        return self._expert_quantization is not None

    def check_run_settings(self, context: RunContext) -> None:
        """``ep_degree`` against the run (before any model is loaded): it must divide the world size, and FSDP1
        and DeepSpeed cannot leave the expert shards to expert parallelism. 4-bit experts: not under FSDP or
        DeepSpeed ZeRO-3, which would shard the packed stacks without their quantization state (``quantize_experts:
        true`` is refused there, ``auto`` keeps the experts in the training dtype)."""
        self._check_expert_parallel(context)
        self._check_quantization_run(context)

    def _check_expert_parallel(self, context: RunContext) -> None:
        ep = self.config.ep_degree
        if ep == 1:
            return
        path = self.key_path("ep_degree")
        if context.world_size % ep:
            raise AccelerationConfigError(
                f"ep_degree {ep} does not divide the world size {context.world_size}: experts are sharded over groups "
                f"of ep_degree processes",
                path=path,
                fix=f"set ep_degree to a divisor of {context.world_size} ({', '.join(map(str, _divisors(context.world_size)))})"
                " that also divides the number of experts, or launch a multiple of ep_degree processes",
            )
        if context.fsdp_version == 1:
            raise AccelerationConfigError(
                "expert parallelism (ep_degree > 1) is not supported with FSDP1: FSDP1's flat parameters would shard "
                "and all-gather the experts that expert parallelism owns",
                path=path,
                fix="use fsdp_version: 2, or ep_degree: 1",
            )
        if context.is_deepspeed:
            raise AccelerationConfigError(
                "expert parallelism (ep_degree > 1) is not supported with DeepSpeed: ZeRO would partition and "
                "gather the experts that expert parallelism owns",
                path=path,
                fix="use FSDP (fsdp_version: 2) or plain data parallelism, or ep_degree: 1",
            )

    def _check_expert_count(self, spec: ArchitectureSpec, config: Any) -> None:
        ep = self.config.ep_degree
        assert spec.moe is not None
        n_experts = spec.moe.num_experts(config)
        if ep > 1 and n_experts % ep:
            raise AccelerationConfigError(
                f"ep_degree {ep} does not divide the {n_experts} experts of this {spec.model_type} model "
                f"({spec.moe.num_experts_config}): each process of an expert-parallel group holds E / ep_degree experts",
                path=self.key_path("ep_degree"),
                fix=f"set ep_degree to a divisor of {n_experts} that also divides the world size",
            )

    def check_prepared_model(self, model: nn.Module, context: RunContext) -> None:
        """Refuse, at ``Accelerator.prepare``, a model without the MoE experts its spec names, and 4-bit expert
        stacks (quantized before the run's settings were known) that FSDP or DeepSpeed ZeRO-3 would shard."""
        self._match(_unwrap_data_parallel(model))
        if context.is_fsdp or (context.is_deepspeed and context.zero_stage == 3):
            packed = [n for n, p in model.named_parameters() if is_4bit_stack(p)]
            if packed:
                raise AccelerationConfigError(
                    f"{len(packed)} expert stacks are 4-bit (e.g. {packed[0]}), but this run uses "
                    f"{'FSDP' if context.is_fsdp else 'DeepSpeed ZeRO-3'}, which would shard the packed codes apart "
                    "from their quantization state",
                    path=self.key_path("quantize_experts"),
                    fix="set quantize_experts: false, or create the Accelerator (or pass the run's settings) before "
                    "the model is augmented so that quantize_experts: auto can keep the experts 16-bit",
                )

    # ------------------------------------------------------------------------------------------- patching
    def augmentation(
        self, model: nn.Module, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[nn.Module, tuple[Any, ...]]:
        """Switch the model's experts to the grouped kernels; returns the same model."""
        self.patch_model(model, self.run_context)
        return model, modifiable_args

    def prepare_contribution(self, model: nn.Module, context: RunContext) -> PrepareContribution | None:
        """Patch the model if no earlier hook did (a script that only calls ``Accelerator.prepare``); with
        ``ep_degree > 1``, shard the experts (:meth:`shard_experts`) and ask FSDP to ignore them."""
        self.patch_model(model, context)
        if self.expert_parallel is None:
            return self._zero3_lora_scopes(model, context)
        from fms_acceleration_accelerate.distributed import PrepareContribution

        sharded = self.shard_experts(model, context)
        trainer = _trainer_on_stack()
        if trainer is not None:  # the HF Trainer (or a subclass, TRL's) preparing its model: make its saves whole
            self.attach_trainer(trainer)
        groups = self.expert_parallel.groups
        assert groups is not None
        return PrepareContribution(
            ignored_modules=(self.expert_parallel.is_sharded,),
            refuse_deepspeed_reason="expert parallelism owns the experts, which ZeRO would partition",
            notes=(
                f"expert parallelism: {groups.ep_size} processes per group, {groups.replicas} replica(s); "
                f"{len(sharded)} expert parameters hold this process's experts and are left out of FSDP / DDP",
            ),
        )

    def _zero3_lora_scopes(self, model: nn.Module, context: RunContext) -> PrepareContribution | None:
        """Under DeepSpeed ZeRO-3, LoRA on the experts: the outermost PEFT ``ParamWrapper`` around each experts module
        with this plugin's forward is a fused scope. The factor route reads the adapters' factors and the base
        stacks in the wrapper's forward, before the experts module's own forward starts; as external parameters of
        the wrapper DeepSpeed gathers them all at its forward and backward (not one by one on first access)."""
        import sys

        if not (context.is_deepspeed and context.zero_stage == 3) or "peft" not in sys.modules:
            return None
        from peft.tuners.lora.layer import ParamWrapper

        from fms_acceleration_accelerate.distributed import PrepareContribution

        def adapted(name: str, module: nn.Module) -> bool:
            return isinstance(module, ParamWrapper) and self._lora_plan(module.get_base_layer()) is not None

        if not any(adapted("", m) for m in model.modules()):
            return None
        return PrepareContribution(
            fused_scopes=(adapted,),
            notes=(
                "scattermoe: LoRA on experts under ZeRO-3: each adapted experts module's PEFT wrapper gathers its "
                "factors and base expert stacks at its forward and backward",
            ),
        )

    def contributes_under_fsdp2(self) -> bool:
        # ep_degree > 1: the experts modules are FSDP2-ignored (the framework shards the rest itself)
        return self.config.expert_parallel

    def after_prepare(self, model: nn.Module, context: RunContext) -> None:
        """Refuse a model whose experts implementation was changed after this plugin set it, and (expert
        parallelism) experts that FSDP sharded after all."""
        if self.expert_parallel is not None:
            from torch.distributed.tensor import DTensor

            for name, param in _unwrap_data_parallel(model).named_parameters():
                owner = name.rpartition(".")[0]
                if isinstance(param, DTensor) and ".experts" in f".{owner}" and self._owned_by_ep(model, owner):
                    raise AccelerationConfigError(
                        f"expert parameter {name} was sharded by FSDP, although expert parallelism owns it",
                        path=self.key_path("ep_degree"),
                        fix="let Accelerator.prepare (with this acceleration section) shard the model, which leaves "
                        "the experts out of FSDP; do not call fully_shard on the layers yourself",
                    )
        for config in self._patched_configs():
            current = getattr(config, "_experts_implementation", None)
            if current != self.experts_key:
                raise AccelerationConfigError(
                    f"the model's experts implementation was changed to {current!r} after the scattermoe plugin set "
                    "it, so its experts would not run the grouped kernels",
                    path=self.key_path(),
                    fix="do not call set_experts_implementation / change config._experts_implementation on the model "
                    "after the acceleration plugins ran",
                )

    def get_callbacks_and_ready_for_train(
        self, model: nn.Module | None = None, accelerator: Accelerator | None = None
    ) -> list[TrainerCallback]:
        """Patch a trainer's model if no earlier hook did; with ``ep_degree > 1`` and an ``accelerator`` that runs
        no acceleration framework in its ``prepare`` (a trainer's own, under the framework API), make that
        ``prepare`` shard the experts (:meth:`shard_at_prepare`); the routing statistics callback."""
        if model is not None:
            self.patch_model(_unwrap_data_parallel(model), self.run_context)
        if self.expert_parallel is not None and accelerator is not None:
            self.shard_at_prepare(accelerator, model)
        elif self.expert_parallel is not None:
            logger.warning(
                "scattermoe: ep_degree %d, but get_callbacks_and_ready_for_train got no accelerator: unless the "
                "framework is attached to the Accelerator that prepares the model (the acceleration: section under "
                "accelerate launch, or AccelerationKwargs), the experts are not sharded; pass trainer.accelerator, "
                "or call plugin.shard_experts(model, context) in your own loop",
                self.config.ep_degree,
            )
        if not self.config.routing_stats:
            return []
        from .callbacks import RoutingStatsCallback

        return [RoutingStatsCallback(self.routing_stats)]

    def patch_model(self, model: nn.Module, context: RunContext) -> ModelMatch:
        """Point the causal LM's experts at this plugin's forward (once per causal LM); returns the match.

        Raises:
            AccelerationConfigError: the model is not a supported MoE model, ``ep_degree`` does not fit it or the
                run, or the installed transformers has no experts interface.
        """
        match = self._match(model)
        self._install_lora_route(model)
        causal = match.causal_lm.module
        patched = self._patched_configs()
        if all(any(e.module.config is c for c in patched) for e in match.experts):
            return match  # patched already (and not reverted since)
        spec = match.spec
        assert spec.moe is not None
        self._check_expert_count(spec, causal.config)
        self._check_expert_parallel(context)
        self._check_dispatch(match)
        for class_name in spec.moe.experts_class_names:
            self._specs[class_name] = spec.moe
        for experts in match.experts:
            self._plans.add(experts.module, spec.moe, experts.path)
        self._check_quantization_run(context)
        if self.quantizes_experts:
            self.quantize_experts(model, match)
        key = self.experts_key
        from transformers.integrations.moe import ExpertsInterface

        if key not in vars(ExpertsInterface)["_global_mapping"]:
            forward = make_experts_forward(
                self._plans,
                self.routing_stats if self.config.routing_stats else None,
                self.expert_parallel,
                self.expert_adapters,
            )
            register_experts_function(
                self.patches, key, forward, "grouped expert kernels (moe_experts: Triton on CUDA, else torch)"
            )
        where = match.causal_lm.path or type(causal).__name__
        configs = {id(e.module.config): e.module.config for e in match.experts}
        for config in configs.values():
            if any(config is c for c in patched):
                continue
            record = self.patches.patch(
                config,
                "_experts_implementation_internal",
                key,
                target=f"{where}.config._experts_implementation",
                description=f"scattermoe experts ({len(match.experts)} MoE layers, {spec.model_type})",
            )
            self._config_patches.append(record)
        if is_main_process():
            activations = sorted({self._plans.get(e.module).act for e in match.experts})
            logger.info(
                "scattermoe: %d MoE layers of %s compute their experts with the grouped kernels (activation %s)",
                len(match.experts),
                type(causal).__name__,
                ", ".join(activations),
            )
        return match

    def _install_lora_route(self, model: nn.Module) -> None:
        """LoRA on the experts through the expert kernels: once a model this plugin patches carries PEFT
        ``target_parameters`` adapters (a PEFT model wrapped before ``augmentation``, or by the time
        ``Accelerator.prepare`` / ``get_callbacks_and_ready_for_train`` patch it), patch PEFT's ``ParamWrapper``
        (see :mod:`.expert_lora`); not under expert parallelism, which refuses LoRA on the experts."""
        import sys

        if self.expert_parallel is not None or "peft" not in sys.modules:
            return
        from peft.tuners.lora.layer import ParamWrapper

        if not any(isinstance(m, ParamWrapper) for m in model.modules()):
            return
        install_peft_route(
            self.patches,
            self.expert_adapters,
            self._lora_plan,
            "scattermoe: LoRA on experts in the expert kernels (moe_experts_lora: x W^T + s (x A^T) B^T per expert, "
            "no merged weights)",
        )

    def quantize_experts(self, model: nn.Module, match: ModelMatch) -> list[str]:
        """Replace every expert stack of ``match`` that is not 4-bit yet by its frozen 4-bit form (recorded patches;
        reverting puts back a dequantized parameter of the original dtype), quantized like the model's 4-bit linear
        layers; make PEFT read the stacks' logical shape and compute LoRA on them from the factors (see
        :mod:`.quantized_experts`). Returns the qualified names quantized now.

        Raises:
            AccelerationConfigError: an expert's size is not a multiple of the 4-bit block size.
        """
        import importlib.util

        import torch

        assert self._expert_quantization is not None
        settings = StackQuantization.like_model(model, *self._expert_quantization)
        done: list[str] = []
        before = after = 0
        for experts in match.experts:
            plan = self._plans.get(experts.module)
            for name in (plan.gate_up_proj, plan.down_proj):
                weight = getattr(experts.module, name)
                if is_4bit_stack(weight):
                    continue
                path = f"{experts.path}.{name}"
                try:
                    packed = quantize_stack(weight, settings, path)
                except ValueError as error:
                    raise AccelerationConfigError(
                        str(error), path=self.key_path("quantize_experts"), fix="set quantize_experts: false"
                    ) from None

                def restore(module: Any = experts.module, name: str = name, trains: bool = weight.requires_grad):
                    return torch.nn.Parameter(dequantize_stack(getattr(module, name)), requires_grad=trains)

                before += weight.numel() * weight.element_size()
                after += packed.numel() * packed.element_size()
                self.patches.patch(
                    experts.module,
                    name,
                    packed,
                    target=path,
                    description=f"4-bit {settings.quant_type} expert stack (block {settings.blocksize}, double quant "
                    f"{settings.compress_statistics})",
                    restore=restore,
                )
                done.append(path)
        if importlib.util.find_spec("peft") is not None:
            peft_shape_patch(self.patches, "scattermoe: PEFT reads the logical (E, rows, cols) shape of 4-bit stacks")
            from peft.tuners.lora.layer import ParamWrapper  # noqa: F401  (the LoRA route patches it)

            install_peft_route(
                self.patches,
                self.expert_adapters,
                self._lora_plan,
                "scattermoe: LoRA on experts in the expert kernels (moe_experts_lora on the dequantized 4-bit stacks)",
            )
        if done and is_main_process():
            logger.info(
                "scattermoe: %d expert stacks stored in 4-bit %s (%.1f MiB -> %.1f MiB of packed codes)",
                len(done),
                settings.quant_type,
                before / 2**20,
                after / 2**20,
            )
        return done

    def _lora_plan(self, module: Any) -> Any:
        """The plan of an experts module whose forward is this plugin's (its adapters may be computed from their
        factors), else ``None``."""
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) != self.experts_key:
            return None
        if self.expert_parallel is not None and self.expert_parallel.shard_of(module) is not None:
            return None
        return self._plans.get(module)

    # ------------------------------------------------------------------------------------------- expert parallelism
    def shard_experts(self, model: nn.Module, context: RunContext | None = None) -> list[str]:
        """Keep this process's experts of every MoE layer (``ep_degree > 1``; a collective the first time: every
        process calls it). ``Accelerator.prepare`` calls it through :meth:`prepare_contribution`; a hand-written
        loop calls it before wrapping the model in DDP / ``fully_shard`` and before creating the optimizer.

        Returns:
            The qualified names of the expert parameters sharded now.

        Raises:
            AccelerationConfigError: ``ep_degree`` is 1, or does not fit the model or the process group, or the
                experts carry LoRA adapters (not supported with expert parallelism).
        """
        if self.expert_parallel is None:
            raise AccelerationConfigError(
                "shard_experts needs expert parallelism, but ep_degree is 1",
                path=self.key_path("ep_degree"),
                fix="set ep_degree to the number of processes that share one set of experts",
            )
        model = _unwrap_data_parallel(model)
        match = self.patch_model(model, context if context is not None else self.run_context)
        wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
        if wrapped:
            raise AccelerationConfigError(
                f"the experts carry LoRA adapters ({wrapped[0]}, PEFT target_parameters), which expert parallelism "
                "does not shard yet",
                path=self.key_path("ep_degree"),
                fix="set ep_degree: 1 for LoRA on the experts, or target only attention / dense layers with LoRA",
            )
        entries = []
        for experts in match.experts:
            plan = self._plans.get(experts.module)
            names = tuple(
                n for n in (plan.gate_up_proj, plan.down_proj, plan.gate_up_bias, plan.down_bias) if n is not None
            )
            entries.append((experts.path, experts.module, names))
        return self.expert_parallel.shard(model, entries)

    def shard_at_prepare(self, accelerator: Any, model: nn.Module | None = None) -> bool:
        """Make ``accelerator.prepare`` shard the experts of the MoE models it prepares (expert parallelism), for an
        ``Accelerator`` with no acceleration framework attached, whose ``prepare`` would run no plugin hook: the HF
        Trainer's own under the framework API (``get_callbacks_and_ready_for_train(trainer.model,
        trainer.accelerator)`` calls it). A recorded, revertible patch of that instance's ``prepare``: before
        Accelerate wraps the model in DDP it runs :meth:`shard_experts` (DDP then leaves the experts alone) and, when
        a trainer is preparing its model, :meth:`attach_trainer`, as ``prepare_contribution`` does for an
        ``Accelerator`` that runs the framework.

        Returns:
            ``True`` when ``accelerator.prepare`` was patched now; ``False``: no expert parallelism, not an
            ``Accelerator``, one whose ``prepare`` runs an acceleration framework (this plugin's
            ``prepare_contribution`` shards there), or patched already.

        Raises:
            AccelerationConfigError: ``model`` was prepared already (its experts can no longer be sharded before
                DDP / FSDP wraps it), or the run uses FSDP2 (Accelerate's own ``fully_shard`` would shard the
                experts) or a setting :meth:`check_run_settings` refuses.
        """
        from accelerate import Accelerator

        from fms_acceleration_accelerate import get_framework

        if self.expert_parallel is None or not isinstance(accelerator, Accelerator):
            return False
        if get_framework(accelerator) is not None:
            return False  # its prepare runs the framework's hooks: prepare_contribution shards the experts
        if any(r.owner is accelerator and r.attribute == "prepare" for r in self.patches.records):
            return False
        path = self.key_path("ep_degree")
        context = self.run_context
        self._check_expert_parallel(context)
        if model is not None and self._prepared_unsharded(model):
            raise AccelerationConfigError(
                "get_callbacks_and_ready_for_train got a model that Accelerator.prepare already wrapped (DDP / FSDP) "
                "without sharding its experts, so expert parallelism (ep_degree > 1) can no longer take effect",
                path=path,
                fix="call get_callbacks_and_ready_for_train(model, accelerator) before accelerator.prepare / "
                "trainer.train(), or call plugin.shard_experts(model) before wrapping the model, or set ep_degree: 1",
            )
        if context.fsdp_version is not None:
            raise AccelerationConfigError(
                "expert parallelism (ep_degree > 1) under FSDP needs the acceleration framework inside "
                "Accelerator.prepare, to leave the experts out of fully_shard; this Accelerator (e.g. the trainer's "
                "own, with the framework API) runs no acceleration framework, so FSDP would shard the experts",
                path=path,
                fix="run with the acceleration section in the Accelerate config under accelerate launch, or create "
                "the Accelerator with kwargs_handlers=[AccelerationKwargs(config=...)], or use plain data "
                "parallelism (no FSDP), or set ep_degree: 1",
            )
        original = accelerator.prepare
        plugin = self

        def prepare(*args: Any, **kwargs: Any) -> Any:
            import torch

            for arg in args:
                if isinstance(arg, torch.nn.Module) and plugin._is_moe_model(arg):
                    plugin.shard_experts(arg, plugin.run_context)
                    trainer = _trainer_on_stack()
                    if trainer is not None:  # the HF Trainer (or a subclass) preparing its model: whole saves
                        plugin.attach_trainer(trainer)
            return original(*args, **kwargs)

        self.patches.patch(
            accelerator,
            "prepare",
            prepare,
            target="Accelerator.prepare (the trainer's)",
            description="scattermoe expert parallelism: shard the experts before DDP wraps the model",
        )
        return True

    def full_state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The model's state dict with every expert of every layer, under the model's own names (a collective
        under expert parallelism: every process calls it; FSDP2-sharded tensors are gathered too).

        ``model.save_pretrained(directory, state_dict=plugin.full_state_dict(model))`` on the main process then
        writes an ordinary Hugging Face checkpoint; :meth:`save_pretrained` does both.
        """
        model = _unwrap_data_parallel(model)
        if self.expert_parallel is None:
            return model.state_dict()
        return self.expert_parallel.full_state_dict(model)

    def save_pretrained(self, model: nn.Module, directory: Any, **kwargs: Any) -> None:
        """Save ``model`` with all its experts as an ordinary Hugging Face checkpoint (every process calls it; the
        main process writes, the others wait for it). ``kwargs`` go to ``save_pretrained``."""
        import torch.distributed as dist

        state = self.full_state_dict(model)
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed or dist.get_rank() == 0:
            _unwrap_data_parallel(model).save_pretrained(directory, state_dict=state, **kwargs)
        if distributed:
            dist.barrier()

    def attach_trainer(self, trainer: Any) -> bool:
        """Make an HF ``Trainer``'s own saves write every expert (expert parallelism; recorded, revertible patches of
        the trainer instance). ``Accelerator.prepare`` calls it when a trainer prepares its model, so a script
        never needs to.

        The trainer writes its weights on the main process only, from that process's ``state_dict()``, which under
        expert parallelism holds only its own experts. The patched ``save_model`` (called on every process by
        ``save_steps`` checkpoints, the final save and a script's ``trainer.save_model()``) first gathers
        :meth:`full_state_dict` on every process, and the trainer's ``_save`` then writes that state dict, in the
        format it writes anyway (``model.safetensors``, or shards and their index). Resuming such a run from a
        checkpoint (``resume_from_checkpoint``) is refused: the optimizer file holds the main process's expert
        states only.

        Returns:
            ``True`` when the trainer was patched now (``False``: no expert parallelism, or patched already).

        Raises:
            AccelerationConfigError: FSDP with a sharded state dict type, whose distributed checkpoint would keep
                one process's experts.
        """
        if self.expert_parallel is None or any(r.owner is trainer for r in self.patches.records):
            return False
        path = self.key_path("ep_degree")
        fsdp_plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
        fsdp_plugin = getattr(fsdp_plugin, "fsdp_plugin", None) if getattr(trainer, "is_fsdp_enabled", False) else None
        if fsdp_plugin is not None and "FULL_STATE_DICT" not in str(fsdp_plugin.state_dict_type):
            raise AccelerationConfigError(
                f"the trainer saves FSDP checkpoints as {fsdp_plugin.state_dict_type}, whose distributed checkpoint "
                "would hold one process's experts under expert parallelism (ep_degree > 1)",
                path=path,
                fix="set fsdp_state_dict_type: FULL_STATE_DICT (the trainer then writes an ordinary checkpoint with "
                "every expert), or save with plugin.save_pretrained(model, directory) from every process",
            )
        plugin = self
        pending: list[dict[str, Any]] = []
        original_save_model = trainer.save_model
        original_save = trainer._save
        original_load = trainer._load_optimizer_and_scheduler

        def save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
            pending.append(plugin.full_state_dict(trainer.model))  # a collective: every process is here
            try:
                original_save_model(output_dir, _internal_call=_internal_call)
            finally:
                pending.clear()

        def _save(output_dir: str | None = None, state_dict: dict | None = None) -> None:
            original_save(output_dir, state_dict=pending[-1] if pending else state_dict)

        def _load_optimizer_and_scheduler(checkpoint: str | None) -> None:
            if checkpoint is not None:
                raise AccelerationConfigError(
                    f"resuming from {checkpoint} with expert parallelism (ep_degree > 1) is not supported: the "
                    "trainer's optimizer file holds the main process's expert states only",
                    path=path,
                    fix="start a new run from the checkpoint's weights (model_name_or_path: the checkpoint folder, "
                    "which holds every expert) without resume_from_checkpoint, or train with ep_degree: 1",
                )
            original_load(checkpoint)

        where = type(trainer).__name__
        self.patches.patch(
            trainer,
            "save_model",
            save_model,
            target=f"{where}.save_model",
            description="gather every expert (full_state_dict) on every process, then the trainer's save",
        )
        self.patches.patch(
            trainer, "_save", _save, target=f"{where}._save", description="writes the gathered state dict"
        )
        self.patches.patch(
            trainer,
            "_load_optimizer_and_scheduler",
            _load_optimizer_and_scheduler,
            target=f"{where}._load_optimizer_and_scheduler",
            description="refuses resuming under expert parallelism",
        )
        return True

    # ------------------------------------------------------------------------------------------- helpers
    def _is_moe_model(self, model: Any) -> bool:
        """Whether ``model`` (DDP-unwrapped) is a model this plugin's spec table matches (a MoE causal LM)."""
        try:
            self._match(_unwrap_data_parallel(model))
        except AccelerationConfigError:
            return False
        return True

    def _prepared_unsharded(self, model: Any) -> bool:
        """Whether ``model`` is already wrapped for data parallelism (DDP, or FSDP-sharded parameters) while none of
        its experts modules is sharded by this plugin."""
        from torch.distributed.tensor import DTensor
        from torch.nn.parallel import DistributedDataParallel

        assert self.expert_parallel is not None
        wrapped = isinstance(model, DistributedDataParallel) or any(isinstance(p, DTensor) for p in model.parameters())
        if not wrapped:
            return False
        return not any(self.expert_parallel.shard_of(m) is not None for m in model.modules())

    def _owned_by_ep(self, model: nn.Module, owner: str) -> bool:
        assert self.expert_parallel is not None
        module = _unwrap_data_parallel(model).get_submodule(owner)
        return self.expert_parallel.shard_of(module) is not None

    def _patched_configs(self) -> list[Any]:
        """The config objects this plugin pointed at its experts forward, whose patch is not reverted."""
        live = {id(r) for r in self.patches.records}
        self._config_patches = [r for r in self._config_patches if id(r) in live]
        return [r.owner for r in self._config_patches]

    def _match(self, model: Any) -> ModelMatch:
        config = getattr(model, "config", None)
        spec = self._spec(getattr(config, "model_type", None))
        return match_model(model, spec)

    def _check_dispatch(self, match: ModelMatch) -> None:
        """Every experts module must dispatch its forward through transformers' ``ExpertsInterface`` (classes
        decorated with ``use_experts_implementation``, which keep the model config as ``self.config``)."""
        try:
            from transformers.integrations.moe import ExpertsInterface  # noqa: F401
        except ImportError:
            import transformers

            raise AccelerationConfigError(
                f"transformers {transformers.__version__} has no experts interface (transformers.integrations.moe."
                "ExpertsInterface), through which the scattermoe plugin runs the experts",
                path=self.key_path(),
                fix="pip install -U 'transformers>=5'",
            ) from None
        for experts in match.experts:
            module = experts.module
            if not hasattr(module, "has_gate") or getattr(module, "config", None) is None:
                raise AccelerationConfigError(
                    f"experts {experts.path} ({type(module).__name__}) do not dispatch their forward through "
                    "transformers' ExpertsInterface (the class is not decorated with use_experts_implementation)",
                    path=self.key_path(),
                    fix="use a transformers release whose modeling code decorates the experts class "
                    "(pip install -U 'transformers>=5'), or remove this section",
                )

    def _spec_of_experts(self, module: Any) -> MoESpec:
        for class_name, spec in self._specs.items():
            if has_class(module, (class_name,)):
                return spec
        raise AccelerationConfigError(
            f"the scattermoe experts forward was called by {type(module).__name__}, an experts class of no model "
            "this plugin patched",
            path=self.key_path(),
            fix="accelerate each model with its own framework (augmentation / Accelerator.prepare)",
        )

    def describe(self) -> list[str]:
        """What will be patched (no model needed)."""
        c = self.config
        lines = [
            "experts of every MoE layer -> kernels.moe.moe_experts (grouped expert GEMMs reading scattered token "
            "rows; Triton on CUDA / TRITON_INTERPRET=1, else the torch reference) through transformers' "
            "ExpertsInterface, on the model's own expert parameters (checkpoint format unchanged)",
            f"architectures: {', '.join(moe_model_types())}",
            "LoRA on the experts (PEFT target_parameters): computed from the adapters' factors in the kernels "
            "(moe_experts_lora), without merged expert weights"
            + ("" if not c.expert_parallel else " - not with expert parallelism, which refuses it"),
            f"expert parallelism: {'ep_degree ' + str(c.ep_degree) if c.expert_parallel else 'none (ep_degree 1)'}",
        ]
        if self.quantizes_experts:
            lines.append(
                "quantize_experts: expert stacks stored in bitsandbytes 4-bit (the model's Linear4bit settings), "
                "frozen; dequantized per layer in the forward and again in the backward"
            )
        if c.routing_stats:
            lines.append(
                "routing_stats: tokens per expert per layer counted on the device; load balance in the trainer log "
                "at logging steps"
            )
        return lines

    def describe_run(self, context: RunContext) -> list[str]:
        """Under DeepSpeed: how ZeRO treats the expert stacks (and their LoRA factors), offload included."""
        if not context.is_deepspeed:
            return []
        from fms_acceleration_accelerate.deepspeed_offload import describe_offload

        stage = context.zero_stage
        lines = [
            "DeepSpeed ZeRO-3: the experts module's forward reads its own 3-D stacks, which DeepSpeed's hooks gather "
            "for it; with LoRA on the experts, each adapted experts module's PEFT wrapper gathers the adapters' "
            "factors and the base stacks at its forward and backward (external parameters)"
            if stage == 3
            else f"DeepSpeed ZeRO-{stage if stage is not None else '?'}: expert stacks stay whole on every rank"
        ]
        return lines + describe_offload(
            context,
            "the expert stacks and LoRA factors are fetched from there whenever ZeRO-3 gathers them; the expert "
            "kernels only ever see whole stacks on the compute device",
        )


__all__ = ["ScatterMoEPlugin", "moe_model_types"]
