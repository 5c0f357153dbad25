"""Dequant backends: the fused-ops plugin's own (bitsandbytes ``Linear4bit``, dense ``nn.Linear``), the registry the
framework builds from every plugin's ``dequant_backends()``, and a GPTQ-shaped format (packed int32 ``qweight`` /
``qzeros``, fp16 ``scales``, int32 ``g_idx``) contributed by a test plugin and run by the fused kernels."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin
from fms_acceleration_accelerate_foak.dequant_backends import BNB_4BIT_BACKEND, DENSE_BACKEND, FOAK_DEQUANT_BACKENDS
from fms_acceleration_accelerate_kernels.dequant import Bnb4bitWeight, DenseWeight, QuantizedWeight
from torch import nn

from fms_acceleration_accelerate import AccelerationFramework, AccelerationPlugin, NoOptions, PluginRegistry
from fms_acceleration_accelerate.dequant import DequantBackend, DequantBackendRegistry
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .tiny_models import assert_grads_close, loss_and_grads, tiny_batch, tiny_model

REGISTRY = DequantBackendRegistry.of(*FOAK_DEQUANT_BACKENDS, contributor="fused_ops_and_kernels")


def _bnb_linear(*args, **kwargs):
    pytest.importorskip("bitsandbytes")
    from tests.kernels.test_nf4_dequant import make_bnb_linear

    return make_bnb_linear(*args, **kwargs)


# ------------------------------------------------------------------------------------- the plugin's backends


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_backend_dispatch_and_dequant_of_linear4bit(quant_type, nested):
    import bitsandbytes.functional as bnbF

    layer, dense = _bnb_linear(128, 96, quant_type=quant_type, nested=nested)
    assert REGISTRY.backend_for(layer) is BNB_4BIT_BACKEND
    weight = REGISTRY.read(layer)
    assert isinstance(weight, Bnb4bitWeight) and isinstance(weight, QuantizedWeight)
    assert weight.shape == (96, 128) and weight.dtype == torch.bfloat16
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(REGISTRY.dequantize(layer), expected)
    assert torch.equal(weight.dequantize_ref(), expected)
    # a 4-bit weight is close to, but not equal to, the weight it came from
    err = (expected.float() - dense.weight.float()).abs().max().item()
    assert 0 < err < 0.25 * dense.weight.abs().max().item()


def test_backend_reads_state_from_module_when_param_lost_it():
    # FSDP can turn Params4bit into a plain parameter: the state then lives only on the module
    layer, _ = _bnb_linear(64, 32)
    expected = REGISTRY.dequantize(layer)
    plain = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    layer.weight = plain
    assert getattr(layer.weight, "quant_state", None) is None and layer.quant_state is not None
    assert torch.equal(REGISTRY.dequantize(layer), expected)


def test_unquantised_linear4bit_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # still on the "meta-free" CPU, not quantised
    with pytest.raises(ValueError, match="not quantised yet"):
        REGISTRY.read(layer)


def test_dense_backend_is_a_no_op_view():
    layer = nn.Linear(64, 32, dtype=torch.bfloat16)
    assert REGISTRY.backend_for(layer) is DENSE_BACKEND
    w = REGISTRY.dequantize(layer)
    assert w.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(REGISTRY.dequantize(layer, dtype=torch.float32), layer.weight.float())
    int_layer = nn.Linear(4, 4)
    int_layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert REGISTRY.find(int_layer) is None  # not a float weight: the dense backend does not accept it


def test_peft_wrapper_is_unwrapped_to_its_base_layer():
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    layer, _ = _bnb_linear(64, 32)
    model.add_module("proj", layer)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["proj"]))
    lora_layer = model.base_model.model.proj
    assert REGISTRY.backend_for(lora_layer) is BNB_4BIT_BACKEND
    assert torch.equal(REGISTRY.dequantize(lora_layer), REGISTRY.dequantize(layer))


def test_unknown_layer_type_lists_backends_and_extra_backend_wins_first():
    class PackedLinear(nn.Module):  # stands in for a future format, e.g. GPTQ
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(4, 8, dtype=torch.int32))

    layer = PackedLinear()
    with pytest.raises(TypeError, match=r"tried: bnb_4bit, dense"):
        REGISTRY.backend_for(layer)
    ones = DenseWeight(torch.ones(4, 8))
    extra = DequantBackend(name="packed", module_types=(PackedLinear,), read=lambda m: ones, weight_format=DenseWeight)
    registry = DequantBackendRegistry.of(extra, *FOAK_DEQUANT_BACKENDS)
    assert registry.backend_for(layer) is extra
    assert torch.equal(registry.dequantize(layer), torch.ones(4, 8))
    # an nn.Linear still reaches the dense backend behind the new entry
    assert registry.backend_for(nn.Linear(8, 4)) is DENSE_BACKEND


def test_string_module_types_never_import_their_package(monkeypatch):
    """``bnb_4bit`` names bitsandbytes' class as a string: without bitsandbytes imported nothing matches it and
    asking does not import it."""
    import sys

    monkeypatch.delitem(sys.modules, "bitsandbytes.nn", raising=False)
    assert not BNB_4BIT_BACKEND.handles(nn.Linear(4, 4))
    assert "bitsandbytes.nn" not in sys.modules


# --------------------------------------------------------------------------------- a GPTQ-shaped weight format


@dataclass(frozen=True)
class GPTQWeight:
    """Test-only GPTQ-style format: 4-bit codes packed 8 per int32 along the input dim (``qweight`` (in/8, out)),
    zero points packed along the output dim (``qzeros`` (groups, out/8)), fp16 ``scales`` (groups, out) and the
    group of each input channel (``g_idx`` (in,) int32); ``w[o, i] = scales[g, o] * (q[i, o] - z[g, o])``."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.scales.shape[1]), int(self.g_idx.shape[0]))

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        shifts = torch.arange(0, 32, self.bits, device=self.device, dtype=torch.int32)
        mask = (1 << self.bits) - 1
        q = ((self.qweight.unsqueeze(1) >> shifts[None, :, None]) & mask).reshape(-1, self.qweight.shape[1])
        z = ((self.qzeros.unsqueeze(2) >> shifts[None, None, :]) & mask).reshape(self.qzeros.shape[0], -1)
        g = self.g_idx.long()
        w = (self.scales[g].float() * (q - z[g]).float()).t().contiguous().to(dtype or self.dtype)
        if out is not None:
            out.copy_(w)
            return out
        return w

    def dequantize_ref(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dequantize(dtype)


def _pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack 4-bit values (0..15) 8 per int32 along ``dim`` (value j of a word in bits 4j..4j+3)."""
    values = values.movedim(dim, -1).to(torch.int64)
    words = values.reshape(*values.shape[:-1], -1, 8)
    packed = (words << (4 * torch.arange(8))).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement int32
    return packed.to(torch.int32).movedim(-1, dim)


class GPTQLinear(nn.Module):
    """A frozen GPTQ-style linear layer: int32 ``qweight``/``qzeros``/``g_idx`` and fp16 ``scales`` buffers."""

    def __init__(self, linear: nn.Linear, group_size: int = 16) -> None:
        super().__init__()
        w = linear.weight.detach().float().t()  # (in, out)
        n_in, n_out = w.shape
        g_idx = torch.arange(n_in, dtype=torch.int32) // group_size
        groups = w.reshape(-1, group_size, n_out)
        lo, hi = groups.amin(1), groups.amax(1)
        scales = ((hi - lo) / 15).clamp_min(1e-6).to(torch.float16)
        zeros = torch.round(-lo / scales.float()).clamp(0, 15)
        q = torch.round(w / scales.float()[g_idx.long()] + zeros[g_idx.long()]).clamp(0, 15)
        self.register_buffer("qweight", _pack_int4(q, 0))
        self.register_buffer("qzeros", _pack_int4(zeros, 1))
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.bias = None

    def weight_format(self) -> GPTQWeight:
        return GPTQWeight(self.qweight, self.qzeros, self.scales, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_format().dequantize(x.dtype))


GPTQ_BACKEND = DequantBackend(
    name="gptq",
    module_types=(GPTQLinear,),
    read=GPTQLinear.weight_format,
    weight_format=GPTQWeight,
    base_layer="auto_gptq",
)


class FakeGPTQPlugin(AccelerationPlugin):
    """Stands in for a GPTQ plugin: contributes its backend (it loads nothing here)."""

    name = "fake_gptq"
    configuration_and_paths = ("peft.quantization.fake_gptq",)
    config_class = NoOptions
    order = 100

    def dequant_backends(self) -> tuple[DequantBackend, ...]:
        return (GPTQ_BACKEND,)


def _gptq_framework(section: dict) -> AccelerationFramework:
    body = {"peft": {"quantization": {"fake_gptq": {}, "fused_ops_and_kernels": section}}}
    return AccelerationFramework(body, registry=PluginRegistry([FakeGPTQPlugin, FusedOpsAndKernelsPlugin]))


def test_gptq_format_round_trips_and_runs_through_the_fused_kernels():
    from fms_acceleration_accelerate_kernels.lora import lora_linear, lora_linear_ref

    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=False)
    layer = GPTQLinear(dense)
    registry = DequantBackendRegistry(
        [("fake_gptq", (GPTQ_BACKEND,)), ("fused_ops_and_kernels", FOAK_DEQUANT_BACKENDS)]
    )
    weight = registry.read(layer)
    assert isinstance(weight, GPTQWeight) and weight.shape == (48, 64)
    assert weight.qweight.dtype == weight.qzeros.dtype == weight.g_idx.dtype == torch.int32
    assert (weight.dequantize().float() - dense.weight).abs().max() < 0.1  # 4-bit round trip
    x = torch.randn(5, 64, requires_grad=True)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1
    a1, b1, a2, b2 = (t.clone().requires_grad_(True) for t in (a, b, a, b))
    y = lora_linear(x, weight, a1, b1, 2.0)
    y_ref = lora_linear_ref(x, weight, a2, b2, 2.0)
    torch.testing.assert_close(y, layer(x) + 2.0 * (x @ a.t()) @ b.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_framework_registry_orders_plugins_and_a_gptq_plugin_feeds_fused_dequant():
    """The registry the framework owns lists the GPTQ plugin's backend first (run order), ``base_layer:
    auto_gptq`` is accepted because a plugin contributes a backend of that format, and fused dequant computes the
    GPTQ MLPs of a tiny Llama with the fused MLP kernel, matching the layers' own forwards."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, GPTQLinear(getattr(layer.mlp, name)))
    batch = tiny_batch()
    expected, expected_grads = loss_and_grads(model, batch)

    framework = _gptq_framework({"base_layer": "auto_gptq", "fused_dequant": True})
    registry = framework.dequant_registry
    assert registry.names == ("gptq", "bnb_4bit", "dense")
    assert registry.contributor("gptq") == "fake_gptq" and registry.contributor("dense") == "fused_ops_and_kernels"
    assert all(p.dequant_registry is registry for p in framework.plugins)
    assert registry.for_base_layer("auto_gptq") == (GPTQ_BACKEND,)
    framework.augmentation(model, None, ())
    plugin = framework.plugin("fused_ops_and_kernels")
    assert plugin.patch_counts["fused_dequant"] == 2 * 3
    table = [r.replacement for r in framework.patches.records]
    assert "kernels.lora_mlp_swiglu [gptq]" in table
    actual, actual_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(expected_grads, actual_grads)
    framework.revert()


def test_auto_gptq_without_a_contributed_backend_is_refused_before_loading():
    with pytest.raises(AccelerationConfigError, match="auto_gptq needs a GPTQ dequant backend"):
        AccelerationFramework(
            {"peft": {"quantization": {"fused_ops_and_kernels": {"base_layer": "auto_gptq", "fused_dequant": True}}}},
            registry=PluginRegistry([FusedOpsAndKernelsPlugin]),
        )


def test_two_frameworks_own_separate_registries():
    with_gptq = _gptq_framework({"base_layer": "auto_gptq", "fused_dequant": True})
    plain = AccelerationFramework(
        {"training": {"fused_ops_and_kernels": {"fast_rms_layernorm": True}}},
        registry=PluginRegistry([FusedOpsAndKernelsPlugin]),
    )
    assert "gptq" in with_gptq.dequant_registry and "gptq" not in plain.dequant_registry
    assert plain.dequant_registry.names == ("bnb_4bit", "dense")


# --------------------------------------------------------------------------------------- registry contract


def test_duplicate_backend_names_are_refused_naming_both_contributors():
    with pytest.raises(AccelerationConfigError, match=r"'dense' is contributed by both 'a' and 'b'"):
        DequantBackendRegistry([("a", (DENSE_BACKEND,)), ("b", (DENSE_BACKEND,))])
    with pytest.raises(TypeError, match="expected a DequantBackend"):
        DequantBackendRegistry([("a", ("dense",))])


def test_backend_declarations_are_checked():
    def read(layer):
        return DenseWeight(layer.weight)

    with pytest.raises(TypeError, match="name must be"):
        DequantBackend(name="Bad Name", module_types=(nn.Linear,), read=read, weight_format=DenseWeight)
    with pytest.raises(TypeError, match="module_types is empty"):
        DequantBackend(name="x", module_types=(), read=read, weight_format=DenseWeight)
    with pytest.raises(TypeError, match="neither a class nor"):
        DequantBackend(name="x", module_types=("bitsandbytes.Linear4bit",), read=read, weight_format=DenseWeight)
    with pytest.raises(TypeError, match="weight_format"):
        DequantBackend(name="x", module_types=(nn.Linear,), read=read, weight_format="DenseWeight")
    wrong = DequantBackend(name="x", module_types=(nn.Linear,), read=read, weight_format=Bnb4bitWeight)
    with pytest.raises(TypeError, match="declares weight_format Bnb4bitWeight"):
        DequantBackendRegistry.of(wrong).read(nn.Linear(4, 4))


def test_declaring_backends_imports_neither_the_kernels_nor_triton(tmp_path):
    """Creating a framework collects every plugin's backends; their weight formats are imported at the first read,
    so ``fms-accelerate check`` and framework creation do not pay for importing Triton."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fms_acceleration_accelerate import AccelerationFramework, PluginRegistry\n"
        "from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin\n"
        "fw = AccelerationFramework({'peft': {'quantization': {'fused_ops_and_kernels': {'base_layer': 'bitsandbytes',"
        " 'fused_lora': True}}}}, registry=PluginRegistry([FusedOpsAndKernelsPlugin]))\n"
        "assert fw.dequant_registry.names == ('bnb_4bit', 'dense')\n"
        "print('fms_acceleration_accelerate_kernels' in sys.modules, 'triton' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
