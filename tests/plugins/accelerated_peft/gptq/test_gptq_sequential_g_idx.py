"""The ``sequential_g_idx`` flag of the GPTQ layers (``g_idx[k] == k // group_size``: no act-order, so the kernels
compute each tile's group from ``k`` and may run the fused dequant-matmul for few rows).

It is decided once: by the loader from each ``g_idx`` as read (never per forward), or at the first use of a layer
built otherwise, and kept on the layer as a plain bool; it follows the layer through FSDP1 parameter storage, the
FSDP2 packed weight (shards, copies, gathers, flatten / unflatten) and revert; ``save_pretrained`` writes only the
checkpoint's tensors and the reload sets it again; a state dict with another ``g_idx`` resets it. The outputs do
not depend on it (Triton interpreter, bit for bit). The two-process paths (rank-0 broadcast, FSDP2 sharding) are
checked in test_gptq_fsdp_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_kernels import gptq as gptq_kernels
from fms_acceleration_accelerate_peft.gptq.config import GPTQLoraConfig
from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear
from fms_acceleration_accelerate_peft.gptq.loader import load_gptq_causal_lm
from fms_acceleration_accelerate_peft.gptq.packed import GPTQPackedWeight, PackedGPTQLinear

from fms_acceleration_accelerate import AccelerationFramework
from fms_acceleration_accelerate.distributed import RunContext, collect_contributions

from .gptq_helpers import GPTQCase, make_gptq_checkpoint, token_batch

LAYERS = 14  # 2 decoder layers x 7 projections


def _load(path, dtype=torch.float32, **kwargs):
    return load_gptq_causal_lm(str(path), GPTQLoraConfig(), dtype=dtype, **kwargs)


def _gptq_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (GPTQLinear, PackedGPTQLinear))}


def _refuse_g_idx_reads(monkeypatch) -> None:
    """From here on, any check of a ``g_idx`` fails the test (it must have been decided before)."""

    def refuse(*args, **kwargs):
        raise AssertionError("g_idx read again after loading")

    monkeypatch.setattr(gptq_kernels, "gptq_sequential_g_idx", refuse)


@pytest.fixture
def counted_g_idx_reads(monkeypatch) -> list[int]:
    """Counts the checks of a ``g_idx`` (each one a device read on GPU)."""
    calls: list[int] = []
    real = gptq_kernels.gptq_sequential_g_idx

    def counting(g_idx, group_size):
        calls.append(int(g_idx.numel()))
        return real(g_idx, group_size)

    monkeypatch.setattr(gptq_kernels, "gptq_sequential_g_idx", counting)
    return calls


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("gptq_seq")
    return {
        "seq": make_gptq_checkpoint(root / "seq", GPTQCase())[0],
        "act": make_gptq_checkpoint(root / "act", GPTQCase(desc_act=True))[0],
    }


@pytest.mark.parametrize(
    "case,expected",
    [
        (GPTQCase(), True),
        (GPTQCase(drop_g_idx=True), True),  # g_idx built by the loader as k // group_size
        (GPTQCase(bits=8, group_size=-1, desc_act=True, sharded=True), True),  # one group: act-order changes nothing
        (GPTQCase(lm_head=True, checkpoint_format="gptq_v2"), True),
        (GPTQCase(desc_act=True), False),
        (GPTQCase(bits=2, sym=True, desc_act=True, sharded=True, checkpoint_format="gptq_v2"), False),
    ],
    ids=lambda v: v.id if isinstance(v, GPTQCase) else str(v),
)
def test_loader_sets_the_flag_on_every_layer(tmp_path, case, expected, monkeypatch):
    path, _ = make_gptq_checkpoint(tmp_path / "ckpt", case)
    model = _load(path, dtype=torch.bfloat16)
    layers = _gptq_layers(model)
    assert len(layers) == LAYERS + case.lm_head
    assert {n: m.sequential_g_idx for n, m in layers.items()} == dict.fromkeys(layers, expected)
    for layer in layers.values():  # it agrees with the data
        assert gptq_kernels.gptq_sequential_g_idx(layer.g_idx, layer.group_size) is expected
    _refuse_g_idx_reads(monkeypatch)  # the forward only reads the flag
    weights = []
    for layer in layers.values():
        layer.register_forward_hook(lambda m, i, o: weights.append(m.quantized_weight()))
    with torch.no_grad():
        model(token_batch())
    assert len(weights) == LAYERS + case.lm_head and all(w.sequential_g_idx is expected for w in weights)


def test_a_layer_built_otherwise_decides_once_at_its_first_use(ckpts, counted_g_idx_reads):
    for key, expected in (("seq", True), ("act", False)):
        loaded = _load(ckpts[key]).model.layers[0].mlp.down_proj
        counted_g_idx_reads.clear()
        layer = GPTQLinear(
            loaded.in_features, loaded.out_features, bits=4, group_size=32, checkpoint_format="gptq", bias=False,
            compute_dtype=torch.float32,
        )  # fmt: skip
        assert layer.sequential_g_idx is None
        layer.load_state_dict(loaded.state_dict())
        assert layer.sequential_g_idx is None
        x = torch.randn(3, layer.in_features)
        outputs = [layer(x) for _ in range(3)]
        assert counted_g_idx_reads == [layer.in_features]  # one check, then the kept bool
        assert layer.sequential_g_idx is expected and layer.quantized_weight().sequential_g_idx is expected
        assert all(torch.equal(y, loaded(x)) for y in outputs)
        # the FSDP2 layer of a weight that came without the flag: the same, on its first forward
        weight = GPTQPackedWeight.from_checkpoint_layout(
            *(loaded.packed_tensors()[k] for k in ("qweight", "qzeros", "scales", "g_idx")),
            dtype=torch.float32, bits=4, group_size=32, checkpoint_format="gptq",
        )  # fmt: skip
        packed = PackedGPTQLinear(weight, None, torch.float32)
        assert weight.sequential_g_idx is None and packed.sequential_g_idx is None
        counted_g_idx_reads.clear()
        assert all(torch.equal(packed(x), outputs[0]) for _ in range(3))
        assert counted_g_idx_reads == [layer.in_features] and packed.sequential_g_idx is expected
    # a layer on meta (a skeleton) cannot tell: unknown, nothing kept
    skeleton = GPTQLinear(64, 64, bits=4, group_size=32, checkpoint_format="gptq", bias=False,
                          compute_dtype=torch.float32, device="meta")  # fmt: skip
    assert skeleton.resolve_sequential_g_idx() is False and skeleton.sequential_g_idx is None


def test_a_state_dict_with_another_g_idx_resets_the_flag(ckpts):
    seq = _load(ckpts["seq"]).model.layers[0].mlp.down_proj
    act = _load(ckpts["act"]).model.layers[0].mlp.down_proj
    x = torch.randn(4, seq.in_features)
    assert seq.sequential_g_idx is True and act.sequential_g_idx is False
    seq.load_state_dict(act.state_dict())  # act-order tensors into a layer flagged sequential
    assert seq.sequential_g_idx is None
    assert torch.equal(seq(x), act(x)) and seq.sequential_g_idx is False
    # the FSDP2 layer takes the flag of the weight it loads
    packed = PackedGPTQLinear.from_gptq_linear(_load(ckpts["seq"]).model.layers[0].mlp.down_proj)
    assert packed.sequential_g_idx is True
    packed.load_state_dict(PackedGPTQLinear.from_gptq_linear(act).state_dict())
    assert packed.sequential_g_idx is False and packed.weight.sequential_g_idx is False
    assert torch.equal(packed(x), act(x))


def test_save_pretrained_writes_no_flag_and_the_reload_sets_it(ckpts, tmp_path):
    model = _load(ckpts["seq"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "again")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "again" / "model.safetensors"), framework="pt") as handle:
        names = {key.rsplit(".", 1)[1] for key in handle.keys() if ".mlp." in key or ".self_attn." in key}
    assert names == {"qweight", "qzeros", "scales", "g_idx"}  # the checkpoint's tensors, nothing else
    again = _load(tmp_path / "again", dtype=torch.bfloat16)
    assert all(m.sequential_g_idx is True for m in _gptq_layers(again).values())


def _framework_model(path, dtype=torch.float32):
    from peft import LoraConfig

    fw = AccelerationFramework({"plugins": {"peft": {"quantization": {"auto_gptq": {"from_quantized": True}}}}})
    model = fw.model_loader(str(path), torch_dtype=dtype)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM")
    model, _ = fw.augmentation(model, None, (lora,))
    return fw, model


@pytest.mark.parametrize("key,expected", [("seq", True), ("act", False)])
def test_the_flag_survives_fsdp2_conversion_sharding_ops_and_revert(ckpts, key, expected, monkeypatch):
    fw, model = _framework_model(ckpts[key])
    _refuse_g_idx_reads(monkeypatch)
    collect_contributions(fw.plugins, model, RunContext(distributed_type="FSDP", fsdp_version=2, world_size=2))
    layers = _gptq_layers(model)
    assert len(layers) == LAYERS and all(isinstance(m, PackedGPTQLinear) for m in layers.values())
    for layer in layers.values():
        assert layer.sequential_g_idx is expected and layer.weight.sequential_g_idx is expected
        assert layer.quantized_weight().sequential_g_idx is expected
    weight = next(iter(layers.values())).weight
    # what FSDP2 does with the parameter: row shards, a padded shard filled by copy_, flat views, a logical dtype
    halves = torch.chunk(weight, 2, dim=0)
    shard = weight.new_zeros(tuple(halves[1].shape))
    shard.narrow(0, 0, halves[1].shape[0]).copy_(halves[1])
    inner, meta = weight.__tensor_flatten__()
    rebuilt = GPTQPackedWeight.__tensor_unflatten__({n: getattr(weight, n) for n in inner}, meta, None, None)
    derived = [*halves, shard, shard.view(-1), weight.to(torch.bfloat16), weight.detach(), weight.clone(), rebuilt]
    assert all(w.sequential_g_idx is expected for w in derived)
    assert all(w.gptq_weight().sequential_g_idx is expected for w in derived)
    assert f"sequential_g_idx={expected}" in repr(weight)
    fw.revert()
    restored = _gptq_layers(model)
    assert all(isinstance(m, GPTQLinear) and m.sequential_g_idx is expected for m in restored.values())


@pytest.mark.parametrize("key,expected", [("seq", True), ("act", False)])
def test_the_flag_survives_fsdp1_parameter_storage_and_revert(ckpts, key, expected, monkeypatch):
    fw, model = _framework_model(ckpts[key], torch.bfloat16)
    _refuse_g_idx_reads(monkeypatch)
    collect_contributions(
        fw.plugins, model, RunContext(distributed_type="FSDP", fsdp_version=1, world_size=2, mixed_precision="bf16")
    )
    layers = _gptq_layers(model)
    assert len(layers) == LAYERS and all(m.storage_dtype == torch.bfloat16 for m in layers.values())
    assert all(m.sequential_g_idx is expected for m in layers.values())
    assert all(m.quantized_weight().sequential_g_idx is expected for m in layers.values())
    for layer in layers.values():  # and back to buffers
        assert GPTQLinear.with_buffer_storage(layer).sequential_g_idx is expected
    fw.revert()
    assert all(m.sequential_g_idx is expected and m.storage_dtype is None for m in _gptq_layers(model).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outputs_do_not_depend_on_the_flag(ckpts, dtype, monkeypatch):
    """Triton interpreter: the flagged model (groups computed from k) gives the logits and input gradients of the
    same model with every flag off (g_idx read) bit for bit, and so does the FSDP2 packed layer (transposed views
    read in place)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _load(ckpts["seq"], dtype=dtype)
    layers = _gptq_layers(model)
    ids = token_batch()

    def logits_and_grad():
        embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        (grad,) = torch.autograd.grad(logits.float().square().mean(), embeds)
        return logits.detach(), grad

    assert all(m.sequential_g_idx is True for m in layers.values())
    flagged = logits_and_grad()
    for layer in layers.values():
        layer.sequential_g_idx = False
    unflagged = logits_and_grad()
    assert torch.equal(flagged[0], unflagged[0]) and torch.equal(flagged[1], unflagged[1])
    layer = model.model.layers[1].mlp.down_proj
    layer.sequential_g_idx = True
    packed = PackedGPTQLinear.from_gptq_linear(layer)
    assert packed.sequential_g_idx is True and not packed.quantized_weight().qweight.is_contiguous()
    x = torch.randn(2, 9, layer.in_features, dtype=dtype)
    assert torch.equal(packed(x), layer(x))
    reference = torch.nn.functional.linear(x, layer.quantized_weight().dequantize_ref())
    assert torch.equal(packed(x), reference)
