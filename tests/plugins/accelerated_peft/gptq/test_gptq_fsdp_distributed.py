"""GPTQ-LoRA over two gloo processes on CPU: FSDP2 with packed GPTQ shards and FSDP1 with flattened packed views,
against one process.

One spawn runs every distributed check (process start-up dominates the cost):

* rank-0 loading (``low_cpu_mem_usage=True``): rank 0 reads the checkpoint, rank 1 receives every tensor by
  broadcast (a plain and a tied, sharded checkpoint), both bit for bit, and each layer's ``sequential_g_idx``
  with them (rank 1 reads no ``g_idx`` to decide it);
* FSDP2: the plugin's ``prepare_contribution`` replaces the ``GPTQLinear`` layers by ``PackedGPTQLinear`` and the
  framework's FSDP2 plan shards the model; the first forward on each rank's half batch equals the one-process
  model's on the same rows bit for bit; 4 AdamW steps with the batch split over the ranks give the losses and
  LoRA gradients of one process on the whole batch (bounds argued in ``test_gptq_fsdp2_two_processes_match_one``);
  each rank keeps half of the packed bytes (``g_idx`` whole), the full copies made for the conversion die unit by
  unit while sharding, a full state dict gathers the exact packed tensors, and revert (collective) gives the
  original layers their exact packed tensors back;
* the all-gather of GPTQ layers moves exactly their packed bytes (int32 ``qweight`` + ``qzeros`` + fp16
  ``scales``; ``g_idx`` is not gathered), counted on the wire, 0.29x a bf16 all-gather of the same weights;
* FSDP2 with the fused-ops plugin (fused LoRA over GPTQ bases, patched after wrapping on the replaced layers):
  the same outputs as one process with the same kernels;
* FSDP2 over a checkpoint without act-order: every shard and every gathered weight keeps ``sequential_g_idx``
  (no ``g_idx`` read after loading), and the first forward equals one process's;
* FSDP1 with bf16 weights, a bf16 mixed-precision ``param_dtype`` and bf16 autocast (Accelerate's FSDP1 mixed
  precision): the packed tensors are flattened and sharded with their decoder unit as bf16 views; the first
  forward equals one process's bit for bit, training runs, and the packed bytes gathered back after training are
  the checkpoint's; in float32 without mixed precision, 4 AdamW steps give one process's losses.
"""

from __future__ import annotations

import gc
import traceback
import weakref
from pathlib import Path

import pytest
import torch

from ..helpers import free_port, init_gloo, spawn_workers, trainable_grads
from .gptq_helpers import GPTQCase, learnable_batches, make_gptq_checkpoint

WORLD = 2
STEPS = 4
LR = 1e-2
TARGETS = ["q_proj", "v_proj", "down_proj"]
PACKED = ("qweight", "qzeros", "scales", "g_idx")


FUSED = {"base_layer": "auto_gptq", "fused_lora": True}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _framework(fused: dict | None = None, **options):
    from fms_acceleration_accelerate import AccelerationFramework

    sections = {"auto_gptq": {"kernel": "triton_v2", "from_quantized": True, **options}}
    if fused is not None:
        sections["fused_ops_and_kernels"] = fused
    return AccelerationFramework({"plugins": {"peft": {"quantization": sections}}})


def _build(path: str, dtype: torch.dtype = torch.float32, fused: dict | None = None, **options):
    from peft import LoraConfig

    fw = _framework(fused, **options)
    model = fw.model_loader(path, torch_dtype=dtype)
    if options.get("no_peft_model"):
        return fw, model
    torch.manual_seed(5)
    targets = ALL_LINEAR if fused else TARGETS
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model, _ = fw.augmentation(model, None, (lora,))
    return fw, model


def _packed_state(model) -> dict[str, torch.Tensor]:
    from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear

    return {
        f"{name}.{key}".replace("_fsdp_wrapped_module.", ""): tensor.clone()
        for name, m in model.named_modules()
        if isinstance(m, GPTQLinear)
        for key, tensor in m.packed_tensors().items()
    }


