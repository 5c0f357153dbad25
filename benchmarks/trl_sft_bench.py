"""TRL SFTTrainer end to end: the same ordinary SFTTrainer script, plain, with Liger-Kernel, and with an
``acceleration:`` section in its Accelerate config.

The script a user would write is :func:`train` (model given as a path, a peft ``LoraConfig``, ``SFTConfig``);
the rows differ only in how it is launched:

=========  ==========================================================================================
``hf``     ``accelerate launch`` with a plain single-GPU bf16 config; QLoRA through TRL's own
           ``model_init_kwargs={"quantization_config": BitsAndBytesConfig(nf4, double quant, bf16)}``
``liger``  as ``hf``, plus ``SFTConfig(use_liger_kernel=True)`` (TRL keeps its own fused LM head)
``ours``   ``accelerate launch --config_file launch_configs/accelerate-single-gpu-qlora-foak.yaml`` (QLoRA) or
           a config whose section is ``foak-fast-lora`` (LoRA); the script passes no quantization config:
           the section's loading plugin receives TRL's ``from_pretrained``
=========  ==========================================================================================

Usage (GPU; from the repository root)::

    python benchmarks/trl_sft_bench.py matrix --out /tmp/trl-bench [--layers 8] [--steps 15] [--rows qlora-hf,...]

writes ``results.csv`` and ``summary.md`` (tokens/s and peak memory, ratios against the ``hf`` row of the same
method, same call, same GPU) and one JSON + log per row. Model: Llama with 8B layer shapes (hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, vocab 128256), random init, saved once; batch 4 x 2048 random tokens
(no padding), LoRA r16 on q,k,v,o, bf16.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402

SHAPE = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
PLAIN_ACCELERATE = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "NO",
    "mixed_precision": "bf16",
    "num_machines": 1,
    "num_processes": 1,
    "gpu_ids": "0",
    "use_cpu": False,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
ROWS = ("qlora-hf", "qlora-liger", "qlora-ours", "lora-hf", "lora-liger", "lora-ours")


# ------------------------------------------------------------------------------------------------ the script
def train(args: argparse.Namespace) -> dict:
    """An ordinary TRL SFTTrainer run; returns timing, memory and losses."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(
        0, args.vocab_size, (args.batch * (args.warmup + args.steps), args.seq_len), generator=generator
    )
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})
    model_init_kwargs = {"dtype": "bfloat16"}
    if args.peft == "qlora" and args.variant != "ours":
        model_init_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        max_length=args.seq_len,
        learning_rate=1e-4,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        optim="adamw_torch_fused",
        use_liger_kernel=args.variant == "liger",
        model_init_kwargs=model_init_kwargs,
        seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    timer = StepTimer()
    trainer = SFTTrainer(model=args.model_dir, args=config, train_dataset=dataset, peft_config=lora, callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.times[args.warmup :]
    step = statistics.median(timed)
    n4 = sum(1 for m in trainer.model.modules() if type(m).__name__ in ("Linear4bit", "Packed4bitLinear"))
    return {
        "row": f"{args.peft}-{args.variant}",
        "step_s": step,
        "tokens_per_s": args.batch * args.seq_len / step,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "losses": timer.losses,
        "modules_4bit": n4,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "trl": benchlib.package_version("trl"),
        **benchlib.environment_info(),
    }


# ------------------------------------------------------------------------------------------------ the matrix
def save_token_id_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tokenizer whose tokens are the ids themselves (the data is pre-tokenized; TRL only needs pad/eos)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<0>", eos_token="<1>").save_pretrained(str(folder))


def _accelerate_config(row: str, folder: Path, cpu: bool) -> Path:
    peft, variant = row.split("-")
    if variant == "ours" and peft == "qlora":
        name = "accelerate-cpu-qlora-foak.yaml" if cpu else "accelerate-single-gpu-qlora-foak.yaml"
        return REPO / "launch_configs" / name
    document = dict(PLAIN_ACCELERATE)
    if cpu:
        document.update(use_cpu=True, mixed_precision="no")
        document.pop("gpu_ids")
    if variant == "ours":
        sample = yaml.safe_load((REPO / "launch_configs" / "foak-fast-lora-sample-configuration.yaml").read_text())
        document["acceleration"] = sample["plugins"]
    path = folder / f"{row}.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def matrix(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir or out / "model")
    if not (model_dir / "config.json").exists():
        shape = {**SHAPE, **(TINY if args.tiny else {}), "num_hidden_layers": args.layers}
        device = "cuda" if not args.tiny else "cpu"
        benchlib.build_random_model(shape, model_dir, device, "bfloat16", 0)
        save_token_id_tokenizer(model_dir, shape["vocab_size"])
    results = []
    for row in args.rows.split(","):
        peft, variant = row.split("-")
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(_accelerate_config(row, out, args.tiny)),
            str(Path(__file__).resolve()),
            "run",
            "--model-dir",
            str(model_dir),
            "--peft",
            peft,
            "--variant",
            variant,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--json",
            str(out / f"{row}.json"),
            "--seq-len",
            str(args.seq_len),
            "--vocab-size",
            str(TINY["vocab_size"] if args.tiny else SHAPE["vocab_size"]),
        ]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        started = time.time()
        with open(out / f"{row}.log", "w", encoding="utf-8") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=args.row_timeout)
        print(f"{row}: exit {code} in {time.time() - started:.0f}s", flush=True)
        if code == 0:
            results.append(json.loads((out / f"{row}.json").read_text()))
        else:
            results.append({"row": row, "error": f"exit {code} (see {row}.log)"})
    write_summary(results, out, args)
    return 0


