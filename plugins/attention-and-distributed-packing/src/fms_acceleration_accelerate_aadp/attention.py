"""Attention backends that never let one example attend to another, and the choice among them.

Every backend computes causal self-attention within each example of a :class:`~.segments.Segments` (plus the
layer's sliding window, logit soft-capping and attention dropout where the model has them):

==============  ============================================================  ============================================
backend         kernel                                                        cannot honour
==============  ============================================================  ============================================
``flash_attn``  flash-attn's ``flash_attn_varlen_func`` over the real tokens  CPU, float32; soft-capping before 2.6;
                                                                              attention sinks
``varlen``      ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own      CPU, float32, soft-capping, attention
                flash kernel) over the real tokens                            dropout, attention sinks; sliding windows
                                                                              where the installed torch has no
                                                                              ``window_size``
``flex``        ``flex_attention`` (compiled) with a document ``BlockMask``   attention dropout, attention sinks;
                built once per forward; soft-capping as a score modifier      training on CPU (PyTorch has no CPU
                                                                              backward for it)
``sdpa``        ``scaled_dot_product_attention`` with a block-diagonal        soft-capping
                boolean mask per row (memory grows with the row length²);
                attention sinks as an extra key column of a per-head float
                mask
``eager``       explicit ``softmax(q kᵀ) v`` with the same mask; attention    nothing (the slowest)
                sinks as an extra softmax column
==============  ============================================================  ============================================

Attention sinks (GPT-OSS: a learned logit per head, handed to the attention function as ``s_aux``) add one column
per head to every softmax and drop its probability; a backend that cannot add it would compute another model, so
those backends refuse such models (:attr:`ModelNeeds.sinks`), and the attention function refuses a call carrying
sinks that its backend cannot apply.

:func:`choose_backend` takes the configured backend, or for ``auto`` the first in that order that is installed and
can honour the model (:class:`ModelNeeds`) and the run (:class:`RunNeeds`), and says why each earlier one was passed
over. Batches whose queries and keys differ in length (decoding with a key/value cache) use the block-diagonal mask
path of ``eager`` / ``sdpa`` whatever the backend: padding-free is a training layout.

:func:`make_attention_function` returns the function registered in transformers' ``AttentionInterface``; it reads
the batch's :class:`~.segments.Segments` from the keyword argument :data:`SEGMENTS_KWARG`, which the decoder stack's
wrapped forward (:func:`make_segments_forward`) computes once per forward, or computes them itself from the
forward's ``position_ids`` / ``cu_seq_lens_q`` / padding mask when called without the wrapper (once per layer then,
each time reading the examples' count and longest length back to the host).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fms_acceleration_accelerate.errors import AccelerationConfigError

from .segments import Segments, segments_of_batch

SEGMENTS_KWARG = "fms_padding_free_segments"
"""Keyword argument through which the wrapped decoder-stack forward hands every attention layer the batch's segments."""

_FIX_BACKEND = "set training.attention.padding_free.attention_backend to one that can (or 'auto')"

_NO_SINKS = "has no attention sinks (the model's learned per-head softmax column)"


@dataclass(frozen=True)
class ModelNeeds:
    """What a model's attention layers ask of a backend.

    Attributes:
        sliding_window: some layer attends only to a window of recent tokens.
        softcap: attention logits are soft-capped (Gemma 2's ``attn_logit_softcapping``).
        dropout: attention dropout is on in training.
        sinks: attention sinks (GPT-OSS): a learned logit per head joins every softmax (``s_aux``).
    """

    sliding_window: bool = False
    softcap: bool = False
    dropout: bool = False
    sinks: bool = False

    def describe(self) -> str:
        needs = [n for n, on in (("sliding windows", self.sliding_window), ("soft-capping", self.softcap),
                                 ("attention dropout", self.dropout), ("attention sinks", self.sinks)) if on]  # fmt: skip
        return ", ".join(needs) or "plain causal attention"