def _bf16_autocast(enabled: bool = True):
    """What Accelerate wraps the forward in under bf16 mixed precision."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _train(
    model, data, rank: int, world: int, *, autocast: bool = False
) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """AdamW steps, each rank on its slice of every batch; the global (rank-mean) losses and the full LoRA gradients
    of every step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, grads = [], []
    for ids in data:
        part = ids.chunk(world)[rank]
        with _bf16_autocast(autocast):
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


def _fsdp2(rank: int, path: str) -> dict:
    from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear
    from fms_acceleration_accelerate_peft.gptq.packed import GPTQPackedWeight, PackedGPTQLinear
    from fms_acceleration_accelerate_peft.gptq.sharding import packed_bytes_per_rank
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from fms_acceleration_accelerate.distributed import (
        RunContext,
        apply_fsdp2_plan,
        collect_contributions,
        fully_shard_kwargs_from_policy,
        plan_fsdp_units,
    )

    fw, model = _build(path)
    originals = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    context = RunContext(distributed_type="FSDP", fsdp_version=2, world_size=WORLD)
    merged = collect_contributions(fw.plugins, model, context)
    layers = [m for m in model.modules() if isinstance(m, PackedGPTQLinear)]
    assert len(layers) == 14 and not any(isinstance(m, GPTQLinear) for m in model.modules())
    # the conversion leaves no second copy: the replaced layers' buffers are emptied at once
    assert all(m._buffers[k].numel() == 0 for m in originals for k in PACKED)
    full_copies = [weakref.ref(m.weight.qweight_t.untyped_storage()) for m in layers]
    alive_before_each_unit = []
    import torch.distributed.fsdp as fsdp

    fully_shard = fsdp.fully_shard

    def counting_fully_shard(*args, **kwargs):
        gc.collect()
        alive_before_each_unit.append(sum(ref() is not None for ref in full_copies))
        return fully_shard(*args, **kwargs)

    fsdp.fully_shard = counting_fully_shard
    try:
        plan = plan_fsdp_units(model, merged, 2)
        apply_fsdp2_plan(model, plan, merged, fully_shard_kwargs_from_policy(), shard_root=True)
    finally:
        fsdp.fully_shard = fully_shard
    for plugin in fw.plugins:
        plugin.after_prepare(model, context)
    gc.collect()
    assert isinstance(model.get_base_model().model.layers[0], FSDPModule)
    # units layers.1, layers.0, root; each decoder layer with 7 GPTQ layers: each full copy dies with its unit
    assert alive_before_each_unit == [14, 7, 0], alive_before_each_unit
    assert sum(ref() is not None for ref in full_copies) == 0
    for m in layers:
        assert isinstance(m.weight, DTensor) and isinstance(m.weight._local_tensor, GPTQPackedWeight)
        assert m.weight._local_tensor.rows == m.out_features // WORLD
    held = packed_bytes_per_rank(model)

    data = learnable_batches(STEPS)
    with torch.no_grad():
        first_logits = model(input_ids=data[0].chunk(WORLD)[rank]).logits
    losses, grads = _train(model, data, rank, WORLD)
    # a full state dict (what Accelerate's get_state_dict / a trainer's save gathers): the packed weights come
    # back whole (DTensor.full_tensor of the subclass gathers the packed tensors), on rank 0
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full_state = {
        f"{key.removesuffix('.weight')}.{name}": tensor
        for key, value in state.items()
        if isinstance(value, GPTQPackedWeight)
        for name, tensor in value.checkpoint_layout().items()
    }
    lora_state = sorted(k for k in state if "lora_" in k)
    fw.revert()  # collective: each layer is rebuilt from the all-gathered shards
    restored = _packed_state(model)
    assert len(restored) == 14 * len(PACKED)
    return {
        "held": held,
        "first_logits": first_logits,
        "losses": losses,
        "grads": grads,
        "restored": restored,
        "full_state": full_state,
        "lora_state": lora_state,
        "notes": list(merged.notes),
    }


