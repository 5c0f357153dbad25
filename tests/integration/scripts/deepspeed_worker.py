"""A plugin stack trained a few steps, under DeepSpeed (stock ``accelerate launch``) or without it (the baseline).

Usage::

    accelerate launch --config_file ds.yaml deepspeed_worker.py OUT STACK CLIENT   # section from the config
    FMS_ACCELERATION_SECTION='<json>' python deepspeed_worker.py OUT STACK CLIENT --baseline   # no DeepSpeed
    python deepspeed_worker.py OUT STACK CLIENT --print-section                     # the section, as JSON

``STACK``: ``full-foak`` (full fine-tuning + fused kernels), ``lora-foak`` (LoRA + fused LoRA and kernels),
``qlora-foak`` (bitsandbytes nf4 + fused LoRA / dequant and kernels); its acceleration section is
:data:`SECTIONS` (the launched run gets it from the Accelerate config, the baseline from the environment, as a
launched worker would).
``moe`` (the scattermoe experts, ``ep_degree: 1``, on the tiny Mixtral in ``OUT/mixtral``), ``moe-lora`` (the same
experts with LoRA on attention and on the experts' 3-D stacks, PEFT ``target_parameters``), ``padding-free-sdpa`` /
``padding-free-eager`` (padding-free attention with that backend; right-padded batches of examples of different
lengths, which the plugin flattens into one row).
``CLIENT``: ``accelerator`` (the script's own ``Accelerator`` and loop) or ``trainer`` (the HF Trainer).

The model is the ``save_pretrained`` checkpoint in ``OUT/llama``, loaded with ``from_pretrained`` (routed to the
bitsandbytes plugin for ``qlora-foak``); LoRA comes from ``get_peft_model``. Every rank trains on its share of the
same global batches; the reported loss of a step is the mean over ranks.

Writes ``OUT/<name>.json`` (``name`` from ``$FMS_TEST_REPORT_NAME``, default ``report``) on rank 0; the HF Trainer
also saves the trained model (``trainer.save_model``) to ``OUT/<name>-saved``.
"""

import json
import os
import sys

import torch

out_dir, stack, client = sys.argv[1:4]
baseline = "--baseline" in sys.argv[4:]
STEPS = 5
BATCH = 4
VOCAB = 96
LORA_TARGETS = {
    "lora-foak": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qlora-foak": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "moe-lora": ["q_proj", "v_proj"],
}
# LoRA on the experts' 3-D stacks (PEFT target_parameters), computed from the factors in the expert kernels
LORA_PARAMETERS = {"moe-lora": ["experts.gate_up_proj", "experts.down_proj"]}
SECTIONS = {
    "full-foak": {
        "training": {
            "fused_ops_and_kernels": {
                "fast_loss": True,
                "fast_rms_layernorm": True,
                "fast_rope_embeddings": True,
                "fast_swiglu": True,
            }
        }
    },
    "lora-foak": {
        "training": {
            "fused_ops_and_kernels": {
                "fused_lora": True,
                "fast_loss": "fused_linear",
                "fast_rms_layernorm": True,
                "fast_rope_embeddings": True,
                "fast_swiglu": True,
            }
        }
    },
    "qlora-foak": {
        "peft": {
            "quantization": {
                "bitsandbytes": {"quant_type": "nf4"},
                "fused_ops_and_kernels": {
                    "base_layer": "bitsandbytes",
                    "fused_lora": True,
                    "fused_dequant": True,
                    "fast_loss": True,
                    "fast_rms_layernorm": True,
                    "fast_rope_embeddings": True,
                },
            }
        }
    },
}

SECTIONS["moe"] = {"training": {"moe": {"scattermoe": {"ep_degree": 1, "routing_stats": True}}}}
SECTIONS["moe-lora"] = SECTIONS["moe"]
for backend in ("sdpa", "eager"):
    SECTIONS[f"padding-free-{backend}"] = {"training": {"attention": {"padding_free": {"attention_backend": backend}}}}
PADDED = stack.startswith("padding-free")
MODEL_DIRS = {"moe": "mixtral", "moe-lora": "mixtral"}

if "--print-section" in sys.argv[4:]:
    print(json.dumps(SECTIONS[stack]))
    sys.exit(0)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fms_acceleration_accelerate import end_training  # noqa: E402
from fms_acceleration_accelerate.accelerate_integration import get_framework  # noqa: E402

world = int(os.environ.get("WORLD_SIZE", "1"))
handlers = []
model_dir = os.path.join(out_dir, MODEL_DIRS.get(stack, "llama"))


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, VOCAB, (8, 16), generator=g)
    return [base[torch.randint(0, 8, (BATCH,), generator=g)] for _ in range(STEPS)]


def padded_examples() -> list[dict[str, torch.Tensor]]:
    """The rows of :func:`batches`, each cut to a length of 5 to 16 tokens and right-padded (id 0) to 16."""
    g = torch.Generator().manual_seed(2)
    examples = []
    for row in torch.cat(batches()):
        length = int(torch.randint(5, 17, (1,), generator=g))
        mask = (torch.arange(row.numel()) < length).long()
        ids = torch.where(mask.bool(), row, torch.zeros_like(row))
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), row, -100)})
    return examples


