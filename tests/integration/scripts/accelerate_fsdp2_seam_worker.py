"""Accelerate's own FSDP2 prepare path on CPU, through a test seam (run under torchrun, 2 processes).

Accelerate refuses FSDP without a GPU, so the worker creates ``Accelerator(cpu=True)`` (a gloo group) and
then switches its state to FSDP2. Everything after that is the real ``Accelerator.prepare`` ->
``_prepare_fsdp2`` -> ``fsdp2_prepare_model``, with our wrapper pre-sharding the planned units and
re-pointing the optimizer. Writes ``OUT_DIR/rank<R>.json``.

Mode (second argument): ``lora`` (default) runs a plugin that contributes FSDP2 units (our pre-sharding);
``full`` runs a full fine-tune with a plugin that contributes nothing, so Accelerate shards on its own.
"""

import json
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from checkout_tests import import_checkout_tests
from torch.distributed.fsdp import FSDPModule
from transformers import LlamaConfig, LlamaForCausalLM

from fms_acceleration_accelerate import PluginRegistry, end_training
from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework

import_checkout_tests()  # the checkout's root stays off sys.path (checkout_tests.py says why)
from tests.integration.toy_plugins import ToyLoraPlugin, ToyMarkerPlugin  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
from train_bench import CollectiveCounter  # noqa: E402  (counts FSDP all-gather bytes, as the benchmarks do)

SECTIONS = {"lora": {"testing": {"toy_lora": {"reduce_fp32": True}}}, "full": {"testing": {"marker": {}}}}


def build(framework, mode):
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
    if mode == "full":
        return LlamaForCausalLM(config)
    model, _ = framework.augmentation(LlamaForCausalLM(config), None, ())
    # what PEFT + gradient checkpointing do: the input embeddings' output requires grad, so FSDP2 would re-gather
    # the (frozen) embedding unit in backward unless told it is not needed there
    model.enable_input_require_grads()
    return model


def gathered_bytes_per_step(model, optimizer, batch, backward):
    """All-gather output bytes of one training step, counted by the benchmark's own collective counter."""
    counter = CollectiveCounter()
    with counter.counting():
        train(model, optimizer, batch, backward, steps=1)
    assert counter.bytes["allgather"] > 0, "no all-gather counted: FSDP2 calls a collective the counter misses"
    return counter.bytes["allgather"]


def train(model, optimizer, batch, backward, steps=3):
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


out_dir = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "lora"
handler = AccelerationKwargs(SECTIONS[mode], registry=PluginRegistry([ToyLoraPlugin, ToyMarkerPlugin]))
# a bounded collective timeout: a rank whose peer died fails instead of outliving the test
group_timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=120))
accelerator = Accelerator(cpu=True, kwargs_handlers=[handler, group_timeout])
accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
)
accelerator.state.distributed_type = DistributedType.FSDP
framework = get_framework(accelerator)
batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))

reference = build(framework, mode)
ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
ref_losses = train(reference, ref_opt, batch, lambda loss: loss.backward())

model = build(framework, mode)
held = [p for p in model.parameters() if p.requires_grad]  # a script keeping its list of trainable parameters
held_bytes = sum(p.untyped_storage().nbytes() for p in held)
optimizer = torch.optim.AdamW(held, lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
current = {id(p) for p in model.parameters()}
losses = train(model, optimizer, batch, accelerator.backward)
report = {
    "held_bytes_before": held_bytes,
    "held_replaced": sum(id(p) not in current for p in held),
    "held_bytes_after": sum(p.untyped_storage().nbytes() for p in held),
    "held_count": len(held),
    "losses": losses,
    "ref_losses": ref_losses,
    "units": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
}
if mode == "lora":
    no_backward_unshard = sorted(
        n
        for n, m in model.named_modules()
        if isinstance(m, FSDPModule) and not m._get_fsdp_state()._fsdp_param_group.unshard_in_backward
    )
    embed = model.get_input_embeddings()
    skipped_bytes = gathered_bytes_per_step(model, optimizer, batch, accelerator.backward)
    embed.set_unshard_in_backward(True)  # FSDP2's default, for comparison
    default_bytes = gathered_bytes_per_step(model, optimizer, batch, accelerator.backward)
    report.update(
        events=framework.plugin("toy_lora").events,
        no_backward_unshard=no_backward_unshard,
        saved_gather_bytes=default_bytes - skipped_bytes,
        embed_bytes=embed.weight.numel() * embed.weight.element_size(),
    )
with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
    json.dump(report, handle)
end_training(accelerator)  # barrier first: every rank exits (see fms_acceleration_accelerate.teardown)