def _fsdp2_fused(rank: int, path: str) -> dict:
    """With the fused-ops plugin (fused LoRA over GPTQ bases): the kernels are patched after wrapping, on the
    replaced layers, and read their gathered packed weights through the gptq backend inside the fused scopes."""
    from fms_acceleration_accelerate.distributed import (
        RunContext,
        apply_fsdp2_plan,
        collect_contributions,
        fully_shard_kwargs_from_policy,
        plan_fsdp_units,
    )

    fw, model = _build(path, fused=FUSED)
    context = RunContext(distributed_type="FSDP", fsdp_version=2, world_size=WORLD)
    merged = collect_contributions(fw.plugins, model, context)
    apply_fsdp2_plan(
        model, plan_fsdp_units(model, merged, 2), merged, fully_shard_kwargs_from_policy(), shard_root=True
    )
    for plugin in fw.plugins:
        plugin.after_prepare(model, context)
    data = learnable_batches(2)
    with torch.no_grad():
        first_logits = model(input_ids=data[0].chunk(WORLD)[rank]).logits
    losses, _ = _train(model, data, rank, WORLD)
    return {
        "first_logits": first_logits,
        "losses": losses,
        "patches": [r.replacement for r in fw.patches.records],
    }


def _all_gather_bytes(path: str) -> dict:
    """Each GPTQ layer its own FSDP2 unit, one forward: the bytes its all-gathers write."""
    from fms_acceleration_accelerate_peft.gptq.packed import PackedGPTQLinear
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    from fms_acceleration_accelerate.distributed import RunContext

    class Counting(DefaultAllGather):
        bytes = 0
        calls = 0

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            Counting.bytes += output_tensor.numel() * output_tensor.element_size()
            Counting.calls += 1
            return super().__call__(output_tensor, input_tensor, group, async_op)

    fw, bare = _build(path, no_peft_model=True)
    fw.plugins[0].prepare_contribution(bare, RunContext(distributed_type="FSDP", fsdp_version=2, world_size=WORLD))
    linears = [m for m in bare.modules() if isinstance(m, PackedGPTQLinear)]
    full = {id(m): m.weight.packed_nbytes(with_g_idx=False) for m in linears}
    expected = sum(full.values())
    dense_bf16 = sum(m.out_features * m.in_features * 2 for m in linears)
    # a bf16 mixed-precision param_dtype, as Accelerate sets it: the packed bytes are gathered uncast all the same
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for m in linears:
        fully_shard(m, reshard_after_forward=True, mp_policy=bf16)
        m.set_custom_all_gather(Counting())
    fully_shard(bare)
    with torch.no_grad():
        bare(input_ids=learnable_batches(1)[0].chunk(WORLD)[0])
    return {"gathered": Counting.bytes, "calls": Counting.calls, "expected": expected, "bf16": dense_bf16}


