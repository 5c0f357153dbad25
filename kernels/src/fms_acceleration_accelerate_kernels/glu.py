"""Gated linear units on separate gate/up tensors: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up``.

Math runs in fp32 and rounds once. The backward saves only the two inputs and recomputes the activation (no
activation tensor is kept between forward and backward). Inputs may be row-strided views, e.g. the two halves of
a fused ``gate_up_proj`` output, without a copy.

Besides the autograd ops, ``glu_forward`` / ``glu_backward`` run the same kernels without autograd for fused
functions that save their own tensors (the fused LoRA MLP in ``lora.py``); ``glu_backward`` can write the gate
gradient over the incoming gradient's buffer. Off CUDA (and without ``TRITON_INTERPRET=1``) they compute the
same fp32 math in torch, rounding once.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import check_float_dtype, flatten_rows, next_power_of_2, use_triton

__all__ = [
    "activation_code",
    "geglu",
    "geglu_ref",
    "geglu_triton",
    "glu_backward",
    "glu_forward",
    "swiglu",
    "swiglu_ref",
    "swiglu_triton",
]

_ACT_SILU = 0
_ACT_GELU_TANH = 1
_ACT_GELU_ERF = 2
_GELU_APPROXIMATIONS = MappingProxyType({"tanh": _ACT_GELU_TANH, "none": _ACT_GELU_ERF})


@triton.jit
def _activation_and_derivative(g, ACT: tl.constexpr, NEED_DERIVATIVE: tl.constexpr):
    """Returns act(g) and, when asked, act'(g) (else a placeholder equal to act(g)); fp32 in and out."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        if NEED_DERIVATIVE:
            deriv = sig * (1.0 + g * (1.0 - sig))
        else:
            deriv = act
    elif ACT == 1:
        sqrt_2_over_pi = 0.7978845608028654
        inner = sqrt_2_over_pi * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner), overflow-free
        act = 0.5 * g * (1.0 + t)
        if NEED_DERIVATIVE:
            deriv = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * sqrt_2_over_pi * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            deriv = act
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        if NEED_DERIVATIVE:
            deriv = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        else:
            deriv = act
    return act, deriv


@triton.jit
def _row_and_cols(n_cols, BLOCK: tl.constexpr):
    """Row and column block of a program on a 1-D grid with the column block varying fastest, so programs
    that run together stream through contiguous memory (and the grid has no 65535 limit on rows)."""
    pid = tl.program_id(0).to(tl.int64)
    n_col_blocks = tl.cdiv(n_cols, BLOCK)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    return row, cols


@triton.jit
def _glu_fwd_kernel(
    GATE,
    UP,
    OUT,
    stride_g,
    stride_u,
    stride_o,
    n_cols,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols = _row_and_cols(n_cols, BLOCK)
    mask = cols < n_cols
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act, _unused = _activation_and_derivative(g, ACT, False)
    tl.store(OUT + row * stride_o + cols, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DOUT,
    GATE,
    UP,
    DGATE,
    DUP,
    stride_do,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    n_cols,
    ACT: tl.constexpr,
    HAS_DGATE: tl.constexpr,
    HAS_DUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols = _row_and_cols(n_cols, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOUT + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    act, deriv = _activation_and_derivative(g, ACT, HAS_DGATE)
    if HAS_DUP:
        tl.store(DUP + row * stride_du + cols, (dout * act).to(DUP.dtype.element_ty), mask=mask)
    if HAS_DGATE:
        u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DGATE + row * stride_dg + cols, (dout * u * deriv).to(DGATE.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int, launch: tuple[int, int] | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps): 2048 elements (16 per thread with 4 warps: two 16-byte loads per tensor in bf16);
    2048 divides the 8B intermediate size 14336, so no lanes idle. ``launch`` overrides (benchmark sweep)."""
    block, warps = launch if launch is not None else (2048, 4)
    block = min(block, next_power_of_2(n_cols))
    return block, max(1, min(warps, block // 128))


def _forward(gate: torch.Tensor, up: torch.Tensor, act: int, launch: tuple[int, int] | None = None) -> torch.Tensor:
    g2, u2 = flatten_rows(gate), flatten_rows(up)
    n_rows, n_cols = g2.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel():
        block, warps = _launch_config(n_cols, launch)
        _glu_fwd_kernel[(n_rows * triton.cdiv(n_cols, block),)](
            g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), n_cols, ACT=act, BLOCK=block, num_warps=warps
        )
    return out.view(gate.shape)


def _backward(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: int,
    need_dgate: bool,
    need_dup: bool,
    launch: tuple[int, int] | None = None,
    dgate_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton backward. ``dgate_out`` (contiguous, gate's shape and dtype; may be ``dout`` itself: each program
    reads its elements of ``dout`` before writing them) receives the gate gradient instead of a new tensor."""
    if not (need_dgate or need_dup):
        return None, None
    d2, g2, u2 = flatten_rows(dout), flatten_rows(gate), flatten_rows(up)
    n_rows, n_cols = g2.shape
    if not need_dgate:
        dgate = None
    elif dgate_out is not None:
        dgate = dgate_out.view(n_rows, n_cols)
    else:
        dgate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device) if need_dup else None
    if g2.numel():
        block, warps = _launch_config(n_cols, launch)
        _glu_bwd_kernel[(n_rows * triton.cdiv(n_cols, block),)](
            d2, g2, u2, dgate if need_dgate else d2, dup if need_dup else d2,
            d2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0) if need_dgate else 0, n_cols if need_dup else 0,
            n_cols, ACT=act, HAS_DGATE=need_dgate, HAS_DUP=need_dup, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return (dgate.view(gate.shape) if need_dgate else None), (dup.view(up.shape) if need_dup else None)


# ------------------------------------------------------------------- no-autograd entry points (fused callers)

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_TANH_COEF = 0.044715
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_torch(g: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 gelu(g) and gelu'(g), the torch form of ``_activation_and_derivative``."""
    if tanh:
        t = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_TANH_COEF * g * g * g))
        act = 0.5 * g * (1.0 + t)
        deriv = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_COEF * g * g)
    else:
        cdf = 0.5 * (1.0 + torch.erf(g * _INV_SQRT_2))
        act = g * cdf
        deriv = cdf + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI
    return act, deriv


