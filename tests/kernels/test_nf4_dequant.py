"""4-bit dequantisation (nf4.py) and the weight formats (dequant.py) against bitsandbytes and the reference.

Reading those formats out of layers (the dequant backends) is tested in tests/plugins/fused_ops/test_dequant_backends.py.

CPU tier: bitsandbytes 0.50 quantises and dequantises on CPU, Triton runs in interpreter mode (small shapes).
GPU tier: 8B layer shapes against bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from fms_acceleration_accelerate_kernels.dequant import (
    Bnb4bitWeight,
    DenseWeight,
    QuantizedWeight,
    bnb_four_bit_state,
)
from fms_acceleration_accelerate_kernels.nf4 import (
    FourBitState,
    dequantize_4bit_ref,
    dequantize_4bit_triton,
    four_bit_code,
    packed_as_bytes,
)
from torch import nn

from tests.kernels.harness import device_for_tests

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

DEVICE = device_for_tests()


def _quantize(shape, blocksize, quant_type, nested, dtype, storage, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(DEVICE)
    packed, qs = bnbF.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )
    return w, packed, qs


def _storage_for(numel: int, wanted: torch.dtype) -> torch.dtype:
    # bitsandbytes can only view the packed bytes as a wider dtype when their count divides evenly.
    n_bytes = (numel + 1) // 2
    return wanted if n_bytes % torch.empty((), dtype=wanted).element_size() == 0 else torch.uint8


CASES = [
    # (shape, blocksize, dtype, storage)
    ((96, 128), 64, torch.bfloat16, torch.bfloat16),
    ((96, 128), 64, torch.float16, torch.uint8),
    ((37, 50), 64, torch.bfloat16, torch.float16),  # odd rows, partial last block
    ((33, 65), 128, torch.float32, torch.float32),  # odd number of values (half-filled last byte)
    ((300, 257), 32, torch.bfloat16, torch.bfloat16),  # > 256 blocks: several nested scale blocks
    ((24, 4096), 4096, torch.bfloat16, torch.bfloat16),  # largest blocksize
]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-bs{c[1]}-{str(c[2])[6:]}")
def test_dequant_matches_bitsandbytes_bit_exact(quant_type, nested, case):
    shape, blocksize, dtype, storage = case
    storage = _storage_for(math.prod(shape), storage)
    _, packed, qs = _quantize(shape, blocksize, quant_type, nested, dtype, storage)
    expected = bnbF.dequantize_4bit(packed, qs)
    state = bnb_four_bit_state(qs)

    ref = dequantize_4bit_ref(packed, state)
    tri = dequantize_4bit_triton(packed, state)
    assert ref.dtype == tri.dtype == dtype and ref.shape == tri.shape == shape
    _assert_bit_exact(ref, expected, "reference")
    _assert_bit_exact(tri, expected, "triton")
    _assert_bit_exact(tri, ref, "triton vs reference", signed_zero=True)


def _assert_bit_exact(got: torch.Tensor, expected: torch.Tensor, what: str, signed_zero: bool = False) -> None:
    """Equal bit patterns; with ``signed_zero=False`` -0.0 and +0.0 count as equal.

    bitsandbytes itself is inconsistent about the sign of FP4 code 8: its C/CUDA kernels give -0.0, its Python
    fallback (odd shapes on CPU) gives +0.0 from the stored table. Our kernels always give -0.0.
    """
    assert not torch.isnan(got).any() and not torch.isnan(expected).any()
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    if not signed_zero:
        got, expected = got + 0.0, expected + 0.0  # -0.0 + 0.0 == +0.0; every other value unchanged
    mismatch = (got.view(int_view) != expected.view(int_view)).sum().item()
    assert mismatch == 0, f"{what}: {mismatch} of {got.numel()} values differ in their bits"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_other_output_dtype_rounds_once_from_fp32(out_dtype):
    _, packed, qs = _quantize((48, 128), 64, "nf4", True, torch.bfloat16, torch.bfloat16)
    state = bnb_four_bit_state(qs)
    full = dequantize_4bit_ref(packed, state, dtype=torch.float32)
    expected = full.to(out_dtype)
    assert torch.equal(dequantize_4bit_ref(packed, state, dtype=out_dtype), expected)
    assert torch.equal(dequantize_4bit_triton(packed, state, dtype=out_dtype), expected)


def test_dequant_into_row_slice_of_a_bigger_buffer():
    _, p1, q1 = _quantize((32, 64), 64, "nf4", False, torch.bfloat16, torch.bfloat16, seed=1)
    _, p2, q2 = _quantize((16, 64), 64, "nf4", False, torch.bfloat16, torch.bfloat16, seed=2)
    buf = torch.full((48, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    dequantize_4bit_triton(p1, bnb_four_bit_state(q1), out=buf[:32])
    dequantize_4bit_triton(p2, bnb_four_bit_state(q2), out=buf[32:])
    assert torch.equal(buf[:32], bnbF.dequantize_4bit(p1, q1))
    assert torch.equal(buf[32:], bnbF.dequantize_4bit(p2, q2))


def test_code_tables_equal_bitsandbytes():
    for quant_type in ("nf4", "fp4"):
        ours = four_bit_code(quant_type)
        theirs = bnbF.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(ours, theirs), quant_type
    with pytest.raises(ValueError, match="nf4' or 'fp4"):
        four_bit_code("int4")


def test_storage_dtype_is_a_view_not_a_cast():
    # the same bytes in uint8, bf16, fp32 and int32 storage must dequantise identically
    _, packed, qs = _quantize((64, 64), 64, "nf4", False, torch.bfloat16, torch.uint8)
    state = bnb_four_bit_state(qs)
    expected = dequantize_4bit_ref(packed, state)
    for storage in (torch.bfloat16, torch.float16, torch.float32, torch.int32):
        viewed = packed.reshape(-1).view(storage).unsqueeze(1)
        assert viewed.data_ptr() == packed.data_ptr()
        assert torch.equal(dequantize_4bit_ref(viewed, state), expected)
        assert torch.equal(dequantize_4bit_triton(viewed, state), expected)


def test_bad_inputs_raise_clear_errors():
    _, packed, qs = _quantize((16, 64), 64, "nf4", False, torch.bfloat16, torch.uint8)
    state = bnb_four_bit_state(qs)
    with pytest.raises(ValueError, match="blocks"):
        FourBitState(
            absmax=state.absmax[:-1], shape=state.shape, blocksize=64, quant_type="nf4",
            dtype=torch.bfloat16, code=state.code,
        )  # fmt: skip
    with pytest.raises(ValueError, match="quant_type"):
        FourBitState(
            absmax=state.absmax, shape=state.shape, blocksize=64, quant_type="nf5",
            dtype=torch.bfloat16, code=state.code,
        )  # fmt: skip
    with pytest.raises(ValueError, match="power of two"):
        FourBitState(
            absmax=state.absmax, shape=state.shape, blocksize=48, quant_type="nf4",
            dtype=torch.bfloat16, code=state.code,
        )  # fmt: skip
    with pytest.raises(ValueError, match="bytes"):
        packed_as_bytes(packed[: packed.shape[0] // 2], state.n_bytes)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        dequantize_4bit_ref(packed, state, dtype=torch.int8)
    with pytest.raises(ValueError, match="out must be"):
        dequantize_4bit_triton(packed, state, out=torch.empty(16, 63, dtype=torch.bfloat16, device=DEVICE))


# ------------------------------------------------------------------------------------------ weight formats


def make_bnb_linear(
    in_features: int,
    out_features: int,
    quant_type: str = "nf4",
    nested: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    storage: torch.dtype = torch.bfloat16,
    bias: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, nn.Linear]:
    """A quantised ``bnb.nn.Linear4bit`` and the dense ``nn.Linear`` it was quantised from (CPU or CUDA)."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        dense.weight.mul_(4.0)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias, compute_dtype=dtype, compress_statistics=nested,
        quant_type=quant_type, quant_storage=storage,
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, compress_statistics=nested, quant_type=quant_type,
        quant_storage=storage, module=layer,
    )  # fmt: skip
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer = layer.to(DEVICE)  # Params4bit quantises on its first move to a device
    return layer, dense.to(DEVICE)


