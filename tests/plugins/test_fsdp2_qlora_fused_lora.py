"""The flagship stack on CPU: FSDP2 + bitsandbytes QLoRA with packed 4-bit all-gather + fused LoRA kernels.

* Unit (one process): the ``bnb_4bit_packed`` dequant backend of the bitsandbytes plugin reads a
  ``Packed4bitLinear`` with our own 4-bit kernels, bit-exact with bitsandbytes' dequantize (nf4/fp4, double
  quantisation on/off); ``Packed4bitLinear`` itself (now on our kernels) matches ``Linear4bit`` bit for bit.
* Two gloo processes: both plugins active (``bitsandbytes`` + ``fused_ops_and_kernels`` with ``fused_lora``,
  ``fused_dequant``, ``base_layer: bitsandbytes``); the framework's FSDP2 plan shards a tiny Llama whose 4-bit
  layers became ``Packed4bitLinear``; fused kernels are patched in ``after_prepare`` and really run (patch
  records, kernel call counters, ``Packed4bitLinear.forward`` and bitsandbytes' dequantize never called);
  losses and LoRA gradients equal the one-process run with the same plugins; decoder-layer all-gathers move
  packed bytes (less than the bf16 size of the base weights alone).
"""

from __future__ import annotations

import importlib
import os
import traceback

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from .accelerated_peft.helpers import (  # noqa: E402
    batches,
    free_port,
    init_gloo,
    lora_config,
    prepare_fsdp2,
    spawn_workers,
    tiny_llama,
    train_sharded,
)

STEPS = 3
WORLD = 2
SECTION = {
    "peft": {
        "quantization": {
            "bitsandbytes": {"quant_type": "nf4"},
            "fused_ops_and_kernels": {"fused_lora": True, "fused_dequant": True, "base_layer": "bitsandbytes"},
        }
    }
}