@dataclass(frozen=True)
class RunNeeds:
    """Where the attention runs.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        dtype: the attention's compute dtype (the mixed-precision dtype, else the model's).
        training: gradients flow through the attention.
    """

    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32
    training: bool = True

    def describe(self) -> str:
        return f"{self.device_type}, {str(self.dtype).removeprefix('torch.')}{', training' if self.training else ''}"


def model_needs(model: Any, attention_modules: list[Any], sinks_attribute: str | None = None) -> ModelNeeds:
    """:class:`ModelNeeds` of ``model`` (a causal LM) from its config and its attention modules (``sinks_attribute``:
    the attention modules' sinks, as the architecture spec names them)."""
    config = model.config
    window = any(getattr(m, "sliding_window", None) for m in attention_modules)
    if not window and not any(hasattr(m, "sliding_window") for m in attention_modules):
        window = getattr(config, "sliding_window", None) is not None  # passed from the config by the attention
    dropout = any(float(getattr(config, name, 0.0) or 0.0) > 0.0 for name in ("attention_dropout", "attn_pdrop"))
    return ModelNeeds(
        sliding_window=bool(window),
        softcap=getattr(config, "attn_logit_softcapping", None) is not None,
        dropout=dropout,
        sinks=sinks_attribute is not None
        and any(isinstance(getattr(m, sinks_attribute, None), torch.Tensor) for m in attention_modules),
    )


# ---------------------------------------------------------------------------------------------------------------
# backends


class AttentionBackend:
    """One way to compute attention over :class:`~.segments.Segments`.

    Subclasses set ``name`` and implement :meth:`unavailable` (the package or function is missing),
    :meth:`cannot_run` (the model or the run asks for something the kernel lacks) and :meth:`attend`. Those that set
    ``supports_sinks`` take the attention sinks as ``attend(..., sinks=(H,) tensor)``.
    """

    name: str = ""
    supports_sinks: bool = False

    def unavailable(self) -> str | None:
        """Why the backend cannot be used in this installation, or ``None``."""
        return None

    def cannot_run(self, model: ModelNeeds, run: RunNeeds) -> str | None:
        """Why the backend cannot honour this model on this run, or ``None``."""
        return None

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        segments: Segments,
        *,
        scaling: float,
        dropout: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """Attention of ``query`` ``(B, H, L, D)`` over ``key`` / ``value`` ``(B, H_kv, L, D)`` within each example;
        returns ``(B, L, H, D)``."""
        raise NotImplementedError


