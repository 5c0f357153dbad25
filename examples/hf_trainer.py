"""Fine-tuning with the Hugging Face Trainer: an ordinary script, accelerated by the launch config alone.

Run it (the tiny model first; any causal LM folder or hub id works the same way)::

    python examples/make_tiny_model.py runs/tiny-llama
    accelerate launch --config_file launch_configs/accelerate-cpu-qlora-foak.yaml \\
        examples/hf_trainer.py --model runs/tiny-llama

Nothing in the script asks for acceleration: the ``acceleration:`` section of the Accelerate config does.

* ``AutoModelForCausalLM.from_pretrained(path)``: with a section whose plugin loads models (4-bit bitsandbytes),
  the load goes through the plugin (a printed line says so) and the model comes back with 4-bit layers.
* LoRA with peft's ``get_peft_model`` (``--full``: no LoRA, every weight trains).
* At ``Accelerator.prepare`` (inside ``trainer.train()``) every active plugin checks the model and the kernels
  are patched; the patch table is printed once. ``--full`` with ``fused_lora`` in the section is refused there
  (no LoRA layers to fuse; the error says to set ``fused_lora: false`` for full fine-tuning); ``--full`` with a
  4-bit model is refused by the Trainer itself. ``fast_loss`` replaces the model's loss (``true``) or its
  lm_head + loss (``fused_linear``); both honour the Trainer's ``num_items_in_batch``, so gradient accumulation
  gives the same loss.
* ``end_training(accelerator)`` ends every process cleanly in multi-process runs; it is the one name the script
  takes from this package.

Shipped configurations it runs with (tested on CPU):

* ``launch_configs/accelerate-cpu-qlora-foak.yaml`` and ``accelerate-cpu-2proc-qlora-foak.yaml``: QLoRA nf4 +
  fused kernels, 1 and 2 processes, LoRA (their section is the body of ``accelerated-peft-bnb-nf4-foak``);
* the acceleration-only files ``accelerated-peft-bnb-nf4`` (4-bit loading only, LoRA), ``foak-fast-lora`` (fused
  LoRA, fused linear loss) and ``foak-fast-kernels`` (RMSNorm, RoPE, SwiGLU and loss kernels, with ``--full``)
  (``launch_configs/<name>-sample-configuration.yaml``), named by an Accelerate config:
  ``acceleration: <path of the file>`` (relative to that config's folder).

Without ``accelerate launch`` (``python examples/hf_trainer.py --model ...``) it trains without acceleration.
The data are ``examples/data/tiny_instructions.jsonl``; the loss covers the responses only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

from fms_acceleration_accelerate import end_training

DATA = Path(__file__).resolve().parent / "data" / "tiny_instructions.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or hub id")
    parser.add_argument("--data", default=str(DATA), help="JSON lines with 'instruction' and 'response'")
    parser.add_argument("--output-dir", default="runs/hf-trainer")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-2 with LoRA, 1e-3 with --full")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def tokenize(record: dict[str, str]) -> dict[str, list[int]]:
        prompt = tokenizer(f"### Instruction: {record['instruction']}\n### Response: ")["input_ids"]
        answer = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)

    model = AutoModelForCausalLM.from_pretrained(args.model)
    if not args.full:
        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr if args.lr is not None else (1e-3 if args.full else 1e-2),
        lr_scheduler_type="constant",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    trainer.train()

    accelerator = trainer.accelerator
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if accelerator.is_main_process:
        print(f"first loss {losses[0]:.4f} -> last loss {losses[-1]:.4f} ({len(losses)} steps)", flush=True)
    del trainer, model
    end_training(accelerator)


if __name__ == "__main__":
    main()