def bnb_weight(layer: nn.Module) -> Bnb4bitWeight:
    """The ``Bnb4bitWeight`` of a quantised ``Linear4bit`` (what the fused-ops plugin's ``bnb_4bit`` backend reads)."""
    return Bnb4bitWeight(packed=layer.weight.detach(), state=bnb_four_bit_state(layer.weight.quant_state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_bnb4bit_weight_dequantises_like_bitsandbytes(quant_type, nested):
    layer, dense = make_bnb_linear(128, 96, quant_type=quant_type, nested=nested)
    weight = bnb_weight(layer)
    assert isinstance(weight, Bnb4bitWeight) and isinstance(weight, QuantizedWeight)
    assert weight.shape == (96, 128) and weight.dtype == torch.bfloat16
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(weight.dequantize(), expected)
    assert torch.equal(weight.dequantize_ref(), expected)
    # a 4-bit weight is close to, but not equal to, the weight it came from
    err = (expected.float() - dense.weight.float()).abs().max().item()
    assert 0 < err < 0.25 * dense.weight.abs().max().item()


def test_dense_weight_is_a_no_op_view():
    layer = nn.Linear(64, 32, dtype=torch.bfloat16).to(DEVICE)
    weight = DenseWeight(layer.weight)
    assert isinstance(weight, QuantizedWeight)
    w = weight.dequantize()
    assert w.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(weight.dequantize(torch.float32), layer.weight.float())
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        DenseWeight(torch.zeros(4, 4, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_gpu_8b_shapes_match_bitsandbytes_cuda(quant_type, nested, shape):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, packed, qs = _quantize(shape, 64, quant_type, nested, torch.bfloat16, torch.bfloat16)
    expected = bnbF.dequantize_4bit(packed, qs)
    got = dequantize_4bit_triton(packed, bnb_four_bit_state(qs))
    # bitsandbytes' CUDA kernel gives +0.0 for FP4 code 8 where ours (and its CPU kernel) give -0.0
    _assert_bit_exact(got, expected, "triton vs bitsandbytes CUDA")