def write_summary(results: list[dict], out: Path, args: argparse.Namespace) -> None:
    base = {r["row"].split("-")[0]: r for r in results if r["row"].endswith("-hf") and "error" not in r}
    fields = [
        "row",
        "tokens_per_s",
        "ratio",
        "peak_mem_gib",
        "mem_ratio",
        "step_s",
        "modules_4bit",
        "trainable_params",
        "first_loss",
        "last_loss",
        "error",
        "gpu_name",
        "torch",
        "transformers",
        "trl",
        "peft_version",
        "bitsandbytes",
        "liger_kernel",
        "date",
    ]
    lines = [
        f"TRL SFTTrainer, Llama {'tiny' if args.tiny else '8B'} layer shapes x{args.layers} layers, batch 4 x {args.seq_len}, LoRA r16 q,k,v,o, bf16, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; {args.steps} timed steps after "
        f"{args.warmup} warm-up (median step).",
        "",
        "| row | tokens/s | x hf | peak GiB | x hf mem | 4-bit modules | first / last loss |",
        "|---|---|---|---|---|---|---|",
    ]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            ref = base.get(r["row"].split("-")[0])
            if "error" not in r:
                r["ratio"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3) if ref else ""
                r["mem_ratio"] = (
                    round(r["peak_mem_gib"] / ref["peak_mem_gib"], 3) if ref and ref["peak_mem_gib"] else ""
                )
                r["first_loss"], r["last_loss"] = (r["losses"][0], r["losses"][-1]) if r["losses"] else ("", "")
                lines.append(
                    f"| {r['row']} | {r['tokens_per_s']:.0f} | {r['ratio']} | {r['peak_mem_gib']:.1f} | {r['mem_ratio']} "
                    f"| {r['modules_4bit']} | {r['first_loss']:.4f} / {r['last_loss']:.4f} |"
                )
            else:
                lines.append(f"| {r['row']} | {r['error']} | | | | | |")
            writer.writerow(r)
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one row (launched by `matrix` under accelerate launch)")
    run.add_argument("--model-dir", required=True)
    run.add_argument("--peft", choices=("qlora", "lora"), required=True)
    run.add_argument("--variant", choices=("hf", "liger", "ours"), required=True)
    run.add_argument("--json", required=True)
    run.add_argument("--vocab-size", type=int, default=SHAPE["vocab_size"])
    mat = sub.add_parser("matrix", help="every row, each under its own accelerate launch")
    mat.add_argument("--out", required=True)
    mat.add_argument("--model-dir")
    mat.add_argument("--layers", type=int, default=8)
    mat.add_argument("--rows", default=",".join(ROWS))
    mat.add_argument("--row-timeout", type=int, default=400)
    mat.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the rows run, measures nothing")
    for p in (run, mat):
        p.add_argument("--steps", type=int, default=15)
        p.add_argument("--warmup", type=int, default=5)
        p.add_argument("--gradient-checkpointing", action="store_true")
        p.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.command == "matrix":
        return matrix(args)
    args.batch = 4
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