# ----------------------------------------------------------------------------------------------- unit tests
def _bnb_linear(in_features: int, out_features: int, quant_type: str, nested: bool, bias: bool = False):
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
        quant_type=quant_type, quant_storage=torch.float32,
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data.clone() * 4, requires_grad=False, compress_statistics=nested, quant_type=quant_type,
        quant_storage=torch.float32, module=layer,
    )  # fmt: skip
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu").train()  # Params4bit quantises on its first move to a device


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
def test_packed4bit_backend_equals_bitsandbytes_dequant(quant_type, nested):
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize_4bit
    from fms_acceleration_accelerate_foak.dequant_backends import DENSE_BACKEND, FOAK_DEQUANT_BACKENDS
    from fms_acceleration_accelerate_kernels.dequant import Bnb4bitWeight
    from fms_acceleration_accelerate_peft.dequant_backend import PACKED4BIT_BACKEND
    from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear

    from fms_acceleration_accelerate.dequant import DequantBackendRegistry

    layer = _bnb_linear(128, 96, quant_type, nested)
    expected = bnb_dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    packed = Packed4bitLinear.from_bnb(layer, torch.float32)

    backend = PACKED4BIT_BACKEND
    registry = DequantBackendRegistry([("bitsandbytes", (backend,)), ("fused_ops_and_kernels", FOAK_DEQUANT_BACKENDS)])
    assert backend.base_layer == "bitsandbytes" and DENSE_BACKEND.base_layer is None
    assert registry.backend_for(packed).name == backend.name
    with pytest.raises(TypeError, match="no dequant backend handles"):
        # without the plugin's backend nothing reads it
        DequantBackendRegistry.of(*FOAK_DEQUANT_BACKENDS).backend_for(packed)
    weight = registry.read(packed)
    assert isinstance(weight, Bnb4bitWeight) and weight.shape == (96, 128)
    # value equality (FP4 code 8: bitsandbytes' table gives +0.0, our kernels -0.0, which compare equal)
    assert torch.equal(weight.dequantize(), expected)
    assert torch.equal(weight.dequantize_ref(), expected)
    assert torch.equal(weight.dequantize(torch.bfloat16), expected.to(torch.bfloat16))
    assert torch.equal(packed.weight.dequantize(), expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
def test_packed4bit_linear_on_our_kernels_is_bit_exact_with_linear4bit(quant_type, nested, monkeypatch):
    from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear

    layer = _bnb_linear(128, 64, quant_type, nested, bias=True)
    packed = Packed4bitLinear.from_bnb(layer, torch.float32)
    assert packed.quant_code.shape == (16,) and "quant_code" not in packed.state_dict()
    x = torch.randn(3, 5, 128)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = layer(x1)
    expected.sum().backward()

    calls = []
    import bitsandbytes.functional as bnbF

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("Packed4bitLinear must not call bitsandbytes' dequantize")

    monkeypatch.setattr(bnbF, "dequantize_4bit", refuse)
    got = packed(x2)
    got.sum().backward()
    assert not calls
    assert torch.equal(got, expected)
    assert torch.equal(x2.grad, x1.grad)


# ----------------------------------------------------------------------------------------------- distributed
def _framework():
    from fms_acceleration_accelerate import AccelerationFramework

    return AccelerationFramework(SECTION)


def _build(path: str, **loader_kwargs):
    fw = _framework()
    model = fw.model_loader(path, dtype=torch.float32, **loader_kwargs)
    torch.manual_seed(5)
    model, _ = fw.augmentation(model, None, (lora_config(),))
    return fw, model


class _Counters:
    """Call counters installed on the kernel entry points (process-local; the spawned workers exit after)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, key: str, *, refuse: bool = False) -> None:
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            self.calls[key] = self.calls.get(key, 0) + 1
            if refuse:
                raise AssertionError(f"{key} must not run in the fused FSDP2 QLoRA stack")
            return original(*args, **kwargs)

        setattr(owner, attr, counted)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def _install_counters() -> _Counters:
    import bitsandbytes.functional as bnbF
    from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear

    lora = importlib.import_module("fms_acceleration_accelerate_kernels.lora")
    dequant = importlib.import_module("fms_acceleration_accelerate_kernels.dequant")
    counters = _Counters()
    for name in ("lora_qkv", "lora_linear", "lora_mlp_swiglu"):
        counters.wrap(lora, name, name)  # fused_lora.py imports them from the module at call time
    counters.wrap(dequant, "dequantize_4bit", "backend_dequantize_4bit")  # Bnb4bitWeight.dequantize
    counters.wrap(Packed4bitLinear, "forward", "Packed4bitLinear.forward", refuse=True)
    counters.wrap(bnbF, "dequantize_4bit", "bnb.dequantize_4bit", refuse=True)
    return counters


def _fused_records(fw) -> list[str]:
    return [f"{r.target}: {r.replacement}" for r in fw.patches.records if "kernels.lora" in r.replacement]


def _worker(rank: int, path: str, port: int, out: str) -> None:
    from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear, Packed4bitWeight
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    try:
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # as under `accelerate launch` with FSDP
        init_gloo(rank, WORLD, port)
        fw, model = _build(path, low_cpu_mem_usage=True)
        foak = fw.plugin("fused_ops_and_kernels")
        assert not _fused_records(fw), "under FSDP fused LoRA must wait for after_prepare"
        counters = _install_counters()  # before the patches: their forwards bind some kernels when created
        prepare_fsdp2(fw, model, WORLD, shard=True)
        layers = model.get_base_model().model.layers
        assert all(isinstance(layer, FSDPModule) for layer in layers)
        packed_layers = [m for m in model.modules() if isinstance(m, Packed4bitLinear)]
        assert len(packed_layers) == 14
        for m in packed_layers:  # each rank holds a packed 4-bit shard, not a dense weight
            local = m.weight._local_tensor
            assert isinstance(local, Packed4bitWeight) and local.shape[0] * WORLD == m.out_features

        class Counting(DefaultAllGather):
            bytes = 0

            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                Counting.bytes += output_tensor.numel() * output_tensor.element_size()
                return super().__call__(output_tensor, input_tensor, group, async_op)

        layers[0].set_custom_all_gather(Counting())
        try:
            losses, grads = train_sharded(model, batches(STEPS), rank, WORLD, grads_at_step=-1)
        finally:
            counters.restore()
        layer0_bf16 = sum(m.out_features * m.in_features * 2 for m in layers[0].modules() if m in packed_layers)
        if rank == 0:
            torch.save(
                {
                    "losses": losses,
                    "grads": grads,
                    "calls": counters.calls,
                    "records": _fused_records(fw),
                    "patch_counts": dict(foak.patch_counts),
                    "gathered_layer0": Counting.bytes,
                    "bf16_layer0": layer0_bf16,
                },
                out,
            )
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:
        traceback.print_exc()
        raise


def test_fsdp2_packed_qlora_with_fused_lora_two_processes_match_one(tmp_path, monkeypatch):
    path = tiny_llama(tmp_path / "llama")
    out = tmp_path / "rank0.pt"
    spawn_workers(_worker, (str(path), free_port(), str(out)), WORLD, timeout=300.0)
    got = torch.load(out, weights_only=False)

    # one process, the same two plugins, the same conversion and patches (FSDP2 context, nothing sharded)
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # as a launched process before its Accelerator
    fw, model = _build(str(path))
    counters = _install_counters()
    prepare_fsdp2(fw, model, WORLD, shard=False)  # the 2-rank conversion, unsharded
    try:
        losses, grads = train_sharded(model, batches(STEPS), 0, 1, grads_at_step=-1)
    finally:
        counters.restore()

    # the fused kernels were patched over Packed4bitLinear bases and ran; the plain 4-bit path never ran
    for records in (got["records"], _fused_records(fw)):
        assert len(records) == 2 * (3 + 1 + 1), records  # per layer: q, k, v (lora_qkv), o, the SwiGLU MLP
        assert all("[bnb_4bit_packed]" in r for r in records), records
    assert got["patch_counts"] == {"fused_lora": 8, "fused_dequant": 6}
    for calls in (got["calls"], counters.calls):
        forwards = 2 * STEPS  # two decoder layers per forward
        assert calls.get("lora_qkv") == forwards and calls.get("lora_linear") == forwards, calls
        assert calls.get("lora_mlp_swiglu") == forwards, calls
        assert calls.get("backend_dequantize_4bit", 0) >= 7 * forwards, calls  # every projection, forward
        assert "Packed4bitLinear.forward" not in calls and "bnb.dequantize_4bit" not in calls, calls

    # same losses and LoRA gradients as one process
    assert got["losses"] == pytest.approx(losses, abs=1e-5), (got["losses"], losses)
    assert got["grads"].keys() == grads.keys() and len(grads) == 16
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads.values())

    # the fused stack computes the same first loss as plain bitsandbytes QLoRA (Linear4bit, no kernels)
    from .accelerated_peft.helpers import framework as bnb_only_framework

    plain_fw = bnb_only_framework()
    plain = plain_fw.model_loader(str(path), dtype=torch.float32)
    torch.manual_seed(5)
    plain, _ = plain_fw.augmentation(plain, None, (lora_config(),))
    ids = batches(STEPS)[0]
    with torch.no_grad():
        plain_loss = plain(input_ids=ids, labels=ids).loss.item()
    assert got["losses"][0] == pytest.approx(plain_loss, rel=1e-4), (got["losses"][0], plain_loss)

    # decoder-layer all-gathers moved packed 4-bit bytes (+ LoRA, norms): a dense gather of the base weights
    # alone would be >= their bf16 size (fp32 here: twice that), per forward and per backward re-gather
    per_gather = got["gathered_layer0"] / (2 * STEPS)
    print(f"layer-0 all-gather {per_gather:.0f} B vs bf16 base weights {got['bf16_layer0']} B")
    assert 0 < per_gather < 0.5 * got["bf16_layer0"], (per_gather, got["bf16_layer0"])


def test_layers_swapped_after_patching_are_read_by_name_and_reported(tmp_path, monkeypatch):
    """Kernels patched before it was known that FSDP comes (no ACCELERATE_USE_FSDP, no train args), then the
    bitsandbytes plugin swaps the 4-bit layers for Packed4bitLinear in prepare and releases the originals' bytes:
    the fused q/k/v group and the whole-MLP kernel read the current layers by name (same logits as a one-process
    model prepared the usual way), and the single projections left on the replaced objects are reported."""
    from fms_acceleration_accelerate_peft.packed4bit import Packed4bitLinear

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    path = tiny_llama(tmp_path / "llama")
    ids = batches(1)[0]
    fw = _framework()
    model = fw.model_loader(str(path), dtype=torch.float32)
    torch.manual_seed(5)
    # LoRA on q and v: k, o and the MLP are adapter-less 4-bit layers computed by fused dequant
    model, _ = fw.augmentation(model, None, (lora_config(("q_proj", "v_proj")),))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    layers = model.get_base_model().model.layers
    mlp = layers[0].mlp
    old = [m for layer in layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    old += [layer.self_attn.k_proj for layer in layers]
    assert any("lora_mlp_swiglu" in r.replacement for r in fw.patches.records)  # patched before the swap
    with pytest.warns(UserWarning, match="replaced after patching and run unfused"):
        prepare_fsdp2(fw, model, WORLD, shard=False)  # converts every Linear4bit (not sharded: no release)
    assert isinstance(mlp.gate_proj, Packed4bitLinear)
    for m in old:  # as after a release under sharding: a kernel still reading a replaced layer would fail
        m.weight.data = torch.empty(0, dtype=m.weight.dtype)
    counters = _Counters()
    lora = importlib.import_module("fms_acceleration_accelerate_kernels.lora")
    for name in ("lora_qkv", "lora_mlp_swiglu"):
        counters.wrap(lora, name, name)
    counters.wrap(Packed4bitLinear, "forward", "Packed4bitLinear.forward")  # the unfused, replaced projections
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        counters.restore()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters.calls.get("lora_mlp_swiglu", 0) == 2  # the MLP kernel runs on the new layers
    assert counters.calls.get("lora_qkv", 0) == 2  # q/k/v group reads the new k_proj by name
    assert counters.calls.get("Packed4bitLinear.forward", 0) > 0  # what the warning announced
