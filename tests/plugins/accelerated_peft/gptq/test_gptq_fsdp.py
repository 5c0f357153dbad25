"""The GPTQ plugin's FSDP contribution in one process: the FSDP2 packed layer and its tensor subclass, the FSDP1
parameter storage, what the contribution asks of the framework, and revert (the two-process runs are in
test_gptq_fsdp_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear
from fms_acceleration_accelerate_peft.gptq.packed import GPTQPackedWeight, PackedGPTQLinear, shardable_rows

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework
from fms_acceleration_accelerate.distributed import (
    RunContext,
    check_keep_dtype_fsdp1,
    collect_contributions,
    plan_fsdp_units,
)

from .gptq_helpers import GPTQCase, make_gptq_checkpoint, token_batch

PACKED = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path, _ = make_gptq_checkpoint(tmp_path_factory.mktemp("gptq") / "ckpt", GPTQCase(desc_act=True))
    return path


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _build(path: Path, dtype: torch.dtype = torch.float32, **options):
    from peft import LoraConfig

    fw = AccelerationFramework(
        {"plugins": {"peft": {"quantization": {"auto_gptq": {"from_quantized": True, **options}}}}}
    )
    model = fw.model_loader(str(path), torch_dtype=dtype)
    if options.get("no_peft_model"):
        return fw, model
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM")
    model, _ = fw.augmentation(model, None, (lora,))
    return fw, model


def _fsdp(version: int, world: int = 2) -> RunContext:
    return RunContext(distributed_type="FSDP", fsdp_version=version, world_size=world)


def _one_layer(path: Path, dtype: torch.dtype = torch.float32) -> GPTQLinear:
    _, model = _build(path, dtype, no_peft_model=True)
    return model.model.layers[0].mlp.down_proj  # K 128: 4 groups, act-order g_idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_layer_computes_what_gptq_linear_computes(ckpt, reference_kernels, dtype):
    layer = _one_layer(ckpt, dtype)
    packed = PackedGPTQLinear.from_gptq_linear(layer)
    assert isinstance(packed.weight, GPTQPackedWeight) and not packed.weight.requires_grad
    assert tuple(packed.weight.shape) == (layer.out_features, layer.in_features) and packed.weight.dtype == dtype
    torch.testing.assert_close(packed.dequantize(), layer.dequantize(), rtol=0, atol=0)
    x = torch.randn(3, 5, layer.in_features, dtype=dtype, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = packed(x2)
    (gx2,) = torch.autograd.grad(y2.sum(), x2)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(gx2, gx, rtol=0, atol=0)
    # the checkpoint layout comes back bit for bit
    back = packed.weight.checkpoint_layout()
    for name, tensor in layer.packed_tensors().items():
        assert torch.equal(back[name], tensor), name


def test_packed_layer_in_the_triton_interpreter_reads_transposed_views(ckpt, monkeypatch):
    """The kernels get ``qweight`` ``[K / pf, N]`` as a transposed view of the row-major ``qweight_t``; the Triton
    dequant (interpreter) and the fused small-batch matmul give what the row-major layer gives."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = _one_layer(ckpt, torch.float16)
    packed = PackedGPTQLinear.from_gptq_linear(layer)
    weight = packed.quantized_weight()
    assert not weight.qweight.is_contiguous()
    torch.testing.assert_close(packed.dequantize(), layer.dequantize(), rtol=0, atol=0)
    x = torch.randn(2, layer.in_features, dtype=torch.float16)
    torch.testing.assert_close(packed(x), layer(x), rtol=0, atol=0)


