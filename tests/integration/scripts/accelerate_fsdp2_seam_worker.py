"""Accelerate's own FSDP2 prepare path on CPU, through a test seam (run under torchrun, 2 processes).

Accelerate refuses FSDP without a GPU, so the worker creates ``Accelerator(cpu=True)`` (a gloo group) and
then switches its state to FSDP2. Everything after that is the real ``Accelerator.prepare`` ->
``_prepare_fsdp2`` -> ``fsdp2_prepare_model``, with our wrapper pre-sharding the planned units and
re-pointing the optimizer. Writes ``OUT_DIR/rank<R>.json``.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from fms_acceleration_accelerate import PluginRegistry
from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework
from tests.integration.toy_plugins import ToyLoraPlugin

SECTION = {"testing": {"toy_lora": {"reduce_fp32": True}}}


def build(framework):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model, _ = framework.augmentation(LlamaForCausalLM(config), None, ())
    return model


def train(model, optimizer, batch, backward):
    losses = []
    for _ in range(3):
        loss = model(input_ids=batch, labels=batch).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


out_dir = sys.argv[1]
handler = AccelerationKwargs(SECTION, registry=PluginRegistry([ToyLoraPlugin]))
accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
)
accelerator.state.distributed_type = DistributedType.FSDP
framework = get_framework(accelerator)
batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))

reference = build(framework)
ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
ref_losses = train(reference, ref_opt, batch, lambda loss: loss.backward())

model = build(framework)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
losses = train(model, optimizer, batch, accelerator.backward)
report = {
    "losses": losses,
    "ref_losses": ref_losses,
    "units": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
    "events": framework.plugin("toy_lora").events,
    "policy_restored": accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap,
}
with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
    json.dump(report, handle)
accelerator.end_training()