def _half_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _to_tokens(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(real tokens, H, D)`` in row-major order."""
    b, h, length, d = x.shape
    tokens = x.transpose(1, 2).reshape(b * length, h, d)
    return tokens if segments.real_index is None else tokens.index_select(0, segments.real_index)


def _from_tokens(out: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``(real tokens, H, D)`` -> ``(B, L, H, D)`` (pad tokens get zeros)."""
    b, length = segments.batch, segments.length
    if segments.real_index is None:
        return out.reshape(b, length, *out.shape[1:])
    full = out.new_zeros(b * length, *out.shape[1:])
    full = full.index_copy(0, segments.real_index, out)
    return full.reshape(b, length, *out.shape[1:])


class FlashAttnBackend(AttentionBackend):
    """flash-attn's variable-length kernel (``flash_attn_varlen_func``)."""

    name = "flash_attn"

    def __init__(self, function: Callable[..., torch.Tensor] | None = None) -> None:
        self._function = function

    def function(self) -> Callable[..., torch.Tensor]:
        if self._function is None:
            from flash_attn import flash_attn_varlen_func

            self._function = flash_attn_varlen_func
        return self._function

    def unavailable(self) -> str | None:
        if self._function is None and importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed"
        return None

    def cannot_run(self, model: ModelNeeds, run: RunNeeds) -> str | None:
        if self._function is None and run.device_type != "cuda":
            return f"needs a CUDA device (the run is on {run.device_type})"
        if self._function is None and not _half_precision(run.dtype):
            return f"needs fp16 or bf16 (the attention runs in {str(run.dtype).removeprefix('torch.')})"
        if model.sinks:
            return _NO_SINKS
        if model.softcap and "softcap" not in inspect.signature(self.function()).parameters:
            return "the installed flash-attn has no soft-capping (flash-attn >= 2.6 has)"
        return None

    def attend(self, query, key, value, segments, *, scaling, dropout, sliding_window, softcap):
        kwargs: dict[str, Any] = {"dropout_p": dropout, "softmax_scale": scaling, "causal": True}
        if sliding_window is not None:
            kwargs["window_size"] = (sliding_window - 1, 0)
        if softcap is not None:
            kwargs["softcap"] = softcap
        out = self.function()(
            _to_tokens(query, segments),
            _to_tokens(key, segments),
            _to_tokens(value, segments),
            segments.cu_seqlens,
            segments.cu_seqlens,
            segments.max_len,
            segments.max_len,
            **kwargs,
        )
        return _from_tokens(out, segments)


def _flash_ops_usable() -> bool:
    """Whether this torch's private flash attention ops take the arguments :class:`_FlashVarlenFunction` passes."""
    aten = torch.ops.aten
    if not (hasattr(aten, "_flash_attention_forward") and hasattr(aten, "_flash_attention_backward")):
        return False
    needed = {"scale", "window_size_left", "window_size_right"}
    for op, positional in ((aten._flash_attention_forward, 10), (aten._flash_attention_backward, 14)):
        arguments = op.default._schema.arguments
        names = {a.name for a in arguments}
        if not needed <= names or sum(1 for a in arguments if not a.kwarg_only) != positional:
            return False
    return True


class _FlashVarlenFunction(torch.autograd.Function):
    """Causal variable-length attention through PyTorch's flash kernels, called directly.

    The same kernels ``torch.nn.attention.varlen.varlen_attn`` runs, without its custom-op dispatch (a few hundred
    microseconds of host time per call, forward and backward, which a host-bound step of a few thousand tokens
    pays in every layer). Key/value heads may be fewer than query heads (the kernels read them grouped).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len, scale, window_left):
        out, lse, rng_a, rng_b, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False,
            scale=scale, window_size_left=window_left, window_size_right=0,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse, rng_a, rng_b)
        ctx.max_len, ctx.scale, ctx.window_left = max_len, scale, window_left
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu_seqlens, out, lse, rng_a, rng_b = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0, True,
            rng_a, rng_b, scale=ctx.scale, window_size_left=ctx.window_left, window_size_right=0,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


class TorchVarlenBackend(AttentionBackend):
    """PyTorch's own variable-length attention, ``torch.nn.attention.varlen.varlen_attn`` (its flash kernel)."""

    name = "varlen"

    def __init__(self, function: Callable[..., torch.Tensor] | None = None) -> None:
        self._function = function
        self._parameter_names: set[str] | None = None
        self._direct: bool | None = None

    def function(self) -> Callable[..., torch.Tensor] | None:
        if self._function is None:
            try:
                from torch.nn.attention.varlen import varlen_attn
            except ImportError:
                return None
            self._function = varlen_attn
        return self._function

    def _is_torch_kernel(self) -> bool:
        return self.function() is not None and self.function().__module__ == "torch.nn.attention.varlen"

    def _parameters(self) -> set[str]:
        if self._parameter_names is None:
            function = self.function()
            self._parameter_names = set(inspect.signature(function).parameters) if function is not None else set()
        return self._parameter_names

    def _calls_kernels_directly(self) -> bool:
        """torch's own function, whose flash kernels :class:`_FlashVarlenFunction` calls without the custom op."""
        if self._direct is None:
            self._direct = self._is_torch_kernel() and _flash_ops_usable()
        return self._direct

    def unavailable(self) -> str | None:
        if self.function() is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
        return None

    def cannot_run(self, model: ModelNeeds, run: RunNeeds) -> str | None:
        # settle how ``attend`` will call the kernels now, while choosing: under torch.compile, ``attend`` is traced,
        # and inspecting signatures or op schemas there would break the graph in every attention layer
        self._parameters()
        self._calls_kernels_directly()
        if self._function is None or self._is_torch_kernel():
            if run.device_type != "cuda":
                return f"needs a CUDA device (the run is on {run.device_type})"
            if not _half_precision(run.dtype):
                return f"needs fp16 or bf16 (the attention runs in {str(run.dtype).removeprefix('torch.')})"
        if model.sinks:
            return _NO_SINKS
        if model.softcap:
            return "has no soft-capping"
        if model.dropout:
            return "has no attention dropout"
        if model.sliding_window and "window_size" not in self._parameters():
            return f"torch {torch.__version__}'s varlen_attn has no sliding window (window_size)"
        return None

    def attend(self, query, key, value, segments, *, scaling, dropout, sliding_window, softcap):
        if dropout or softcap is not None:
            raise AccelerationConfigError(
                "the varlen attention backend got attention dropout or soft-capping, which it cannot compute",
                fix=_FIX_BACKEND,
            )
        q, k, v = (_to_tokens(t, segments) for t in (query, key, value))
        if q.is_cuda and self._calls_kernels_directly():
            window_left = -1 if sliding_window is None else sliding_window - 1
            out = _FlashVarlenFunction.apply(q, k, v, segments.cu_seqlens, segments.max_len, scaling, window_left)
            return _from_tokens(out, segments)
        parameters = self._parameters()
        kwargs: dict[str, Any] = {"scale": scaling}
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in parameters:
                kwargs["enable_gqa"] = True
            elif not self._is_torch_kernel():
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            # else: torch's flash kernel reads grouped key/value heads as they are (no copies of k and v per query
            # head, forward or backward)
        if "window_size" in parameters:
            kwargs["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
        elif sliding_window is not None:
            raise AccelerationConfigError(
                f"torch {torch.__version__}'s varlen_attn has no sliding window", fix=_FIX_BACKEND
            )
        else:
            kwargs["is_causal"] = True
        cu, n = segments.cu_seqlens, segments.max_len
        return _from_tokens(self.function()(q, k, v, cu, cu, n, n, **kwargs), segments)


class FlexBackend(AttentionBackend):
    """``flex_attention`` (compiled once per backend instance) with a document mask."""

    name = "flex"

    def __init__(self, compile: bool = True) -> None:
        self._compile = compile
        self._compiled: Callable[..., torch.Tensor] | None = None
        # the segments of the forward in progress and their block masks by sliding window (every layer reuses them)
        self._masks: tuple[Segments, dict[int | None, Any]] | None = None

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no flex_attention"
        return None

    def cannot_run(self, model: ModelNeeds, run: RunNeeds) -> str | None:
        if model.sinks:
            return _NO_SINKS
        if model.dropout:
            return "has no attention dropout"
        if run.training and run.device_type == "cpu":
            return "PyTorch has no CPU backward for flex_attention"
        return None

    def _flex(self) -> Callable[..., torch.Tensor]:
        if self._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            # default dynamism: after the first change of the flattened length the kernel is compiled for dynamic
            # lengths, so batches of every length reuse it
            self._compiled = torch.compile(flex_attention) if self._compile else flex_attention
        return self._compiled

    def block_mask(self, segments: Segments, sliding_window: int | None) -> Any:
        """The document mask of ``segments``, built once per forward and sliding window (kept while ``segments`` is the
        forward's: every layer, and the recomputation of checkpointed layers, reuse it)."""
        if self._masks is None or self._masks[0] is not segments:
            self._masks = (segments, {})
        masks = self._masks[1]
        if sliding_window in masks:
            return masks[sliding_window]
        from torch.nn.attention.flex_attention import create_block_mask

        doc = segments.doc_ids

        def document_causal(b, h, q_idx, kv_idx):
            keep = (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)
            if sliding_window is not None:
                keep = keep & (q_idx - kv_idx < sliding_window)
            return keep

        mask = create_block_mask(
            document_causal,
            segments.batch,
            None,
            segments.length,
            segments.length,
            device=doc.device,
            _compile=self._compile and doc.device.type == "cuda",  # compiled: no length x length mask in memory
        )
        masks[sliding_window] = mask
        return mask

    def attend(self, query, key, value, segments, *, scaling, dropout, sliding_window, softcap):
        if dropout:
            raise AccelerationConfigError("the flex attention backend has no attention dropout", fix=_FIX_BACKEND)
        score_mod = None
        if softcap is not None:

            def score_mod(score, b, h, q_idx, kv_idx):
                return softcap * torch.tanh(score / softcap)

        out = self._flex()(
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=self.block_mask(segments, sliding_window),
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2)


class SdpaBackend(AttentionBackend):
    """``scaled_dot_product_attention`` with a block-diagonal boolean mask per row (with attention sinks: a float
    mask per head, one column longer, see :func:`_sdpa`)."""

    name = "sdpa"
    supports_sinks = True

    def cannot_run(self, model: ModelNeeds, run: RunNeeds) -> str | None:
        if model.softcap:
            return "has no soft-capping"
        return None

    def attend(self, query, key, value, segments, *, scaling, dropout, sliding_window, softcap, sinks=None):
        if softcap is not None:
            raise AccelerationConfigError("the sdpa attention backend has no soft-capping", fix=_FIX_BACKEND)
        return _sdpa(query, key, value, segments.allowed(sliding_window), scaling, dropout, sinks)


class EagerBackend(AttentionBackend):
    """``softmax(q kᵀ · scale [soft-capped] + mask [, sink]) v`` written out, with the block-diagonal mask."""

    name = "eager"
    supports_sinks = True

    def attend(self, query, key, value, segments, *, scaling, dropout, sliding_window, softcap, sinks=None):
        return _eager(query, key, value, segments.allowed(sliding_window), scaling, dropout, softcap, sinks)


def _sdpa(query, key, value, allowed, scaling, dropout, sinks=None) -> torch.Tensor:
    """SDPA over the ``allowed`` mask. With ``sinks`` ((H,) logits): one more key per head whose key and value are
    zero, so its logit is the mask's value there, the head's sink, and it adds nothing to the output; the mask is
    then additive, per head, ``(B, H, Lq, Lk + 1)`` in the query's dtype (the sinks' gradient flows through it)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mask = allowed
    if sinks is not None:
        b, h, lq, _ = query.shape
        blocked = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, -math.inf)
        column = sinks.to(query.dtype).view(1, h, 1, 1).expand(b, h, lq, 1)
        mask = torch.cat((blocked.expand(b, h, lq, -1), column), dim=-1)
        key = torch.cat((key, key.new_zeros(b, h, 1, key.shape[-1])), dim=2)
        value = torch.cat((value, value.new_zeros(b, h, 1, value.shape[-1])), dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)


def _eager(query, key, value, allowed, scaling, dropout, softcap, sinks=None) -> torch.Tensor:
    """Attention written out; ``sinks`` ((H,) logits): a column per head joins the softmax and is dropped after."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if sinks is not None:
        b, h, lq, _ = scores.shape
        column = sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, lq, 1)
        weights = torch.softmax(torch.cat((scores, column), dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
        weights = weights.to(query.dtype)
    else:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, value).transpose(1, 2)


BACKEND_CLASSES: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (FlashAttnBackend, TorchVarlenBackend, FlexBackend, SdpaBackend, EagerBackend)
}


@dataclass(frozen=True)
class BackendChoice:
    """The chosen backend and why the ones before it were passed over."""

    backend: AttentionBackend
    passed_over: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return self.backend.name

    def describe(self) -> str:
        skipped = "; ".join(f"{name}: {why}" for name, why in self.passed_over)
        return self.name + (f" (passed over {skipped})" if skipped else "")


def choose_backend(
    preference: tuple[str, ...],
    model: ModelNeeds,
    run: RunNeeds,
    *,
    backends: dict[str, AttentionBackend] | None = None,
    path: str | None = None,
) -> BackendChoice:
    """The first backend of ``preference`` that is installed and can honour ``model`` on ``run``.

    Args:
        preference: backend names in order (one name for an explicit choice).
        model: what the model's attention asks for.
        run: device, dtype, training.
        backends: backend instances by name (default: new ones).
        path: the config key path to name in errors.

    Raises:
        AccelerationConfigError: no backend of ``preference`` can run; the message says why each cannot.
    """
    passed_over: list[tuple[str, str]] = []
    for name in preference:
        backend = (backends or {}).get(name) or BACKEND_CLASSES[name]()
        why = backend.unavailable() or backend.cannot_run(model, run)
        if why is None:
            return BackendChoice(backend, tuple(passed_over))
        passed_over.append((name, why))
    reasons = "; ".join(f"{name} {why}" for name, why in passed_over)
    raise AccelerationConfigError(
        f"attention backend {'/'.join(preference)} cannot run this model ({model.describe()}) on this run "
        f"({run.describe()}): {reasons}",
        path=path,
        fix="set attention_backend: auto (it picks one that can), or change the run (e.g. mixed_precision: bf16 on "
        "a GPU for flash_attn / varlen)",
    )


# ---------------------------------------------------------------------------------------------------------------
# the function registered in transformers' AttentionInterface


def _dense_with_cache(
    query, key, value, attention_mask, scaling, dropout, sliding_window, softcap, sinks=None
) -> torch.Tensor:
    """Queries that are the last ``Lq`` of ``Lk`` keys (decoding with a key/value cache): causal, padding and sliding
    window masks on the explicit path."""
    b, _, lq, _ = query.shape
    lk = key.shape[2]
    q_idx = torch.arange(lk - lq, lk, device=query.device)[:, None]
    k_idx = torch.arange(lk, device=query.device)[None, :]
    allowed = (k_idx <= q_idx)[None, None].expand(b, 1, lq, lk)
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, -lk:].to(torch.bool)
    elif attention_mask is not None:
        raise AccelerationConfigError(
            f"padding-free attention got a {attention_mask.dim()}-D attention mask",
            fix="pass a 2-D padding mask (or none), or remove training.attention.padding_free",
        )
    allowed = allowed | (k_idx == q_idx)  # a fully padded query row attends to itself (its output is unused)
    return _eager(query, key, value, allowed, scaling, dropout, softcap, sinks)


