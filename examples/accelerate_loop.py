"""A plain Accelerate training loop (LoRA fine-tuning) with acceleration plugins.

Two ways to run it, after ``python examples/make_tiny_model.py runs/tiny-llama`` (the tiny model; any causal LM
folder or hub id works the same way):

1. Config file (no code change)::

       accelerate launch --config_file launch_configs/accelerate-cpu-qlora-foak.yaml \\
           examples/accelerate_loop.py --model runs/tiny-llama

   with a top-level ``acceleration:`` section in the Accelerate config. ``Accelerator()`` below picks it up.

2. Python::

       python examples/accelerate_loop.py --model runs/tiny-llama \\
           --acceleration-config launch_configs/foak-fast-lora-sample-configuration.yaml

   which passes ``AccelerationKwargs(config=...)`` to the Accelerator.

Shipped configurations it runs with (tested on CPU): ``launch_configs/accelerate-cpu-qlora-foak.yaml`` and
``accelerate-cpu-2proc-qlora-foak.yaml`` under ``accelerate launch``; the acceleration-only files
``accelerated-peft-bnb-nf4``, ``accelerated-peft-bnb-nf4-foak``, ``foak-fast-kernels`` and ``foak-fast-lora``
(``launch_configs/<name>-sample-configuration.yaml``) with ``--acceleration-config``, and ``foak-fast-kernels``
also with ``--full``. The GPU and FSDP launch configs carry the same sections with GPU settings. Without any
(plain Accelerate), nothing is accelerated. What each stage does:

* loading: ``AutoModelForCausalLM.from_pretrained`` as usual. When the config has a plugin that loads models
  (4-bit bitsandbytes QLoRA), that call goes through it (a line says so) and the model comes back with 4-bit
  layers; ``framework.model_loader(path)`` is the explicit spelling of the same thing.
* LoRA: the script's ``LoraConfig`` goes to ``framework.augmentation``. A plugin that adds LoRA itself (the
  bitsandbytes plugin) consumes it and returns ``None``; otherwise the script adds it with ``get_peft_model``, so
  the kernels that fuse LoRA (``fused_lora``) find adapters at ``prepare``. ``--full`` trains every weight
  instead (not possible with a 4-bit model or ``fused_lora``, which are refused with an error saying why).
* ``accelerator.prepare(model, optimizer, loader)``: every active plugin checks the model (a 4-bit loader wants
  its 4-bit layers, ``fused_lora`` wants LoRA layers), then FSDP units, mixed precision, and kernels that need the
  wrapped model; the patch table is printed there.
* ``end_training(accelerator)`` ends every process cleanly in multi-process runs.

The data are ``examples/data/tiny_instructions.jsonl``; the loss covers the responses only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from fms_acceleration_accelerate import end_training
from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework

DATA = Path(__file__).resolve().parent / "data" / "tiny_instructions.jsonl"


def training_data(tokenizer, path: str, batch_size: int) -> DataLoader:
    """Prompt + response token ids; labels -100 on the prompt, so only the response is learned."""

    def tokenize(record: dict[str, str]) -> dict[str, list[int]]:
        prompt = tokenizer(f"### Instruction: {record['instruction']}\n### Response: ")["input_ids"]
        answer = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    dataset = load_dataset("json", data_files=path, split="train")
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True),
        generator=torch.Generator().manual_seed(0),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or hub id")
    parser.add_argument("--data", default=str(DATA), help="JSON lines with 'instruction' and 'response'")
    parser.add_argument("--acceleration-config", help="acceleration YAML (else: the launch config's section)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-2 with LoRA, 1e-3 with --full")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    args = parser.parse_args()

    handlers = [AccelerationKwargs(config=args.acceleration_config)] if args.acceleration_config else []
    # without a GPU, cpu=True lets a multi-process launch form a gloo process group
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), kwargs_handlers=handlers)
    framework = get_framework(accelerator)  # None when no acceleration config is in play

    # through the loading plugin, if the config has one
    model = AutoModelForCausalLM.from_pretrained(args.model)
    loader = training_data(AutoTokenizer.from_pretrained(args.model), args.data, args.batch_size)

    lora = None
    if not args.full:
        lora = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,  # the fused LoRA kernels implement dropout 0
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
    if framework is not None and framework.requires_augmentation:
        model, (lora,) = framework.augmentation(model, None, modifiable_args=(lora,))
    if lora is not None:  # no plugin added the adapters: the plain peft way
        model = get_peft_model(model, lora)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr if args.lr is not None else (1e-3 if args.full else 1e-2))
    # model and optimizer together: the optimizer follows the wrapped / sharded parameters; the loader gives each
    # process its share of the batches
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses = []
    for step, batch in zip(range(args.steps), loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if accelerator.is_main_process:
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    if accelerator.is_main_process:
        plugins = ", ".join(get_framework(accelerator).active_plugin_names) if framework is not None else "none"
        print(f"plugins: {plugins}; first loss {losses[0]:.4f} -> last loss {losses[-1]:.4f}", flush=True)
    # drop the prepared objects, then end: a multi-process gloo job otherwise can hang at exit (see end_training)
    del model, optimizer, loader
    end_training(accelerator)


if __name__ == "__main__":
    main()
