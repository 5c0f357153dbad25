"""A plain Accelerate training loop with acceleration plugins.

Two ways to run it:

1. Config file (no code change)::

       accelerate launch --config_file cfg.yaml examples/accelerate_loop.py

   with a top-level ``acceleration:`` section in cfg.yaml. ``Accelerator()`` below picks it up.

2. Python::

       python examples/accelerate_loop.py --acceleration-config accel.yaml

   which passes ``AccelerationKwargs(config=...)`` to the Accelerator.

Plugins that change the model before the optimizer exists (LoRA, quantized loading, kernels) are reached
through the framework API: ``framework.augmentation(model, ...)`` below. Prepare-time hooks (FSDP units,
mixed precision, kernels that need the sharded model) run inside ``accelerator.prepare``.

The model is a tiny random-init Llama saved to a temporary folder (no hub access); the data is
``examples/data/tiny_instructions.jsonl`` if present, else random tokens.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework


def build_model(folder: str) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--acceleration-config", help="acceleration YAML (else: the launch config's section)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    handlers = [AccelerationKwargs(config=args.acceleration_config)] if args.acceleration_config else []
    accelerator = Accelerator(cpu=args.cpu, kwargs_handlers=handlers)
    framework = get_framework(accelerator)  # None when no acceleration config is in play

    with tempfile.TemporaryDirectory() as folder:
        model = build_model(folder)
    if framework is not None and framework.requires_augmentation:
        model, _ = framework.augmentation(model, None, ())  # e.g. LoRA; before the optimizer is created
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    # model and optimizer together: the optimizer follows the wrapped / sharded parameters
    model, optimizer = accelerator.prepare(model, optimizer)

    generator = torch.Generator().manual_seed(accelerator.process_index)
    for step in range(args.steps):
        batch = torch.randint(0, 256, (4, 64), generator=generator).to(accelerator.device)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if accelerator.is_main_process:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
