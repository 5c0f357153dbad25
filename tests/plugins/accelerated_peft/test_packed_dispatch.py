"""The shape-only dispatch handlers (detach / alias, split, slice, view, as_strided) that the bitsandbytes 4-bit
and the GPTQ packed weights share: the same inner tensors under the new shape, row ranges of them, and errors
that name the weight's class."""

from __future__ import annotations

import pytest
import torch
from fms_acceleration_accelerate_peft.gptq.packed import GPTQPackedWeight
from fms_acceleration_accelerate_peft.packed4bit import Packed4bitWeight

ROWS, COLS = 16, 64


def _packed4bit() -> Packed4bitWeight:
    g = torch.Generator().manual_seed(0)
    numel, blocksize = ROWS * COLS, 64  # one block per row
    packed = torch.randint(0, 256, (numel // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(numel // blocksize, generator=g)
    return Packed4bitWeight(packed, absmax, (ROWS, COLS), torch.float32, blocksize, "nf4", COLS)


def _gptq() -> GPTQPackedWeight:
    g = torch.Generator().manual_seed(0)
    pf, group_size = 8, 32  # 4 bits: 8 codes per int32 word
    qweight_t = torch.randint(-(2**31), 2**31 - 1, (ROWS, COLS // pf), dtype=torch.int32, generator=g)
    qzeros_t = torch.randint(-(2**31), 2**31 - 1, (ROWS // pf, COLS // group_size), dtype=torch.int32, generator=g)
    scales_t = torch.rand(ROWS, COLS // group_size, generator=g).half()
    g_idx = (torch.arange(COLS) // group_size).to(torch.int32)
    return GPTQPackedWeight(qweight_t, qzeros_t, scales_t, g_idx, (ROWS, COLS), torch.float32, 4, group_size, "gptq")


WEIGHTS = pytest.mark.parametrize("make", [_packed4bit, _gptq], ids=["packed4bit", "gptq"])


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    names, _ = t.__tensor_flatten__()
    return [getattr(t, n) for n in names]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(x.data_ptr() == y.data_ptr() for x, y in zip(_inner(a), _inner(b), strict=True))


@WEIGHTS
def test_shape_ops_rewrap_the_same_inner_tensors(make):
    weight = make()
    full = weight.dequantize()
    for op in (torch.Tensor.detach, torch.ops.aten.alias.default):
        out = op(weight)
        assert type(out) is type(weight) and out.shape == weight.shape and _same_storage(out, weight)
    flat = weight.view(-1)
    assert flat.shape == (ROWS * COLS,) and _same_storage(flat, weight)
    back = flat.view(ROWS, -1)
    assert back.shape == (ROWS, COLS) and _same_storage(back, weight)
    torch.testing.assert_close(back.dequantize(), full, rtol=0, atol=0)
    strided = torch.as_strided(weight, (ROWS * COLS,), (1,))
    assert strided.shape == (ROWS * COLS,) and _same_storage(strided, weight)


@WEIGHTS
def test_split_and_slice_cut_rows(make):
    weight = make()
    full = weight.dequantize()
    halves = torch.split(weight, ROWS // 2)
    assert [type(h) for h in halves] == [type(weight)] * 2 and all(h.shape == (ROWS // 2, COLS) for h in halves)
    torch.testing.assert_close(torch.cat([h.dequantize() for h in halves]), full, rtol=0, atol=0)
    # an open end and an end past the last row are clamped as for a plain tensor
    torch.testing.assert_close(weight[8:].dequantize(), full[8:], rtol=0, atol=0)
    torch.testing.assert_close(weight[:8].dequantize(), full[:8], rtol=0, atol=0)
    torch.testing.assert_close(weight[8:100].dequantize(), full[8:], rtol=0, atol=0)
    # negative bounds count from the end, as for a plain tensor (ROWS - 8 falls on a packing boundary)
    torch.testing.assert_close(weight[-8:].dequantize(), full[-8:], rtol=0, atol=0)
    torch.testing.assert_close(weight[:-8].dequantize(), full[:-8], rtol=0, atol=0)


@WEIGHTS
def test_errors_name_the_weight_class(make):
    weight = make()
    name = type(weight).__name__
    with pytest.raises(NotImplementedError, match=rf"{name} slicing needs step 1, got step 2"):
        weight[::2]
    with pytest.raises(NotImplementedError, match=rf"{name} can only be sliced along dim 0, got dim 1"):
        weight[:, :8]
    with pytest.raises(ValueError, match=rf"cannot view a {name} of shape \(16, 64\) as \(7,\)"):
        weight.view(7)
    with pytest.raises(
        NotImplementedError, match=rf"{name}.as_strided only re-views the whole tensor: .*size \(4, 64\)"
    ):
        torch.as_strided(weight, (4, COLS), (COLS, 1))
    with pytest.raises(NotImplementedError, match=rf"{name}.as_strided .*storage offset 64"):
        torch.as_strided(weight, (ROWS, COLS), (COLS, 1), COLS)
