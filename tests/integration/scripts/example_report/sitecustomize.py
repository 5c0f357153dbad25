"""Report hook for the example tests (tests/integration/test_examples.py); the examples themselves know nothing of it.

Python imports ``sitecustomize`` at start-up from ``sys.path``; the tests put this folder on ``PYTHONPATH`` and set
``EXAMPLE_REPORT_DIR``. Without that variable nothing happens. With it, in every process (the launcher's too, where
nothing is ever reported):

* every call of a module whose ``forward`` is set on the instance (how kernels are patched onto modules) is counted
  per (module, forward function), and every call of every module per module (for replaced child modules), through
  one global forward hook;
* ``Accelerator.backward`` records each loss it gets; at the first one (after ``prepare``, so after every patch)
  the functions patched onto Python modules (e.g. ``apply_rotary_pos_emb``) are wrapped with a counter;
* ``Accelerator.free_memory`` with prepared models (``end_training(accelerator)`` calls it first) writes
  ``$EXAMPLE_REPORT_DIR/rank<R>.json``: the active plugins, the losses, what the model holds (4-bit layers, LoRA
  layers and whether their B matrices left zero, the trainable parameters), each patch-table row with the calls
  that ran through its replacement (``null``: not a call), and the loss kernels' own call counters
  (``loss_kernel_calls()`` of the plugins that have one).

These wrappers are test instrumentation of the example processes only; they sit on the class and stay for the
life of the process.
"""

from __future__ import annotations

import os

if os.environ.get("EXAMPLE_REPORT_DIR"):
    import collections
    import functools
    import json
    import types

    import torch
    from accelerate import Accelerator

    def _install_report_hook(report_dir: str) -> None:
        per_forward: collections.Counter = collections.Counter()
        per_module: collections.Counter = collections.Counter()
        function_calls: dict[tuple[int, str], list[int]] = {}
        losses: list[float] = []

        def count(module, args, output):
            per_module[id(module)] += 1
            forward = module.__dict__.get("forward")
            if forward is not None:
                per_forward[(id(module), id(forward))] += 1

        torch.nn.modules.module.register_module_forward_hook(count)

        def framework_of(accelerator):
            from fms_acceleration_accelerate.accelerate_integration import get_framework

            return get_framework(accelerator)

        def wrap_module_functions(framework) -> None:
            for record in framework.patches.records:
                owner, name = record.owner, record.attribute
                if not isinstance(owner, types.ModuleType) or (id(owner), name) in function_calls:
                    continue
                patched = getattr(owner, name)
                calls = function_calls[(id(owner), name)] = [0]

                @functools.wraps(patched)
                def counted(*args, __patched=patched, __calls=calls, **kwargs):
                    __calls[0] += 1
                    return __patched(*args, **kwargs)

                setattr(owner, name, counted)

        original_backward = Accelerator.backward
        original_free_memory = Accelerator.free_memory

        def backward(self, loss, **kwargs):
            if not losses:
                framework = framework_of(self)
                if framework is not None:
                    wrap_module_functions(framework)
            losses.append(float(loss.detach().float().item()))
            return original_backward(self, loss, **kwargs)

        def calls_of(record) -> int | None:
            owner, name = record.owner, record.attribute
            if isinstance(owner, types.ModuleType):
                counter = function_calls.get((id(owner), name))
                return counter[0] if counter is not None else 0
            value = owner.__dict__.get(name) if hasattr(owner, "__dict__") else None
            if isinstance(owner, torch.nn.Module) and name == "forward" and value is not None:
                return per_forward[(id(owner), id(value))]
            if isinstance(value, torch.nn.Module):
                return per_module[id(value)]
            child = owner._modules.get(name) if isinstance(owner, torch.nn.Module) else None
            if child is not None:
                return per_module[id(child)]
            return None  # not something that is called (a loading hook, a recompute setting, a loss property)

        def describe(model: torch.nn.Module) -> dict:
            def four_bit(module) -> bool:
                cls = type(module)
                return (cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")) or (
                    cls.__name__ == "Packed4bitLinear"
                )

            quantized = [m for m in model.modules() if four_bit(m)]
            lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
            lora_b = [b.weight for m in lora for b in m.lora_B.values()]
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            return {
                "class": type(model).__name__,
                "four_bit_layers": len(quantized),
                "four_bit_kinds": sorted(
                    {f"{type(m).__name__}:{getattr(m.weight, 'quant_type', '?')}" for m in quantized}
                ),
                "lora_layers": len(lora),
                "lora_bases": sorted({type(m.base_layer).__name__ for m in lora}),
                "lora_b_nonzero": sum(1 for w in lora_b if bool(w.detach().abs().sum() > 0)),
                "lora_b_total": len(lora_b),
                "trainable": len(trainable),
                "trainable_not_lora": [n for n in trainable if "lora_" not in n],
            }

        def write_report(accelerator) -> None:
            models = [m for m in getattr(accelerator, "_models", []) if isinstance(m, torch.nn.Module)]
            if not models:
                return  # a trainer's reset before prepare
            framework = framework_of(accelerator)
            report: dict = {
                "rank": accelerator.process_index,
                "world": accelerator.num_processes,
                "plugins": list(framework.active_plugin_names) if framework is not None else None,
                "losses": list(losses),
                "model": describe(accelerator.unwrap_model(models[0])),
                "patches": [],
                "loss_kernel_calls": {},
            }
            if framework is not None:
                rows: dict[tuple[str, str, str], dict] = {}
                for record in framework.patches.records:
                    ((plugin, target, replacement, _),) = framework.patches.summary_rows([record])
                    row = rows.setdefault(
                        (plugin, target, replacement),
                        {"plugin": plugin, "target": target, "replacement": replacement, "count": 0, "calls": None},
                    )
                    row["count"] += 1
                    calls = calls_of(record)
                    if calls is not None:
                        row["calls"] = (row["calls"] or 0) + calls
                report["patches"] = list(rows.values())
                for plugin in framework.plugins:
                    if callable(getattr(plugin, "loss_kernel_calls", None)):
                        report["loss_kernel_calls"].update(plugin.loss_kernel_calls())
            path = os.path.join(report_dir, f"rank{accelerator.process_index}.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=1)

        def free_memory(self, *objects):
            write_report(self)
            return original_free_memory(self, *objects)

        Accelerator.backward = backward
        Accelerator.free_memory = free_memory

    _install_report_hook(os.environ["EXAMPLE_REPORT_DIR"])