def make_attention_function(backend: AttentionBackend) -> Callable[..., tuple[torch.Tensor, None]]:
    """The attention function registered in transformers' ``AttentionInterface`` for ``backend``.

    Signature as transformers calls it: ``(module, query (B, H, L, D), key, value (B, H_kv, L, D), attention_mask,
    scaling=, dropout=, sliding_window=, softcap=, s_aux=, **kwargs) -> (output (B, L, H, D), None)``; ``s_aux``: the
    attention sinks (H,) of models that have them (GPT-OSS), applied by the backends that can, refused by the others.
    """

    def padding_free_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        dropout = float(dropout or 0.0) if module.training else 0.0
        if kwargs.get("output_attentions"):
            raise AccelerationConfigError(
                "padding-free attention does not return attention weights (output_attentions=True)",
                fix="call the model without output_attentions, or remove training.attention.padding_free",
            )
        sinks = kwargs.pop("s_aux", None)
        if query.shape[2] != key.shape[2]:
            out = _dense_with_cache(query, key, value, attention_mask, scale, dropout, sliding_window, softcap, sinks)
            return out.contiguous(), None
        extra: dict[str, Any] = {}
        if sinks is not None:
            if not backend.supports_sinks:
                raise AccelerationConfigError(
                    f"the {backend.name} padding-free attention backend got attention sinks (s_aux, from "
                    f"{type(module).__name__}), which it cannot apply; without them it would compute another model",
                    fix="set training.attention.padding_free.attention_backend to sdpa, eager or auto",
                )
            extra["sinks"] = sinks
        segments = kwargs.get(SEGMENTS_KWARG)
        if segments is None or segments.length != query.shape[2] or segments.batch != query.shape[0]:
            segments = segments_of_batch(
                batch=query.shape[0],
                length=query.shape[2],
                device=query.device,
                position_ids=kwargs.get("position_ids"),
                attention_mask=attention_mask,
                cu_seq_lens=kwargs.get("cu_seq_lens_q"),
                max_length=kwargs.get("max_length_q"),
            )
        out = backend.attend(
            query,
            key,
            value,
            segments,
            scaling=scale,
            dropout=dropout,
            sliding_window=sliding_window,
            softcap=softcap,
            **extra,
        )
        return out.contiguous(), None

    padding_free_attention.backend = backend  # type: ignore[attr-defined]
    return padding_free_attention


