"""Fused LoRA over a frozen (possibly 4-bit) base weight, with a memory-lean backward.

For one projection ``y = x W^T + b + s * (x A^T) B^T`` with ``W`` (out, in) frozen, ``A`` (r, in), ``B`` (out, r):

* forward dequantises ``W`` into a temporary (``W`` is a weight format of ``dequant.py``: packed tensors plus
  metadata, or a dense tensor), runs one GEMM, frees it, and adds the LoRA term in the GEMM epilogue
  (``addmm_``);
* backward saves only ``x``, the tiny ``x A^T`` (tokens, r), ``A`` and ``B`` in the compute dtype (cast once in
  forward, so the backward casts nothing; the parameters themselves when they already are in that dtype) and a
  reference to the quantised weight; it dequantises ``W`` again for ``dx = dy W`` instead of keeping a dense copy
  alive between forward and backward. Gradients: ``dx``, ``dA``, ``dB`` (and the bias when it requires grad); the base weight is frozen
  (a dense base weight that requires grad is refused).

Grouped variants share one input: ``lora_qkv`` saves ``x`` once, computes all three LoRA down-projections with
one GEMM (``A_q``, ``A_k``, ``A_v`` stacked) and accumulates ``dx`` of q, k and v into one buffer;
``lora_mlp_swiglu`` fuses gate/up/down with the SwiGLU activation, saving ``x``, ``gate`` and ``up`` and
recomputing ``silu(gate) * up`` in backward (with the GLU kernels of ``glu.py``); ``lora_mlp_geglu`` is the same
with ``gelu(gate) * up`` (Gemma). ``quantized_linear`` is the same machinery without an adapter, for frozen
quantised layers that LoRA does not target (their backward dequantises again instead of storing ``W``).

Everything here takes tensors (and weight formats, which hold tensors): reading them from ``nn.Module``s or PEFT
layers is the caller's job (the fused-ops plugin's ``fused_lora.py`` reads PEFT LoRA layers, and the frozen base
weights through the framework's dequant backends).

Dtypes: the matmuls run in ``x``'s dtype (or the autocast dtype when autocast is on); ``A``/``B`` (often fp32
under PEFT) are cast to it for the matmuls and receive gradients in their own dtype.

LoRA dropout: these kernels implement dropout = 0 only (the dominant QLoRA setting, and the one where saving
only ``x`` is possible; with dropout the dropped input or its mask would have to be kept as well); callers
refuse layers whose dropout is active.

FSDP: ``A``, ``B`` and the base weight's tensors must be the ones seen *inside* the module's forward (after FSDP
has gathered them); a patched forward should read them and call these functions from within the LoRA module's
forward, never hold tensors captured at patch time. The backward dequantises the base weight through the same tensor objects,
which FSDP re-gathers before the module's backward.

Double backward and ``retain_graph`` re-use of the MLP backward are supported (no saved tensor is modified in
place); higher-order gradients are not (``once_differentiable``).

torch.compile: the fused autograd functions are traced by Dynamo as they are (no custom op wraps the whole
projection: resolving the ``QuantizedWeight`` and the adapter is plain Python that Dynamo follows). The one piece Dynamo cannot trace is the Triton 4-bit dequant kernel, so under
``torch.compiler.is_compiling()`` a bitsandbytes 4-bit weight is dequantised by the custom op
``fms_accel_kernels::lora_dequantize_4bit`` (packed bytes, scales and tables as plain tensors), in forward and
again in backward; the compiled backward therefore still saves no dense weight. ``lora_linear`` over a dense or
bnb 4-bit base compiles with ``fullgraph=True`` (checked with the aot_eager backend on CPU in
tests/kernels/test_lora_compile.py). Other ``QuantizedWeight`` formats are dequantised by their own
``dequantize`` under compile, which Dynamo traces only if that is plain torch code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dequant import Bnb4bitWeight, DenseWeight, QuantizedWeight
from .glu import activation_code, glu_backward, glu_forward
from .nf4 import FourBitState, NestedAbsmax, dequantize_4bit

__all__ = [
    "LoraProjection",
    "lora_linear",
    "lora_linear_ref",
    "lora_mlp_geglu",
    "lora_mlp_geglu_ref",
    "lora_mlp_swiglu",
    "lora_mlp_swiglu_ref",
    "lora_qkv",
    "lora_qkv_ref",
    "quantized_linear",
    "quantized_linear_ref",
]

Base = torch.Tensor | QuantizedWeight
_WEIGHT_FORMAT_MEMBERS = ("shape", "dtype", "device", "dequantize", "dequantize_ref")


@dataclass(frozen=True)
class LoraProjection:
    """One projection for the fused functions: a frozen base and an optional LoRA adapter.

    Attributes:
        base: the frozen base weight: a dense (out, in) tensor that does not require grad, or a
            ``QuantizedWeight`` (``DenseWeight``, ``Bnb4bitWeight``, ...).
        lora_A: (r, in) adapter down-projection, or None for a projection without adapter.
        lora_B: (out, r) adapter up-projection (None exactly when ``lora_A`` is None).
        scaling: LoRA scaling ``s`` (PEFT: ``lora_alpha / r``).
        bias: (out,) bias, or None.
    """

    base: Base
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.lora_A is None) != (self.lora_B is None):
            raise ValueError("lora_A and lora_B must both be given or both be None")
        if self.lora_A is not None:
            if self.lora_A.dim() != 2 or self.lora_B.dim() != 2 or self.lora_A.shape[0] != self.lora_B.shape[1]:
                raise ValueError(
                    f"expected lora_A (r, in) and lora_B (out, r), got {tuple(self.lora_A.shape)} and "
                    f"{tuple(self.lora_B.shape)}"
                )


@dataclass(frozen=True)
class _Resolved:
    weight: QuantizedWeight
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scaling: float
    bias: torch.Tensor | None


def _resolve(spec: LoraProjection, in_features: int) -> _Resolved:
    base = spec.base
    if isinstance(base, torch.Tensor):
        if base.requires_grad:
            raise ValueError(
                "the base weight requires grad, but the fused LoRA kernels keep the base frozen; pass "
                "weight.detach() if it is meant to be frozen"
            )
        weight = DenseWeight(base)
    elif isinstance(base, (DenseWeight, Bnb4bitWeight)) or all(hasattr(base, m) for m in _WEIGHT_FORMAT_MEMBERS):
        # members checked one by one: Dynamo does not trace isinstance against a runtime-checkable Protocol
        weight = base
        # Only a trainable *Parameter* is refused. Under FSDP1 with use_orig_params the forward sees plain tensor
        # views of the flat parameter, which require grad when the flat parameter also holds LoRA weights; those
        # views stand for frozen parameters, get no gradient here, and FSDP drops the (zero) gradient of frozen
        # original parameters.
        if (
            isinstance(weight, DenseWeight)
            and isinstance(weight.weight, torch.nn.Parameter)
            and weight.weight.requires_grad
        ):
            raise ValueError(
                "the base weight is a parameter that requires grad, but the fused LoRA kernels keep the base frozen "
                "(no weight gradient); freeze it (weight.requires_grad_(False)) or do not fuse this layer"
            )
    else:
        raise TypeError(
            f"base must be a (out, in) weight tensor or a QuantizedWeight, got {type(base).__name__}; read a "
            "layer's weight with the dequant backends of fms_acceleration_accelerate.dequant first"
        )
    bias = spec.bias
    out_features, base_in = weight.shape
    if base_in != in_features:
        raise ValueError(f"input has {in_features} features but the base weight is {weight.shape} (out, in)")
    if spec.lora_A is not None:
        if spec.lora_A.shape[1] != in_features or spec.lora_B.shape[0] != out_features:
            raise ValueError(
                f"LoRA shapes A {tuple(spec.lora_A.shape)}, B {tuple(spec.lora_B.shape)} do not fit a base "
                f"weight of shape {weight.shape} (out, in)"
            )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    return _Resolved(weight, spec.lora_A, spec.lora_B, float(spec.scaling), bias)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# ------------------------------------------------------------------------------------- torch.compile seam


@torch.library.custom_op("fms_accel_kernels::lora_dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    orig_dtype: torch.dtype,
    dtype: torch.dtype,
) -> torch.Tensor:
    nested = None
    if nested_absmax is not None:
        nested = NestedAbsmax(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize, offset=nested_offset)
    state = FourBitState(
        absmax=absmax, shape=tuple(shape), blocksize=blocksize, quant_type=quant_type, dtype=orig_dtype, code=code,
        nested=nested,
    )  # fmt: skip
    return dequantize_4bit(packed, state, dtype=dtype)


@_dequantize_4bit_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize, nested_blocksize,
      quant_type, orig_dtype, dtype):  # fmt: skip
    return packed.new_empty(tuple(shape), dtype=dtype)


def _dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) weight in ``dtype``; under ``torch.compile`` a bitsandbytes 4-bit weight goes through
    the opaque custom op ``fms_accel_kernels::lora_dequantize_4bit`` (plain tensors and scalars in, so Dynamo
    does not trace into the Triton dequant kernel or the state dataclasses)."""
    if torch.compiler.is_compiling() and isinstance(weight, Bnb4bitWeight):
        state = weight.state
        nested = state.nested
        return _dequantize_4bit_op(
            weight.packed, state.absmax, state.code,
            nested.absmax if nested is not None else None, nested.code if nested is not None else None,
            nested.offset if nested is not None else None, list(state.shape), state.blocksize,
            nested.blocksize if nested is not None else 0, state.quant_type, state.dtype, dtype,
        )  # fmt: skip
    return weight.dequantize(dtype)


