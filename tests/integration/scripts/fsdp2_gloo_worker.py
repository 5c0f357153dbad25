"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): the sharding hooks on a tiny Llama with LoRA.

Rank 0 also trains an unsharded copy on the full batch (the 1-process reference). Each rank trains the
FSDP2-sharded model (units from ``plan_fsdp_units``, optimizer created *before* sharding and re-pointed with
the returned map) on its half of the batch. Writes ``$OUT_DIR/result.json`` on rank 0.

Usage: torchrun --nproc_per_node 2 fsdp2_gloo_worker.py OUT_DIR [fused_attention]
"""

import gc
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from checkout_tests import import_checkout_tests
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from fms_acceleration_accelerate import AccelerationFramework, PluginRegistry
from fms_acceleration_accelerate.distributed import (
    PrepareContext,
    apply_fsdp2_plan,
    collect_contributions,
    fully_shard_kwargs_from_policy,
    plan_fsdp_units,
    switch_optimizer_params,
)

import_checkout_tests()  # the checkout's root stays off sys.path (checkout_tests.py says why)
from tests.integration.toy_plugins import ToyLoraPlugin  # noqa: E402

STEPS = 3


def build(framework):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model, _ = framework.augmentation(model, None, ())
    # non-zero LoRA B so that LoRA A gets gradients from the first step
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def lora_grads(model):
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            out[name] = grad.detach().clone()
    return out


def main():
    out_dir = sys.argv[1]
    fused = len(sys.argv) > 2 and sys.argv[2] == "fused_attention"
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # bounded: a lost peer is an error
    rank, world = dist.get_rank(), dist.get_world_size()
    section = {
        "testing": {"toy_lora": {"r": 4, "fused_attention": fused, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
    }
    framework = AccelerationFramework(section, registry=PluginRegistry([ToyLoraPlugin]))
    torch.manual_seed(123)
    batch = torch.randint(0, 96, (2 * world, 16))

    result = {"world": world}
    if rank == 0:  # 1-process reference on the full batch
        ref = build(framework)
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
        ref_losses = []
        for step in range(STEPS):
            loss = ref(input_ids=batch, labels=batch).loss
            loss.backward()
            if step == 0:
                ref_grads = lora_grads(ref)
            opt.step()
            opt.zero_grad()
            ref_losses.append(loss.item())
        result["ref_losses"] = ref_losses

    model = build(framework)
    context = PrepareContext(distributed_type="FSDP", fsdp_version=2, world_size=world, framework=framework)
    merged = collect_contributions(framework.plugins, model, context)
    plan = plan_fsdp_units(model, merged, 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mesh = init_device_mesh("cpu", (world,))
    mapping = apply_fsdp2_plan(model, plan, merged, fully_shard_kwargs_from_policy(mesh=mesh), shard_root=True)
    switched = switch_optimizer_params(optimizer, mapping)
    sharded_units = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    local = batch[rank * 2 : (rank + 1) * 2]
    losses = []
    for step in range(STEPS):
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        if step == 0:
            grads = lora_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    if rank == 0:
        result.update(
            losses=losses,
            grad_max_abs_diff={n: (grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads},
            missing_grads=sorted(set(ref_grads) - set(grads)),
            plan=[{"name": u.name, "kind": u.kind, "reason": u.reason} for u in plan.units],
            plan_fsdp1=[
                {"name": u.name, "kind": u.kind, "reason": u.reason}
                for u in plan_fsdp_units(build(framework), merged, 1).units
            ],
            sharded_units=sharded_units,
            switched=switched,
            optimizer_params_are_dtensors=all(
                isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]
            ),
        )
        with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    # the teardown order of fms_acceleration_accelerate.teardown: drop the sharded model and its optimizer (and with
    # them the gradient collectives' state) first, then wait for every process while gloo's worker threads finish,
    # then destroy the process group
    del model, optimizer, mapping, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
