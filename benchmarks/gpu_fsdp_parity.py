"""Loss parity of the real Accelerate FSDP1 / FSDP2 paths with plugin stacks, on 1 or 2 GPUs.

One command trains a tiny random-init Llama for ``--steps`` (>= 20) steps in a matrix of cases
(stack x FSDP version x world size) and compares every case's per-step loss with the one-process, no-FSDP run
of the same stack on the same global batch (with world size 2 each rank trains on its half of the rows; the
reported loss is the all-reduced mean, and FSDP averages the gradients, so both runs follow the same
trajectory up to rounding).

Stacks (``STACKS``; every plugin is set up through the public API only:
``Accelerator(kwargs_handlers=[AccelerationKwargs(config=...)])`` -> ``framework.model_loader`` (QLoRA) ->
``framework.augmentation`` -> ``accelerator.prepare(model, optimizer)``):

* ``lora-foak``: a built-in LoRA plugin (``bench.lora``: r 8 on q/k/v/o, fp32 gradient reduction) plus
  ``fsdp_parity_foak.yaml`` (fused LoRA, Triton RMSNorm / RoPE / cross-entropy); fp32 weights, bf16 mixed
  precision. FSDP1 runs with ``use_orig_params=True`` (fused LoRA keeps the adapters in the decoder unit).
* ``qlora-foak``: the flagship QLoRA stack, ``fsdp_parity_qlora.yaml``: the bitsandbytes plugin (nf4, its
  ``model_loader`` and LoRA augmentation, fp32 LoRA weights) + fused ops with ``base_layer: bitsandbytes``
  (fused LoRA, fused dequant, RMSNorm, RoPE, loss); bf16 weights and 4-bit storage, bf16 mixed precision;
  FSDP2 with the packed 4-bit all-gather (the plugin's default).
* ``qlora-foak-unpacked``: the same with ``fsdp2_packed_all_gather: false`` (FSDP2's default handling of the
  bitsandbytes parameters); compared with the ``qlora-foak`` reference.
* ``qlora-foak-fsdp1``: the stack as FSDP1 needs it: a flat parameter holds one dtype, and the fused-LoRA
  decoder unit holds the bf16 4-bit storage *and* the adapters, so the adapters are bf16 too
  (``fp32_lora_params: false``) and mixed precision is off (with it, Accelerate upcasts every trainable flat
  parameter to fp32, which here would include the packed storage). Its own no-FSDP reference.
* ``qlora-foak-fsdp1-mixed`` (diagnostic, only with ``--stacks``): the flagship defaults (fp32 adapters,
  bf16 mixed precision) under FSDP1, to see what a user who keeps the defaults gets.

Each case runs in its own process tree (FSDP cases under ``torchrun``, the no-FSDP references as one plain
process; Accelerate's state is per process) with a timeout, so a failure or hang cannot stop the others;
world-size-1 cases share the GPUs (``--per-gpu`` at a time on each), world-size-2 cases use both.
Writes ``OUT/<case>.json``, ``OUT/<case>.log`` and ``OUT/summary.json``, prints a Markdown table, and exits
non-zero if any check failed (loss parity within ``--rtol``, the fused LoRA kernels patched, the run finished).

Run (repository root, after ``bash benchmarks/gpu_setup.sh``)::

    python benchmarks/gpu_fsdp_parity.py --out OUT/parity --nproc 2      # world sizes 1 and 2 (2 GPUs)
    python benchmarks/gpu_fsdp_parity.py --out OUT/parity                # world size 1 only
    python benchmarks/gpu_fsdp_parity.py --out OUT/parity --stacks lora-foak --fsdp fsdp2

Without a GPU, ``--cpu`` runs the no-FSDP references and, with ``--nproc 2``, FSDP2 over 2 gloo processes on
tiny shapes, fp32. Accelerate refuses FSDP on CPU, so the FSDP2 worker then uses the test seam of
``tests/integration/scripts/flagship_accelerate_prepare_worker.py``: it creates ``Accelerator(cpu=True)`` and
switches its state to FSDP2 before loading the model; everything after is the real ``Accelerator.prepare``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
FSDP_MODES = ("none", "fsdp1", "fsdp2")
# per-process environment that must reach every spawned rank (the GPU image sets them; never unset them)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


@dataclasses.dataclass(frozen=True)
class Stack:
    """A plugin stack of the parity matrix.

    Attributes:
        name: stack name (``--stacks``).
        config: acceleration YAML (relative to ``benchmarks/``).
        quantized: the model comes from the bitsandbytes plugin's ``model_loader`` (LoRA from its augmentation).
        dtype: model dtype on GPU (``float32`` / ``bfloat16``); fp32 on CPU.
        mixed_precision: Accelerate's ``mixed_precision`` on GPU; ``no`` on CPU.
        overrides: ``(dotted.path.in.the.body, value)`` set on top of ``config``.
        fsdp: FSDP versions this stack is checked with.
        reference: stack whose ``none`` run this stack's FSDP runs are compared with.
        default: part of the default matrix (otherwise only when named in ``--stacks``).
    """

    name: str
    config: str
    quantized: bool
    dtype: str
    mixed_precision: str
    overrides: tuple[tuple[str, Any], ...] = ()
    fsdp: tuple[str, ...] = ("fsdp1", "fsdp2")
    reference: str = ""
    default: bool = True

    @property
    def reference_stack(self) -> str:
        return self.reference or self.name


_BNB = "peft.quantization.bitsandbytes"
STACKS = {
    s.name: s
    for s in (
        Stack("lora-foak", "fsdp_parity_foak.yaml", quantized=False, dtype="float32", mixed_precision="bf16"),
        Stack(
            "qlora-foak", "fsdp_parity_qlora.yaml", quantized=True, dtype="bfloat16", mixed_precision="bf16",
            fsdp=("fsdp2",),
        ),
        Stack(
            "qlora-foak-unpacked", "fsdp_parity_qlora.yaml", quantized=True, dtype="bfloat16", mixed_precision="bf16",
            overrides=((f"{_BNB}.fsdp2_packed_all_gather", False),), fsdp=("fsdp2",), reference="qlora-foak",
        ),
        Stack(
            "qlora-foak-fsdp1", "fsdp_parity_qlora.yaml", quantized=True, dtype="bfloat16", mixed_precision="no",
            overrides=((f"{_BNB}.fp32_lora_params", False),), fsdp=("fsdp1",),
        ),
        Stack(  # diagnostic: the flagship defaults under FSDP1 (fp32 adapters next to bf16 storage in one unit)
            "qlora-foak-fsdp1-mixed", "fsdp_parity_qlora.yaml", quantized=True, dtype="bfloat16",
            mixed_precision="bf16", fsdp=("fsdp1",), reference="qlora-foak", default=False,
        ),
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    stack: str
    fsdp: str
    world: int

    @property
    def name(self) -> str:
        return f"{self.stack}--{self.fsdp}--w{self.world}"

    @property
    def reference(self) -> str:
        return Case(STACKS[self.stack].reference_stack, "none", 1).name


def build_matrix(stacks: list[str], fsdp: list[str], nproc: int, cpu: bool, batch: int = 0) -> list[Case]:
    """The cases to run: each stack's no-FSDP reference, then its FSDP versions at world sizes 1..nproc (those
    that divide ``batch``, the global batch rows every rank takes an equal slice of; 0: all)."""
    cases: list[Case] = []
    for name in stacks:
        stack = STACKS[name]
        reference = Case(stack.reference_stack, "none", 1)
        if reference not in cases:
            cases.append(reference)
        for version in stack.fsdp:
            if version not in fsdp or (cpu and version == "fsdp1"):
                continue  # FSDP1 needs a GPU (no CPU seam for it)
            for world in range(1, nproc + 1):
                if cpu and world == 1:
                    continue  # the CPU seam needs a process group of more than one rank
                if batch and batch % world:
                    continue  # the ranks' slices of the global batch would differ in size
                cases.append(Case(name, version, world))
    return cases


# ----------------------------------------------------------------------------------------------- plugin


def bench_registry():
    """Installed plugins plus a built-in LoRA plugin (``bench.lora``) for the LoRA stack."""
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

    installed = list(PluginRegistry.discover().entries)
    return PluginRegistry([*installed, BenchLoraPlugin])


def stack_section(stack: Stack) -> dict:
    """The acceleration body of ``stack`` (its YAML plus overrides; the built-in LoRA plugin for LoRA stacks)."""
    from fms_acceleration_accelerate.config import load_acceleration_config

    body = copy.deepcopy(dict(load_acceleration_config(HERE / stack.config).body))
    for dotted, value in stack.overrides:
        node = body
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if not stack.quantized:
        body["bench"] = {"lora": {"r": 8, "reduce_fp32": True}}
    return body


# ----------------------------------------------------------------------------------------------- one case


def model_config(cpu: bool):
    from transformers import LlamaConfig

    if cpu:  # tiny: the CPU test must stay fast; hidden 64 still splits the 4-bit blocks over 2 ranks
        shape = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    else:
        shape = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}
    return LlamaConfig(
        **shape,
        num_attention_heads=4 if cpu else 8,
        num_key_value_heads=2 if cpu else 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def run_worker(args: argparse.Namespace) -> None:
    """Train one case in this process (one rank of a ``torchrun`` job); rank 0 writes ``OUT/<case>.json``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs, get_framework

    stack = STACKS[args.stack]
    case = Case(args.stack, args.fsdp, int(os.environ.get("WORLD_SIZE", "1")))
    dtype = torch.float32 if args.cpu else getattr(torch, stack.dtype)
    mixed_precision = "no" if args.cpu else stack.mixed_precision
    registry = None if stack.quantized else bench_registry()
    handler = AccelerationKwargs(config=stack_section(stack), registry=registry)

    def fsdp_plugin_for(version: int) -> FullyShardedDataParallelPlugin:
        return FullyShardedDataParallelPlugin(
            fsdp_version=version,
            auto_wrap_policy="transformer_based_wrap",
            cpu_ram_efficient_loading=False,
            state_dict_type="SHARDED_STATE_DICT",
            # FSDP1: fused LoRA reads the adapters inside the decoder layer's unit, so that unit holds frozen and
            # trainable parameters; FSDP1 flat parameters allow that only with use_orig_params (FSDP2 ignores it)
            use_orig_params=True,
        )

    version = {"none": None, "fsdp1": 1, "fsdp2": 2}[args.fsdp]
    if args.cpu:
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, kwargs_handlers=[handler])
        if version is not None:  # the CPU seam (see the module docstring): FSDP2 over gloo
            if version != 2 or accelerator.distributed_type != DistributedType.MULTI_CPU:
                raise SystemExit("--cpu supports FSDP2 with 2 or more processes only")
            accelerator.state.fsdp_plugin = fsdp_plugin_for(2)
            accelerator.state.distributed_type = DistributedType.FSDP
            os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch` with an FSDP config exports
    else:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            fsdp_plugin=fsdp_plugin_for(version) if version is not None else None,
            kwargs_handlers=[handler],
        )
    framework = get_framework(accelerator)
    assert framework is not None, "AccelerationKwargs did not attach a framework"
    world, rank = accelerator.num_processes, accelerator.process_index
    if world != case.world:
        raise SystemExit(f"Accelerate sees {world} processes, torchrun started {case.world}")

    config = model_config(args.cpu)
    lora_args: tuple = ()
    folder = Path(args.out) / f".model-{case.name}"  # one checkpoint per case, written by rank 0
    if accelerator.is_main_process:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    accelerator.wait_for_everyone()
    if stack.quantized:
        from peft import LoraConfig

        # rank 0 quantizes and broadcasts when there is more than one rank (the plugin's distributed loader)
        model = framework.model_loader(str(folder), dtype=dtype, low_cpu_mem_usage=world > 1)
        lora_args = (
            LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                task_type="CAUSAL_LM",
            ),
        )  # fmt: skip
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder)
    torch.manual_seed(1)  # the same LoRA initialisation on every rank and in the reference
    model, _ = framework.augmentation(model, None, lora_args)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    distributed_type = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    prepare_start = time.perf_counter()
    model, optimizer = accelerator.prepare(model, optimizer)
    prepare_seconds = time.perf_counter() - prepare_start

    generator = torch.Generator().manual_seed(1234)
    seq = 32 if args.cpu else args.seq
    distinct = [torch.randint(0, config.vocab_size, (args.batch, seq), generator=generator) for _ in range(4)]
    batches = [distinct[i % len(distinct)] for i in range(args.steps)]  # repeated, so the loss goes down
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = []
    for batch in batches:
        part = batch.chunk(world)[rank].to(accelerator.device)  # this rank's rows of the global batch
        loss = model(input_ids=part, labels=part).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().float()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        losses.append(value.item())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    peaks = [peak]
    if world > 1:
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)

    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    foak = framework.plugin("fused_ops_and_kernels")
    q_proj = _first_lora_q_proj(model)
    result = {
        "case": case.name,
        "stack": case.stack,
        "fsdp": case.fsdp,
        "world": world,
        "losses": losses,
        "seconds": elapsed,
        "prepare_seconds": prepare_seconds,
        "peak_memory_gib_per_rank": peaks,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "mixed_precision": mixed_precision,
        "distributed_type": distributed_type + (" (CPU seam)" if args.cpu and version is not None else ""),
        "plugins": list(framework.active_plugin_names),
        "patch_counts": dict(foak.patch_counts) if foak is not None else {},
        "base_layer_class": type(q_proj.base_layer).__name__ if q_proj is not None else None,
        "fsdp_units": sum(1 for m in model.modules() if isinstance(m, (FSDPModule, FullyShardedDataParallel))),
        "versions": {
            name: __import__(name).__version__
            for name in ("torch", "accelerate", "transformers", "peft", "triton")
            if _importable(name)
        },
    }
    if stack.quantized and _importable("bitsandbytes"):
        result["versions"]["bitsandbytes"] = __import__("bitsandbytes").__version__
    if accelerator.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{case.name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        print(f"{case.name} losses: " + " ".join(f"{x:.4f}" for x in losses), flush=True)
    # the package's teardown order: the sharded model and its optimizer (and the gradient collectives' state) go
    # first, every process waits at a barrier while gloo's worker threads finish, then the process group goes
    # (a rank destroyed the group under a running gloo thread once: 'terminate called without an active exception')
    from fms_acceleration_accelerate.teardown import end_training

    del model, optimizer, q_proj, loss
    end_training(accelerator)


def _first_lora_q_proj(model: torch.nn.Module) -> torch.nn.Module | None:
    """The first decoder layer's LoRA ``q_proj`` (FSDP1 / checkpoint wrappers add names to the path)."""
    for name, module in model.named_modules():
        clean = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        if clean.endswith("self_attn.q_proj") and hasattr(module, "base_layer"):
            return module
    return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------------------------- driver


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _visible_gpus(cpu: bool) -> list[str]:
    if cpu or not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def child_env(devices: list[str] | None) -> dict[str, str]:
    """The environment of a case's ``torchrun``: ours without the distributed variables, NCCL settings kept."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    for key, value in NCCL_ENV.items():
        env.setdefault(key, value)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


@dataclasses.dataclass
class Job:
    case: Case
    devices: list[str] | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    timeout: float = 0.0
    wall: float | None = None
    exit_code: int | None = None
    timed_out: bool = False
    skipped: str = ""


def _start(job: Job, args: argparse.Namespace, out: Path, ports: set[int], timeout: float) -> None:
    if job.case.fsdp == "none":  # the reference: one plain process, Accelerate's DistributedType.NO (no DDP)
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(job.case.world),
                    "--master_port", str(_free_port(ports))]  # fmt: skip
    cmd = [
        *launcher, str(Path(__file__).resolve()), "--worker",
        "--stack", job.case.stack, "--fsdp", job.case.fsdp, "--out", str(out), "--steps", str(args.steps),
        "--batch", str(args.batch), "--seq", str(args.seq), "--lr", str(args.lr),
    ]  # fmt: skip
    if args.cpu:
        cmd.append("--cpu")
    log = (out / f"{job.case.name}.log").open("w", encoding="utf-8")
    log.write(f"$ {' '.join(cmd)}\n# CUDA_VISIBLE_DEVICES={','.join(job.devices or []) or '-'}\n")
    log.flush()
    job.proc = subprocess.Popen(
        cmd, env=child_env(job.devices), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    job.started, job.timeout = time.monotonic(), timeout
    print(f"[parity] start {job.case.name} (devices {','.join(job.devices or []) or 'cpu'})", flush=True)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux ``/proc``; torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop a case that outlived its timeout: SIGTERM (torchrun forwards it to its workers), then SIGKILL."""
    tree = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in (proc.pid, *tree):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
            if sig == signal.SIGTERM and not any(Path(f"/proc/{pid}").exists() for pid in tree):
                return
        except subprocess.TimeoutExpired:
            continue


def run_matrix(cases: list[Case], args: argparse.Namespace, out: Path) -> list[Job]:
    """Run every case in its own process tree; world-size-1 cases share the GPUs, ``--per-gpu`` each."""
    gpus = _visible_gpus(args.cpu)
    slots = {g: args.per_gpu for g in gpus} if gpus else {"cpu": 1}
    jobs = [Job(c) for c in cases]
    for job in jobs:
        if gpus and job.case.world > len(gpus):
            job.skipped = f"needs {job.case.world} GPUs, {len(gpus)} visible"
    pending = [j for j in jobs if not j.skipped]
    running: list[Job] = []
    ports: set[int] = set()
    deadline = time.monotonic() + args.budget
    while pending or running:
        now = time.monotonic()
        for job in list(running):
            code = job.proc.poll()
            if code is None and now - job.started > job.timeout:
                _kill_tree(job.proc)
                job.timed_out, code = True, job.proc.returncode
            if code is not None:
                job.exit_code, job.wall = code, now - job.started
                for device in job.devices or ["cpu"]:
                    slots[device] += 1
                running.remove(job)
                state = "TIMED OUT" if job.timed_out else f"exit {code}"
                print(f"[parity] done  {job.case.name}: {state} in {job.wall:.0f}s", flush=True)
        for job in list(pending):
            left = deadline - now
            if left < 10:
                job.skipped = f"--budget {args.budget}s used up before it could start"
                pending.remove(job)
                continue
            free = [d for d, n in slots.items() if n > 0]
            if gpus:
                free.sort(key=lambda d: -slots[d])  # least loaded first
            if len(free) < (job.case.world if gpus else 1):
                continue
            job.devices = free[: job.case.world] if gpus else None
            for device in job.devices or ["cpu"]:
                slots[device] -= 1
            pending.remove(job)
            running.append(job)
            _start(job, args, out, ports, min(args.timeout, left))
        time.sleep(0.2)
    return jobs


def _error_line(log: Path) -> str:
    """The most telling error line of a case's log (the first rank's exception, not torchrun's summary)."""
    if not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln) for ln in lines]
    pattern = re.compile(r"^[\w.]*(Error|Exception|Exit)\b.*")
    for line in lines:
        if pattern.match(line) and "ChildFailedError" not in line:
            return line[:400]
    return lines[-1][:400] if lines else ""


def summarize(jobs: list[Job], out: Path, rtol: float | None, cpu: bool) -> dict:
    """Compare every case with its reference; write ``summary.json``."""
    results: dict[str, dict] = {}
    for job in jobs:
        path = out / f"{job.case.name}.json"
        if path.is_file():
            results[job.case.name] = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for job in jobs:
        case, stack = job.case, STACKS[job.case.stack]
        mixed = "no" if cpu else stack.mixed_precision
        low_precision = not cpu and (mixed != "no" or stack.dtype != "float32")
        tol = rtol if rtol is not None else (3e-2 if low_precision else 2e-3)
        row: dict[str, Any] = {
            "case": case.name, "stack": case.stack, "fsdp": case.fsdp, "world": case.world,
            "reference": None if case.fsdp == "none" else case.reference, "rtol": tol,
            "exit_code": job.exit_code, "timed_out": job.timed_out, "wall_seconds": job.wall,
            "devices": job.devices, "ok": False, "problems": [],
        }  # fmt: skip
        result = results.get(case.name)
        if job.skipped:
            row["problems"].append(f"skipped: {job.skipped}")
        elif result is None:
            what = f"timed out after {job.timeout:.0f}s" if job.timed_out else f"exit {job.exit_code}"
            row["problems"].append(f"no result ({what}): {_error_line(out / f'{case.name}.log')}")
        else:
            row.update(
                train_seconds=result["seconds"], prepare_seconds=result["prepare_seconds"],
                peak_memory_gib_per_rank=result["peak_memory_gib_per_rank"], final_loss=result["losses"][-1],
                patch_counts=result["patch_counts"], base_layer_class=result["base_layer_class"],
                fsdp_units=result["fsdp_units"], device=result["device"], steps=len(result["losses"]),
            )  # fmt: skip
            if job.exit_code not in (0, None):
                row["problems"].append(f"exit {job.exit_code} after writing its result")
            if not result["patch_counts"].get("fused_lora"):
                row["problems"].append("the fused LoRA kernels were not patched")
            if case.fsdp != "none":
                if result["fsdp_units"] == 0:
                    row["problems"].append("no FSDP unit in the prepared model")
                reference = results.get(case.reference)
                if reference is None:
                    row["problems"].append(f"reference {case.reference} has no result")
                else:
                    rel = [
                        abs(a - b) / max(abs(b), 1e-8)
                        for a, b in zip(result["losses"], reference["losses"], strict=True)
                    ]
                    row.update(max_rel_diff=max(rel), reference_final_loss=reference["losses"][-1])
                    if max(rel) > tol:
                        first = next(i for i, r in enumerate(rel) if r > tol)
                        row["problems"].append(
                            f"loss differs by up to {max(rel):.3g} (> rtol {tol:g}), first at step {first}"
                        )
        row["ok"] = not row["problems"]
        rows.append(row)
    summary = {"ok": all(r["ok"] for r in rows), "cases": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def markdown_table(summary: dict) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| stack | FSDP | world | max rel loss diff | final loss (ref) | pass | peak GiB per rank | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["cases"]:
        peaks = r.get("peak_memory_gib_per_rank") or []
        peak = " / ".join(fmt(p, ".2f") for p in peaks) if peaks else "-"
        final = fmt(r.get("final_loss"), ".4f")
        if r.get("reference_final_loss") is not None:
            final += f" ({r['reference_final_loss']:.4f})"
        verdict = "ok" if r["ok"] else "**FAIL**: " + "; ".join(r["problems"]).replace("|", "/")
        lines.append(
            f"| {r['stack']} | {r['fsdp']} | {r['world']} | {fmt(r.get('max_rel_diff'), '.2e')} | {final} | "
            f"{verdict} | {peak} | {fmt(r.get('train_seconds'), '.1f')} | {fmt(r['wall_seconds'], '.0f')} |"
        )
    return "\n".join(lines)


def drive(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = build_matrix(args.stacks, args.fsdp, args.nproc, args.cpu, args.batch)
    print(f"[parity] {len(cases)} cases: {', '.join(c.name for c in cases)}", flush=True)
    start = time.monotonic()
    jobs = run_matrix(cases, args, out)
    summary = summarize(jobs, out, args.rtol, args.cpu)
    summary.update(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        wall_seconds=time.monotonic() - start,
        steps=args.steps,
        global_batch=[args.batch, 32 if args.cpu else args.seq],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    table = markdown_table(summary)
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"[parity] {'all checks passed' if summary['ok'] else 'SOME CHECKS FAILED'} "
          f"({summary['wall_seconds']:.0f}s); {out / 'summary.json'}", flush=True)  # fmt: skip
    return 0 if summary["ok"] else 1


def _csv(choices: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return values

    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (per-case logs and JSON, summary.json, summary.md)")
    parser.add_argument(
        "--stacks",
        type=_csv(list(STACKS)),
        default=[name for name, stack in STACKS.items() if stack.default],
        help="comma-separated (default: all but qlora-foak-fsdp1-mixed)",
    )
    parser.add_argument(
        "--fsdp",
        type=_csv(FSDP_MODES),
        default=list(FSDP_MODES[1:]),
        help="fsdp1,fsdp2 (the none references always run)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="largest world size (runs 1..nproc)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4, help="global batch rows (split over the ranks)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length on GPU (32 on CPU)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rtol", type=float, default=None, help="default: 3e-2 with bf16 anywhere, else 2e-3")
    parser.add_argument("--cpu", action="store_true", help="no GPU: references + FSDP2 over gloo (seam), fp32")
    parser.add_argument("--per-gpu", type=int, default=2, help="cases sharing one GPU at a time")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per case (its process tree is killed)")
    parser.add_argument("--budget", type=float, default=600, help="no case starts after this many seconds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", choices=list(STACKS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.stack is None or len(args.fsdp) != 1:
            parser.error("--worker needs --stack and one --fsdp value")
        args.fsdp = args.fsdp[0]
        run_worker(args)
        return 0
    if args.steps < 20:
        parser.error("--steps must be at least 20")
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.batch % args.nproc:
        parser.error(f"--batch {args.batch} must split evenly over {args.nproc} processes")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