# ------------------------------------------------------------------------------------------ shared helpers


def _lora_down(x2: torch.Tensor, lora_As: Sequence[torch.Tensor | None], dtype: torch.dtype):
    """``x A^T`` for all adapters with one GEMM.

    Returns:
        ``(xa, slices, stacked)``: xa (T, sum r) or None; ``[(index, slice)]``, the rows of ``stacked`` / columns
        of ``xa`` of each adapter; stacked (sum r, in), the adapters' A in ``dtype`` (stacked, then cast once;
        saved for the backward, which then casts nothing), or None.
    """
    present = [(i, a) for i, a in enumerate(lora_As) if a is not None]
    if not present:
        return None, [], None
    stacked = (torch.cat([a for _, a in present], dim=0) if len(present) > 1 else present[0][1]).to(dtype)
    xa = x2 @ stacked.t()
    slices, start = [], 0
    for i, a in present:
        slices.append((i, slice(start, start + a.shape[0])))
        start += a.shape[0]
    return xa, slices, stacked


def _lora_backward(
    grads: Sequence[torch.Tensor | None],
    inp: torch.Tensor,
    down: torch.Tensor | None,
    stacked_a: torch.Tensor | None,
    slices: Sequence[tuple[int, slice]],
    cast_bs: Sequence[torch.Tensor | None],
    param_dtypes: Sequence[tuple[torch.dtype, torch.dtype] | None],
    scalings: Sequence[float],
    d_inp: torch.Tensor | None,
    need_inp: bool,
):
    """Adapter gradients of projections sharing one input.

    Args:
        grads: per projection, (T, out_i) upstream gradient or None.
        inp: (T, in) shared input.
        down: (T, sum r) saved ``inp A^T`` of all adapters (column blocks in projection order).
        stacked_a, slices: the adapters' A in the compute dtype and each adapter's rows, from ``_lora_down``.
        cast_bs: per projection, its B in the compute dtype (None without adapter).
        param_dtypes: per projection, the dtypes of its A and B parameters (those of the returned gradients).
        scalings: per projection, the LoRA scaling.
        d_inp: (T, in) input gradient accumulated so far (the base part), or None.
        need_inp: whether the input gradient is wanted.

    Returns:
        (d_inp, dA list, dB list); entries of projections without adapter or gradient are None.
    """
    n = len(grads)
    d_as: list[torch.Tensor | None] = [None] * n
    d_bs: list[torch.Tensor | None] = [None] * n
    parts, used = [], []
    for i, cols in slices:
        g = grads[i]
        if g is None:
            continue
        s = scalings[i]
        # dB = s * g^T (x A^T);  d(x A^T) = s * g B  (a scaling of 1 multiplies nothing: same values)
        d_b = g.t() @ down[:, cols]
        part = g @ cast_bs[i]
        if s != 1.0:
            d_b.mul_(s)
            part.mul_(s)
        d_bs[i] = d_b.to(param_dtypes[i][1])
        parts.append(part)
        used.append((i, cols))
    if parts:
        d_down = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if len(used) == len(slices):
            a = stacked_a
        else:  # some projection got no gradient: the rows of the others
            a = torch.cat([stacked_a[cols] for _, cols in used]) if len(used) > 1 else stacked_a[used[0][1]]
        if need_inp:
            if d_inp is None:
                d_inp = d_down @ a
            else:
                d_inp.addmm_(d_down, a)
        d_a_all = d_down.t() @ inp  # (sum r, in)
        row = 0
        for i, cols in used:
            r = cols.stop - cols.start
            d_as[i] = d_a_all[row : row + r].to(param_dtypes[i][0])
            row += r
    return d_inp, d_as, d_bs