def _fsdp1(rank: int, path: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """FSDP1 over the plan's units; bf16: weights, ``param_dtype`` and autocast in bf16 (Accelerate's mixed
    precision); float32: no mixed precision (the arithmetic of one process, for the loss parity)."""
    from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    from fms_acceleration_accelerate.distributed import (
        RunContext,
        check_fsdp1_dtypes,
        check_keep_dtype_fsdp1,
        collect_contributions,
        fsdp1_auto_wrap_policy,
        plan_fsdp_units,
    )

    mixed = dtype == torch.bfloat16
    fw, model = _build(path, dtype)
    context = RunContext(
        distributed_type="FSDP", fsdp_version=1, world_size=WORLD, mixed_precision="bf16" if mixed else "no"
    )
    merged = collect_contributions(fw.plugins, model, context)
    gptq = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(gptq) == 14 and all(m.storage_dtype == dtype for m in gptq)
    assert not any(b.is_floating_point() for m in gptq for b in m.buffers())  # nothing for buffer_dtype to cast
    check_keep_dtype_fsdp1(model, merged, dtype)
    plan = plan_fsdp_units(model, merged, 1)
    check_fsdp1_dtypes(model, plan, merged, mixed_precision=mixed)
    storage = sum(p.numel() for n, p in model.named_parameters() if merged.keeps_dtype(n, p))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    units = sum(1 for u in plan.units if u.frozen)
    wrapped = FullyShardedDataParallel(
        model,
        auto_wrap_policy=fsdp1_auto_wrap_policy(model, plan),
        device_id=torch.device("cpu"),
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None,
        use_orig_params=False,
    )
    local_flat = sum(p.numel() for p in wrapped.parameters() if not p.requires_grad)
    data = learnable_batches(3 if mixed else STEPS)
    with torch.no_grad(), _bf16_autocast(mixed):
        first_logits = wrapped(input_ids=data[0].chunk(WORLD)[rank]).logits
    losses, _ = _train(wrapped, data, rank, WORLD, autocast=mixed)
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        after = _packed_state(wrapped)
    return {
        "first_logits": first_logits,
        "losses": losses,
        "after": after,
        "storage": storage,
        "frozen": frozen,
        "units": units,
        "local_flat": local_flat,
        "notes": list(merged.notes),
    }


def _rank0_load(rank: int, paths: list[str]) -> list[dict]:
    """``low_cpu_mem_usage=True`` under the process group: rank 0 reads, rank 1 receives (it may not read, nor
    check a ``g_idx``: the layout flags come with the tensors)."""
    from fms_acceleration_accelerate_kernels import gptq as gptq_kernels
    from fms_acceleration_accelerate_peft.gptq import loader
    from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear

    read, check = loader.load_tensors, gptq_kernels.gptq_sequential_g_idx
    if rank != 0:

        def refuse(*args, **kwargs):
            raise AssertionError("rank > 0 must receive the tensors, not read them")

        loader.load_tensors = refuse
        gptq_kernels.gptq_sequential_g_idx = refuse
    try:
        out = []
        for path in paths:
            model = _framework(no_peft_model=True).model_loader(path, torch_dtype=torch.float32, low_cpu_mem_usage=True)
            with torch.no_grad():
                logits = model(input_ids=learnable_batches(1)[0]).logits
            tied = model.lm_head.weight is model.model.embed_tokens.weight
            flags = [m.sequential_g_idx for m in model.modules() if isinstance(m, GPTQLinear)]
            out.append({"packed": _packed_state(model), "logits": logits, "tied": tied, "flags": flags})
        return out
    finally:
        loader.load_tensors, gptq_kernels.gptq_sequential_g_idx = read, check


def _fsdp2_sequential(rank: int, path: str) -> dict:
    """FSDP2 over a checkpoint without act-order: ``sequential_g_idx`` of every local shard and of every weight
    gathered inside the forward; no ``g_idx`` may be checked after loading."""
    from fms_acceleration_accelerate_kernels import gptq as gptq_kernels
    from fms_acceleration_accelerate_peft.gptq.packed import PackedGPTQLinear

    from fms_acceleration_accelerate.distributed import (
        RunContext,
        apply_fsdp2_plan,
        collect_contributions,
        fully_shard_kwargs_from_policy,
        plan_fsdp_units,
    )

    fw, model = _build(path)
    check = gptq_kernels.gptq_sequential_g_idx

    def refuse(*args, **kwargs):
        raise AssertionError("a g_idx was checked after loading")

    gptq_kernels.gptq_sequential_g_idx = refuse
    try:
        context = RunContext(distributed_type="FSDP", fsdp_version=2, world_size=WORLD)
        merged = collect_contributions(fw.plugins, model, context)
        apply_fsdp2_plan(
            model, plan_fsdp_units(model, merged, 2), merged, fully_shard_kwargs_from_policy(), shard_root=True
        )
        layers = [m for m in model.modules() if isinstance(m, PackedGPTQLinear)]
        shards = [m.weight._local_tensor.sequential_g_idx for m in layers]
        gathered: list[bool] = []
        for m in layers:
            m.register_forward_hook(lambda mod, args, out: gathered.append(mod.quantized_weight().sequential_g_idx))
        with torch.no_grad():
            logits = model(input_ids=learnable_batches(1)[0].chunk(WORLD)[rank]).logits
    finally:
        gptq_kernels.gptq_sequential_g_idx = check
    return {"layers": len(layers), "shards": shards, "gathered": gathered, "logits": logits}


def _worker(rank: int, path: str, tied_path: str, port: int, out: str) -> None:
    try:
        init_gloo(rank, WORLD, port)
        result = {"rank0_load": _rank0_load(rank, [path, tied_path])}
        result.update(fsdp2=_fsdp2(rank, path), bytes=_all_gather_bytes(path), fsdp1=_fsdp1(rank, path))
        result.update(fsdp1_fp32=_fsdp1(rank, path, torch.float32))
        result.update(fused=_fsdp2_fused(rank, path))
        result.update(sequential=_fsdp2_sequential(rank, tied_path))
        torch.save(result, f"{out}.{rank}")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:
        Path(f"{out}.{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """The GPTQ checkpoints and both ranks' results (one spawn for the tests below)."""
    root = tmp_path_factory.mktemp("gptq_fsdp")
    path, _ = make_gptq_checkpoint(root / "ckpt", GPTQCase(desc_act=True))
    tied, _ = make_gptq_checkpoint(root / "tied", GPTQCase(tie=True, sharded=True, sym=True), seed=3)
    out = str(root / "rank")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")  # the kernels' torch references on CPU (the interpreter is tested elsewhere)
    mp.setenv("OMP_NUM_THREADS", "1")
    try:
        spawn_workers(_worker, (str(path), str(tied), free_port(), out), WORLD, timeout=300.0)
    finally:
        mp.undo()
    errors = [Path(f"{out}.{r}.err") for r in range(WORLD) if Path(f"{out}.{r}.err").exists()]
    assert not errors, errors[0].read_text()
    return path, [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)], tied


@pytest.mark.slow
def test_rank0_reads_the_gptq_checkpoint_and_the_others_receive_it(distributed_run, monkeypatch):
    """Rank 1 never reads a tensor from the files (its reader raises), yet both ranks hold the checkpoint's packed
    tensors bit for bit and compute the logits of a one-process load exactly, tied embeddings re-tied."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path, results, tied = distributed_run
    for index, checkpoint in enumerate((path, tied)):
        model = _framework(no_peft_model=True).model_loader(str(checkpoint), torch_dtype=torch.float32)
        packed = _packed_state(model)
        with torch.no_grad():
            logits = model(input_ids=learnable_batches(1)[0]).logits
        for got in results:
            loaded = got["rank0_load"][index]
            assert loaded["packed"].keys() == packed.keys()
            for key, tensor in packed.items():
                assert loaded["packed"][key].dtype == tensor.dtype and torch.equal(loaded["packed"][key], tensor), key
            torch.testing.assert_close(loaded["logits"], logits, rtol=0, atol=0)
            assert loaded["tied"] == (index == 1)
            # act-order checkpoint: no layer sequential; the other: every layer (rank 1 got them from rank 0)
            assert loaded["flags"] == [index == 1] * 14


@pytest.mark.slow
def test_gptq_fsdp2_two_processes_match_one(distributed_run, monkeypatch):
    """Two ranks against one process on the whole batch, the same LoRA initialisation.

    Bounds, from the arithmetic: the packed bytes each rank gathers are the checkpoint's (checked bit for bit after
    revert), so every forward on the same rows computes the same operations on the same values: the first logits
    are equal exactly. Training: FSDP2 reduce-scatters the mean of the two half-batch float32 gradients, one process
    sums the whole batch at once; the two agree up to float32 re-association (~1e-7 relative, far inside rtol 1e-4)
    at the first step, where the weights are identical. AdamW normalises each gradient by its own running size, so a
    coordinate whose gradient is at the rounding level can move by up to ~lr either way: later steps start from
    weights that differ by that much, so their gradients are compared at 10% of the tensor's largest gradient
    (a rank missing from the reduction or counted twice changes a gradient by 50% to 100%), and the losses
    (~4.6) within 1e-5 (the tiny adapters change them by ~1e-3 per step).
    """
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path, results, _ = distributed_run
    _, model = _build(str(path))
    original = _packed_state(model)
    data = learnable_batches(STEPS)
    with torch.no_grad():
        halves = [model(input_ids=data[0].chunk(WORLD)[r]).logits for r in range(WORLD)]
    losses, grads = _train(model, data, 0, 1)

    for rank, got in enumerate(results):
        fsdp2 = got["fsdp2"]
        assert any("14 GPTQ layers sharded as packed bytes" in n for n in fsdp2["notes"]), fsdp2["notes"]
        torch.testing.assert_close(fsdp2["first_logits"], halves[rank], rtol=0, atol=0)
        # revert gives the original layers their packed tensors back, bit for bit
        assert fsdp2["restored"].keys() == original.keys()
        for key, tensor in original.items():
            assert tensor.dtype == fsdp2["restored"][key].dtype and torch.equal(tensor, fsdp2["restored"][key]), key
        if rank == 0:  # the full state dict is gathered onto rank 0 (cpu_offload)
            assert fsdp2["full_state"].keys() == original.keys()
            for key, tensor in original.items():
                assert torch.equal(fsdp2["full_state"][key], tensor), key
            assert len(fsdp2["lora_state"]) == 2 * 2 * len(TARGETS)
        assert fsdp2["losses"] == pytest.approx(losses, abs=1e-5), (fsdp2["losses"], losses)
        assert fsdp2["grads"][0].keys() == grads[0].keys() and len(grads[0]) == 2 * 2 * len(TARGETS)
        for name, g in grads[0].items():
            torch.testing.assert_close(fsdp2["grads"][0][name], g, rtol=1e-4, atol=1e-7)
        for step in range(1, STEPS):
            for name, g in grads[step].items():
                torch.testing.assert_close(fsdp2["grads"][step][name], g, rtol=0, atol=0.1 * float(g.abs().max()))

        # FSDP1 in float32 (packed tensors as float32 views in the flat parameters): the same arithmetic as one
        # process, through the backward of the GPTQ layers too (the adapters of layer 0 learn from the input
        # gradients of layer 1's GPTQ projections, computed from the saved views of the unsharded flat parameter)
        fsdp1 = got["fsdp1_fp32"]
        torch.testing.assert_close(fsdp1["first_logits"], halves[rank], rtol=0, atol=0)
        assert fsdp1["losses"] == pytest.approx(losses, abs=1e-5), (fsdp1["losses"], losses)

    # each rank holds half of qweight/qzeros/scales and all of g_idx
    gathered = sum(t.numel() * t.element_size() for k, t in original.items() if not k.endswith("g_idx"))
    g_idx = sum(t.numel() * t.element_size() for k, t in original.items() if k.endswith("g_idx"))
    assert [got["fsdp2"]["held"] for got in results] == [gathered // WORLD + g_idx] * WORLD


@pytest.mark.slow
def test_gptq_fsdp2_all_gather_moves_packed_bytes(distributed_run):
    _, results, _ = distributed_run
    counted = results[0]["bytes"]
    print(
        f"GPTQ all-gather: {counted['gathered']} bytes in {counted['calls']} calls; packed bytes "
        f"{counted['expected']}; bf16 {counted['bf16']} ({counted['gathered'] / counted['bf16']:.3f}x)"
    )
    assert counted["calls"] == 14  # one all-gather per GPTQ unit
    assert counted["gathered"] == counted["expected"]  # int32 qweight + qzeros + fp16 scales, nothing else
    # 4 bits, group size 32: 0.5 + 2.5 / 32 bytes per weight against 2
    assert counted["gathered"] <= 0.3 * counted["bf16"]
    assert results[1]["bytes"] == counted


@pytest.mark.slow
def test_gptq_fsdp1_flattens_packed_views_without_a_cast(distributed_run, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path, results, _ = distributed_run
    _, model = _build(str(path), torch.bfloat16)
    original = _packed_state(model)
    data = learnable_batches(1)
    with torch.no_grad(), _bf16_autocast():
        halves = [model(input_ids=data[0].chunk(WORLD)[r]).logits for r in range(WORLD)]
    for rank, got in enumerate(results):
        fsdp1 = got["fsdp1"]
        assert any("FSDP1: 14 GPTQ layers" in n for n in fsdp1["notes"]), fsdp1["notes"]
        # bf16 param_dtype equals the storage dtype: the packed views are gathered as they are; LoRA B starts at 0
        torch.testing.assert_close(fsdp1["first_logits"], halves[rank], rtol=0, atol=0)
        assert all(torch.isfinite(torch.tensor(fsdp1["losses"])))
        for key, tensor in original.items():
            after = fsdp1["after"][key]
            assert after.dtype == tensor.dtype and torch.equal(after, tensor), key
        # the frozen flat parameters (packed views, norms, embeddings) are split over the ranks: each holds its
        # 1/WORLD of them (FSDP1 pads each flat parameter by fewer than WORLD elements), the packed views included
        assert fsdp1["storage"] > fsdp1["frozen"] // 2
        assert 0 <= fsdp1["local_flat"] * WORLD - fsdp1["frozen"] < WORLD * fsdp1["units"]


@pytest.mark.slow
def test_gptq_fsdp2_with_fused_lora_kernels(distributed_run, monkeypatch):
    """The fused LoRA kernels (q/k/v, o, whole gated MLP) over sharded GPTQ bases: patched after wrapping on the
    replaced layers, they compute what the same kernels compute in one process (exactly on the first forward;
    the training losses within the bound argued above)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path, results, _ = distributed_run
    _, model = _build(str(path), fused=FUSED)
    data = learnable_batches(2)
    with torch.no_grad():
        halves = [model(input_ids=data[0].chunk(WORLD)[r]).logits for r in range(WORLD)]
    losses, _ = _train(model, data, 0, 1)
    for rank, got in enumerate(results):
        fused = got["fused"]
        assert fused["patches"].count("kernels.lora_qkv [gptq] (lora)") == 2 * 3, fused["patches"]
        assert any(p.startswith("kernels.lora_mlp_swiglu [gptq]") for p in fused["patches"])
        assert sum(p.startswith("PackedGPTQLinear") for p in fused["patches"]) == 14
        torch.testing.assert_close(fused["first_logits"], halves[rank], rtol=0, atol=0)
        assert fused["losses"] == pytest.approx(losses, abs=1e-5), (fused["losses"], losses)


@pytest.mark.slow
def test_gptq_fsdp2_keeps_the_sequential_layout_flag(distributed_run, monkeypatch):
    """A checkpoint without act-order under FSDP2: every rank's shards and every weight gathered in the forward
    are flagged ``sequential_g_idx`` (decided at load, carried through the conversion and FSDP2's sharding and
    all-gather), and the first forward equals one process's on the same rows."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, results, tied = distributed_run
    _, model = _build(str(tied))
    data = learnable_batches(1)
    with torch.no_grad():
        halves = [model(input_ids=data[0].chunk(WORLD)[r]).logits for r in range(WORLD)]
    for rank, got in enumerate(results):
        sequential = got["sequential"]
        assert sequential["layers"] == 14
        assert sequential["shards"] == [True] * 14 and sequential["gathered"] == [True] * 14
        torch.testing.assert_close(sequential["logits"], halves[rank], rtol=0, atol=0)
