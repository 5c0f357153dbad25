"""The flagship stack (bitsandbytes nf4 QLoRA + fused LoRA kernels) through the real ``Accelerator.prepare``.

Usage::

    torchrun --nproc_per_node 2 flagship_accelerate_prepare_worker.py OUT_DIR   # FSDP2 (seam)
    python flagship_accelerate_prepare_worker.py OUT_DIR --single              # 1 process, no FSDP

The model is the ``save_pretrained`` checkpoint in ``OUT_DIR/llama``.

Both modes use the public API only: ``Accelerator(kwargs_handlers=[AccelerationKwargs(config=...)])``,
``framework.model_loader``, ``framework.augmentation`` and ``accelerator.prepare(model, optimizer)``.

FSDP2 mode: Accelerate refuses FSDP without a GPU, so the worker creates ``Accelerator(cpu=True)`` (a gloo
group) and then switches its state to FSDP2, as the launcher would (``ACCELERATE_USE_FSDP=true`` before
the model is loaded). Everything after is the real ``Accelerator.prepare`` -> ``_prepare_fsdp2``, with our
wrapper running the plugins' contributions (4-bit layers become ``Packed4bitLinear``), pre-sharding the
planned units, re-pointing the optimizer, and the fused LoRA patches applied in ``after_prepare``.
Each rank trains on its half of every batch; the reported loss is the all-reduced mean.

Writes ``OUT_DIR/rank<R>.json`` (``OUT_DIR/single.json`` in single mode).
"""

import json
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import LoraConfig

from fms_acceleration_accelerate import end_training
from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework

SECTION = {
    "plugins": {
        "peft": {
            "quantization": {
                "bitsandbytes": {"quant_type": "nf4"},
                "fused_ops_and_kernels": {"fused_lora": True, "fused_dequant": True, "base_layer": "bitsandbytes"},
            }
        }
    }
}
STEPS = 4
VOCAB = 96


def batches(n: int, batch: int = 4, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, VOCAB, (8, seq), generator=g)
    return [base[torch.randint(0, 8, (batch,), generator=g)] for _ in range(n)]


def fused_records(framework) -> list[str]:
    return [f"{r.target}: {r.replacement}" for r in framework.patches.records if "kernels.lora" in r.replacement]


out_dir = sys.argv[1]
model_dir = os.path.join(out_dir, "llama")
single = "--single" in sys.argv[2:]

handler = AccelerationKwargs(config=SECTION)
# a bounded collective timeout: a rank whose peer died fails instead of outliving the test
group_timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=120))
accelerator = Accelerator(cpu=True, kwargs_handlers=[handler, group_timeout])
if not single:
    assert accelerator.num_processes == 2 and accelerator.distributed_type == DistributedType.MULTI_CPU
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
    )
    accelerator.state.distributed_type = DistributedType.FSDP
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch` with an FSDP config exports
else:
    assert accelerator.num_processes == 1 and accelerator.distributed_type == DistributedType.NO
framework = get_framework(accelerator)
assert framework is not None
world, rank = accelerator.num_processes, accelerator.process_index

model = framework.model_loader(model_dir, dtype=torch.float32, low_cpu_mem_usage=not single)
torch.manual_seed(5)
lora = LoraConfig(
    r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
)
model, _ = framework.augmentation(model, None, (lora,))
records_before_prepare = fused_records(framework)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
records_after_prepare = fused_records(framework)

from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear, Packed4bitWeight  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

packed = []
for name, module in model.named_modules():
    if isinstance(module, Packed4bitLinear):
        weight = module.weight
        local = weight._local_tensor if isinstance(weight, DTensor) else weight
        packed.append(
            {
                "name": name,
                "out_features": module.out_features,
                "dtensor": isinstance(weight, DTensor),
                "local_type": type(local).__name__,
                "local_is_packed": isinstance(local, Packed4bitWeight),
                "local_rows": int(local.shape[0]),
            }
        )

trainable = [p for p in model.parameters() if p.requires_grad]
trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
opt_params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
optimizer_report = {
    "count": len(opt_params),
    "same_objects": len(opt_params) == len(trainable) and all(a is b for a, b in zip(opt_params, trainable)),
    "all_dtensor": all(isinstance(p, DTensor) for p in opt_params),
    "lora_names": all(".lora_A." in n or ".lora_B." in n for n in trainable_names),
}

# the fused kernels read the 4-bit bases themselves: the plain 4-bit forwards must never run
plain_forwards = {"count": 0}
base_class = type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)  # Linear4bit or packed
original_forward = base_class.forward


def counted_forward(self, *args, **kwargs):
    plain_forwards["count"] += 1
    return original_forward(self, *args, **kwargs)


base_class.forward = counted_forward
model.train()
losses = []
for ids in batches(STEPS):
    part = ids.chunk(world)[rank]
    loss = model(input_ids=part, labels=part).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    value = loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(value)
        value /= world
    losses.append(value.item())

base_class.forward = original_forward

# every optimizer parameter got a step (AdamW state) and is still the model's parameter
optimizer_report["all_stepped"] = all(len(optimizer.optimizer.state[p]) > 0 for p in opt_params)
optimizer_report["still_model_params"] = all(
    a is b for a, b in zip(opt_params, [p for p in model.parameters() if p.requires_grad])
)

report = {
    "world": world,
    "losses": losses,
    "records_before_prepare": records_before_prepare,
    "records_after_prepare": records_after_prepare,
    "packed": packed,
    # the replaced Linear4bit layers whose full packed bytes were dropped once their replacements were sharded
    "released_swaps": sum(
        1 for swap in getattr(framework.plugin("bitsandbytes"), "_packed_swaps", ()) if swap.released
    ),
    "base_class": base_class.__name__,
    "plain_base_forwards": plain_forwards["count"],
    "fsdp_units": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
    "optimizer": optimizer_report,
    "patch_counts": dict(framework.plugin("fused_ops_and_kernels").patch_counts),
}
name = "single.json" if single else f"rank{rank}.json"
with open(os.path.join(out_dir, name), "w", encoding="utf-8") as handle:
    json.dump(report, handle)
end_training(accelerator)  # barrier first: every rank exits (see fms_acceleration_accelerate.teardown)
