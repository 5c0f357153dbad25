"""Loss parity of the real Accelerate FSDP1 / FSDP2 paths with a plugin stack, on one GPU.

Trains the same tiny random-init Llama + LoRA for ``--steps`` (>= 20) steps three ways, each in its own
process (Accelerate's state is per process):

* ``none``  — no FSDP (the reference),
* ``fsdp1`` — ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=1))``,
* ``fsdp2`` — the same with ``fsdp_version=2``,

all with ``AccelerationKwargs`` activating the plugin stack (a built-in LoRA plugin that contributes the
wrap plan + fp32 gradient reduction, plus any installed plugins named in ``--acceleration-config``), and
writes ``OUT/<mode>.json`` and ``OUT/summary.json`` (max relative loss difference per FSDP mode vs ``none``,
pass/fail against ``--rtol``).

Run (1 GPU)::

    python benchmarks/gpu_fsdp_parity.py --out benchmarks/results/fsdp_parity          # spawns the 3 runs
    torchrun --nproc_per_node 1 benchmarks/gpu_fsdp_parity.py --mode fsdp2 --out OUT    # one mode
    accelerate launch --num_processes 1 benchmarks/gpu_fsdp_parity.py --mode fsdp1 --out OUT

Without a GPU, ``--mode none --cpu`` runs the reference path (FSDP itself needs a GPU in Accelerate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("none", "fsdp1", "fsdp2")


# ----------------------------------------------------------------------------------------------- plugin


def bench_registry():
    """Installed plugins plus a built-in LoRA plugin (``bench.lora``) for the parity run."""
    from fms_acceleration_accelerate import AccelerationPlugin, PluginRegistry, option
    from fms_acceleration_accelerate.distributed import PrepareContribution

    @dataclasses.dataclass(frozen=True)
    class BenchLoraConfig:
        r: int = option(8, help="LoRA rank")
        reduce_fp32: bool = option(True, help="reduce gradients in fp32")

    class BenchLoraPlugin(AccelerationPlugin):
        name = "bench_lora"
        configuration_and_paths = ("bench.lora",)
        config_class = BenchLoraConfig
        order = 150

        def augmentation(self, model, train_args, modifiable_args):
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=self.config.r, lora_alpha=2 * self.config.r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            )
            return get_peft_model(model, lora), modifiable_args

        def prepare_contribution(self, model, context):
            return PrepareContribution(
                reduce_dtype=torch.float32 if self.config.reduce_fp32 else None,
                notes=("LoRA adapters; fp32 reductions",),
            )

    installed = [e for e in PluginRegistry.discover().entries]
    return PluginRegistry([*installed, BenchLoraPlugin])


# ----------------------------------------------------------------------------------------------- one run


def run_mode(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework

    section: dict = {"bench": {"lora": {"r": 8, "reduce_fp32": True}}}
    if args.acceleration_config:
        from fms_acceleration_accelerate.config import load_acceleration_config

        section.update(load_acceleration_config(args.acceleration_config).body)
    handler = AccelerationKwargs(config=section, registry=bench_registry())
    fsdp_plugin = None
    if args.mode != "none":
        fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1 if args.mode == "fsdp1" else 2,
            auto_wrap_policy="transformer_based_wrap",
            cpu_ram_efficient_loading=False,
            state_dict_type="SHARDED_STATE_DICT",
            # FSDP1: fused LoRA kernels read the adapters inside the decoder layer's unit, so that unit holds
            # frozen and trainable parameters; FSDP1 flat parameters allow that only with use_orig_params
            # (without it the framework refuses with that fix; FSDP2 needs nothing)
            use_orig_params=True,
        )
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, fsdp_plugin=fsdp_plugin, kwargs_handlers=[handler]
    )
    framework = get_framework(accelerator)

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(1)
    model, _ = framework.augmentation(model, None, ())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    generator = torch.Generator().manual_seed(1234)
    distinct = [torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator) for _ in range(4)]
    batches = [distinct[i % len(distinct)] for i in range(args.steps)]  # repeated, so the loss goes down
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = []
    for batch in batches:
        batch = batch.to(accelerator.device)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    result = {
        "mode": args.mode,
        "losses": losses,
        "seconds": elapsed,
        "device": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu",
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else None,
        "mixed_precision": args.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        "plugins": list(framework.active_plugin_names),
        "fsdp_units": sum(1 for m in model.modules() if isinstance(m, (FSDPModule, FullyShardedDataParallel))),
        "versions": {
            "torch": torch.__version__,
            "accelerate": __import__("accelerate").__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    if accelerator.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.mode}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        print(f"{args.mode} losses: " + " ".join(f"{x:.4f}" for x in losses), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# ----------------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compare(out: Path, modes: list[str], rtol: float) -> dict:
    reference = json.loads((out / "none.json").read_text())
    summary: dict = {"reference": "none", "rtol": rtol, "steps": len(reference["losses"]), "modes": {}}
    for mode in modes:
        path = out / f"{mode}.json"
        if not path.is_file():
            summary["modes"][mode] = {"ok": False, "error": "no result (see the run's log)"}
            continue
        losses = json.loads(path.read_text())["losses"]
        rel = [abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses, reference["losses"], strict=True)]
        summary["modes"][mode] = {
            "ok": max(rel) <= rtol,
            "max_rel_diff": max(rel),
            "final_loss": losses[-1],
            "reference_final_loss": reference["losses"][-1],
        }
    summary["ok"] = all(m["ok"] for m in summary["modes"].values())
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def drive(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = ["none"] if args.cpu else list(MODES)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    for mode in modes:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(_free_port()),
            __file__,
            "--mode",
            mode,
            *args.passthrough,
        ]
        print("running:", " ".join(cmd), flush=True)
        with (out / f"{mode}.log").open("w", encoding="utf-8") as log:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        print(f"{mode}: exit {code} (log: {out / f'{mode}.log'})", flush=True)
    summary = compare(out, [m for m in modes if m != "none"], args.rtol)
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--out", default="benchmarks/results/fsdp_parity")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--rtol", type=float, default=None, help="default: 2e-3 (fp32), 3e-2 (bf16)")
    parser.add_argument("--acceleration-config", default=None, help="extra plugin sections (installed plugins)")
    parser.add_argument("--cpu", action="store_true", help="reference run on CPU only (no FSDP)")
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    if args.steps < 20:
        parser.error("--steps must be at least 20")
    if args.rtol is None:
        args.rtol = 2e-3 if args.mixed_precision == "no" else 3e-2
    if args.mode == "all":
        args.passthrough = [a for a in sys.argv[1:] if a not in ("--mode", "all")]
        return drive(args)
    run_mode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