def _cast_bs(lora_Bs: Sequence[torch.Tensor | None], dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Each B in the compute dtype (the parameter itself when it already is)."""
    return [b.to(dtype) if b is not None else None for b in lora_Bs]


def _param_dtypes(lora_As, lora_Bs) -> tuple[tuple[torch.dtype, torch.dtype] | None, ...]:
    return tuple((a.dtype, b.dtype) if a is not None else None for a, b in zip(lora_As, lora_Bs))


def _base_linear(
    inp: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """(T, in) -> (T, out) ``inp @ W^T + bias`` in ``dtype``; the dense ``W`` lives only for this GEMM."""
    w = _dequantize(weight, dtype)
    return F.linear(inp, w, bias.to(dtype) if bias is not None else None)


@dataclass(frozen=True)
class _Plan:
    weights: tuple[QuantizedWeight, ...]
    scalings: tuple[float, ...]
    out_features: tuple[int, ...]
    act: int = 0  # MLP only: the glu.activation_code of the gate activation
    compute_output: bool = True  # MLP only: False skips the down projection (see lora_mlp_swiglu)


# ------------------------------------------------------------------------------ grouped linear (O, QKV)


class _FusedLoraLinearFunction(torch.autograd.Function):
    """N projections of one input: y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T.

    ``flat`` holds (A_0, B_0, bias_0, A_1, B_1, bias_1, ...), None where absent.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _Plan, *flat: torch.Tensor | None):
        n = len(plan.weights)
        lora_As, lora_Bs, biases = flat[0::3], flat[1::3], flat[2::3]
        dtype = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        outs = []
        for i in range(n):
            outs.append(_base_linear(x2, plan.weights[i], biases[i], dtype))
        down, slices, stacked = _lora_down(x2, lora_As, dtype)
        cast_bs = _cast_bs(lora_Bs, dtype)
        for i, cols in slices:
            outs[i].addmm_(down[:, cols], cast_bs[i].t(), alpha=plan.scalings[i])
        ctx.plan = plan
        ctx.x_shape = x.shape
        ctx.slices = slices
        ctx.param_dtypes = _param_dtypes(lora_As, lora_Bs)
        ctx.save_for_backward(x2, down, stacked, *cast_bs)
        outs = tuple(o.view(*lead, o.shape[-1]) for o in outs)
        return outs[0] if n == 1 else outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs: torch.Tensor | None):
        plan: _Plan = ctx.plan
        n = len(plan.weights)
        x2, down, stacked, *cast_bs = ctx.saved_tensors
        dtype = x2.dtype
        grads = [
            g.reshape(-1, plan.out_features[i]).to(dtype) if g is not None else None for i, g in enumerate(grad_outs)
        ]
        need = ctx.needs_input_grad
        need_x = need[0]
        with torch.autocast(device_type=x2.device.type, enabled=False):
            dx = None
            if need_x:
                for i in range(n):
                    if grads[i] is None:
                        continue
                    w = _dequantize(plan.weights[i], dtype)  # recomputed instead of saved
                    if dx is None:
                        dx = grads[i] @ w
                    else:
                        dx.addmm_(grads[i], w)
                    del w
            dx, d_as, d_bs = _lora_backward(
                grads, x2, down, stacked, ctx.slices, cast_bs, ctx.param_dtypes, plan.scalings, dx, need_x
            )
            result: list[torch.Tensor | None] = [dx.view(ctx.x_shape) if (need_x and dx is not None) else None, None]
            for i in range(n):
                bias_grad = None
                if need[4 + 3 * i] and grads[i] is not None:
                    bias_grad = grads[i].sum(0)
                result += [
                    d_as[i] if need[2 + 3 * i] else None,
                    d_bs[i] if need[3 + 3 * i] else None,
                    bias_grad,
                ]
        return tuple(result)