def _forward_torch(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """act(gate) * up in fp32 torch math, rounded once to gate's dtype."""
    if act == _ACT_SILU:
        return (F.silu(gate.float()) * up.float()).to(gate.dtype)
    approximate = "tanh" if act == _ACT_GELU_TANH else "none"
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(gate.dtype)


def _backward_torch(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int, dgate_out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) in fp32 torch math; dgate goes into ``dgate_out`` when given."""
    g, u, d = gate.float(), up.float(), dout.float()
    if act == _ACT_SILU:
        sig = torch.sigmoid(g)
        dup = (d * g * sig).to(up.dtype)
        dgate = d * u * sig * (1.0 + g * (1.0 - sig))
    else:
        value, deriv = _gelu_torch(g, act == _ACT_GELU_TANH)
        dup = (d * value).to(up.dtype)
        dgate = d * u * deriv
    if dgate_out is None:
        return dgate.to(gate.dtype), dup
    dgate_out.copy_(dgate)
    return dgate_out, dup


def activation_code(activation: str, approximate: str = "tanh") -> int:
    """The kernels' activation code for ``glu_forward`` / ``glu_backward``.

    Args:
        activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU).
        approximate: for ``"gelu"``: ``"tanh"`` or ``"none"``, as in ``torch.nn.functional.gelu``.

    Raises:
        ValueError: unknown activation or approximation.
    """
    if activation == "silu":
        return _ACT_SILU
    if activation == "gelu":
        return _gelu_code(approximate)
    raise ValueError(f"activation must be 'silu' or 'gelu', got {activation!r}")


def glu_forward(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """``act(gate) * up`` without autograd (fp32 math, one rounding): the Triton kernel where ``use_triton``
    holds, else torch.

    Args:
        gate, up: (..., I) tensors of one shape and dtype.
        act: an ``activation_code``.

    Returns:
        (..., I) tensor in gate's dtype.
    """
    if use_triton(gate, up):
        return _forward(gate, up, act)
    return _forward_torch(gate, up, act)


def glu_backward(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: int,
    dgate_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dgate, dup)`` of ``act(gate) * up`` without autograd (fp32 math, one rounding each).

    Args:
        dout: (..., I) gradient of the output.
        gate, up: (..., I) forward inputs.
        act: an ``activation_code``.
        dgate_out: contiguous tensor of gate's shape and dtype that receives ``dgate`` (it may be ``dout``
            itself, saving one buffer); a new tensor when None.

    Returns:
        ``(dgate, dup)``; ``dgate`` is ``dgate_out`` when given.
    """
    if dgate_out is not None and (
        dgate_out.shape != gate.shape or dgate_out.dtype != gate.dtype or not dgate_out.is_contiguous()
    ):
        raise ValueError(
            f"dgate_out must be a contiguous {gate.dtype} tensor of shape {tuple(gate.shape)}, got "
            f"{dgate_out.dtype} {tuple(dgate_out.shape)} contiguous={dgate_out.is_contiguous()}"
        )
    if use_triton(dout, gate, up):
        dgate, dup = _backward(dout, gate, up, act, True, True, dgate_out=dgate_out)
        return dgate, dup
    return _backward_torch(dout, gate, up, act, dgate_out)


