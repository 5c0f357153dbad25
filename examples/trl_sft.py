"""LoRA fine-tuning with TRL's SFTTrainer: an ordinary TRL script, accelerated by the launch config alone.

Run it (the tiny model first; any causal LM folder or hub id works the same way)::

    python examples/make_tiny_model.py runs/tiny-llama
    accelerate launch --config_file launch_configs/accelerate-cpu-qlora-foak.yaml \\
        examples/trl_sft.py --model runs/tiny-llama

Nothing in the script asks for acceleration: the ``acceleration:`` section of the Accelerate config does.

* TRL loads the model from the path given as ``model=`` (``from_pretrained``). With a section whose plugin loads
  models (4-bit bitsandbytes), that load goes through the plugin: a printed line says so, and the model has
  4-bit layers. ``--preloaded`` loads it in the script with ``AutoModelForCausalLM.from_pretrained`` and passes
  the model object instead: the same happens.
* TRL adds the LoRA adapters of ``peft_config`` (over the 4-bit layers, with a 4-bit model).
* At ``Accelerator.prepare`` (inside ``trainer.train()``) every active plugin checks the model (a 4-bit loader
  wants its 4-bit layers, ``fused_lora`` wants LoRA layers) and the kernels are patched; the patch table is
  printed once. ``fast_loss`` serves TRL's fused LM head (``fused_lm_head=True``): per-token log-probabilities,
  entropy and token accuracy come from the loss kernels.
* ``end_training(accelerator)`` ends every process cleanly in multi-process runs; it is the one name the script
  takes from this package.

Shipped configurations it runs with (tested on CPU):

* ``launch_configs/accelerate-cpu-qlora-foak.yaml`` and ``accelerate-cpu-2proc-qlora-foak.yaml``: QLoRA nf4 +
  fused kernels, 1 and 2 processes (their section is the body of ``accelerated-peft-bnb-nf4-foak``);
* the acceleration-only files ``accelerated-peft-bnb-nf4`` (4-bit loading only), ``foak-fast-kernels`` (RMSNorm,
  RoPE, SwiGLU and loss kernels) and ``foak-fast-lora`` (fused LoRA, fused linear loss)
  (``launch_configs/<name>-sample-configuration.yaml``), named by an Accelerate config:
  ``acceleration: <path of the file>`` (relative to that config's folder).

Without ``accelerate launch`` (``python examples/trl_sft.py --model ...``) it trains without acceleration.
The data are ``examples/data/tiny_instructions.jsonl`` as prompt-completion pairs (the loss covers the
completion only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from fms_acceleration_accelerate import end_training

DATA = Path(__file__).resolve().parent / "data" / "tiny_instructions.jsonl"


def to_prompt_completion(record: dict[str, str]) -> dict[str, str]:
    return {"prompt": f"### Instruction: {record['instruction']}\n### Response: ", "completion": record["response"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or hub id")
    parser.add_argument("--data", default=str(DATA), help="JSON lines with 'instruction' and 'response'")
    parser.add_argument("--output-dir", default="runs/trl-sft")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    parser.add_argument("--preloaded", action="store_true", help="load the model here and pass the model object")
    args = parser.parse_args()

    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    training_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_length=128,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model) if args.preloaded else args.model
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, peft_config=peft_config)
    trainer.train()

    accelerator = trainer.accelerator
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if accelerator.is_main_process:
        print(f"first loss {losses[0]:.4f} -> last loss {losses[-1]:.4f} ({len(losses)} steps)", flush=True)
    del trainer, model
    end_training(accelerator)


if __name__ == "__main__":
    main()