def test_sharding_ops_cut_whole_zero_point_words(ckpt):
    layer = _one_layer(ckpt)  # out 64, 4-bit: pf 8
    weight = PackedGPTQLinear.from_gptq_linear(layer).weight
    full = weight.dequantize()
    halves = torch.chunk(weight, 2, dim=0)  # what FSDP2 does with the parameter
    assert [type(h) for h in halves] == [GPTQPackedWeight] * 2
    assert all(h.rows == 32 and torch.equal(h.g_idx, weight.g_idx) for h in halves)
    torch.testing.assert_close(torch.cat([h.dequantize() for h in halves]), full, rtol=0, atol=0)
    # new_zeros + narrow + copy_ (FSDP2's padded shard), view(-1) (its flat data): the rows survive
    shard = weight.new_zeros((32, layer.in_features))
    shard.narrow(0, 0, 32).copy_(halves[1])
    torch.testing.assert_close(shard.dequantize(), full[32:], rtol=0, atol=0)
    assert shard.view(-1).shape == (32 * layer.in_features,)
    with pytest.raises(ValueError, match="whole groups of 8 output channels"):
        weight[4:12]
    with pytest.raises(ValueError, match="whole groups of 8"):
        weight.new_zeros((4, layer.in_features))
    with pytest.raises(TypeError, match="no quantization"):
        shard.copy_(torch.zeros(32, layer.in_features))
    with pytest.raises(NotImplementedError, match="gptq_weight"):
        weight + 1
    # a dtype change is logical only: the packed integers and scales are never cast
    as_bf16 = weight.to(torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and as_bf16.scales_t.dtype == torch.float16
    assert torch.equal(as_bf16.qweight_t, weight.qweight_t)
    assert shardable_rows(64, 4, 8) and not shardable_rows(64, 4, 16) and not shardable_rows(64, 4, 3)


def test_fsdp2_contribution_converts_shardable_layers_and_reverts(ckpt, reference_kernels):
    fw, model = _build(ckpt)
    ids = token_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    originals = {n: m.packed_tensors() for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    originals = {n: {k: v.clone() for k, v in t.items()} for n, t in originals.items()}
    merged = collect_contributions(fw.plugins, model, _fsdp(2))
    assert merged.trainable_dtype == torch.float32 and merged.reduce_dtype == torch.float32
    assert sum(isinstance(m, PackedGPTQLinear) for m in model.modules()) == 14
    assert not any(isinstance(m, GPTQLinear) for m in model.modules())
    assert any("14 GPTQ layers sharded as packed bytes" in n for n in merged.notes), merged.notes
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    records = [r for r in fw.patches.records if r.replacement.startswith("PackedGPTQLinear")]
    assert len(records) == 14  # through the patch recorder (summary table, revert)
    assert fw.revert() == 14
    restored = {n: m.packed_tensors() for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    assert restored.keys() == originals.keys()
    for name, tensors in originals.items():
        for key, tensor in tensors.items():
            assert torch.equal(restored[name][key], tensor), (name, key)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_fsdp2_layers_that_do_not_split_stay_replicated(ckpt):
    fw, model = _build(ckpt)
    # 8 ranks: k_proj / v_proj (32 outputs) would get 4 channels each, half a zero-point word of 8
    merged = collect_contributions(fw.plugins, model, _fsdp(2, world=8))
    kept = [n for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
    assert len(kept) == 4 and all(n.endswith(("k_proj", "v_proj")) for n in kept)
    assert sum(isinstance(m, PackedGPTQLinear) for m in model.modules()) == 10
    assert any("4 left replicated" in n for n in merged.notes), merged.notes


def test_fsdp2_on_one_rank_and_no_fsdp_change_nothing(ckpt):
    fw, model = _build(ckpt)
    assert fw.plugins[0].prepare_contribution(model, RunContext()) is None
    merged = collect_contributions(fw.plugins, model, _fsdp(2, world=1))
    assert any("FSDP2 on one rank" in n for n in merged.notes), merged.notes
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14 and len(fw.patches.records) == 0


def test_fsdp1_parameter_storage_views_the_packed_bytes(ckpt, reference_kernels):
    layer = _one_layer(ckpt, torch.bfloat16)
    tensors = {k: v.clone() for k, v in layer.packed_tensors().items()}
    pointers = {k: getattr(layer, k).data_ptr() for k in PACKED}
    flat = GPTQLinear.with_parameter_storage(layer, torch.bfloat16)
    assert dict(flat.named_buffers()) == {}
    params = dict(flat.named_parameters())
    assert set(params) == set(PACKED)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params.values())
    assert {k: params[k].data_ptr() for k in PACKED} == pointers  # views of the same memory, no copy
    assert params["qweight"].shape == (layer.qweight.shape[0], 2 * layer.qweight.shape[1])
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(flat(x), layer(x), rtol=0, atol=0)
    # the state dict is the checkpoint's (int32 / float16 under the checkpoint names), and loads back bit for bit
    state = flat.state_dict()
    for key, tensor in tensors.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    other = GPTQLinear.with_parameter_storage(_one_layer(ckpt, torch.bfloat16), torch.bfloat16)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(state)
    for key, tensor in other.packed_tensors().items():
        assert torch.equal(tensor, tensors[key]), key
    # a float32 storage views float16 scales two to a word
    wide = GPTQLinear.with_parameter_storage(layer, torch.float32)
    assert wide.scales.shape == (layer.scales.shape[0], layer.scales.shape[1] // 2)
    torch.testing.assert_close(wide(x.float()), layer(x.float()), rtol=0, atol=0)


def test_fsdp1_contribution_declares_the_packed_views_keep_dtype(ckpt, reference_kernels):
    fw, model = _build(ckpt, torch.bfloat16)
    ids = token_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged = collect_contributions(fw.plugins, model, _fsdp(1))
    assert merged.trainable_dtype == torch.float32 and merged.reduce_dtype == torch.float32
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 14 and all(m.storage_dtype == torch.bfloat16 for m in layers)
    packed = [n for n, p in model.named_parameters() if merged.keeps_dtype(n, p)]
    assert len(packed) == 14 * 4 and all(n.rsplit(".", 1)[1] in PACKED for n in packed)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    check_keep_dtype_fsdp1(model, merged, torch.bfloat16)  # storage == param_dtype: gathered as it is
    with pytest.raises(AccelerationConfigError, match="corrupting"):
        check_keep_dtype_fsdp1(model, merged, torch.float16)  # a cast would scramble the int32 words
    plan = plan_fsdp_units(model, merged, 1)
    assert not plan.mixed_units
    layer_unit = next(u for u in plan.units if u.reason == "decoder layer")
    assert any(n.endswith("q_proj.base_layer.qweight") for n in layer_unit.frozen) and not layer_unit.trainable
    assert any(u.reason == "trainable split" and "lora_A" in u.name for u in plan.units)
    assert fw.revert() == 14
    assert all(m.storage_dtype is None for m in model.modules() if isinstance(m, GPTQLinear))
    assert not [n for n, p in model.named_parameters() if n.rsplit(".", 1)[1] in PACKED]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_fused_dequant_backend_reads_the_fsdp_layers(ckpt, reference_kernels):
    from fms_acceleration_accelerate_peft.gptq.dequant_backend import GPTQ_BACKEND

    layer = _one_layer(ckpt)
    expected = layer.dequantize()
    for module in (PackedGPTQLinear.from_gptq_linear(layer), GPTQLinear.with_parameter_storage(layer, torch.float32)):
        assert isinstance(module, GPTQ_BACKEND.module_types)
        torch.testing.assert_close(GPTQ_BACKEND.read(module).dequantize(), expected, rtol=0, atol=0)


def test_load_staging_keeps_the_model_in_host_memory_under_fsdp2(ckpt, monkeypatch):
    """Under FSDP2 with several processes on GPUs the model waits in host memory (FSDP2 then moves one unit at a
    time); the GPU named by the run context is never touched, so this runs on a machine without one."""
    from fms_acceleration_accelerate_peft.gptq import loader
    from fms_acceleration_accelerate_peft.gptq.config import GPTQLoraConfig

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    resolve = loader.resolve_load_staging
    auto, device, host = GPTQLoraConfig(), GPTQLoraConfig(load_staging="device"), GPTQLoraConfig(load_staging="cpu")
    assert resolve(auto, world_size=2, device=gpu, fsdp_version=2) == cpu
    assert resolve(auto, world_size=1, device=gpu, fsdp_version=2) == gpu
    assert resolve(auto, world_size=2, device=gpu, fsdp_version=1) == gpu
    assert resolve(auto, world_size=2, device=gpu, fsdp_version=None) == gpu
    assert resolve(device, world_size=2, device=gpu, fsdp_version=2) == gpu
    assert resolve(host, world_size=1, device=gpu, fsdp_version=None) == cpu
    assert resolve(host, world_size=2, device=cpu, fsdp_version=2) == cpu

    context = RunContext(distributed_type="FSDP", fsdp_version=2, device=gpu, world_size=2)
    model = loader.load_gptq_causal_lm(str(ckpt), auto, run_context=context, torch_dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device == cpu for t in tensors)

    monkeypatch.setattr(loader, "load_tensors", lambda *a, **k: pytest.fail("read a tensor before refusing"))
    with pytest.raises(AccelerationConfigError, match=r"load_staging: cpu needs FSDP2(?s:.*)load_staging: auto"):
        loader.load_gptq_causal_lm(
            str(ckpt), host, run_context=RunContext(distributed_type="FSDP", fsdp_version=1, device=gpu)
        )


def test_load_staging_value_is_checked():
    with pytest.raises(AccelerationConfigError, match="load_staging"):
        AccelerationFramework({"plugins": {"peft": {"quantization": {"auto_gptq": {"load_staging": "gpu"}}}}})
