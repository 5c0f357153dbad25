"""Expert parallelism on CPU processes (gloo): loss parity against one process, all-to-all bytes, expert bytes per rank.

What CPUs can measure about the MoE plugin's expert parallelism (``training.moe.scattermoe.ep_degree``), none of
which depends on the device: whether N processes train the same model as one process (loss step by step), how many
bytes the expert all-to-alls move per step, and how many bytes of expert parameters each process holds. Not speed
or scaling: CPU processes sharing a few cores say nothing about GPU throughput.

Models: tiny random-init models with the expert count and top-k of the real ones and tiny widths:

* ``granite``: GraniteMoe-like, 40 experts, top-8 (GraniteMoe 3B-a800m's routing);
* ``mixtral``: Mixtral-like, 8 experts, top-2.

Methods: ``full`` (full fine-tuning) and ``lora`` (PEFT LoRA r8 on q,k,v,o; experts frozen: their forward and the
input backward still go through the all-to-all). Expert parallelism refuses LoRA on the experts, so it is not run.

Every run: ``--steps`` AdamW steps on the same batches of the shipped instruction data (``ROWS`` rows of ``SEQ``
tokens, its byte-level BPE tokenizer, vocab 8192); each process
takes its ``ROWS / N`` rows of every batch (stock ``Accelerator(cpu=True)``, DDP; ``fsdp2``: the real
``Accelerator.prepare`` FSDP2 path switched on through the same seam as ``tests/plugins/moe/ep_worker.py``, since
Accelerate refuses FSDP without a GPU). The one-process reference is the same model and optimizer with
transformers' eager experts on the whole batches, in the parent process. The all-to-all bytes are counted by
wrapping ``torch.distributed.all_to_all_single`` (and ``all_reduce``) inside the worker for the training steps
only (restored afterwards); ``a2a_offrank_bytes`` leaves out the chunk a process sends to itself. Every step, the
counted bytes summed over the processes are checked against what the dispatch sends for the routing it was given
(:func:`dispatch_bytes`: one hidden row per token and destination process, slot metadata, counts): column
``a2a_bytes_as_expected``, and the exit status.

Usage::

    python benchmarks/moe_ep_cpu.py --out DIR [--only granite-full-ep2-n2 ...] [--steps 6]

Writes ``DIR/moe_ep_cpu.csv``, ``DIR/moe_ep_cpu.md`` and the per-rank reports ``DIR/runs/<run>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
ROWS, SEQ = 8, 32
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LOSS_RTOL = 1e-5  # the rounding-level tolerance of tests/plugins/moe/test_moe_ep.py

MODELS: dict[str, dict[str, Any]] = {
    "granite": dict(
        model_type="granitemoe", hidden_size=32, intermediate_size=16, num_local_experts=40, num_experts_per_tok=8,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
        max_position_embeddings=128, embedding_multiplier=12.0, logits_scaling=6.0, residual_multiplier=0.22,
        attention_multiplier=0.125, tie_word_embeddings=True,
    ),
    "mixtral": dict(
        model_type="mixtral", hidden_size=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
        max_position_embeddings=128, tie_word_embeddings=False,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    model: str
    method: str
    ep_degree: int
    nproc: int
    wrap: str = "ddp"

    @property
    def name(self) -> str:
        suffix = "" if self.wrap == "ddp" else f"-{self.wrap}"
        return f"{self.model}-{self.method}-ep{self.ep_degree}-n{self.nproc}{suffix}"


def default_runs() -> list[Run]:
    runs = []
    for model in MODELS:
        for method in ("full", "lora"):
            for ep, n in ((1, 2), (2, 2), (4, 4), (2, 4)):
                runs.append(Run(model, method, ep, n))
        runs.append(Run(model, "full", 2, 2, "fsdp2"))
    return runs


# ------------------------------------------------------------------------------------------------ shared
def save_model(name: str, directory: Path) -> Path:
    """Save the tiny random-init model ``name`` (routers with real spread, as the MoE tests do)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(MODELS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith((".gate.weight", ".router.weight", ".router.layer.weight")):
                p.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


def load(directory: str | Path, method: str, experts_implementation: str | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=torch.float32, attn_implementation="eager")
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)  # the same adapters' initialisation in every process and in the reference
        model = get_peft_model(model, LoraConfig(**LORA))
    return model


