"""Two gloo processes on CPU: rank-0 loading, FSDP2 with packed 4-bit shards, parity with one process.

One spawn runs every distributed check (process start-up dominates the cost):

* rank 0 loads and quantizes, rank 1 builds on meta and receives (it may not call ``from_pretrained``);
* the plugin's ``prepare_contribution`` converts 4-bit layers to ``Packed4bitLinear`` and the framework's
  FSDP2 plan shards the model; 4 AdamW steps with the batch split over the ranks give the same losses and
  LoRA gradients as one process on the whole batch, and adapters that differ from that process's by no more
  than AdamW's arithmetic allows (see ``adamw_divergence_bound``);
* each rank keeps half of the packed bytes; the all-gather of 4-bit layers moves <= 0.3x the bf16 bytes;
* the full state gathered from the shards equals the unsharded dequantized weights; adapters saved from
  the sharded model load with plain peft.
"""

from __future__ import annotations

import gc
import math
import traceback
import weakref
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from .helpers import (
    batches,
    framework,
    free_port,
    init_gloo,
    lora_config,
    prepare_fsdp2,
    spawn_workers,
    tiny_llama,
    trainable_grads,
)

STEPS = 4
WORLD = 2
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8  # AdamW of both runs (weight decay: torch's default)


def train_recording(model, data, rank: int, world: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """AdamW steps, each rank on its slice of every batch. Returns the global (rank-mean) losses and the full
    (gathered) LoRA gradients of every step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS)
    losses, grads = [], []
    for ids in data:
        part = ids.chunk(world)[rank]
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        grads.append(trainable_grads(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses, grads


def adamw_divergence_bound(grads_a, grads_b, theta: torch.Tensor) -> torch.Tensor:
    """Per coordinate, how far two AdamW runs from the same start may end apart when their gradients were
    ``grads_a[t]`` and ``grads_b[t]`` (one tensor per step): the optimizer's arithmetic, not a tolerance.

    Why the runs cannot agree exactly: FSDP2 reduce-scatters each gradient as the sum of two half-batch
    gradients, one process sums the whole batch at once, so the float32 gradients differ by rounding (~1e-8
    here, checked separately). AdamW moves a weight by ``lr * u`` with ``u = m_hat / (sqrt(v_hat) + eps)``,
    which normalises the gradient by its own size: a coordinate whose gradient history is itself at the
    rounding level (LoRA A gets its first non-zero gradient only once B has moved; some of those are ~1e-8)
    moves by up to ~lr whatever the sign or size of that noise, so its two runs can end up to 2 * lr apart
    per step. Coordinates with gradients well above the noise move almost identically.

    The bound: with ``m_hat = sum_s a_s g_s`` and ``v_hat = sum_s b_s g_s^2`` (bias-corrected weights,
    ``sum a_s = sum b_s = 1``), Cauchy-Schwarz gives ``|u| <= U_t = sqrt(sum_s a_s^2 / b_s)`` (~1 for a few
    steps) and ``|du/dg_s| <= (a_s + U_t sqrt(b_s)) / (sqrt(v_hat) + eps)``. Along the segment between the two
    gradient histories ``|g_s|`` stays above ``min(|g_a|, |g_b|)`` where the signs agree (0 where they do not),
    which bounds ``v_hat`` from below; so step ``t`` changes the gap by at most
    ``lr * min(2 U_t, sum_s |g_a,s - g_b,s| (a_s + U_t sqrt(b_s)) / (sqrt(v_lo) + eps))``. Decoupled weight
    decay only shrinks a gap. On top: float32 rounding of both runs' updates, a few ulps of the weight per step.
    """
    b1, b2 = BETAS
    steps = len(grads_a)
    bound = 4 * steps * torch.finfo(torch.float32).eps * (theta.double().abs() + LR)  # rounding of the updates
    for t in range(1, steps + 1):
        a = [(1 - b1) * b1 ** (t - s) / (1 - b1**t) for s in range(1, t + 1)]
        b = [(1 - b2) * b2 ** (t - s) / (1 - b2**t) for s in range(1, t + 1)]
        u_max = math.sqrt(sum(x * x / y for x, y in zip(a, b)))
        v_lo = torch.zeros_like(bound)
        sensitivity = torch.zeros_like(bound)
        for s in range(t):
            ga, gb = grads_a[s].double(), grads_b[s].double()
            same_sign_floor = torch.where(ga * gb > 0, torch.minimum(ga.abs(), gb.abs()), torch.zeros_like(ga))
            v_lo += b[s] * same_sign_floor**2
            sensitivity += (ga - gb).abs() * (a[s] + u_max * math.sqrt(b[s]))
        bound += LR * torch.clamp(sensitivity / (v_lo.sqrt() + EPS), max=2 * u_max)
    return bound


def _build(path: Path, **loader_kwargs):
    fw = framework()
    model = fw.model_loader(str(path), dtype=torch.float32, **loader_kwargs)
    torch.manual_seed(5)
    model, _ = fw.augmentation(model, None, (lora_config(),))
    return fw, model


def _worker(rank: int, path: str, port: int, out: str) -> None:
    from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear
    from fms_acceleration_accelerate_peft.save import gather_full_state_dict, save_lora_adapters
    from fms_acceleration_accelerate_peft.sharding import packed_bytes_per_rank
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather
    from transformers import AutoModelForCausalLM

    try:
        init_gloo(rank, WORLD, port)
        if rank != 0:

            def refuse(*a, **k):
                raise AssertionError("rank > 0 must receive the weights, not load them")

            AutoModelForCausalLM.from_pretrained = refuse
        fw, model = _build(Path(path), low_cpu_mem_usage=True)
        ids = batches(1, seed=9)[0]
        with torch.no_grad():
            received_logits = model(input_ids=ids).logits
        import bitsandbytes as bnb

        layers4bit = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
        before = {n: m.weight.data.clone() for n, m in layers4bit}
        # weak references to the storages themselves: an address key would count a new allocation that reuses a
        # freed block of the same size (seen once in CI) as the old weight still alive
        full_storages = [weakref.ref(m.weight.untyped_storage()) for _, m in layers4bit]
        bnb_plugin = fw.plugins[0]
        released_before_after_prepare = []
        after_prepare = bnb_plugin.after_prepare

        def spy(*args, **kwargs):
            released_before_after_prepare.append(sum(sw.released for sw in bnb_plugin._packed_swaps))
            return after_prepare(*args, **kwargs)

        bnb_plugin.after_prepare = spy

        def alive_full_storages() -> int:
            gc.collect()
            return sum(ref() is not None for ref in full_storages)

        import torch.distributed.fsdp as fsdp

        fully_shard, alive_before_each_unit = fsdp.fully_shard, []

        def counting_fully_shard(*args, **kwargs):
            alive_before_each_unit.append(alive_full_storages())
            return fully_shard(*args, **kwargs)

        fsdp.fully_shard = counting_fully_shard
        try:
            prepare_fsdp2(fw, model, WORLD, shard=True)
        finally:
            fsdp.fully_shard = fully_shard
        # released unit by unit as the framework shards them (after_unit_sharded; apply_fsdp2_plan holds the
        # pre-shard parameters only weakly), not all at the end: while preparing, a rank holds the unsharded
        # rest of the model and the shards made so far, never the whole model twice. Units: layers.1, layers.0,
        # root, each decoder layer with 7 replaced 4-bit projections.
        assert alive_before_each_unit == [14, 7, 0]
        assert released_before_after_prepare == [14]
        assert sum(isinstance(m, Packed4bitLinear) for m in model.modules()) == 14
        # the replaced layers' full packed bytes are gone once their replacements are sharded (held, they cost a
        # whole unsharded 4-bit layer per decoder layer on every rank)
        swaps = fw.plugins[0]._packed_swaps
        assert len(swaps) == 14 and all(sw.released and sw.original.weight.numel() == 0 for sw in swaps)
        assert alive_full_storages() == 0, "a full (unsharded) 4-bit weight of a replaced layer is still alive"
        swaps = [r for r in fw.patches.records if r.replacement.startswith("Packed4bitLinear")]
        assert len(swaps) == 14  # the module swaps go through the patch recorder (summary table, revert)
        assert isinstance(model.get_base_model().model.layers[0], FSDPModule)

        class Counting(DefaultAllGather):
            bytes = 0

            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                Counting.bytes += output_tensor.numel() * output_tensor.element_size()
                return super().__call__(output_tensor, input_tensor, group, async_op)

        losses, grads = train_recording(model, batches(STEPS), rank, WORLD)
        full = gather_full_state_dict(model)
        save_lora_adapters(model, Path(out).parent / "adapter")
        held = packed_bytes_per_rank(model)
        # revert after sharding (collective): the original layers come back with their exact packed bytes
        fw.patches.revert()
        restored = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert set(restored) == set(before)
        for n, data in before.items():
            got = restored[n].weight.data
            # compared as bytes: packed codes viewed as float32 may spell NaNs
            assert got.shape == data.shape and torch.equal(got.view(torch.uint8), data.view(torch.uint8)), n

        # all-gather traffic of 4-bit layers alone: each Packed4bitLinear its own unit
        from torch.distributed.fsdp import fully_shard

        fw2 = framework({"no_peft_model": True})
        bare = fw2.model_loader(path, dtype=torch.float32, low_cpu_mem_usage=True)
        prepare_fsdp2(fw2, bare, WORLD, shard=False)
        linears = [m for m in bare.modules() if isinstance(m, Packed4bitLinear)]
        for m in linears:
            fully_shard(m, reshard_after_forward=True)
            m.set_custom_all_gather(Counting())
        fully_shard(bare)
        Counting.bytes = 0
        with torch.no_grad():
            bare(input_ids=ids)
        bf16_bytes = sum(m.weight.numel() * 2 for m in linears)
        if rank == 0:
            torch.save(
                {
                    "losses": losses,
                    "grads": grads,
                    "full": full,
                    "received_logits": received_logits,
                    "held": held,
                    "gathered": Counting.bytes,
                    "bf16": bf16_bytes,
                },
                out,
            )
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:
        traceback.print_exc()
        raise


def test_fsdp2_two_processes_match_one(tmp_path):
    from fms_acceleration_accelerate_peft.save import gather_full_state_dict
    from peft import PeftModel
    from safetensors.torch import load_file

    path = tiny_llama(tmp_path / "llama")
    out = tmp_path / "rank0.pt"
    spawn_workers(_worker, (str(path), free_port(), str(out)), WORLD, timeout=240.0)
    got = torch.load(out, weights_only=False)

    # one process, whole batches, same conversion (no sharding)
    fw, model = _build(path)
    ids = batches(1, seed=9)[0]
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    torch.testing.assert_close(got["received_logits"], ref_logits, rtol=0, atol=0)  # rank-0 load is exact
    prepare_fsdp2(fw, model, WORLD, shard=False)  # the 2-rank conversion, unsharded
    losses, grads = train_recording(model, batches(STEPS), 0, 1)
    full = gather_full_state_dict(model)

    assert got["losses"] == pytest.approx(losses, abs=1e-5), (got["losses"], losses)
    assert len(got["grads"]) == len(grads) == STEPS
    assert got["grads"][0].keys() == grads[0].keys() and grads[0]
    for name, g in grads[0].items():
        # first step, identical weights: the reduce-scatter sums the same numbers in another order
        torch.testing.assert_close(got["grads"][0][name], g, rtol=1e-4, atol=1e-6)
    for step in range(1, STEPS):
        for name, g in grads[step].items():
            # later steps start from weights that differ within the bound below (AdamW may move a weight whose
            # gradient is at the rounding level by ~lr either way), so their gradients differ more (seen: 0.2% of
            # the tensor's largest gradient); a rank missing from the reduction or counted twice is off by a
            # large fraction of the gradient itself
            torch.testing.assert_close(got["grads"][step][name], g, rtol=0, atol=0.1 * float(g.abs().max()))
    base_keys = [k for k in full if k.endswith("base_layer.weight")]
    assert len(base_keys) == 8
    lora_keys = [k for k in full if "lora_" in k]
    assert sorted(lora_keys) == sorted(grads[0])
    informative = total = 0
    for key in full:
        if key not in lora_keys:
            torch.testing.assert_close(got["full"][key], full[key], rtol=1e-4, atol=0)  # frozen weights
            continue
        bound = adamw_divergence_bound([g[key] for g in got["grads"]], [g[key] for g in grads], full[key])
        gap = (got["full"][key].double() - full[key].double()).abs()
        worst, within = int(torch.argmax(gap / bound)), bool((gap <= bound).all())
        assert within, (
            f"{key}: adapters of the two runs differ by {gap.flatten()[worst]:.3g} at element {worst}, more than "
            f"AdamW's arithmetic allows ({bound.flatten()[worst]:.3g}) for their gradients"
        )
        informative += int((bound < LR / 100).sum())
        total += bound.numel()
    # the bound stays far below one AdamW step (~lr) for nearly every weight, so a shard whose update went
    # missing, twice or to the wrong place fails above; the wide allowance is for the few weights whose gradient
    # history sits at the rounding level (and the ones a flipped early step made drift since)
    assert informative >= 0.95 * total, f"only {informative} of {total} adapter weights have a bound below lr/100"

    # each rank holds half of the packed bytes; 4-bit all-gathers move <= 0.3x the bf16 bytes
    from fms_acceleration_accelerate_peft.sharding import packed_bytes_per_rank

    assert got["held"] * WORLD == packed_bytes_per_rank(model)
    print(f"4-bit all-gather bytes {got['gathered']} vs bf16 {got['bf16']} ({got['gathered'] / got['bf16']:.3f}x)")
    assert 0 < got["gathered"] <= 0.3 * got["bf16"], (got["gathered"], got["bf16"])

    # adapters saved from the sharded model: standard PEFT files holding exactly the sharded run's adapters
    # (which are within the bound above of the one-process ones)
    adapter = tmp_path / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    mine = {k: v for k, v in got["full"].items() if "lora_" in k}
    assert len(saved) == len(mine)
    from .helpers import quantized_base

    loaded = PeftModel.from_pretrained(quantized_base(path), adapter)
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p.detach(), mine[name], rtol=0, atol=0)
