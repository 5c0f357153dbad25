"""The main job: an accelerated fine-tune of a tiny embedded Llama on embedded instruction data.

Run through the real entry point (see the README):

    accelerate launch --config_file launch_configs/<config>.yaml examples/train_tiny.py

The Accelerate config carries an ``acceleration:`` section; every process's ``Accelerator`` picks it up.
Loading and augmentation (e.g. 4-bit quantization + LoRA) go through the framework API, as with the HF
Trainer. The model is random-init from a config in this file and saved locally first (no hub access);
the tokenizer is byte-level (UTF-8 bytes + 3 specials), so nothing is downloaded.

Prints the loss every few steps, train tokens/s (padding excluded) and the patch summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from fms_acceleration_accelerate import AccelerationFramework, end_training
from fms_acceleration_accelerate.accelerate_integration import get_framework

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "tiny_instructions.jsonl"
PAD, BOS, EOS = 256, 257, 258
VOCAB = 259


def tiny_llama_config() -> LlamaConfig:
    """A 2-layer Llama small enough for CPU; dims are multiples of 64 so 4-bit blocks divide them."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )


def encode(record: dict[str, str]) -> tuple[list[int], list[int]]:
    """Byte-level tokens; labels are -100 on the prompt so only the response is learned."""
    prompt = [BOS, *f"### Instruction: {record['instruction']}\n### Response: ".encode()]
    answer = [*record["response"].encode(), EOS]
    return prompt + answer, [-100] * len(prompt) + answer


def batches(records: list[dict[str, str]], batch_size: int, steps: int, seed: int):
    """Yield ``steps`` padded batches (input_ids, attention_mask, labels), cycling through the data."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(records), generator=generator).tolist()
        chunk, order = order[:batch_size], order[batch_size:]
        encoded = [encode(records[i]) for i in chunk]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((batch_size, width), PAD)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (tokens, targets) in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(targets)] = torch.tensor(targets)
            mask[row, : len(tokens)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="runs/tiny-llama")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--metrics-out", default=None, help="write final metrics as JSON here")
    parser.add_argument(
        "--collective-timeout", type=float, default=300.0, help="seconds a collective may wait for the other processes"
    )
    args = parser.parse_args()

    # a bounded collective timeout: a process that lost its peer fails with an error instead of waiting forever
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.collective_timeout))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])
    # the framework built from the acceleration section that `accelerate launch` handed to this process;
    # run without one (plain python), nothing is accelerated
    framework = get_framework(accelerator) or AccelerationFramework({})
    dtype = torch.bfloat16

    model_dir = Path(args.work_dir) / "base"
    if accelerator.is_main_process and not (model_dir / "config.json").exists():
        torch.manual_seed(args.seed)
        AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=dtype).save_pretrained(model_dir)
    accelerator.wait_for_everyone()

    if framework.requires_custom_loading:
        model = framework.model_loader(str(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    # seed here, not only when the base model is first built: LoRA's A matrices are drawn from the global RNG,
    # and a rerun that finds the saved base model must draw the same ones
    torch.manual_seed(args.seed)
    model, (lora,) = framework.augmentation(model, None, modifiable_args=(lora,))
    if lora is not None:  # no plugin consumed the LoRA config: apply it the plain peft way
        model = get_peft_model(model, lora)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    framework.get_callbacks_and_ready_for_train(model, accelerator)  # logs the patch summary once

    records = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    losses, tokens, start = [], 0, None
    for step, batch in enumerate(batches(records, args.batch_size, args.steps, args.seed), start=1):
        if step == 2:
            start, tokens = time.perf_counter(), 0  # step 1 is warm-up
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if accelerator.is_main_process and (step % 5 == 0 or step == 1):
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    elapsed = time.perf_counter() - start if start is not None else math.nan
    tok_s = tokens * accelerator.num_processes / elapsed
    if accelerator.is_main_process:
        print(f"active plugins: {', '.join(framework.active_plugin_names) or 'none'}")
        print(f"first loss {losses[0]:.4f} -> last loss {losses[-1]:.4f}; train tokens/s {tok_s:.0f}")
        if args.metrics_out:
            Path(args.metrics_out).write_text(
                json.dumps({"losses": losses, "tokens_per_s": tok_s, "plugins": framework.active_plugin_names})
            )
    # teardown in an order that lets every process exit: drop the prepared objects (DDP's reducer holds the
    # process group), wait for all processes, then destroy the group (see fms_acceleration_accelerate.teardown)
    del model, optimizer
    end_training(accelerator)


if __name__ == "__main__":
    main()
