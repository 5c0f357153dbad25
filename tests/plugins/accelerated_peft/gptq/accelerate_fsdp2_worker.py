"""GPTQ-LoRA (+ fused LoRA kernels) through the real ``Accelerator.prepare`` FSDP2 path, on CPU.

Usage::

    torchrun --nproc_per_node 2 accelerate_fsdp2_worker.py CKPT OUT_DIR   # FSDP2 (seam)
    python accelerate_fsdp2_worker.py CKPT OUT_DIR --single              # 1 process, no FSDP

Public API only: ``Accelerator(kwargs_handlers=[AccelerationKwargs(config=...)])``, ``framework.model_loader``
(``low_cpu_mem_usage=True``: rank 0 reads, rank 1 receives), ``framework.augmentation`` and
``accelerator.prepare(model, optimizer)``. Accelerate refuses FSDP without a GPU, so the FSDP2 mode creates
``Accelerator(cpu=True)`` (a gloo group) and switches its state to FSDP2 as ``accelerate launch`` with an FSDP
config would; everything after is the real ``Accelerator.prepare``. Each rank trains on its half of every batch;
the reported loss is the all-reduced mean. Writes ``OUT_DIR/rank<R>.json`` (``single.json``).
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
                "auto_gptq": {"kernel": "triton_v2", "from_quantized": True},
                "fused_ops_and_kernels": {"fused_lora": True, "base_layer": "auto_gptq"},
            }
        }
    }
}
STEPS = 4
VOCAB = 96
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(n: int, batch: int = 4, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, VOCAB, (8, seq), generator=g)
    return [base[torch.randint(0, 8, (batch,), generator=g)] for _ in range(n)]


ckpt, out_dir = sys.argv[1], sys.argv[2]
single = "--single" in sys.argv[3:]

group_timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=120))
accelerator = Accelerator(cpu=True, kwargs_handlers=[AccelerationKwargs(config=SECTION), group_timeout])
if not single:
    assert accelerator.num_processes == 2 and accelerator.distributed_type == DistributedType.MULTI_CPU
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
    )
    accelerator.state.distributed_type = DistributedType.FSDP
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch` with an FSDP config exports
framework = get_framework(accelerator)
world, rank = accelerator.num_processes, accelerator.process_index

reads = {"count": 0}
if rank > 0:
    from fms_acceleration_accelerate_peft.gptq import loader

    original_read = loader.load_tensors

    def counted_read(*args, **kwargs):
        reads["count"] += 1
        return original_read(*args, **kwargs)

    loader.load_tensors = counted_read

model = framework.model_loader(ckpt, torch_dtype=torch.float32, low_cpu_mem_usage=True)
torch.manual_seed(5)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
model, _ = framework.augmentation(model, None, (lora,))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)

from fms_acceleration_accelerate_peft.gptq.packed import GPTQPackedWeight, PackedGPTQLinear  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

packed = []
for name, module in model.named_modules():
    if isinstance(module, PackedGPTQLinear):
        local = module.weight._local_tensor if isinstance(module.weight, DTensor) else module.weight
        packed.append(
            {
                "name": name,
                "out_features": module.out_features,
                "local_is_packed": isinstance(local, GPTQPackedWeight),
                "local_rows": int(local.rows),
            }
        )
trainable = [p for p in model.parameters() if p.requires_grad]
opt_params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]

# the fused kernels read the GPTQ bases themselves: the layers' own forwards must never run
base_class = type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)
plain = {"count": 0}
original_forward = base_class.forward


def counted_forward(self, *args, **kwargs):
    plain["count"] += 1
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

report = {
    "world": world,
    "losses": losses,
    "rank_reads": reads["count"],
    "packed": packed,
    "base_class": base_class.__name__,
    "plain_base_forwards": plain["count"],
    "fused_records": [r.replacement for r in framework.patches.records if "kernels.lora" in r.replacement],
    "fsdp_units": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
    "optimizer_follows_model": len(opt_params) == len(trainable) and all(a is b for a, b in zip(opt_params, trainable)),
    "optimizer_all_dtensor": all(isinstance(p, DTensor) for p in opt_params),
}
with open(os.path.join(out_dir, "single.json" if single else f"rank{rank}.json"), "w", encoding="utf-8") as handle:
    json.dump(report, handle)
end_training(accelerator)
