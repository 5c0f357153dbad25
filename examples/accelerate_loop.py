"""A plain Accelerate training loop (LoRA fine-tuning) with acceleration plugins.

Two ways to run it:

1. Config file (no code change)::

       accelerate launch --config_file launch_configs/accelerate-cpu-qlora-foak.yaml examples/accelerate_loop.py

   with a top-level ``acceleration:`` section in the Accelerate config. ``Accelerator()`` below picks it up.

2. Python::

       python examples/accelerate_loop.py --acceleration-config launch_configs/foak-fast-lora-sample-configuration.yaml

   which passes ``AccelerationKwargs(config=...)`` to the Accelerator.

It runs with every shipped configuration in ``launch_configs/`` (the GPU and FSDP ones on GPUs), and with none
(plain Accelerate). What each stage does:

* loading: ``AutoModelForCausalLM.from_pretrained`` as usual. When the config has a plugin that loads models
  (4-bit bitsandbytes QLoRA), that call goes through it (a line says so) and the model comes back with 4-bit
  layers; ``framework.model_loader(path)`` is the explicit spelling of the same thing.
* LoRA: the script's ``LoraConfig`` goes to ``framework.augmentation``. A plugin that adds LoRA itself (the
  bitsandbytes plugin) consumes it and returns ``None``; otherwise the script adds it with ``get_peft_model``, so
  the kernels that fuse LoRA (``fused_lora``) find adapters at ``prepare``. ``--full`` trains every weight
  instead (not possible with a 4-bit model or ``fused_lora``, which are refused with an error saying why).
* ``accelerator.prepare(model, optimizer)``: FSDP units, mixed precision, and kernels that need the wrapped model;
  the patch table is printed there.

The model is a tiny random-init Llama saved to a temporary folder (no hub access); the data are a few fixed
token rows, which the model memorises (the loss falls within a few steps).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fms_acceleration_accelerate import end_training
from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework

VOCAB = 256


def save_tiny_llama(folder: str) -> None:
    """A 2-layer Llama (dims multiples of 64, so 4-bit blocks divide them), saved as a checkpoint."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def batches(steps: int, rank: int, batch_size: int = 4, length: int = 32):
    """The same few token rows every step (each process its own): loss falls as the model memorises them."""
    generator = torch.Generator().manual_seed(rank)
    rows = torch.randint(0, VOCAB, (batch_size, length), generator=generator)
    for _ in range(steps):
        yield rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--acceleration-config", help="acceleration YAML (else: the launch config's section)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    args = parser.parse_args()

    # each process saves its own copy of the checkpoint, before the process group exists (transformers saves only
    # on rank 0 once it does)
    checkpoint = tempfile.TemporaryDirectory()
    save_tiny_llama(checkpoint.name)

    handlers = [AccelerationKwargs(config=args.acceleration_config)] if args.acceleration_config else []
    # without a GPU, cpu=True lets a multi-process launch form a gloo process group
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), kwargs_handlers=handlers)
    framework = get_framework(accelerator)  # None when no acceleration config is in play

    with checkpoint:
        # through the loading plugin, if the config has one
        model = AutoModelForCausalLM.from_pretrained(checkpoint.name)

    lora = None
    if not args.full:
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,  # the fused LoRA kernels implement dropout 0
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        )
    if framework is not None and framework.requires_augmentation:
        model, (lora,) = framework.augmentation(model, None, modifiable_args=(lora,))
    if lora is not None:  # no plugin added the adapters: the plain peft way
        model = get_peft_model(model, lora)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    # model and optimizer together: the optimizer follows the wrapped / sharded parameters
    model, optimizer = accelerator.prepare(model, optimizer)

    losses = []
    for step, batch in enumerate(batches(args.steps, accelerator.process_index)):
        batch = batch.to(accelerator.device)
        loss = model(input_ids=batch, labels=batch).loss
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
    del model, optimizer
    end_training(accelerator)


if __name__ == "__main__":
    main()