class _GLUFunction(torch.autograd.Function):
    """Eager autograd path; ``torch.compile`` uses the custom op below."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return _forward(gate, up, act)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = _backward(dout, gate, up, ctx.act, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dgate, dup, None


@torch.library.custom_op("fms_accel_kernels::glu_fwd", mutates_args=())
def _glu_fwd_op(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    return _forward(gate, up, act)


@_glu_fwd_op.register_fake
def _(gate, up, act):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("fms_accel_kernels::glu_bwd", mutates_args=())
def _glu_bwd_op(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int, need_dgate: bool, need_dup: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = _backward(dout, gate, up, act, need_dgate, need_dup)
    return (dgate if dgate is not None else gate.new_empty(0)), (dup if dup is not None else up.new_empty(0))


@_glu_bwd_op.register_fake
def _(dout, gate, up, act, need_dgate, need_dup):
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if need_dgate else gate.new_empty(0)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device) if need_dup else up.new_empty(0)
    return dgate, dup


def _glu_setup_context(ctx, inputs, output):
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _glu_autograd_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dgate, dup = _glu_bwd_op(dout, gate, up, ctx.act, need_dgate, need_dup)
    return (dgate if need_dgate else None), (dup if need_dup else None), None


_glu_fwd_op.register_autograd(_glu_autograd_backward, setup_context=_glu_setup_context)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float_dtype("gate", gate)
    check_float_dtype("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate ({gate.dtype}) and up ({up.dtype}) must share a dtype")


def _triton_glu(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    _check(gate, up)
    if torch.compiler.is_compiling():
        return _glu_fwd_op(gate, up, act)
    return _GLUFunction.apply(gate, up, act)


def _gelu_code(approximate: str) -> int:
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none' (as in torch.nn.functional.gelu); got {approximate!r}")
    return _GELU_APPROXIMATIONS[approximate]


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-torch SwiGLU as HF's MLP computes it: ``silu(gate) * up``.

    Args:
        gate: (..., I) gate projection output.
        up: (..., I) up projection output.

    Returns:
        (..., I) tensor in the inputs' dtype.
    """
    return F.silu(gate) * up


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU with autograd (fp32 math, recomputing backward); contract of :func:`swiglu_ref`."""
    return _triton_glu(gate, up, _ACT_SILU)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``silu(gate) * up``: Triton on CUDA (or ``TRITON_INTERPRET=1``), else the reference.

    Args:
        gate: (..., I) gate projection output, fp32/bf16/fp16.
        up: (..., I) up projection output, same shape and dtype.

    Returns:
        (..., I) tensor in the inputs' dtype.
    """
    if use_triton(gate, up):
        return swiglu_triton(gate, up)
    return swiglu_ref(gate, up)


def geglu_ref(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Pure-torch GeGLU: ``gelu(gate, approximate) * up``.

    Args:
        gate: (..., I) gate projection output.
        up: (..., I) up projection output.
        approximate: ``"tanh"`` (Gemma's ``gelu_pytorch_tanh``) or ``"none"`` (exact erf GELU).

    Returns:
        (..., I) tensor in the inputs' dtype.
    """
    _gelu_code(approximate)
    return F.gelu(gate, approximate=approximate) * up


def geglu_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Triton GeGLU with autograd (fp32 math, recomputing backward); contract of :func:`geglu_ref`."""
    return _triton_glu(gate, up, _gelu_code(approximate))


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU ``gelu(gate) * up``: Triton on CUDA (or ``TRITON_INTERPRET=1``), else the reference.

    Args:
        gate: (..., I) gate projection output, fp32/bf16/fp16.
        up: (..., I) up projection output, same shape and dtype.
        approximate: ``"tanh"`` or ``"none"``, as in ``torch.nn.functional.gelu``.

    Returns:
        (..., I) tensor in the inputs' dtype.
    """
    if use_triton(gate, up):
        return geglu_triton(gate, up, approximate)
    return geglu_ref(gate, up, approximate)
