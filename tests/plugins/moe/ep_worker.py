"""Worker of the expert-parallel tests, started by ``torchrun`` (one process per rank; gloo on CPU).

``python ep_worker.py <model_dir> <out_dir> <ep_degree> [ddp|fsdp2]``: a stock ``Accelerator(cpu=True)`` with the
section ``training.moe.scattermoe.ep_degree`` trains a tiny MoE model for a few AdamW steps, every rank on its share of
each batch (``ddp``: Accelerate wraps it in DDP; ``fsdp2``: the Accelerator's state is switched to FSDP2 after it is
created, as Accelerate refuses FSDP without a GPU, and the real ``Accelerator.prepare`` FSDP2 path shards the model,
the framework's units and Accelerate's root, with the experts ignored). Each rank also trains, alone and without any distribution, the same model with
transformers' eager experts on the whole batches (the one-process reference). The checkpoint saved through
``plugin.save_pretrained`` is reloaded by rank 0 with plain ``from_pretrained``. Each rank writes what it measured to
``<out_dir>/rank<r>.json``; the test asserts on it.

``trainer`` instead of ``ddp``: the HF ``Trainer`` trains under expert parallelism (the section reaches its own
Accelerator from ``$FMS_ACCELERATION_SECTION``), saves a ``save_steps`` checkpoint and a final ``save_model``, and
every rank reloads both with plain ``from_pretrained`` (see :func:`trainer_main`). ``framework-api``: the same
with the section given to the script's own ``AccelerationFramework`` and a stock Trainer (no section reaches the
trainer's Accelerator).

``dispatch``: no training; one experts layer called directly under expert parallelism, its all-to-all calls
recorded, against the unsharded layer with transformers' eager experts (see :func:`dispatch_main`).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

STEPS = 3
ROWS, SEQ = 8, 12
LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


def load(directory: str, experts_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).train()


def batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (ROWS, SEQ), generator=g) for _ in range(STEPS + 1)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main(model_dir: str, out_dir: str, ep_degree: int, wrap: str) -> dict:
    import torch.distributed as dist
    from accelerate import Accelerator

    from fms_acceleration_accelerate import AccelerationKwargs
    from fms_acceleration_accelerate.accelerate_integration import get_framework

    handler = AccelerationKwargs({"training": {"moe": {"scattermoe": {"ep_degree": ep_degree}}}})
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    if wrap == "fsdp2":
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
        )
        accelerator.state.distributed_type = DistributedType.FSDP
    rank, world = accelerator.process_index, accelerator.num_processes
    plugin = get_framework(accelerator).plugin("scattermoe")

    model = load(model_dir)
    data = batches(model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    result: dict = {"rank": rank, "world": world, "wrapper": type(model).__name__}
    result["local_experts"] = [
        int(m.gate_up_proj.shape[0]) for n, m in inner.named_modules() if n.endswith("mlp.experts")
    ]
    result["ddp_ignored"] = sorted(getattr(inner, "_ddp_params_and_buffers_to_ignore", []))
    result["experts_are_dtensors"] = any(
        type(p).__name__ == "DTensor" for n, p in inner.named_parameters() if ".experts." in n
    )
    result["dense_dtensors"] = sum(type(p).__name__ == "DTensor" for n, p in inner.named_parameters())

    reference = load(model_dir, experts_implementation="eager")
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, betas=BETAS, eps=EPS)

    losses, ref_losses = [], []
    for step, ids in enumerate(data[:STEPS]):
        part = ids.chunk(world)[rank]
        loss = model(input_ids=part, labels=part).loss
        accelerator.backward(loss)
        ref_loss = reference(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        if step == 0:
            ref_grads = dict(reference.named_parameters())
            dense, expert = [], []
            shards = {n: plugin.expert_parallel.shard_of(m) for n, m in inner.named_modules()}
            for name, param in inner.named_parameters():
                want, got = ref_grads[name].grad, gathered(param.grad)  # (FSDP2: gathered, every rank in turn)
                owner, _, attr = name.rpartition(".")
                shard = shards.get(owner)
                if shard is not None:
                    want = want[shard.first : shard.first + shard.count]
                    expert.append((name, rel_diff(got, want), max_diff(got, want)))
                else:
                    dense.append((name, rel_diff(got, want), max_diff(got, want)))
            result["grads_dense"] = dense
            result["grads_expert"] = expert
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        dist.all_reduce(value)
        losses.append(value.item() / world)
        ref_losses.append(ref_loss.item())
    result["losses"], result["ref_losses"] = losses, ref_losses

    evaluation = data[STEPS]
    model.eval()
    reference.eval()
    with torch.no_grad():
        ep_logits = model(input_ids=evaluation).logits  # every rank runs the whole batch (a collective forward)
        ref_logits = reference(input_ids=evaluation).logits
    result["ep_vs_ref_logits"] = max_diff(ep_logits, ref_logits)
    result["ref_logits_scale"] = ref_logits.abs().max().item()

    checkpoint = Path(out_dir) / "checkpoint"
    plugin.save_pretrained(model, checkpoint)  # every rank calls it; rank 0 writes, the others wait
    reloaded = load(str(checkpoint)).eval()  # plain transformers, its default experts implementation
    with torch.no_grad():
        logits = reloaded(input_ids=evaluation).logits
    result["reload_vs_ep_logits"] = max_diff(logits, ep_logits)
    result["reload_vs_ref_logits"] = max_diff(logits, ref_logits)
    result["reload_experts"] = [
        int(m.gate_up_proj.shape[0]) for n, m in reloaded.named_modules() if n.endswith("mlp.experts")
    ]
    full = dict(reloaded.named_parameters())
    exact = True  # this rank's slices are the checkpoint's rows of its experts, bit for bit
    for name, module in inner.named_modules():
        shard = plugin.expert_parallel.shard_of(module)
        if shard is not None:
            for attr in shard.names:
                rows = full[f"{name}.{attr}"][shard.first : shard.first + shard.count]
                exact &= torch.equal(getattr(module, attr).detach(), rows)
    result["slices_exact"] = exact
    result["first_experts"] = sorted({s.first for s in shards.values() if s is not None})
    return result


def trainer_main(model_dir: str, out_dir: str, ep_degree: int = 2, framework_api: bool = False) -> dict:
    """The HF ``Trainer`` under expert parallelism: the section comes from ``$FMS_ACCELERATION_SECTION`` (as under
    ``accelerate launch``) to the trainer's own Accelerator; it trains ``STEPS - 1`` steps, saves a checkpoint at the
    last step (``save_steps``) and once more with ``trainer.save_model``; rank 0 reloads both with plain
    ``from_pretrained``.

    ``framework_api``: no section reaches the trainer's Accelerator; the script's own ``AccelerationFramework``
    augments the model and the trainer gets ``framework.get_callbacks_and_ready_for_train(trainer.model,
    trainer.accelerator)`` (the framework API as fms-hf-tuning drives it)."""
    from safetensors import safe_open
    from transformers import Trainer, TrainingArguments

    from fms_acceleration_accelerate.accelerate_integration import get_framework

    framework = None
    model = load(model_dir)
    if framework_api:
        from fms_acceleration_accelerate import AccelerationFramework

        framework = AccelerationFramework({"training": {"moe": {"scattermoe": {"ep_degree": ep_degree}}}})
        model, _ = framework.augmentation(model)
    data = batches(model.config.vocab_size)
    rows = [{"input_ids": r, "labels": r} for ids in data[: STEPS - 1] for r in ids]
    steps = STEPS - 1
    args = TrainingArguments(
        output_dir=str(Path(out_dir) / "run"),
        max_steps=steps,
        per_device_train_batch_size=ROWS // 2,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="steps",
        save_steps=steps,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result: dict = {"rank": trainer.args.process_index, "world": trainer.args.world_size}
    result["accelerator_has_framework"] = get_framework(trainer.accelerator) is not None
    if framework is not None:
        for callback in framework.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
            trainer.add_callback(callback)
    trainer.train()
    final = Path(out_dir) / "final"
    trainer.save_model(str(final))  # every rank calls it, as the trainer's docs ask

    plugin = (framework or get_framework(trainer.accelerator)).plugin("scattermoe")
    inner = trainer.model
    result["local_experts"] = [
        int(m.gate_up_proj.shape[0]) for n, m in inner.named_modules() if n.endswith("mlp.experts")
    ]
    result["trainer_patched"] = sorted(r.attribute for r in plugin.patches.records if r.owner is trainer)
    result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    inner.eval()
    with torch.no_grad():
        ep_logits = inner(input_ids=data[STEPS]).logits  # a collective forward: every rank, the same batch
    checkpoint = Path(args.output_dir) / f"checkpoint-{steps}"
    for label, directory in (("checkpoint", checkpoint), ("final", final)):
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        result[f"{label}_files"] = files
        with safe_open(str(directory / files[0]), "pt") as f:  # Mixtral's format: one key per expert and matrix
            experts = set()
            for key in f.keys():
                layer, found, rest = key.partition(".experts.")
                if found:
                    experts.add((layer, rest.split(".")[0]))
            result[f"{label}_file_experts"] = len(experts)
        try:
            reloaded = load(str(directory)).eval()  # plain transformers, its default experts implementation
        except (RuntimeError, ValueError, OSError) as exc:  # a wrong checkpoint: the test reports why it did not load
            result[f"{label}_reload_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        with torch.no_grad():
            logits = reloaded(input_ids=data[STEPS]).logits
        result[f"{label}_vs_ep_logits"] = max_diff(logits, ep_logits)
        result[f"{label}_experts"] = [
            int(m.gate_up_proj.shape[0]) for n, m in reloaded.named_modules() if n.endswith("mlp.experts")
        ]
    return result


def dispatch_main(model_dir: str, ep_degree: int, tokens: int = 6) -> dict:
    """One experts layer (the first MoE layer of a model routing every token to every expert) under expert
    parallelism, called directly on ``tokens`` tokens per rank, forward and backward, with the shapes and splits of
    every ``all_to_all_single`` recorded (the function wrapped for these calls only); and the same layer of the
    unsharded model with transformers' eager experts on every rank's tokens (the one-process reference).

    Two routings: ``all`` (every token to every expert) and ``first_rank`` (every token to two experts of EP rank 0
    only: the other ranks receive no row and still take part in every exchange, backward included)."""
    import torch.distributed as dist

    from fms_acceleration_accelerate import AccelerationFramework
    from fms_acceleration_accelerate.distributed import RunContext

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    framework = AccelerationFramework({"training": {"moe": {"scattermoe": {"ep_degree": ep_degree}}}})
    plugin = framework.plugin("scattermoe")
    model = load(model_dir)
    plugin.shard_experts(model, RunContext(world_size=world, distributed_type="MULTI_CPU"))
    experts = model.model.layers[0].mlp.experts
    shard = plugin.expert_parallel.shard_of(experts)
    reference = load(model_dir, experts_implementation="eager").model.layers[0].mlp.experts
    total, k = shard.total, model.config.num_experts_per_tok
    hidden_size = model.config.hidden_size

    g = torch.Generator().manual_seed(11)  # every rank draws every rank's inputs; each takes its own rows
    hidden = torch.randn(world * tokens, hidden_size, generator=g)
    target = torch.randn(world * tokens, hidden_size, generator=g)
    mine = slice(rank * tokens, (rank + 1) * tokens)
    routings = {
        "all": torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(world * tokens)]),
        "first_rank": torch.stack([torch.randperm(2, generator=g) for _ in range(world * tokens)]),
    }
    original = dist.all_to_all_single
    calls: list[dict] = []

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        calls.append({"shape": list(input.shape), "dtype": str(input.dtype), "splits": list(input_split_sizes or [])})
        return original(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    result: dict = {"rank": rank, "world": world, "tokens": tokens, "k": k, "experts": total}
    result["hidden_size"] = hidden_size
    for label, index in routings.items():
        weights = torch.rand(index.shape, generator=g) + 0.1
        calls.clear()
        experts.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        ep_hidden = hidden[mine].clone().requires_grad_(True)
        ep_weights = weights[mine].clone().requires_grad_(True)
        dist.all_to_all_single = counting
        try:
            out = experts(ep_hidden, index[mine], ep_weights)
            (out * target[mine]).sum().backward()
        finally:
            dist.all_to_all_single = original

        ref_hidden = hidden.clone().requires_grad_(True)
        ref_weights = weights.clone().requires_grad_(True)
        ref_out = reference(ref_hidden, index, ref_weights)
        (ref_out * target).sum().backward()

        pairs = {
            "out": (out, ref_out[mine]),
            "grad_hidden": (ep_hidden.grad, ref_hidden.grad[mine]),
            "grad_weights": (ep_weights.grad, ref_weights.grad[mine]),
        }
        for name in shard.names:
            # the hook scales expert gradients by 1 / world (the mean loss over processes); the loss here is the sum
            want = getattr(reference, name).grad[shard.first : shard.first + shard.count]
            pairs[f"grad_{name}"] = (getattr(experts, name).grad * world, want)
        result[label] = {
            "calls": list(calls),
            # (relative, absolute difference, largest reference value)
            "compared": {
                key: (rel_diff(got, want), max_diff(got, want), want.abs().max().item())
                for key, (got, want) in pairs.items()
            },
        }
    framework.revert()
    return result


if __name__ == "__main__":
    model_dir, out_dir, ep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    wrap = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    rank = int(os.environ.get("RANK", "0"))
    path = Path(out_dir) / f"rank{rank}.json"
    try:
        if wrap == "dispatch":
            outcome = dispatch_main(model_dir, ep)
        elif wrap in ("trainer", "framework-api"):
            outcome = trainer_main(model_dir, out_dir, ep, framework_api=wrap == "framework-api")
        else:
            outcome = main(model_dir, out_dir, ep, wrap)
    except BaseException:  # the test reads the traceback from the file
        outcome = {"error": traceback.format_exc()}
    path.write_text(json.dumps(outcome), encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo + DDP can deadlock in the process group's destructor at interpreter exit: leave at once
    os._exit(0 if "error" not in outcome else 1)