def _apply_fused(
    function: type[torch.autograd.Function],
    x: torch.Tensor,
    resolved: Sequence[_Resolved],
    act: int = 0,
    compute_output: bool = True,
):
    """Run ``function`` (a fused LoRA autograd function) on ``x`` in the compute dtype, autocast off inside."""
    dtype = _compute_dtype(x)
    plan = _Plan(
        weights=tuple(r.weight for r in resolved),
        scalings=tuple(r.scaling for r in resolved),
        out_features=tuple(r.weight.shape[0] for r in resolved),
        act=act,
        compute_output=compute_output,
    )
    flat: list[torch.Tensor | None] = []
    for r in resolved:
        flat += [r.lora_A, r.lora_B, r.bias]
    with torch.autocast(device_type=x.device.type, enabled=False):
        return function.apply(x.to(dtype), plan, *flat)


def _run_grouped(x: torch.Tensor, specs: Sequence[LoraProjection]):
    resolved = [_resolve(s, x.shape[-1]) for s in specs]
    return _apply_fused(_FusedLoraLinearFunction, x, resolved)


def lora_linear(
    x: torch.Tensor,
    base: Base,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused LoRA projection ``x W^T + bias + scaling * (x A^T) B^T`` (e.g. the attention O projection).

    Callers must pass ``lora_A``/``lora_B`` (and the tensors of ``base``) as obtained inside the module's forward,
    so that FSDP has gathered them (see the module docstring).

    Args:
        x: (..., in) input.
        base: frozen base: (out, in) weight tensor or ``QuantizedWeight``.
        lora_A: (r, in) adapter weight (``lora_A.weight``), or None for no adapter.
        lora_B: (out, r) adapter weight (``lora_B.weight``), or None.
        scaling: LoRA scaling (PEFT: ``lora_alpha / r``).
        bias: (out,) bias, or None.

    Returns:
        (..., out) output in the compute dtype (``x``'s dtype, or the autocast dtype).
    """
    return _run_grouped(x, [LoraProjection(base, lora_A, lora_B, scaling, bias)])


def quantized_linear(
    x: torch.Tensor,
    base: Base,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Frozen (quantised) linear ``x W^T + bias`` whose backward dequantises ``W`` again instead of storing it.

    Args:
        x: (..., in) input.
        base: frozen base: (out, in) weight tensor or ``QuantizedWeight`` (e.g. a ``Bnb4bitWeight``).
        bias: (out,) bias, or None.

    Returns:
        (..., out) output in the compute dtype.
    """
    return _run_grouped(x, [LoraProjection(base, None, None, 1.0, bias)])


def lora_qkv(
    x: torch.Tensor,
    q: LoraProjection,
    k: LoraProjection,
    v: LoraProjection,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused q, k, v projections of one input, each a frozen base plus an optional LoRA adapter.

    ``x`` is saved once; the three LoRA down-projections run as one GEMM; in backward ``dx`` of all three
    accumulates into one buffer and each base weight is dequantised again, one at a time.

    Args:
        x: (..., hidden) input.
        q, k, v: the three projections; tensors inside must be those seen inside the module forward (FSDP).

    Returns:
        (q, k, v), each (..., out_i) in the compute dtype.
    """
    return _run_grouped(x, [q, k, v])


# -------------------------------------------------------------------------------------------------- MLP


class _FusedLoraMlpFunction(torch.autograd.Function):
    """y = down(act(gate(x)) * up(x)), each projection a frozen base plus optional LoRA.

    ``act`` is ``plan.act``: silu (SwiGLU) or gelu with the tanh / erf form (GeGLU), computed by the GLU
    kernels of ``glu.py``.

    ``flat`` holds (A_g, B_g, bias_g, A_u, B_u, bias_u, A_d, B_d, bias_d), None where absent.
    Saved: x, gate, up, the (T, r) LoRA down-projections, A and B in the compute dtype; not saved:
    h = act(gate) * up, any dense weight.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _Plan, *flat: torch.Tensor | None):
        lora_As, lora_Bs, biases = flat[0::3], flat[1::3], flat[2::3]
        dtype = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        gate_up = []
        for i in (0, 1):
            gate_up.append(_base_linear(x2, plan.weights[i], biases[i], dtype))
        cast_bs = _cast_bs(lora_Bs, dtype)
        down_gu, slices, stacked_gu = _lora_down(x2, lora_As[:2], dtype)
        for i, cols in slices:
            gate_up[i].addmm_(down_gu[:, cols], cast_bs[i].t(), alpha=plan.scalings[i])
        gate, up = gate_up
        h = glu_forward(gate, up, plan.act)
        down_d, slices_d, stacked_d = _lora_down(h, lora_As[2:], dtype)
        if plan.compute_output:
            y = _base_linear(h, plan.weights[2], biases[2], dtype)
            if slices_d:
                y.addmm_(down_d, cast_bs[2].t(), alpha=plan.scalings[2])
        elif plan.out_features[2] == x2.shape[1]:
            # the caller discards y (checkpoint recomputation): only the saved tensors below matter. The
            # placeholder is the input itself, not a new tensor: a recomputation under selective checkpointing
            # (checkpoint_keep_attention) may only run ops its forward ran, and the forward ran no allocation here
            y = x2
        else:
            y = x2.new_zeros(x2.shape[0], plan.out_features[2])
        del h
        ctx.plan = plan
        ctx.x_shape = x.shape
        ctx.slices = (slices, slices_d)
        ctx.param_dtypes = _param_dtypes(lora_As, lora_Bs)
        ctx.save_for_backward(x2, gate, up, down_gu, down_d, stacked_gu, stacked_d, *cast_bs)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        plan: _Plan = ctx.plan
        x2, gate, up, down_gu, down_d, stacked_gu, stacked_d, *cast_bs = ctx.saved_tensors
        slices_gu, slices_d = ctx.slices
        dtype = x2.dtype
        need = ctx.needs_input_grad
        gy = grad_y.reshape(-1, plan.out_features[2]).to(dtype)
        with torch.autocast(device_type=x2.device.type, enabled=False):
            # down projection: its input h is recomputed (only needed for dA_down)
            d_as_d = [None]
            d_bs_d = [None]
            dh = _dequantize(plan.weights[2], dtype)
            dh = gy @ dh  # (T, I); the dense down weight is dropped right after
            if slices_d:
                h = glu_forward(gate, up, plan.act)
                dh, d_as_d, d_bs_d = _lora_backward(
                    [gy], h, down_d, stacked_d, slices_d, cast_bs[2:], ctx.param_dtypes[2:], plan.scalings[2:], dh,
                    True,
                )  # fmt: skip
                del h
            bias_d = gy.sum(0) if need[10] else None
            dgate, dup = glu_backward(dh, gate, up, plan.act, dgate_out=dh)  # dgate overwrites dh
            del dh
            need_x = need[0]
            dx = None
            if need_x:
                for i, g in ((0, dgate), (1, dup)):
                    w = _dequantize(plan.weights[i], dtype)
                    if dx is None:
                        dx = g @ w
                    else:
                        dx.addmm_(g, w)
                    del w
            dx, d_as, d_bs = _lora_backward(
                [dgate, dup], x2, down_gu, stacked_gu, slices_gu, cast_bs[:2], ctx.param_dtypes[:2], plan.scalings[:2],
                dx, need_x,
            )  # fmt: skip
            bias_g = dgate.sum(0) if need[4] else None
            bias_u = dup.sum(0) if need[7] else None
        return (
            dx.view(ctx.x_shape) if need_x else None,
            None,
            d_as[0] if need[2] else None,
            d_bs[0] if need[3] else None,
            bias_g,
            d_as[1] if need[5] else None,
            d_bs[1] if need[6] else None,
            bias_u,
            d_as_d[0] if need[8] else None,
            d_bs_d[0] if need[9] else None,
            bias_d,
        )


def lora_mlp_swiglu(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    compute_output: bool = True,
) -> torch.Tensor:
    """Fused SwiGLU MLP ``down(silu(gate(x)) * up(x))``, each projection a frozen base plus optional LoRA.

    Saves ``x``, ``gate`` and ``up`` (the activation is recomputed in backward) and no dense weight; each base
    weight is dequantised into a temporary when needed, in forward and again in backward.

    Args:
        x: (..., hidden) input.
        gate, up: (intermediate, hidden) projections; down: (hidden, intermediate). Tensors inside must be
            those seen inside the module forward (FSDP).
        compute_output: ``False`` skips the down projection (its dequant and GEMM) and returns a placeholder
            of the output's shape whose values are meaningless (the input itself where shapes allow), while
            saving exactly what a full call saves, so backward is unchanged. Only for a forward whose output
            is discarded: activation checkpointing's recomputation of a layer where nothing after the MLP
            saves its output (see ``fms_acceleration_accelerate_foak.recompute``).

    Returns:
        (..., hidden) output in the compute dtype (a placeholder when ``compute_output`` is ``False``).
    """
    resolved = _resolve_mlp(x, gate, up, down)
    return _apply_fused(_FusedLoraMlpFunction, x, resolved, activation_code("silu"), compute_output)


def _resolve_mlp(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
) -> list[_Resolved]:
    hidden = x.shape[-1]
    g = _resolve(gate, hidden)
    u = _resolve(up, hidden)
    if g.weight.shape != u.weight.shape:
        raise ValueError(f"gate {g.weight.shape} and up {u.weight.shape} projections must have the same shape")
    d = _resolve(down, g.weight.shape[0])
    return [g, u, d]


def lora_mlp_geglu(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    approximate: str = "tanh",
    compute_output: bool = True,
) -> torch.Tensor:
    """Fused GeGLU MLP ``down(gelu(gate(x)) * up(x))`` (Gemma / Gemma 2), each projection a frozen base plus
    optional LoRA.

    Same memory-lean design as ``lora_mlp_swiglu``: saves ``x``, ``gate`` and ``up`` (``gelu(gate) * up`` is
    recomputed in backward, fp32 math) and no dense weight; ``dgate`` is written over the ``dh`` buffer.

    Args:
        x: (..., hidden) input.
        gate, up: (intermediate, hidden) projections; down: (hidden, intermediate). Tensors inside must be
            those seen inside the module forward (FSDP).
        approximate: ``"tanh"`` (HF ``gelu_pytorch_tanh``, Gemma's default) or ``"none"`` (exact erf GELU), as
            in ``torch.nn.functional.gelu``.
        compute_output: as in ``lora_mlp_swiglu``.

    Returns:
        (..., hidden) output in the compute dtype (a placeholder when ``compute_output`` is ``False``).

    Raises:
        ValueError: ``approximate`` is not ``"tanh"`` or ``"none"``, or the projection shapes do not fit.
    """
    act = activation_code("gelu", approximate)
    resolved = _resolve_mlp(x, gate, up, down)
    return _apply_fused(_FusedLoraMlpFunction, x, resolved, act, compute_output)


# ------------------------------------------------------------------------------------------- references


def _ref_projection(x: torch.Tensor, spec: LoraProjection) -> torch.Tensor:
    r = _resolve(spec, x.shape[-1])
    w = r.weight.dequantize_ref(x.dtype)
    bias = r.bias.to(x.dtype) if r.bias is not None else None
    y = F.linear(x, w, bias)
    if r.lora_A is not None:
        # PEFT's order: lora_B(lora_A(x)) * scaling
        y = y + F.linear(F.linear(x, r.lora_A.to(x.dtype)), r.lora_B.to(x.dtype)) * r.scaling
    return y


def lora_linear_ref(
    x: torch.Tensor,
    base: Base,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch (autograd) reference of ``lora_linear``; same arguments and result."""
    return _ref_projection(x, LoraProjection(base, lora_A, lora_B, scaling, bias))


def quantized_linear_ref(
    x: torch.Tensor,
    base: Base,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch (autograd) reference of ``quantized_linear``; same arguments and result."""
    return _ref_projection(x, LoraProjection(base, None, None, 1.0, bias))


def lora_qkv_ref(
    x: torch.Tensor,
    q: LoraProjection,
    k: LoraProjection,
    v: LoraProjection,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch (autograd) reference of ``lora_qkv``; same arguments and result."""
    return tuple(_ref_projection(x, spec) for spec in (q, k, v))


def lora_mlp_swiglu_ref(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
) -> torch.Tensor:
    """Pure-torch (autograd) reference of ``lora_mlp_swiglu``; same arguments and result."""
    h = F.silu(_ref_projection(x, gate)) * _ref_projection(x, up)
    return _ref_projection(h, down)


def lora_mlp_geglu_ref(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    approximate: str = "tanh",
    compute_output: bool = True,
) -> torch.Tensor:
    """Pure-torch (autograd) reference of ``lora_mlp_geglu``; same arguments and result."""
    activation_code("gelu", approximate)
    h = F.gelu(_ref_projection(x, gate), approximate=approximate) * _ref_projection(x, up)
    return _ref_projection(h, down)