def load_model():
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # ZeRO-3 with an Accelerator (or TrainingArguments) created first: transformers loads a 16/32-bit model partitioned
    # (deepspeed.zero.Init), a 4-bit one whole (DeepSpeed partitions it when it builds the engine)
    report["loaded_partitioned"] = sum(hasattr(p, "ds_id") for p in model.parameters())
    if stack in LORA_TARGETS:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(5)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS[stack],
            target_parameters=LORA_PARAMETERS.get(stack),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.train()  # bitsandbytes on CPU repacks 4-bit weights in eval mode (see the DeepSpeed notes)
    return model


def inner(model):
    while hasattr(model, "module") and type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel"):
        model = model.module
    return model


def _optimizer_name(accelerator) -> str | None:
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is None:
        return None
    optimizer = engine.engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner).__name__


def describe(model, accelerator) -> dict:
    model = inner(model)
    params = list(model.parameters())
    framework = get_framework(accelerator)
    gathered = [m for m in model.modules() if getattr(m, "_fms_acceleration_zero3_external", None)]
    return {
        "distributed_type": str(accelerator.distributed_type),
        "world": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
        "ds_params": sum(hasattr(p, "ds_id") for p in params),
        # ZeRO-3 between steps: every parameter partitioned (its local data empty)
        "partitioned": sum(hasattr(p, "ds_id") and p.data.numel() == 0 for p in params),
        "params": len(params),
        "partitioned_3d": sum(hasattr(p, "ds_id") and len(p.ds_shape) == 3 and p.data.numel() == 0 for p in params),
        "gathered_scopes": sorted({type(m).__name__ for m in gathered}),
        "gathered_count": len(gathered),
        # external parameters of every module (DeepSpeed registers one by itself when a forward reads a weight that
        # no module gathered) against those the framework registered for the fused scopes
        "external_params": sum(len(getattr(m, "_external_params", {})) for m in model.modules()),
        "registered_external": sum(len(m._fms_acceleration_zero3_external) for m in gathered),
        # modules that got external parameters beyond the framework's registration (a failing test's diagnostics)
        "unregistered_external": sorted(
            f"{name}: {len(m._external_params) - len(getattr(m, '_fms_acceleration_zero3_external', ()))}"
            for name, m in model.named_modules()
            if len(getattr(m, "_external_params", {})) > len(getattr(m, "_fms_acceleration_zero3_external", ()))
        ),
        "plugins": list(framework.active_plugin_names) if framework else None,
        "patch_targets": sorted({r.replacement for r in framework.patches.records}) if framework else [],
        "patch_counts": dict(framework.plugin("fused_ops_and_kernels").patch_counts)
        if framework and "fused_ops_and_kernels" in framework.active_plugin_names
        else {},
        # the optimizer that steps (DeepSpeed's wrapper's inner one: DeepSpeedCPUAdam or the script's AdamW)
        "optimizer": _optimizer_name(accelerator),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": model.config._attn_implementation,
        # experts forwards that computed their LoRA from the adapters' factors (not PEFT's merged weights)
        "factored_calls": framework.plugin("scattermoe").expert_adapters.factored_calls
        if framework and "scattermoe" in framework.active_plugin_names
        else 0,
        "routed_tokens": int(sum(c.sum() for c in framework.plugin("scattermoe").routing_stats.totals().values()))
        if framework and "scattermoe" in framework.active_plugin_names
        else 0,
        "backend": framework.plugin("padding_free").backend_of(model).name
        if framework and "padding_free" in framework.active_plugin_names
        else None,
    }


report: dict = {"stack": stack, "client": client, "baseline": baseline}
if client == "accelerator":
    if world > 1:  # DeepSpeed on CPU: Accelerate picks no backend by itself
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(cpu=baseline, kwargs_handlers=handlers)
    model = load_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = padded_examples() if PADDED else torch.cat(batches())
    data = torch.utils.data.DataLoader(rows, batch_size=BATCH // accelerator.num_processes)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    losses, shapes = [], []
    for ids in data:
        if PADDED:  # a dict of padded rows, flattened by the padding-free plugin's collator: one row of real tokens
            shapes.append(list(ids["input_ids"].shape))
            loss = model(**ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    report.update(describe(model, accelerator), losses=losses, batch_shapes=shapes)
    del model, optimizer
    final = accelerator
elif client == "trainer":
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    rows = torch.cat(batches())
    dataset = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"trainer-{stack}"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH // world,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=baseline,
        ddp_backend="gloo" if world > 1 else None,
        dataloader_drop_last=True,
        seed=0,
    )
    model = load_model()
    recorder = Losses()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train_dataset = dataset
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(dataset)
    trainer.train()
    report.update(describe(trainer.model_wrapped, trainer.accelerator), losses=recorder.losses)
    # the trained model's logits (train mode, no dropout: bitsandbytes' CPU path repacks weights in eval mode), then
    # the trainer's save: a whole model, or the PEFT adapter, that plain transformers / PEFT must load back
    with torch.no_grad():
        report["logits"] = trainer.model_wrapped(input_ids=rows[:2]).logits.tolist()
    name = os.environ.get("FMS_TEST_REPORT_NAME", "report")
    trainer.save_model(os.path.join(out_dir, f"{name}-saved"))
    final = trainer.accelerator
else:
    raise SystemExit(f"unknown client {client!r}")

if final.is_main_process:
    name = os.environ.get("FMS_TEST_REPORT_NAME", "report")
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)
end_training(final)
