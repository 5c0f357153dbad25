"""GPTQ format, dequantisation kernels and the frozen GPTQ linear (kernels/.../gptq.py).

The format is checked against an independent reading written here (plain Python integer arithmetic on the
int32 words, element by element), not against the module's own unpacking: bits 2/4/8, symmetric and asymmetric
zeros, group sizes 32/128/-1, act-order (a permuted ``g_idx``) on and off, v1 and v2 zero conventions.

CPU tier: Triton kernels in interpreter mode on small shapes. GPU tier: tests/kernels/test_gptq.py's ``gpu``
tests and benchmarks/kernel-bench/gptq_bench.py at 8B layer shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fms_acceleration_accelerate_kernels import dequant as dequant_module
from fms_acceleration_accelerate_kernels._utils import use_triton
from fms_acceleration_accelerate_kernels.gptq import (
    _FUSED_MAX_ROWS,
    GPTQWeight,
    _dequantize_triton,
    _matmul_fused,
    _use_fused,
    gptq_dequantize,
    gptq_dequantize_ref,
    gptq_linear,
    gptq_sequential_g_idx,
    pack_gptq,
    unpack_gptq,
)

from tests.kernels.harness import device_for_tests

DEVICE = device_for_tests()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------ independent reading


def _word_bits(word: int, slot: int, bits: int) -> int:
    """Field ``slot`` (little end first) of a 32-bit word given as a Python int (int32 two's complement)."""
    return ((word & 0xFFFFFFFF) >> (slot * bits)) & ((1 << bits) - 1)


def _independent_unpack(qweight, qzeros, bits, k, n, checkpoint_format):
    pf = 32 // bits
    qw, qz = qweight.tolist(), qzeros.tolist()
    codes = [[_word_bits(qw[i // pf][j], i % pf, bits) for j in range(n)] for i in range(k)]
    offset = 1 if checkpoint_format == "gptq" else 0
    zeros = [[_word_bits(qz[g][j // pf], j % pf, bits) + offset for j in range(n)] for g in range(len(qz))]
    return codes, zeros


def _independent_pack(intweight, zeros, bits, checkpoint_format):
    pf = 32 // bits
    offset = 1 if checkpoint_format == "gptq" else 0
    iw, zs = intweight.tolist(), zeros.tolist()
    k, n = len(iw), len(iw[0])

    def signed(word: int) -> int:
        return word - (1 << 32) if word >= 1 << 31 else word

    qweight = [
        [signed(sum(iw[r * pf + s][j] << (s * bits) for s in range(pf))) for j in range(n)] for r in range(k // pf)
    ]
    qzeros = [
        [signed(sum((zs[g][c * pf + s] - offset) << (s * bits) for s in range(pf))) for c in range(n // pf)]
        for g in range(len(zs))
    ]
    return torch.tensor(qweight, dtype=torch.int32), torch.tensor(qzeros, dtype=torch.int32)


def _independent_dequant(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype):
    k, n = g_idx.numel(), scales.shape[1]
    codes, zeros = _independent_unpack(qweight, qzeros, bits, k, n, checkpoint_format)
    sc, gi = scales.float().tolist(), g_idx.tolist()
    # fp16 scale x (a 9-bit integer) is exact in fp64 and in fp32, so one rounding to ``dtype`` either way
    w = [[sc[gi[i]][j] * (codes[i][j] - zeros[gi[i]][j]) for i in range(k)] for j in range(n)]
    return torch.tensor(w, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------ test data


def make_gptq(
    k: int,
    n: int,
    bits: int = 4,
    group_size: int = 32,
    desc_act: bool = False,
    sym: bool = False,
    checkpoint_format: str = "gptq",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Random codes / zeros / scales / g_idx of one quantised linear and their packed tensors."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    per_group = k if group_size == -1 else group_size
    if desc_act:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // per_group).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // per_group).to(torch.int32)
    intweight = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
    elif checkpoint_format == "gptq":
        zeros = torch.randint(1, 2**bits + 1, (groups, n), generator=gen, dtype=torch.int32)  # 2**bits: no wrap
    else:
        zeros = torch.randint(0, 2**bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    qweight, qzeros = pack_gptq(intweight, zeros, bits, checkpoint_format=checkpoint_format)
    out = dict(
        intweight=intweight, zeros=zeros, scales=scales, g_idx=g_idx, qweight=qweight, qzeros=qzeros, bits=bits,
        group_size=group_size, checkpoint_format=checkpoint_format, k=k, n=n,
    )  # fmt: skip
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in out.items()}


def weight_of(d: dict, dtype: torch.dtype | None = None, sequential: bool = False) -> GPTQWeight:
    """The GPTQWeight of ``d``; ``sequential`` flags g_idx as k // group_size (as a loader does after checking)."""
    return GPTQWeight(
        d["qweight"], d["qzeros"], d["scales"], d["g_idx"], d["bits"], d["group_size"], d["checkpoint_format"],
        d["n"], d["k"], dtype, sequential_g_idx=sequential,
    )  # fmt: skip


def _packed_args(d: dict) -> tuple:
    return d["qweight"], d["qzeros"], d["scales"], d["g_idx"], d["bits"], d["checkpoint_format"]


# ------------------------------------------------------------------------------ format


FORMAT_CASES = [
    (bits, group_size, desc_act, sym, fmt)
    for bits in (2, 4, 8)
    for group_size in (32, 128, -1)
    for desc_act in (False, True)
    for sym in (False, True)
    for fmt in ("gptq", "gptq_v2")
]


def _case_id(case) -> str:
    bits, group_size, desc_act, sym, fmt = case
    return f"b{bits}-g{group_size}-{'act' if desc_act else 'seq'}-{'sym' if sym else 'asym'}-{fmt}"


@pytest.mark.parametrize("case", FORMAT_CASES, ids=_case_id)
def test_format_against_independent_reading(case):
    bits, group_size, desc_act, sym, fmt = case
    pf = 32 // bits
    k, n = 256, 3 * pf  # odd multiple of the pack factor
    d = make_gptq(k, n, bits, group_size, desc_act, sym, fmt, seed=bits * 7 + group_size)

    # packing: word by word as the spec says
    exp_qweight, exp_qzeros = _independent_pack(d["intweight"], d["zeros"], bits, fmt)
    assert d["qweight"].dtype == d["qzeros"].dtype == torch.int32
    assert torch.equal(d["qweight"], exp_qweight)
    assert torch.equal(d["qzeros"], exp_qzeros)
    # unpacking: the round trip gives the codes and the true zeros back; so does the independent reading
    codes, zeros = unpack_gptq(d["qweight"], d["qzeros"], bits, k, n, checkpoint_format=fmt)
    assert codes.dtype == zeros.dtype == torch.int32
    assert torch.equal(codes, d["intweight"]) and torch.equal(zeros, d["zeros"])
    ind_codes, ind_zeros = _independent_unpack(d["qweight"], d["qzeros"], bits, k, n, fmt)
    assert codes.tolist() == ind_codes and zeros.tolist() == ind_zeros
    # dequantisation, each output dtype rounded once from the exact value
    for dtype in DTYPES:
        expected = _independent_dequant(*_packed_args(d), dtype)
        got = gptq_dequantize_ref(*_packed_args(d), dtype=dtype)
        assert got.shape == (n, k) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, expected), dtype


def test_symmetric_words_follow_the_v1_off_by_one():
    for bits, v1_word, v2_word in (
        (4, 0x77777777, 0x88888888),
        (8, 0x7F7F7F7F, 0x80808080),
        (2, 0x55555555, 0xAAAAAAAA),
    ):
        for fmt, word in (("gptq", v1_word), ("gptq_v2", v2_word)):
            d = make_gptq(64, 32, bits, 32, sym=True, checkpoint_format=fmt)
            signed = word - (1 << 32) if word >= 1 << 31 else word
            assert (d["qzeros"] == signed).all(), (bits, fmt, hex(word))
            _, zeros = unpack_gptq(d["qweight"], d["qzeros"], bits, 64, 32, checkpoint_format=fmt)
            assert (zeros == 2 ** (bits - 1)).all()


def test_v1_reads_stored_all_ones_as_two_to_the_bits_without_wrap():
    qzeros = torch.full((1, 1), -1, dtype=torch.int32)  # every stored 4-bit zero is 15
    qweight = torch.zeros(1, 8, dtype=torch.int32)
    _, zeros = unpack_gptq(qweight, qzeros, 4, 8, 8, checkpoint_format="gptq")
    assert (zeros == 16).all()
    _, zeros = unpack_gptq(qweight, qzeros, 4, 8, 8, checkpoint_format="gptq_v2")
    assert (zeros == 15).all()
    w = gptq_dequantize_ref(
        qweight, qzeros, torch.ones(1, 8, dtype=torch.float16), torch.zeros(8, dtype=torch.int32), 4
    )
    assert (w == -16).all()


def test_group_size_that_does_not_divide_in_features():
    # G = ceil(K / group_size): the last group is partial
    d = make_gptq(96, 16, 4, 64, desc_act=True)
    weight = weight_of(d)
    expected = _independent_dequant(*_packed_args(d), torch.float32)
    assert torch.equal(weight.dequantize_ref(torch.float32), expected)


def test_bad_inputs_raise_clear_errors():
    d = make_gptq(64, 16, 4, 32)
    with pytest.raises(ValueError, match="3-bit"):
        pack_gptq(d["intweight"], d["zeros"], 3)
    with pytest.raises(ValueError, match="checkpoint_format"):
        pack_gptq(d["intweight"], d["zeros"], 4, checkpoint_format="marlin")
    with pytest.raises(ValueError, match="clamp zeros to >= 1"):
        pack_gptq(d["intweight"], torch.zeros_like(d["zeros"]), 4, checkpoint_format="gptq")
    pack_gptq(d["intweight"], torch.zeros_like(d["zeros"]), 4, checkpoint_format="gptq_v2")  # representable in v2
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\)"):
        pack_gptq(d["intweight"] + 16, d["zeros"], 4)
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_gptq(d["intweight"][:, :12], d["zeros"][:, :12], 4)
    with pytest.raises(ValueError, match="qweight has shape"):
        unpack_gptq(d["qweight"], d["qzeros"], 4, 128, 16)
    with pytest.raises(TypeError, match="int32"):
        unpack_gptq(d["qweight"].long(), d["qzeros"], 4, 64, 16)
    with pytest.raises(ValueError, match="2 groups, but"):
        GPTQWeight(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], 4, 64, "gptq", 16, 64)
    with pytest.raises(ValueError, match="group_size"):
        GPTQWeight(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], 4, 0, "gptq", 16, 64)
    with pytest.raises(ValueError, match="scales has shape"):
        GPTQWeight(d["qweight"], d["qzeros"], d["scales"][:, :8], d["g_idx"], 4, 32, "gptq", 16, 64)
    with pytest.raises(ValueError, match="g_idx has shape"):
        GPTQWeight(d["qweight"], d["qzeros"], d["scales"], d["g_idx"][:32], 4, 32, "gptq", 16, 64)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        gptq_dequantize_ref(*_packed_args(d), dtype=torch.int8)
    with pytest.raises(ValueError, match="out must be"):
        gptq_dequantize(*_packed_args(d), out=torch.empty(16, 63, dtype=torch.float16))


# ------------------------------------------------------------------------------ Triton dequantisation


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True], ids=["seq", "act"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_dequant_is_bit_exact(bits, desc_act, fmt):
    pf = 32 // bits
    # K = 224 and N = 9 pf: neither a multiple of the kernel's blocks (partial tiles on both axes)
    d = make_gptq(224, 9 * pf, bits, 32, desc_act=desc_act, checkpoint_format=fmt, seed=bits, device=DEVICE)
    for dtype in DTYPES:
        expected = gptq_dequantize_ref(*_packed_args(d), dtype=dtype)
        got = _dequantize_triton(*_packed_args(d), dtype)
        assert got.dtype == dtype and got.shape == (9 * pf, 224)
        assert torch.equal(got, expected), (dtype, (got.float() - expected.float()).abs().max().item())
    # the dispatching function takes the same path here (CUDA or TRITON_INTERPRET=1) and gives the same
    assert use_triton(d["qweight"])
    expected = gptq_dequantize_ref(*_packed_args(d), dtype=torch.bfloat16)
    assert torch.equal(gptq_dequantize(*_packed_args(d), dtype=torch.bfloat16), expected)
    # a checked sequential layout: groups computed from k instead of read
    assert gptq_sequential_g_idx(d["g_idx"], 32) is (not desc_act)
    if not desc_act:
        for dtype in DTYPES:
            got = _dequantize_triton(*_packed_args(d), dtype, sequential_group_size=32)
            assert torch.equal(got, gptq_dequantize_ref(*_packed_args(d), dtype=dtype)), dtype
        assert torch.equal(weight_of(d, torch.bfloat16, sequential=True).dequantize(), expected)


@pytest.mark.parametrize("group_size", [24, 8, 96, -1])
def test_triton_dequant_sequential_layout_any_group_size(group_size):
    # group sizes that are no power of two (tiles shrink to a divisor) or below a tile; one group
    d = make_gptq(192, 40, 4, group_size, device=DEVICE, seed=group_size + 50)
    assert gptq_sequential_g_idx(d["g_idx"], group_size)
    for dtype in (torch.bfloat16, torch.float16):
        expected = gptq_dequantize_ref(*_packed_args(d), dtype=dtype)
        assert torch.equal(weight_of(d, dtype, sequential=True).dequantize(), expected), dtype
        for launch in ((64, 128, 8), (32, 64, 4)):
            got = _dequantize_triton(*_packed_args(d), dtype, sequential_group_size=max(group_size, 0), launch=launch)
            assert torch.equal(got, expected), (dtype, launch)


def test_sequential_g_idx_detection():
    d = make_gptq(96, 16, 4, 32)
    assert gptq_sequential_g_idx(d["g_idx"], 32) and not gptq_sequential_g_idx(d["g_idx"], 64)
    assert gptq_sequential_g_idx(d["g_idx"].long(), 32)
    assert not gptq_sequential_g_idx(make_gptq(96, 16, 4, 32, desc_act=True)["g_idx"], 32)
    assert gptq_sequential_g_idx(torch.zeros(96, dtype=torch.int32), -1)
    with pytest.raises(TypeError, match="sequential_g_idx must be a bool"):
        GPTQWeight(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], 4, 32, "gptq", 16, 96, sequential_g_idx=1)


def test_triton_dequant_other_launches_int64_g_idx_and_group_minus_one():
    d = make_gptq(256, 48, 4, -1, device=DEVICE, seed=5)
    expected = gptq_dequantize_ref(*_packed_args(d), dtype=torch.bfloat16)
    for launch in ((32, 64, 4), (128, 32, 2)):
        got = _dequantize_triton(*_packed_args(d), torch.bfloat16, launch=launch)
        assert torch.equal(got, expected), launch
    d = make_gptq(128, 16, 8, 32, desc_act=True, device=DEVICE, seed=6)
    args = list(_packed_args(d))
    args[3] = args[3].long()
    assert torch.equal(
        _dequantize_triton(*args, torch.float16), gptq_dequantize_ref(*_packed_args(d), dtype=torch.float16)
    )


def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    from fms_acceleration_accelerate_kernels import gptq as gptq_module

    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken on CPU without TRITON_INTERPRET")

    d = make_gptq(64, 16, 4, 32, desc_act=True)  # CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(gptq_module, "_dequantize_triton", boom)
    monkeypatch.setattr(gptq_module, "_matmul_fused", boom)
    expected = gptq_dequantize_ref(*_packed_args(d), dtype=torch.bfloat16)
    assert torch.equal(gptq_dequantize(*_packed_args(d), dtype=torch.bfloat16), expected)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    gptq_linear(x, weight_of(d)).sum().backward()
    assert x.grad is not None


def test_triton_kernels_read_non_contiguous_packed_tensors():
    d = make_gptq(128, 32, 4, 32, desc_act=True, device=DEVICE, seed=9)
    strided = dict(d)
    for name in ("qweight", "qzeros", "scales"):
        strided[name] = d[name].t().contiguous().t()  # same values, column-major
        assert not strided[name].is_contiguous()
    strided["g_idx"] = torch.stack([d["g_idx"], d["g_idx"]], dim=1)[:, 0]
    expected = gptq_dequantize_ref(*_packed_args(d), dtype=torch.float16)
    assert torch.equal(_dequantize_triton(*_packed_args(strided), torch.float16), expected)
    d = make_gptq(128, 32, 4, 32, device=DEVICE, seed=9)  # the fused kernel runs the sequential layout
    strided = dict(d)
    for name in ("qweight", "qzeros", "scales"):
        strided[name] = d[name].t().contiguous().t()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.float16)
    fused = _matmul_fused(x, weight_of(strided, sequential=True), None)
    assert torch.equal(fused, _matmul_fused(x, weight_of(d, sequential=True), None))


class _LaunchSpy:
    """Wraps a Triton kernel: records the data pointers of the first tensor arguments of each launch."""

    def __init__(self, kernel, first: int, count: int = 3) -> None:
        self.kernel, self.first, self.count, self.pointers = kernel, first, count, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.pointers.append(tuple(a.data_ptr() for a in args[self.first : self.first + self.count]))
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize("desc_act", [False, True], ids=["seq", "act"])
def test_transposed_packed_views_are_read_in_place_bit_exact(desc_act, monkeypatch):
    """FSDP2's packed layout stores qweight / qzeros / scales transposed and hands the kernels ``.t()`` views: the
    launchers pass their strides (no row-major copy of the packed codes; act-order copies only the small zeros and
    scales, which it gathers per channel) and the results equal the row-major ones bit for bit."""
    from fms_acceleration_accelerate_kernels import gptq as gptq_module

    d = make_gptq(256, 48, 4, 32, desc_act=desc_act, device=DEVICE, seed=21)
    views = dict(d)
    for name in ("qweight", "qzeros", "scales"):
        views[name] = d[name].t().contiguous().t()  # as PackedGPTQLinear's gptq_weight() hands them over
        assert not views[name].is_contiguous()
    dequant = _LaunchSpy(gptq_module._gptq_dequant_kernel, 0)
    monkeypatch.setattr(gptq_module, "_gptq_dequant_kernel", dequant)
    for dtype in DTYPES:
        expected = gptq_dequantize_ref(*_packed_args(d), dtype=dtype)
        row_major = weight_of(d, dtype, sequential=not desc_act).dequantize()
        got = weight_of(views, dtype, sequential=not desc_act).dequantize()
        assert torch.equal(got, expected) and torch.equal(got, row_major), dtype
    in_place = {(views["qweight"].data_ptr(), views["qzeros"].data_ptr(), views["scales"].data_ptr())}
    launched = set(dequant.pointers[1::2])  # every second launch read the views
    if desc_act:
        assert {p[0] for p in launched} == {views["qweight"].data_ptr()}
    else:
        assert launched == in_place
    if not desc_act:
        fused = _LaunchSpy(gptq_module._gptq_matmul_kernel, 1)
        monkeypatch.setattr(gptq_module, "_gptq_matmul_kernel", fused)
        x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
        y = _matmul_fused(x, weight_of(views, sequential=True), None)
        assert torch.equal(y, _matmul_fused(x, weight_of(d, sequential=True), None))
        assert set(fused.pointers[:1]) == in_place


def test_triton_dequant_rounds_bf16_to_nearest_even():
    # 4-bit codes 0..15 minus zero 8 times scales chosen so that most products fall between two bf16 values
    d = make_gptq(128, 64, 4, 32, desc_act=True, device=DEVICE, seed=7)
    scales = (torch.rand(d["scales"].shape, generator=torch.Generator().manual_seed(8)) * 3 + 1).to(torch.float16)
    d["scales"] = scales.to(DEVICE)
    full = gptq_dequantize_ref(*_packed_args(d), dtype=torch.float32)
    expected = full.to(torch.bfloat16)  # torch rounds to nearest even
    assert not torch.equal(expected.float(), full)  # the case is not trivial
    assert torch.equal(_dequantize_triton(*_packed_args(d), torch.bfloat16), expected)


# ------------------------------------------------------------------------------ weight format


def test_gptq_weight_is_a_quantized_weight_format():
    d = make_gptq(64, 24, 4, 32, desc_act=True, device=DEVICE)
    weight = weight_of(d, torch.bfloat16)
    assert dequant_module.GPTQWeight is GPTQWeight and "GPTQWeight" in dequant_module.__all__
    assert isinstance(weight, dequant_module.QuantizedWeight)
    assert weight.shape == (24, 64) and weight.dtype == torch.bfloat16 and weight.device == d["qweight"].device
    assert weight_of(d).dtype == torch.float16  # default: the scales' dtype
    expected = _independent_dequant(
        *(t.cpu() if isinstance(t, torch.Tensor) else t for t in _packed_args(d)), torch.bfloat16
    )
    assert torch.equal(weight.dequantize().cpu(), expected)
    assert torch.equal(weight.dequantize_ref().cpu(), expected)
    expected32 = _independent_dequant(
        *(t.cpu() if isinstance(t, torch.Tensor) else t for t in _packed_args(d)), torch.float32
    )
    assert torch.equal(weight.dequantize(torch.float32).cpu(), expected32)
    buf = torch.full((48, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    weight.dequantize(out=buf[24:])
    assert torch.equal(buf[24:].cpu(), expected) and buf[:24].isnan().all()


# ------------------------------------------------------------------------------ fused dequant-matmul


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "bits,group_size,desc_act,fmt", [(4, 32, False, "gptq"), (2, 64, False, "gptq_v2"), (8, -1, True, "gptq")]
)
def test_fused_matmul_matches_dense_product(dtype, bits, group_size, desc_act, fmt):
    # sequential layouts (flagged) and one group (any g_idx is all zeros: no flag needed)
    pf = 32 // bits
    k, n = 192, 5 * pf * 4  # K not a multiple of BLOCK_K * split, N not a multiple of BLOCK_N
    d = make_gptq(k, n, bits, group_size, desc_act, checkpoint_format=fmt, seed=11, device=DEVICE)
    weight = weight_of(d, sequential=not desc_act)
    gen = torch.Generator().manual_seed(2)
    w = gptq_dequantize_ref(*_packed_args(d), dtype=dtype).float()
    bias = torch.randn(n, generator=gen).to(DEVICE, torch.float16)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    cases = [(1, 1, None), (1, None, None), (5, 3, None), (17, None, None), (_FUSED_MAX_ROWS, 2, None)]
    cases += [(3, None, (False, 32, 64, 4, 4)), (2, 2, (True, 16, 32, 4, 4)), (_FUSED_MAX_ROWS + 9, None, None)]
    for m, split_k, launch in cases:  # multiply-sum and tensor cores, with and without K splits
        x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
        expected = x.float() @ w.t() + bias.float()
        got = _matmul_fused(x, weight, bias, launch=launch, split_k=split_k)
        assert got.dtype == dtype and got.shape == (m, n)
        atol = tol * expected.abs().max().item()  # sums of K products: absolute error scales with the outputs
        torch.testing.assert_close(got.float(), expected, atol=atol, rtol=tol, msg=lambda e, m=m: f"M={m}: {e}")
    # a strided input (a column slice) is read through its strides
    wide = torch.randn(3, 2 * k, generator=gen).to(DEVICE, dtype)
    x = wide[:, ::2]
    expected = x.float() @ w.t()
    atol = tol * expected.abs().max().item()
    torch.testing.assert_close(_matmul_fused(x, weight, None).float(), expected, atol=atol, rtol=tol)


@pytest.fixture
def fused_for_small_weights(monkeypatch):
    """gptq_linear takes the fused kernel for the tiny test weights too (its size threshold set to 0)."""
    from fms_acceleration_accelerate_kernels import gptq as gptq_module

    monkeypatch.setattr(gptq_module, "_FUSED_MIN_NUMEL", 0)


def test_gptq_linear_dispatch_fused_for_large_weights_only(monkeypatch):
    from fms_acceleration_accelerate_kernels import gptq as gptq_module

    d = make_gptq(64, 32, 4, 32, device=DEVICE)
    few = torch.randn(_FUSED_MAX_ROWS, 64, device=DEVICE, dtype=torch.bfloat16)
    assert not _use_fused(few, weight_of(d, sequential=True))  # 64 x 32 elements
    monkeypatch.setattr(gptq_module, "_FUSED_MIN_NUMEL", 64 * 32)
    assert _use_fused(few, weight_of(d, sequential=True))


def test_gptq_linear_dispatch_fused_for_few_rows_of_a_sequential_layout_only(fused_for_small_weights):
    d = make_gptq(64, 32, 4, 32, device=DEVICE)
    weight = weight_of(d, sequential=True)
    few = torch.randn(_FUSED_MAX_ROWS, 64, device=DEVICE, dtype=torch.bfloat16)
    many = torch.randn(_FUSED_MAX_ROWS + 1, 64, device=DEVICE, dtype=torch.bfloat16)
    assert _use_fused(few, weight) and _use_fused(few[:1], weight) and not _use_fused(many, weight)
    assert not _use_fused(few.float(), weight)  # fp32 runs dequant + matmul (no tf32 in the fused dot)
    assert not _use_fused(few[:0], weight)
    # g_idx not flagged (act-order or unchecked), or groups too small for a tile: dequant + cuBLAS
    assert not _use_fused(few, weight_of(d))
    assert not _use_fused(few, weight_of(make_gptq(64, 32, 4, 8, device=DEVICE), sequential=True))
    act = make_gptq(64, 32, 4, 32, desc_act=True, device=DEVICE)
    assert not _use_fused(few, weight_of(act))
    with pytest.raises(ValueError, match="sequential_g_idx=True"):
        _matmul_fused(few, weight_of(act), None)
    assert _use_fused(few, weight_of(make_gptq(64, 32, 4, -1, desc_act=True, device=DEVICE)))  # one group


# ------------------------------------------------------------------------------ linear


def _dense_linear(x, d, bias, dtype):
    w = gptq_dequantize_ref(*_packed_args(d), dtype=dtype)
    return F.linear(x, w, bias.to(dtype) if bias is not None else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [7, 2 * _FUSED_MAX_ROWS], ids=["few_rows", "many_rows"])
@pytest.mark.parametrize("desc_act", [False, True], ids=["seq", "act"])
def test_gptq_linear_forward_and_grads_match_dense(dtype, with_bias, rows, desc_act, fused_for_small_weights):
    d = make_gptq(128, 40, 4, 32, desc_act=desc_act, device=DEVICE, seed=3)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, rows, 128, generator=gen).to(DEVICE, dtype)
    b0 = (torch.randn(40, generator=gen) * 0.1).to(DEVICE, torch.float16) if with_bias else None
    gy = torch.randn(3, rows, 40, generator=gen).to(DEVICE, dtype)

    x_ref = x0.clone().requires_grad_(True)
    b_ref = b0.clone().requires_grad_(True) if with_bias else None
    y_ref = _dense_linear(x_ref, d, b_ref, dtype)
    y_ref.backward(gy)

    x = x0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True) if with_bias else None
    y = gptq_linear(x, weight_of(d, sequential=not desc_act), b)
    assert y.shape == (3, rows, 40) and y.dtype == dtype
    y.backward(gy)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    # few rows: the fused kernel against a dense GEMM, so the atol scales with the outputs (sums of K products)
    torch.testing.assert_close(y, y_ref, atol=tol * max(1.0, y_ref.abs().max().item()), rtol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol * max(1.0, x_ref.grad.abs().max().item()), rtol=tol)
    if with_bias:
        assert b.grad.dtype == torch.float16
        torch.testing.assert_close(b.grad, b_ref.grad, atol=tol, rtol=tol)


def test_gptq_linear_saves_no_dense_weight_and_skips_frozen_bias_grad():
    d = make_gptq(128, 64, 4, 32, device=DEVICE)
    x = torch.randn(5, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(64, device=DEVICE, dtype=torch.float16)  # frozen
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = gptq_linear(x, weight_of(d), bias)
    assert all(numel < 64 * 128 for numel in saved), saved  # nothing the size of the dense weight
    y.sum().backward()
    assert x.grad is not None and bias.grad is None


def test_gptq_linear_under_autocast_runs_in_the_autocast_dtype():
    d = make_gptq(64, 32, 8, -1, device=DEVICE)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_(True)
    with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
        y = gptq_linear(x, weight_of(d))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    expected = _dense_linear(x.detach().bfloat16(), d, None, torch.bfloat16).float()
    atol = 2e-2 * expected.abs().max().item()
    torch.testing.assert_close(y.float(), expected, atol=atol, rtol=2e-2)


def test_gptq_linear_rejects_mismatched_inputs():
    d = make_gptq(64, 32, 4, 32)
    with pytest.raises(ValueError, match="input has 32 features"):
        gptq_linear(torch.randn(2, 32), weight_of(d))
    with pytest.raises(ValueError, match="bias has shape"):
        gptq_linear(torch.randn(2, 64), weight_of(d), torch.zeros(31))
    with pytest.raises(TypeError, match="GPTQWeight"):
        gptq_linear(torch.randn(2, 64), torch.randn(32, 64))


def test_gptq_weight_as_base_of_the_fused_lora_linear():
    from fms_acceleration_accelerate_kernels.lora import lora_linear, lora_linear_ref

    d = make_gptq(64, 32, 4, 32, desc_act=True, device=DEVICE)
    weight = weight_of(d)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen).to(DEVICE, torch.float16)
    a = (torch.randn(4, 64, generator=gen) * 0.1).to(DEVICE).requires_grad_(True)
    b = (torch.randn(32, 4, generator=gen) * 0.1).to(DEVICE).requires_grad_(True)
    y = lora_linear(x, weight, a, b, 2.0)
    torch.testing.assert_close(y, lora_linear_ref(x, weight, a, b, 2.0), atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("rows", [8, 2 * _FUSED_MAX_ROWS], ids=["fused", "dequant_matmul"])
def test_gptq_linear_compiles_fullgraph_and_matches_eager(rows, fused_for_small_weights):
    """The Triton launchers sit behind custom ops while compiling; a GPTQWeight built inside the graph is fine."""
    d = make_gptq(64, 32, 4, 32, device=DEVICE)

    def step(x, qweight, qzeros, scales, g_idx):
        weight = GPTQWeight(qweight, qzeros, scales, g_idx, 4, 32, "gptq", 32, 64, sequential_g_idx=True)
        return gptq_linear(x, weight)

    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    tensors = (d["qweight"], d["qzeros"], d["scales"], d["g_idx"])
    x_eager = x.clone().requires_grad_(True)
    eager = step(x_eager, *tensors)
    eager.float().square().sum().backward()
    torch._dynamo.reset()
    x_comp = x.clone().requires_grad_(True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x_comp, *tensors)
    compiled.float().square().sum().backward()
    assert torch.equal(compiled, eager)
    assert torch.equal(x_comp.grad, x_eager.grad)


def test_custom_ops_pass_opcheck():
    d = make_gptq(64, 32, 4, 32, device=DEVICE)
    tensors = (d["qweight"], d["qzeros"], d["scales"], d["g_idx"])
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    dequant = torch.ops.fms_accel_kernels.gptq_dequantize.default
    for sequential_group_size in (0, 32):
        torch.library.opcheck(dequant, (*tensors, 4, "gptq", torch.bfloat16, sequential_group_size), test_utils=checks)
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(32, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(
        torch.ops.fms_accel_kernels.gptq_matmul_fused.default, (x, *tensors, bias, 4, 32, "gptq", True),
        test_utils=checks,
    )  # fmt: skip


# ------------------------------------------------------------------------------ GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("desc_act", [False, True], ids=["seq", "act"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_gpu_8b_shapes(shape, desc_act):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n, k = shape
    d = make_gptq(k, n, 4, 128, desc_act=desc_act, device="cuda")
    weight = weight_of(d, sequential=gptq_sequential_g_idx(d["g_idx"], 128))
    for dtype in (torch.bfloat16, torch.float16):
        ref = weight.dequantize_ref(dtype)
        assert torch.equal(weight.dequantize(dtype), ref), dtype
        x = torch.randn(16, k, device="cuda", dtype=dtype)
        truth = x.float() @ ref.float().t()
        dense_err = (F.linear(x, ref).float() - truth).abs().max().item()
        fused_err = (gptq_linear(x, weight).float() - truth).abs().max().item()
        assert fused_err <= 2 * dense_err + 1e-2 * truth.abs().max().item(), (dtype, fused_err, dense_err)
