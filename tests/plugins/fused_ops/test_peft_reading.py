"""Reading PEFT LoRA layers into the tensors the fused kernels take (``fused_lora.peft_lora_projection``) and the
refusals of layers the kernels cannot fuse (``fused_lora.fused_lora_unsupported_reason``)."""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_foak.dequant_backends import FOAK_DEQUANT_BACKENDS
from fms_acceleration_accelerate_foak.fused_lora import (
    base_projection,
    fused_lora_unsupported_reason,
    peft_lora_projection,
)
from fms_acceleration_accelerate_kernels.dequant import Bnb4bitWeight, DenseWeight
from torch import nn

from fms_acceleration_accelerate.dequant import DequantBackendRegistry
from tests.kernels.harness import DTYPE_TOLERANCES, device_for_tests

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

DEVICE = device_for_tests()
REGISTRY = DequantBackendRegistry.of(*FOAK_DEQUANT_BACKENDS, contributor="fused_ops_and_kernels")


def _nf4_layer(in_features: int, out_features: int, seed: int, bias: bool = False) -> nn.Module:
    from tests.kernels.test_lora_fused import make_base

    return make_base("nf4_double_quant", in_features, out_features, bias=bias, seed=seed)


def _tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_lora_linear_against_a_peft_qlora_layer(triton_interpreter):
    from fms_acceleration_accelerate_kernels.lora import lora_linear

    model = nn.Sequential()
    model.add_module("o_proj", _nf4_layer(128, 96, seed=6))
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["o_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.o_proj
    layer.to(torch.bfloat16)  # adapters in bf16 like the base compute dtype

    x = _tokens(2, 9, 128, seed=7).to(DEVICE, torch.bfloat16)
    x1 = x.clone().requires_grad_(True)
    y_peft = layer(x1)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    peft_grads = [layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()]
    layer.zero_grad(set_to_none=True)

    x2 = x.clone().requires_grad_(True)
    spec = peft_lora_projection(layer, REGISTRY)
    assert spec.scaling == 2.0
    assert isinstance(spec.base, Bnb4bitWeight)  # read by the bnb_4bit backend: tensors only from here on
    y = lora_linear(x2, spec.base, spec.lora_A, spec.lora_B, spec.scaling)
    y.backward(g)
    tol = DTYPE_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y, y_peft, atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(x2.grad, x1.grad, atol=4 * tol.atol, rtol=4 * tol.rtol)
    for got, want in zip([layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad], peft_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=4 * tol.atol, rtol=4 * tol.rtol)


def _peft_layer(**lora_kwargs):
    model = nn.Sequential()
    model.add_module("proj", _nf4_layer(64, 32, seed=70))
    config = peft.LoraConfig(r=4, target_modules=["proj"], **lora_kwargs)
    return peft.get_peft_model(model, config).base_model.model.proj


def test_active_dropout_is_refused_with_the_fix_and_eval_mode_is_fused():
    layer = _peft_layer(lora_dropout=0.1)
    layer.train()
    reason = fused_lora_unsupported_reason(layer)
    assert reason is not None and "lora_dropout=0.1" in reason
    with pytest.raises(ValueError, match="Set lora_dropout=0"):
        peft_lora_projection(layer, REGISTRY)
    layer.eval()  # dropout is the identity in eval mode
    assert fused_lora_unsupported_reason(layer) is None
    assert peft_lora_projection(layer, REGISTRY).lora_A is layer.lora_A["default"].weight


def test_dora_and_non_lora_modules_are_refused():
    layer = _peft_layer(use_dora=True)
    assert "DoRA" in fused_lora_unsupported_reason(layer)
    assert "not a PEFT LoRA layer" in fused_lora_unsupported_reason(nn.Linear(4, 4))


def test_base_layer_bias_is_read_with_the_weight():
    """The kernels take no modules: the base layer's bias travels in the projection next to its weight."""
    dense = nn.Linear(16, 8, bias=True).requires_grad_(False)
    p = base_projection(dense, REGISTRY)
    assert isinstance(p.base, DenseWeight) and p.base.weight is dense.weight and p.bias is dense.bias
    model = nn.Sequential()
    model.add_module("proj", _nf4_layer(64, 32, seed=71, bias=True))
    layer = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["proj"])).base_model.model.proj
    p = peft_lora_projection(layer, REGISTRY)
    base = layer.get_base_layer()
    assert isinstance(p.base, Bnb4bitWeight) and p.bias is base.bias and p.lora_B is layer.lora_B["default"].weight


def test_projection_reader_follows_the_adapter_state_and_reads_tensors_every_call():
    """The reader decides once per adapter state (and base layer) but reads the tensors at every call."""
    import gc
    import weakref

    from fms_acceleration_accelerate_foak.fused_lora import ProjectionReader

    layer = _peft_layer(lora_dropout=0.1)
    reader = ProjectionReader(REGISTRY)
    layer.eval()  # dropout is the identity: fusable
    p = reader.read(layer)
    assert p is not None and p.lora_A is layer.lora_A["default"].weight and isinstance(p.base, Bnb4bitWeight)
    layer.train()  # active dropout: not fusable now
    assert reader.read(layer) is None
    layer.eval()
    layer.enable_adapters(False)
    assert reader.read(layer) is None
    layer.enable_adapters(True)
    assert reader.read(layer) is not None
    # a parameter replaced in place of the old one (e.g. by FSDP or a loaded adapter) is the one read
    replacement = torch.nn.Parameter(layer.lora_A["default"].weight.detach().clone())
    layer.lora_A["default"].weight = replacement
    assert reader.read(layer).lora_A is replacement
    layer.scaling["default"] = 3.0  # PEFT's set_scale writes here
    assert reader.read(layer).scaling == 3.0
    # another base layer (e.g. swapped by a plugin) is read by its own backend
    dense = nn.Linear(64, 32).requires_grad_(False)
    layer.base_layer = dense
    p = reader.read(layer)
    assert isinstance(p.base, DenseWeight) and p.base.weight is dense.weight
    # a plain layer: no adapter state, its weight and bias
    plain = nn.Linear(16, 8, bias=True).requires_grad_(False)
    p = reader.read(plain)
    assert p.lora_A is None and p.base.weight is plain.weight and p.bias is plain.bias
    # the reader keeps no module alive
    gone = weakref.ref(plain)
    del plain, p
    gc.collect()
    assert gone() is None