def padding_mask_for(*args: Any, attention_mask: torch.Tensor | None = None, kv_length: int = 0, **kwargs: Any):
    """The mask function registered in transformers' ``AttentionMaskInterface`` next to the attention function:
    the 2-D padding mask (``None`` when nothing is padded), as transformers' flash-attention masks are; the attention
    function derives everything else from the batch's segments."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:] if kv_length else attention_mask
    return None if bool(mask.all()) else mask


# ---------------------------------------------------------------------------------------------------------------
# the decoder stack's forward: segments once per forward


def _cache_is_empty(kwargs: dict[str, Any]) -> bool:
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None:
            length = getattr(cache, "get_seq_length", None)
            return callable(length) and int(length()) == 0
    return True


def make_segments_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the bound ``forward`` of a decoder stack (or of a model that passes its keyword arguments on to one):
    compute the batch's :class:`~.segments.Segments` once (from ``position_ids``, ``cu_seq_lens_q`` or the padding
    mask) and pass them to every attention layer as :data:`SEGMENTS_KWARG`. Forwards that continue a key/value cache,
    and calls that already carry segments, are passed through unchanged."""
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if args:  # positional arguments (input_ids, attention_mask, position_ids, ...) by name
            bound = signature.bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            extra = kwargs.pop(var_keyword, None) if var_keyword is not None else None
            if isinstance(extra, dict):
                kwargs.update(extra)
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is not None and SEGMENTS_KWARG not in kwargs and _cache_is_empty(kwargs):
            kwargs[SEGMENTS_KWARG] = segments_of_batch(
                batch=tokens.shape[0],
                length=tokens.shape[1],
                device=tokens.device,
                position_ids=kwargs.get("position_ids"),
                attention_mask=kwargs.get("attention_mask"),
                cu_seq_lens=kwargs.get("cu_seq_lens_q"),
                max_length=kwargs.get("max_length_q"),
            )
        return original(**kwargs)

    return forward


__all__ = [
    "BACKEND_CLASSES",
    "SEGMENTS_KWARG",
    "AttentionBackend",
    "BackendChoice",
    "EagerBackend",
    "FlashAttnBackend",
    "FlexBackend",
    "ModelNeeds",
    "RunNeeds",
    "SdpaBackend",
    "TorchVarlenBackend",
    "choose_backend",
    "make_attention_function",
    "make_segments_forward",
    "model_needs",
    "padding_mask_for",
]