def batches(vocab: int, steps: int) -> list[torch.Tensor]:
    """``steps`` batches of ``ROWS`` x ``SEQ`` tokens: the shipped instruction data (its tokenizer has ``vocab``
    ids), concatenated in file order and cut into rows, so the loss has something to learn."""
    sys.path.insert(0, str(BENCH))
    try:
        import benchlib
    finally:
        sys.path.remove(str(BENCH))
    tokens = [t for ids in benchlib.load_instruction_token_lists(seq_len=10**9) for t in ids]
    need = steps * ROWS * SEQ
    if max(tokens[:need]) >= vocab:
        raise ValueError(f"the models need vocab_size >= {max(tokens[:need]) + 1} for the shipped data")
    return list(torch.tensor(tokens[:need]).view(steps, ROWS, SEQ))


def reference_losses(directory: Path, method: str, steps: int) -> list[float]:
    """One process, transformers' eager experts, whole batches."""
    model = load(directory, method, experts_implementation="eager")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS)
    losses = []
    for ids in batches(model.config.vocab_size, steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------------ worker
class CollectiveCounter:
    """Counts the bytes given to ``all_to_all_single`` and ``all_reduce`` while installed (restored by ``close``)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._originals = (dist.all_to_all_single, dist.all_reduce)
        self.reset()
        a2a, reduce = self._originals

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            nbytes = input.numel() * input.element_size()
            me = dist.get_rank(group) if group is not None else dist.get_rank()
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            if input_split_sizes:
                row = nbytes // max(1, input.shape[0]) if input.dim() else nbytes
                own = input_split_sizes[me] * row
            else:
                own = nbytes // size
            self.a2a_calls += 1
            self.a2a_bytes += nbytes
            self.a2a_offrank_bytes += nbytes - own
            return a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

        def all_reduce(tensor, *args, **kw):
            self.all_reduce_bytes += tensor.numel() * tensor.element_size()
            return reduce(tensor, *args, **kw)

        dist.all_to_all_single, dist.all_reduce = all_to_all_single, all_reduce

    def reset(self) -> None:
        self.a2a_calls = self.a2a_bytes = self.a2a_offrank_bytes = self.all_reduce_bytes = 0

    def close(self) -> None:
        self._dist.all_to_all_single, self._dist.all_reduce = self._originals


def dispatch_bytes(ep: int, slots: int, rows: int, row_bytes: int, weight_bytes: int, backward: bool) -> int:
    """Bytes one expert-parallel layer call hands to ``all_to_all_single`` for the slots and rows one process sends
    (the dispatch protocol of ``ExpertParallel.experts_forward``): the count exchange (``ep`` x 2 int64), per slot
    its row index and local expert id (2 int64) and its routing weight, the ``rows`` distinct (token, destination)
    hidden rows out and as many combined rows back; the backward sends the same rows both ways again and the
    weights' gradients. The combined rows that come back are the receiver's to send; counted here with the rows they
    answer, so the sum over the processes of an EP group is exact (and so is the off-rank part, given the off-rank
    ``slots`` and ``rows``; the count exchange's off-rank part is ``(ep - 1) x 2`` int64 instead)."""
    passes = 2 if backward else 1
    return ep * 2 * 8 + slots * (2 * 8 + passes * weight_bytes) + 2 * passes * rows * row_bytes


class RoutingCounter:
    """Counts, per ``experts_forward`` call of the plugin's expert parallelism (an instance attribute shadowing the
    method while installed, removed by ``close``), the routing slots this process sends and the distinct
    (token, destination process) pairs among them (the rows the dispatch sends: one per token and destination
    process, whatever the number of its slots there), and the all-to-all bytes :func:`dispatch_bytes` expects."""

    def __init__(self, expert_parallel: Any) -> None:
        import torch.distributed as dist

        self._ep = expert_parallel
        self.reset()
        method = type(expert_parallel).experts_forward

        def experts_forward(shard, hidden, top_k_index, top_k_weights, *args, **kwargs):
            group = expert_parallel.groups.ep_group
            me = dist.get_rank(group)
            owner = torch.div(top_k_index, shard.count, rounding_mode="floor")  # (T, k)
            size = dist.get_world_size(group)
            hit = torch.zeros(owner.shape[0], size, dtype=torch.bool).scatter_(1, owner, True)  # (T, ranks)
            slots, offrank_slots = owner.numel(), int((owner != me).sum())
            pairs, offrank_pairs = int(hit.sum()), int(hit.sum() - hit[:, me].sum())
            self.slots += slots
            self.offrank_slots += offrank_slots
            self.pairs += pairs
            self.offrank_pairs += offrank_pairs
            self.tokens += owner.shape[0]
            backward = torch.is_grad_enabled() and (hidden.requires_grad or top_k_weights.requires_grad)
            row_bytes, weight_bytes = hidden.shape[1] * hidden.element_size(), top_k_weights.element_size()
            self.expected_bytes += dispatch_bytes(size, slots, pairs, row_bytes, weight_bytes, backward)
            offrank = dispatch_bytes(size, offrank_slots, offrank_pairs, row_bytes, weight_bytes, backward)
            self.expected_offrank_bytes += offrank - 2 * 8  # less the count exchange's own row
            return method(expert_parallel, shard, hidden, top_k_index, top_k_weights, *args, **kwargs)

        expert_parallel.experts_forward = experts_forward

    def reset(self) -> None:
        self.slots = self.offrank_slots = self.pairs = self.offrank_pairs = self.tokens = 0
        self.expected_bytes = self.expected_offrank_bytes = 0

    def close(self) -> None:
        vars(self._ep).pop("experts_forward", None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def worker(model_dir: str, method: str, ep_degree: int, wrap: str, steps: int) -> dict[str, Any]:
    import torch.distributed as dist
    from accelerate import Accelerator

    from fms_acceleration_accelerate import AccelerationKwargs

    handler = AccelerationKwargs({"training": {"moe": {"scattermoe": {"ep_degree": ep_degree}}}})
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    if wrap == "fsdp2":
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
        )
        accelerator.state.distributed_type = DistributedType.FSDP
    rank, world = accelerator.process_index, accelerator.num_processes
    model = load(model_dir, method)
    data = batches(model.config.vocab_size, steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    named = list(inner.named_parameters())
    expert = [p for n, p in named if ".experts." in n]
    result: dict[str, Any] = {
        "rank": rank,
        "world": world,
        "local_experts": sorted({int(_local(p).shape[0]) for p in expert}),
        "expert_param_bytes": sum(_local(p).numel() * _local(p).element_size() for p in expert),
        "param_bytes": sum(_local(p).numel() * _local(p).element_size() for _, p in named),
        "trainable_dense_bytes": sum(
            _local(p).numel() * _local(p).element_size() for n, p in named if p.requires_grad and ".experts." not in n
        ),
        "trainable_expert_bytes": sum(_local(p).numel() * _local(p).element_size() for p in expert if p.requires_grad),
    }
    from fms_acceleration_accelerate.accelerate_integration import get_framework

    expert_parallel = get_framework(accelerator).plugin("scattermoe").expert_parallel
    routing = RoutingCounter(expert_parallel) if ep_degree > 1 else None
    counter = CollectiveCounter()
    losses, a2a, a2a_off, calls, reduced, seconds, routed = [], [], [], [], [], [], []
    try:
        for ids in data:
            counter.reset()
            if routing is not None:
                routing.reset()
            start = time.perf_counter()
            part = ids.chunk(world)[rank]
            loss = model(input_ids=part, labels=part).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
            a2a.append(counter.a2a_bytes)
            a2a_off.append(counter.a2a_offrank_bytes)
            calls.append(counter.a2a_calls)
            reduced.append(counter.all_reduce_bytes)
            if routing is not None:
                routed.append([routing.tokens, routing.slots, routing.offrank_slots, routing.pairs,
                               routing.offrank_pairs, routing.expected_bytes,
                               routing.expected_offrank_bytes])  # fmt: skip
            value = loss.detach().clone()
            counter.close()  # the loss average below is not the training's traffic
            dist.all_reduce(value)
            counter = CollectiveCounter()
            losses.append(value.item() / world)
    finally:
        counter.close()
        if routing is not None:
            routing.close()
    result.update(
        losses=losses, a2a_bytes=a2a, a2a_offrank_bytes=a2a_off, a2a_calls=calls, all_reduce_bytes=reduced,
        step_seconds=seconds, tokens_per_rank_step=(ROWS // world) * SEQ, routing=routed,
    )  # fmt: skip
    return result


# ------------------------------------------------------------------------------------------------ parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(run: Run, model_dir: Path, out: Path, steps: int, timeout: int) -> tuple[list[dict], str]:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FMS_ACCELERATION", "ACCELERATE_"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="0", PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(run.nproc),
        "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", str(model_dir), str(out),
        run.method, str(run.ep_degree), run.wrap, str(steps),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=timeout)
    (out / "launch.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    reports = []
    for rank in range(run.nproc):
        path = out / f"rank{rank}.json"
        if not path.exists():
            return [], f"rank {rank} wrote no report (exit {proc.returncode}); see {out / 'launch.log'}"
        report = json.loads(path.read_text(encoding="utf-8"))
        if "error" in report:
            return [], report["error"].strip().splitlines()[-1]
        reports.append(report)
    return reports, ""


FIELDS = [
    "run", "model", "method", "wrap", "nproc", "ep_degree", "status", "experts_per_rank", "expert_param_bytes_per_rank",
    "param_bytes_per_rank", "trainable_dense_bytes_per_rank", "a2a_bytes_per_step_per_rank",
    "a2a_offrank_bytes_per_step_per_rank", "a2a_calls_per_step", "python_all_reduce_bytes_per_step_per_rank",
    "offrank_slots_per_token", "offrank_ranks_per_token", "offrank_rows_if_once_per_rank", "a2a_bytes_as_expected",
    "loss_max_rel_diff", "loss_parity", "ref_loss_change", "diff_vs_change", "losses", "ref_losses", "note",
]  # fmt: skip


def summarise(run: Run, reports: list[dict], ref: list[float], error: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run": run.name, "model": run.model, "method": run.method, "wrap": run.wrap, "nproc": run.nproc,
        "ep_degree": run.ep_degree, "ref_losses": " ".join(f"{v:.7f}" for v in ref),
    }  # fmt: skip
    if error:
        return {**row, "status": "failed", "note": error[:300]}
    first = reports[0]
    losses = first["losses"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))

    def per_rank_mean(key: str) -> float:
        """Mean over the steps after the first, then max over ranks (the busiest rank)."""
        return max(sum(r[key][1:]) / max(1, len(r[key]) - 1) for r in reports)

    if first.get("routing"):
        # over every rank and step: [tokens, slots, off-rank slots, pairs, off-rank pairs, expected bytes, off-rank]
        totals = [sum(step[i] for r in reports for step in r["routing"]) for i in range(7)]
        row["offrank_slots_per_token"] = f"{totals[2] / totals[0]:.2f}"
        row["offrank_ranks_per_token"] = f"{totals[4] / totals[0]:.2f}"
        row["offrank_rows_if_once_per_rank"] = f"{totals[4] / max(1, totals[2]):.2f}"
        # every step, summed over the processes: the counted bytes are the protocol's (dispatch_bytes)
        exact = all(
            sum(r["a2a_bytes"][s] for r in reports) == sum(r["routing"][s][5] for r in reports)
            and sum(r["a2a_offrank_bytes"][s] for r in reports) == sum(r["routing"][s][6] for r in reports)
            for s in range(len(first["routing"]))
        )
        row["a2a_bytes_as_expected"] = "yes" if exact else "NO"
    row.update(
        status="ok",
        experts_per_rank="/".join(str(e) for e in first["local_experts"]),
        expert_param_bytes_per_rank=max(r["expert_param_bytes"] for r in reports),
        param_bytes_per_rank=max(r["param_bytes"] for r in reports),
        trainable_dense_bytes_per_rank=max(r["trainable_dense_bytes"] for r in reports),
        a2a_bytes_per_step_per_rank=round(per_rank_mean("a2a_bytes")),
        a2a_offrank_bytes_per_step_per_rank=round(per_rank_mean("a2a_offrank_bytes")),
        a2a_calls_per_step=first["a2a_calls"][-1],
        python_all_reduce_bytes_per_step_per_rank=round(per_rank_mean("all_reduce_bytes")),
        loss_max_rel_diff=f"{rel:.2e}",
        loss_parity="yes" if rel <= LOSS_RTOL else "NO",
        ref_loss_change=f"{ref[-1] - ref[0]:.4f}",
        diff_vs_change=f"{max(abs(a - b) for a, b in zip(losses, ref)) / max(abs(ref[-1] - ref[0]), 1e-30):.1e}",
        losses=" ".join(f"{v:.7f}" for v in losses),
        note=f"{first['tokens_per_rank_step']} tokens per rank per step",
    )
    return row


def write(rows: list[dict], out: Path) -> None:
    with (out / "moe_ep_cpu.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [
        "run", "status", "experts_per_rank", "expert_param_bytes_per_rank", "param_bytes_per_rank",
        "a2a_bytes_per_step_per_rank", "a2a_offrank_bytes_per_step_per_rank", "a2a_calls_per_step",
        "python_all_reduce_bytes_per_step_per_rank", "offrank_slots_per_token", "offrank_ranks_per_token",
        "offrank_rows_if_once_per_rank", "a2a_bytes_as_expected", "loss_max_rel_diff", "loss_parity",
        "ref_loss_change", "diff_vs_change",
    ]  # fmt: skip
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in shown) + " |" for r in rows]
    failed = [r for r in rows if r["status"] != "ok"]
    lines += ["", *[f"- {r['run']}: {r['note']}" for r in failed]]
    (out / "moe_ep_cpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", default=None, help="run names (e.g. granite-full-ep2-n2)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    args = parser.parse_args(argv)
    runs = default_runs()
    if args.only:
        unknown = sorted(set(args.only) - {r.name for r in runs})
        if unknown:
            parser.error(f"unknown run(s) {unknown}; known: {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    models, refs, rows = {}, {}, []
    for run in runs:
        if run.model not in models:
            models[run.model] = save_model(run.model, args.out / "models" / run.model)
        if (run.model, run.method) not in refs:
            refs[run.model, run.method] = reference_losses(models[run.model], run.method, args.steps)
        start = time.perf_counter()
        try:
            reports, error = launch(run, models[run.model], args.out / "runs" / run.name, args.steps, args.timeout)
        except subprocess.TimeoutExpired:
            reports, error = [], f"timed out after {args.timeout} s"
        row = summarise(run, reports, refs[run.model, run.method], error)
        rows.append(row)
        print(f"{run.name}: {row['status']} ({time.perf_counter() - start:.0f} s) {row.get('loss_max_rel_diff', '')} "
              f"{row.get('note', '')}", flush=True)  # fmt: skip
        write(rows, args.out)
    print((args.out / "moe_ep_cpu.md").read_text(encoding="utf-8"))
    checks = ("loss_parity", "a2a_bytes_as_expected")
    return 0 if all(r["status"] == "ok" and all(r.get(c, "yes") == "yes" for c in checks) for r in rows) else 1


def _worker_entry(argv: list[str]) -> None:
    model_dir, out_dir, method, ep, wrap, steps = argv
    rank = int(os.environ.get("RANK", "0"))
    try:
        outcome = worker(model_dir, method, int(ep), wrap, int(steps))
    except BaseException:  # the parent reads the traceback from the report
        outcome = {"error": traceback.format_exc()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(outcome), encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if "error" not in outcome else 1)  # gloo + DDP can hang in the process group's destructor


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_entry(sys.argv[2:])
    raise SystemExit(main())
