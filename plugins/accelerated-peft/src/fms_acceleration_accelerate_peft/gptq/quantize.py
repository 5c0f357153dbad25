"""Write a standard Hugging Face GPTQ checkpoint from a local causal-LM directory (``fms-accelerate quantize``).

Two methods:

``gptq``
    The GPTQ algorithm (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers"). Decoder layers are quantized one after the other; each layer is fed the outputs
    of the already-quantized layers before it. For every linear layer of a decoder layer the Hessian of the
    layer-wise squared error, ``H = 2 X X^T`` over the calibration tokens ``X`` reaching it, is accumulated; its
    diagonal is dampened by ``damp_percent`` of its mean; the upper Cholesky factor of ``H^-1`` drives the
    column-by-column quantization: each column is rounded to the grid of its group, and the rounding error,
    divided by the factor's diagonal entry, is spread onto the columns not yet quantized (within a block of
    columns at once, then onto the rest of the matrix in one matrix product per block). With ``desc_act``
    (act-order) the columns are processed in order of decreasing ``diag(H)``, and ``g_idx`` records the group of
    every input channel. A group's scale and zero are computed from the (error-updated) weights when the group
    starts. With ``true_sequential`` the linears of a decoder layer are quantized in the order they run (q/k/v,
    then o, then gate/up, then down for a Llama), each group seeing the inputs produced by the already-quantized
    linears before it.

``rtn``
    Round-to-nearest: per group, per output channel, min/max grid, no calibration needed for the weights (the
    calibration text is still used to report each layer's output error).

The grid: ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``, ``w ~ scale * (q - zero)``. Asymmetric grids
span ``[min(w, 0), max(w, 0)]`` of the group; symmetric grids span ``[-a, a]`` with ``a = max |w|`` and the
zero fixed at ``2**(bits - 1)``. Scales are rounded to fp16 (the format's dtype) before any code is computed,
so the codes are optimal for the stored scales. Checkpoint format ``gptq`` (v1) stores ``zero - 1`` and cannot
represent a zero of 0: zeros are clamped to ``>= 1`` there (the clamp is part of the grid the algorithm
compensates for); ``gptq_v2`` stores zeros as they are.

Calibration text: a ``.txt`` file (used whole) or a ``.jsonl`` file (one JSON object a line with a ``text`` or
``output`` field, or ``instruction`` + ``response``); by default the small text shipped with this package
(``calibration/calibration.jsonl``: documentation of the Python standard library, from the repository's
benchmark dataset). It is tokenized with the model directory's tokenizer; a directory without one (tiny test
models) gets a byte-level fallback: token id = UTF-8 byte value modulo the vocabulary size. ``num_samples``
windows of ``seq_len`` tokens are drawn at seeded random offsets of the token stream.

Output (``out_dir``): ``config.json`` with ``quantization_config`` (and the same keys in
``quantize_config.json`` for older readers), the tokenizer files and ``generation_config.json`` when present,
and safetensors (``model.safetensors``, or shards + ``model.safetensors.index.json`` beyond
``max_shard_size``). Per quantized linear ``<name>``: ``qweight`` int32 ``[K / pf, N]``, ``qzeros`` int32
``[G, N / pf]``, ``scales`` fp16 ``[G, N]``, ``g_idx`` int32 ``[K]``, ``bias`` fp16 ``[N]`` when the layer has
one. Every other tensor (embeddings, norms, ``lm_head``) is written in ``dtype`` (fp16 by default, the GPTQ
convention). The packing is :func:`fms_acceleration_accelerate_kernels.gptq.pack_gptq`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fms_acceleration_accelerate.errors import AccelerationConfigError

SUPPORTED_BITS = (2, 4, 8)
METHODS = ("gptq", "rtn")
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from the model directory when present (besides ``generation_config.json``)."""
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A model directory holding one of these has a tokenizer (else the byte-level fallback is used)."""
WEIGHT_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_STALE_OUTPUTS = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_ERROR_SAMPLES = 16
"""At most this many calibration samples are kept to measure each layer's output error."""


def calibration_path() -> Path:
    """The calibration text shipped with the package (used when no ``calibration`` file is given)."""
    return Path(str(resources.files("fms_acceleration_accelerate_peft") / "gptq" / "calibration" / "calibration.jsonl"))


@dataclass(frozen=True)
class QuantizeOptions:
    """What :func:`quantize` writes and how (the ``fms-accelerate quantize`` flags, same names).

    Attributes:
        bits: 2, 4 or 8.
        group_size: input channels per (scale, zero) group: a positive divisor of every quantized layer's
            ``in_features``, or -1 (one group per output channel).
        desc_act: act-order (``gptq`` only): columns in order of decreasing Hessian diagonal, ``g_idx`` follows.
        sym: symmetric grid (zero fixed at ``2**(bits-1)``); asymmetric otherwise.
        method: ``gptq`` or ``rtn`` (round-to-nearest).
        checkpoint_format: ``gptq`` (v1 zero offset, what most readers expect) or ``gptq_v2``.
        true_sequential: quantize a decoder layer's linears in execution order (see the module docstring).
        damp_percent: diagonal dampening, a fraction of the mean of ``diag(H)``.
        block_size: columns updated at once (rounded to a multiple of ``group_size``); speed only.
        calibration: a ``.txt`` / ``.jsonl`` file; ``None``: the shipped text.
        num_samples: calibration windows.
        seq_len: tokens per window.
        batch_size: windows per forward pass.
        device: ``cpu``, ``cuda`` or ``cuda:N``; ``None``: ``cuda`` when available, else ``cpu``.
        dtype: dtype of the tensors that stay unquantized: ``float16`` (GPTQ's convention), ``bfloat16``,
            ``float32``.
        max_shard_size: largest safetensors file, bytes or a size such as ``"5GB"`` / ``"500MiB"``.
        overwrite: allow a non-empty ``out_dir`` (its old weight files are removed first).
        seed: calibration windows' offsets.
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    method: str = "gptq"
    checkpoint_format: str = "gptq"
    true_sequential: bool = True
    damp_percent: float = 0.01
    block_size: int = 128
    calibration: str | Path | None = None
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 4
    device: str | None = None
    dtype: str = "float16"
    max_shard_size: int | str = "5GB"
    overwrite: bool = False
    seed: int = 0


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear layer quantized: codes, grid, group map, and the weight they represent.

    Attributes:
        intweight: int32 ``[K, N]`` codes in ``[0, 2**bits)`` (input channel first, GPTQ's layout).
        zeros: int32 ``[G, N]`` true zero points.
        scales: fp16 ``[G, N]``.
        g_idx: int32 ``[K]`` group of every input channel.
        dequantized: fp32 ``[N, K]``: ``scales[g_idx[k], n] * (intweight[k, n] - zeros[g_idx[k], n])``.
    """

    intweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    dequantized: torch.Tensor


@dataclass(frozen=True)
class LayerReport:
    """What quantizing one decoder layer did."""

    index: int
    seconds: float
    relative_error: float
    """Mean over calibration samples of ``||y_q - y|| / ||y||``, ``y`` the layer's full-precision output on the
    same (already quantized upstream) inputs."""
    linears: tuple[str, ...]


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize` wrote."""

    out_dir: Path
    quantization_config: dict[str, Any]
    layers: tuple[LayerReport, ...]
    files: tuple[str, ...]
    total_bytes: int
    tokenizer: str
    """``"model"`` (the directory's tokenizer) or ``"bytes"`` (the byte-level fallback)."""
    num_samples: int
    seq_len: int
    notes: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------------------------- validation


def _error(flag: str, problem: str, fix: str) -> AccelerationConfigError:
    return AccelerationConfigError(problem, path=flag, fix=fix)


def parse_size(value: int | str) -> int:
    """Bytes of ``value``: an int, or ``"<number>[B|KB|MB|GB|TB|KiB|MiB|GiB|TiB]"`` (decimal / binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise _error("--max-shard-size", f"{value} is not a positive size", "give e.g. 5GB, 500MB or 2GiB")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise _error("--max-shard-size", f"{value!r} is not a size", "give e.g. 5GB, 500MB, 2GiB or a byte count")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "b":
        scale = 1
    else:
        base = 1024 if "i" in unit else 1000
        scale = base ** ("kmgt".index(unit[0]) + 1)
    size = int(number * scale)
    if size <= 0:
        raise _error("--max-shard-size", f"{value!r} is not a positive size", "give e.g. 5GB, 500MB or 2GiB")
    return size


def resolve_dtype(name: str) -> torch.dtype:
    """``torch.dtype`` of a ``--dtype`` value (``float16``/``fp16``, ``bfloat16``/``bf16``, ``float32``/``fp32``)."""
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise _error("--dtype", f"{name!r} is not a supported dtype", f"use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(name: str | None) -> torch.device:
    """The device to quantize on: ``None`` means ``cuda`` when available, else ``cpu``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise _error("--device", f"{name!r} is not a device", "use cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _error("--device", f"{name} was asked for but CUDA is not available", "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _error(
                "--device", f"{name} does not exist ({torch.cuda.device_count()} CUDA devices)", "pick an existing one"
            )
    return device


def validate_options(model_dir: str | Path, out_dir: str | Path, options: QuantizeOptions) -> None:
    """Check every flag and both paths (no model is loaded); raise one error listing every problem."""
    problems: list[AccelerationConfigError] = []

    def check(condition: bool, flag: str, problem: str, fix: str) -> None:
        if not condition:
            problems.append(_error(flag, problem, fix))

    bits = options.bits
    if bits == 3:
        problems.append(
            _error(
                "--bits",
                "3 bits is not supported: its codes do not fit 32-bit words evenly (irregular packing)",
                "use --bits 4 (or 2 or 8)",
            )
        )
    else:
        check(bits in SUPPORTED_BITS, "--bits", f"{bits!r} bits is not supported", "use --bits 2, 4 or 8")
    gs = options.group_size
    check(
        isinstance(gs, int) and (gs == -1 or gs > 0),
        "--group-size",
        f"{gs!r} is not a group size",
        "use a positive divisor of the layers' in_features (e.g. 128, 64, 32) or -1 (one group per row)",
    )
    check(options.method in METHODS, "--method", f"{options.method!r} is not a method", "use gptq or rtn")
    check(
        options.checkpoint_format in CHECKPOINT_FORMATS,
        "--checkpoint-format",
        f"{options.checkpoint_format!r} is not a GPTQ checkpoint format",
        "use gptq (v1, read by most tools) or gptq_v2",
    )
    check(
        not (options.desc_act and options.method == "rtn"),
        "--desc-act",
        "act-order orders columns by the calibration activations' Hessian; round-to-nearest has none",
        "drop --desc-act, or use --method gptq",
    )
    check(
        0 < options.damp_percent < 1,
        "--damp",
        f"{options.damp_percent!r} is not a fraction in (0, 1)",
        "use e.g. --damp 0.01 (1% of the mean Hessian diagonal)",
    )
    check(options.num_samples >= 1, "--num-samples", f"{options.num_samples!r} is not >= 1", "use e.g. 128")
    check(options.seq_len >= 2, "--seq-len", f"{options.seq_len!r} is not >= 2", "use e.g. 512")
    check(options.batch_size >= 1, "--batch-size", f"{options.batch_size!r} is not >= 1", "use e.g. 4")
    check(options.block_size >= 1, "block_size", f"{options.block_size!r} is not >= 1", "use e.g. 128")
    for validator in (lambda: resolve_dtype(options.dtype), lambda: parse_size(options.max_shard_size)):
        try:
            validator()
        except AccelerationConfigError as exc:
            problems.append(exc)
    if options.calibration is not None:
        cal = Path(options.calibration)
        if not cal.is_file():
            problems.append(_error("--calibration", f"{str(cal)!r} is not a file", "give a .txt or .jsonl file"))
        elif cal.suffix.lower() not in (".txt", ".jsonl"):
            problems.append(
                _error("--calibration", f"{str(cal)!r} is neither .txt nor .jsonl", "give a .txt or .jsonl file")
            )
    model_path = Path(model_dir)
    if not model_path.is_dir():
        problems.append(
            _error("MODEL", f"{str(model_path)!r} is not a directory", "give a local Hugging Face model directory")
        )
    elif not (model_path / "config.json").is_file():
        problems.append(
            _error(
                "MODEL",
                f"{str(model_path)!r} has no config.json",
                "give a directory written by save_pretrained (config.json + safetensors)",
            )
        )
    out_path = Path(out_dir)
    if out_path.exists() and not out_path.is_dir():
        problems.append(_error("OUT", f"{str(out_path)!r} exists and is not a directory", "give a new directory"))
    elif out_path.is_dir() and any(out_path.iterdir()) and not options.overwrite:
        problems.append(
            _error("OUT", f"{str(out_path)!r} exists and is not empty", "give a new directory, or pass --overwrite")
        )
    if model_path.is_dir() and out_path.exists() and out_path.resolve() == model_path.resolve():
        problems.append(_error("OUT", "OUT is the model directory itself", "write the checkpoint to a new directory"))
    error = AccelerationConfigError.combine(problems)
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------------- the algorithm


def _grid(x: torch.Tensor, bits: int, sym: bool, min_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` (fp32, ``[rows]``) of the min/max grid of ``x`` ``[rows, cols]``."""
    maxq = 2**bits - 1
    lo = x.amin(dim=1).clamp(max=0)
    hi = x.amax(dim=1).clamp(min=0)
    if sym:
        amax = torch.maximum(-lo, hi)
        scale = 2 * amax / maxq
    else:
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # the stored precision: codes are computed against the scale readers will use
    scale = scale.to(torch.float16).float().clamp(min=2.0**-24)
    if sym:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``w`` on the grid (all broadcastable)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def _min_zero(checkpoint_format: str) -> int:
    return 1 if checkpoint_format == "gptq" else 0


def quantize_rtn(
    weight: torch.Tensor, *, bits: int, group_size: int, sym: bool, checkpoint_format: str = "gptq"
) -> QuantizedLinear:
    """Round-to-nearest of ``weight`` ``[N, K]``, per group of ``group_size`` input channels (-1: all)."""
    w = weight.detach().float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    groups = k // gs
    maxq = 2**bits - 1
    wg = w.reshape(n, groups, gs).permute(1, 0, 2).reshape(groups * n, gs)
    scale, zero = _grid(wg, bits, sym, _min_zero(checkpoint_format))
    q, deq = _round(wg, scale[:, None], zero[:, None], maxq)
    codes = q.reshape(groups, n, gs).permute(1, 0, 2).reshape(n, k)
    deq = deq.reshape(groups, n, gs).permute(1, 0, 2).reshape(n, k)
    g_idx = torch.arange(k, device=w.device) // gs
    return QuantizedLinear(
        intweight=codes.t().contiguous().to(torch.int32),
        zeros=zero.reshape(groups, n).to(torch.int32),
        scales=scale.reshape(groups, n).to(torch.float16),
        g_idx=g_idx.to(torch.int32),
        dequantized=deq,
    )


def _inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; the dampening is raised (x10, at most 4
    times) while the matrix is not positive definite. Returns the factor and the dampening used."""
    mean_diag = torch.diagonal(hessian).mean().item()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = damp_percent
    for _ in range(5):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        damp *= 10
    raise RuntimeError(
        f"the layer's Hessian is not positive definite even dampened by {damp / 10:g} of its mean diagonal; "
        "use more calibration samples (--num-samples) or a larger --damp"
    )


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    checkpoint_format: str = "gptq",
) -> QuantizedLinear:
    """GPTQ of ``weight`` ``[N, K]`` given the Hessian ``hessian`` ``[K, K]`` (``2 X X^T`` of its inputs).

    See the module docstring. Input channels that never saw a non-zero activation (``diag(H) == 0``) carry no
    information: their weights are quantized as zero.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone().to(w.device)
    n, k = w.shape
    maxq = 2**bits - 1
    min_zero = _min_zero(checkpoint_format)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if desc_act else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    u, _ = _inverse_hessian_factor(h, damp_percent)
    del h

    gs = k if group_size == -1 else group_size
    groups = k // gs
    # blocks hold whole groups: a group's grid is computed from columns that already received every update
    block = gs * max(1, block_size // gs) if group_size != -1 else block_size
    codes = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    scales = torch.zeros(groups, n, device=w.device)
    zeros = torch.zeros(groups, n, device=w.device)
    if group_size == -1:
        scale, zero = _grid(w, bits, sym, min_zero)
        scales[0], zeros[0] = scale, zero
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1 and col % gs == 0:
                scale, zero = _grid(w1[:, i : i + gs], bits, sym, min_zero)
                scales[col // gs], zeros[col // gs] = scale, zero
            column = w1[:, i]
            q, dq = _round(column, scale, zero, maxq)
            codes[:, col], deq[:, col] = q, dq
            e = (column - dq) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    g_idx = torch.arange(k, device=w.device) // gs
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, deq = codes[:, inverse], deq[:, inverse]
        g_idx = g_idx[inverse]
    return QuantizedLinear(
        intweight=codes.t().contiguous().to(torch.int32),
        zeros=zeros.to(torch.int32),
        scales=scales.to(torch.float16),
        g_idx=g_idx.to(torch.int32),
        dequantized=deq,
    )


class HessianAccumulator:
    """Running ``2/n * sum x x^T`` (fp32) over the rows ``x`` of every input a linear layer receives."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.hessian = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self.hessian *= self.rows / (self.rows + m)
        self.rows += m
        x = x * math.sqrt(2 / self.rows)
        self.hessian.addmm_(x.t(), x)


# ----------------------------------------------------------------------------------------- the model's parts


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, layers)``: the model's stack of decoder layers (the largest ``ModuleList`` of
    ``num_hidden_layers`` modules that hold linear layers)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or (count is not None and len(module) != count):
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise AccelerationConfigError(
            f"found no stack of {count} decoder layers holding linear layers in {type(model).__name__}",
            path="MODEL",
            fix="quantize a decoder-only causal LM (Llama, Mistral, Qwen, Granite, ...)",
        )
    return best[1], best[2]


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def check_shapes(model: nn.Module, options: QuantizeOptions) -> tuple[str, dict[str, tuple[int, int]]]:
    """Check every linear of the decoder layers against bits / group size; returns ``(prefix, {name: (N, K)})``."""
    prefix, layers = find_decoder_layers(model)
    shapes = {
        f"{prefix}.{i}.{name}": (m.out_features, m.in_features)
        for i, layer in enumerate(layers)
        for name, m in _linears(layer).items()
    }
    pf = 32 // options.bits
    problems = []
    in_features = sorted({k for _, k in shapes.values()})
    if options.group_size != -1:
        bad = [k for k in in_features if k % options.group_size]
        if bad:
            common = math.gcd(*in_features)
            divisors = [str(d) for d in (256, 128, 64, 32, 16) if common % d == 0]
            first = next(name for name, (_, k) in shapes.items() if k == bad[0])
            others = f" (nor {', '.join(map(str, bad[1:]))})" if len(bad) > 1 else ""
            choices = f"{', '.join(divisors)} or -1" if divisors else "-1"
            problems.append(
                _error(
                    "--group-size",
                    f"{options.group_size} does not divide in_features {bad[0]} of {first}{others}",
                    f"use --group-size {choices} (one group per output channel)",
                )
            )
    for name, (n, k) in shapes.items():
        if k % pf or n % pf:
            problems.append(
                _error(
                    "--bits",
                    f"{name} has shape (out {n}, in {k}); {options.bits}-bit packing needs both to be multiples "
                    f"of {pf}",
                    "this model cannot be written in the GPTQ format at these bits; try --bits 8",
                )
            )
            break
    error = AccelerationConfigError.combine(problems)
    if error is not None:
        raise error
    return prefix, shapes


class _StopForward(Exception):
    """Raised by :class:`_InputCatcher` once the first decoder layer's inputs are recorded."""


@dataclass(frozen=True)
class _LayerArgs:
    """The arguments a decoder layer got besides its hidden states (masks, positions, rotary embeddings...)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _InputCatcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs and stops the forward pass."""

    def __init__(self, layer: nn.Module, store: list[tuple[torch.Tensor, _LayerArgs]]) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: moving the model must not move it
        self.__dict__["_store"] = store
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(layer, attr):
                self.__dict__[attr] = getattr(layer, attr)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._store.append((hidden_states, _LayerArgs(args, kwargs)))
        raise _StopForward


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# -------------------------------------------------------------------------------------------- calibration


def _read_calibration(path: Path) -> list[str]:
    if path.suffix.lower() == ".txt":
        text = path.read_text(encoding="utf-8")
        return [text] if text.strip() else []
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(
                "--calibration", f"{path}:{number} is not JSON ({exc.msg})", "one JSON object a line"
            ) from None
        if not isinstance(record, dict):
            raise _error("--calibration", f"{path}:{number} is not a JSON object", "one JSON object a line")
        if isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record.get("output"), str):
            texts.append(record["output"])
        elif isinstance(record.get("instruction"), str) and isinstance(record.get("response"), str):
            texts.append(f"{record['instruction']}\n\n{record['response']}")
        else:
            raise _error(
                "--calibration",
                f"{path}:{number} has no string field 'text' or 'output' (nor 'instruction' + 'response')",
                "give every line a 'text' field",
            )
    return [t for t in texts if t.strip()]


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_MARKERS)


def calibration_tokens(model_dir: Path, texts: Sequence[str], vocab_size: int) -> tuple[torch.Tensor, str]:
    """The calibration texts as one stream of token ids, and ``"model"`` or ``"bytes"`` (which tokenizer)."""
    if has_tokenizer(model_dir):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.extend(separator)
        stream = torch.tensor(ids, dtype=torch.long)
        if stream.numel() and int(stream.max()) >= vocab_size:
            raise _error(
                "MODEL",
                f"the directory's tokenizer produces id {int(stream.max())}, beyond the model's vocabulary "
                f"({vocab_size})",
                "save the model's own tokenizer beside it",
            )
        return stream, "model"
    data = "\n\n".join(texts).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.long) % vocab_size, "bytes"


def calibration_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[num_samples, seq_len]`` windows of ``stream`` at seeded random offsets."""
    if stream.numel() < seq_len:
        raise _error(
            "--seq-len",
            f"the calibration text has {stream.numel()} tokens, fewer than --seq-len {seq_len}",
            "lower --seq-len or pass a longer --calibration file",
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


# ------------------------------------------------------------------------------------------- the pipeline


class _Progress:
    """One line per decoder layer (through tqdm's writer, with a bar on a terminal, when tqdm is installed)."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self._log = log
        self._bar = None
        if log is print and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc="quantizing", unit="layer", file=sys.stderr, leave=False)

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            self._log(text)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _execution_groups(
    layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, extra: _LayerArgs
) -> list[list[str]]:
    """The layer's linears grouped by shared input, in the order they run (q/k/v, o, gate/up, down)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda _m, args, _name=name: calls.append((_name, args[0])))
        for name, module in linears.items()
    ]
    try:
        with torch.no_grad():
            layer(hidden, *extra.args, **extra.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    previous = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if previous is not None and x is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = x
    unused = [name for name in linears if name not in seen]
    if unused:
        groups.append(unused)
    return groups


def _run_layer(
    layer: nn.Module, inputs: Sequence[torch.Tensor], extras: Sequence[_LayerArgs], keep: int | None = None
) -> list[torch.Tensor]:
    """The layer's outputs on every batch (or the first ``keep`` batches)."""
    outputs = []
    with torch.no_grad():
        for index, (hidden, extra) in enumerate(zip(inputs, extras)):
            if keep is not None and index >= keep:
                break
            outputs.append(_layer_output(layer(hidden, *extra.args, **extra.kwargs)))
    return outputs


def _relative_error(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> float:
    ratios = []
    for ref, out in zip(reference, actual):
        ref = ref.float().flatten(1)
        diff = (out.float().flatten(1) - ref).norm(dim=1)
        ratios.append(diff / ref.norm(dim=1).clamp(min=1e-12))
    return torch.cat(ratios).mean().item()


def quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    options: QuantizeOptions | None = None,
    *,
    log: Callable[[str], None] = print,
) -> QuantizeReport:
    """Quantize the causal LM in ``model_dir`` and write a GPTQ checkpoint to ``out_dir`` (see the module doc).

    Every flag and path is checked before the model is loaded (:class:`AccelerationConfigError`, a
    ``ValueError``, naming the flag and the fix). ``log`` receives the progress lines.
    """
    from fms_acceleration_accelerate_kernels.gptq import pack_gptq
    from transformers import AutoConfig, AutoModelForCausalLM

    options = options or QuantizeOptions()
    validate_options(model_dir, out_dir, options)
    model_path, out_path = Path(model_dir), Path(out_dir)
    out_dtype = resolve_dtype(options.dtype)
    device = resolve_device(options.device)
    shard_bytes = parse_size(options.max_shard_size)
    cal_path = Path(options.calibration) if options.calibration is not None else calibration_path()
    texts = _read_calibration(cal_path)
    if not texts:
        raise _error("--calibration", f"{cal_path} holds no text", "give a file with some text")

    try:
        config = AutoConfig.from_pretrained(str(model_path))
    except (OSError, ValueError, KeyError) as exc:
        raise _error(
            "MODEL", f"cannot read {model_path / 'config.json'}: {exc}", "give a Hugging Face model directory"
        ) from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise _error(
            "MODEL",
            f"{model_path} is not a causal LM transformers can build: {exc}",
            "give the directory of a causal language model (AutoModelForCausalLM)",
        ) from None
    prefix, _ = check_shapes(skeleton, options)
    del skeleton
    text_config = config.get_text_config()
    vocab_size = text_config.vocab_size
    max_positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and options.seq_len > max_positions:
        raise _error(
            "--seq-len",
            f"{options.seq_len} tokens exceed the model's max_position_embeddings ({max_positions})",
            f"use --seq-len {max_positions} or less",
        )
    stream, tokenizer_kind = calibration_tokens(model_path, texts, vocab_size)
    samples = calibration_windows(stream, options.num_samples, options.seq_len, options.seed)

    started = time.perf_counter()
    log(
        f"quantizing {model_path} -> {out_path}: method {options.method}, {options.bits} bits, group size "
        f"{options.group_size}, {'sym' if options.sym else 'asym'}, desc_act {'on' if options.desc_act else 'off'}, "
        f"format {options.checkpoint_format}, device {device}"
    )
    source = "the shipped calibration text" if options.calibration is None else str(cal_path)
    log(f"calibration: {options.num_samples} windows of {options.seq_len} tokens from {source}")
    notes = []
    if tokenizer_kind == "bytes":
        note = (
            f"note: {model_path} has no tokenizer; the calibration text is tokenized byte-level "
            f"(token id = UTF-8 byte value mod the vocabulary size {vocab_size})"
        )
        notes.append(note)
        log(note)

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype="auto")
    model.eval()
    model.config.use_cache = False
    layers_prefix, layers = find_decoder_layers(model)
    assert layers_prefix == prefix

    # inputs of the first decoder layer: run the embeddings (and whatever precedes the layers) on the device
    store: list[tuple[torch.Tensor, _LayerArgs]] = []
    originals = list(layers)
    layers[0] = _InputCatcher(originals[0], store)
    for index in range(1, len(layers)):
        layers[index] = nn.Identity()
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    try:
        base.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            for batch in samples.split(options.batch_size):
                try:
                    base(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
        base.to("cpu")
    inputs = [hidden.float() for hidden, _ in store]
    layer_args = [extra for _, extra in store]
    del store

    progress = _Progress(len(layers), log)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    reports = []
    block_groups: list[list[str]] = []
    keep = max(1, math.ceil(_ERROR_SAMPLES / options.batch_size))
    for index, layer in enumerate(layers):
        tick = time.perf_counter()
        layer.to(device=device, dtype=torch.float32)
        linears = _linears(layer)
        groups = _execution_groups(layer, linears, inputs[0], layer_args[0])
        if index == 0:
            block_groups = groups
        reference = _run_layer(layer, inputs, layer_args, keep=keep)
        if options.method == "rtn":
            quantized = {name: _quantize_rtn_module(linears[name], options) for name in linears}
            for name, result in quantized.items():
                linears[name].weight.data.copy_(result.dequantized)
        else:
            quantized = {}
            for group in groups if options.true_sequential else [list(linears)]:
                hessians = _collect_hessians(layer, {name: linears[name] for name in group}, inputs, layer_args)
                for name in group:
                    result = _quantize_gptq_module(linears[name], hessians.pop(name), options)
                    linears[name].weight.data.copy_(result.dequantized)
                    quantized[name] = result
        outputs = _run_layer(layer, inputs, layer_args)
        error = _relative_error(reference, outputs[: len(reference)])
        inputs = outputs
        for name, result in quantized.items():
            packed[f"{prefix}.{index}.{name}"] = _pack(result, pack_gptq, options)
        del quantized, reference
        layer.to("cpu")
        seconds = time.perf_counter() - tick
        reports.append(LayerReport(index, seconds, error, tuple(linears)))
        progress.line(
            f"layer {index + 1:>{len(str(len(layers)))}}/{len(layers)}: {len(linears)} linears, {seconds:.2f} s, "
            f"mean relative output error {error:.4g}"
        )
        progress.step()
    progress.close()

    qconfig = _quantization_config(options, prefix, block_groups, tokenizer_kind)
    files, total = _write_checkpoint(model, model_path, out_path, packed, qconfig, out_dtype, shard_bytes)
    log(
        f"wrote {out_path}: {len(packed)} quantized linears in {len(layers)} layers, {len(files)} weight "
        f"file(s), {total / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s"
    )
    return QuantizeReport(
        out_dir=out_path,
        quantization_config=qconfig,
        layers=tuple(reports),
        files=tuple(files),
        total_bytes=total,
        tokenizer=tokenizer_kind,
        num_samples=options.num_samples,
        seq_len=options.seq_len,
        notes=tuple(notes),
    )


def _quantize_rtn_module(module: nn.Linear, options: QuantizeOptions) -> QuantizedLinear:
    return quantize_rtn(
        module.weight,
        bits=options.bits,
        group_size=options.group_size,
        sym=options.sym,
        checkpoint_format=options.checkpoint_format,
    )


def _quantize_gptq_module(module: nn.Linear, hessian: torch.Tensor, options: QuantizeOptions) -> QuantizedLinear:
    return quantize_gptq(
        module.weight,
        hessian,
        bits=options.bits,
        group_size=options.group_size,
        sym=options.sym,
        desc_act=options.desc_act,
        damp_percent=options.damp_percent,
        block_size=options.block_size,
        checkpoint_format=options.checkpoint_format,
    )


def _collect_hessians(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: Sequence[torch.Tensor],
    extras: Sequence[_LayerArgs],
) -> dict[str, torch.Tensor]:
    """Run the layer over every calibration batch and return the Hessian of each of ``linears``."""
    accumulators = {
        name: HessianAccumulator(module.in_features, module.weight.device) for name, module in linears.items()
    }
    handles = [
        linears[name].register_forward_pre_hook(lambda _m, args, _acc=acc: _acc.add(args[0]))
        for name, acc in accumulators.items()
    ]
    try:
        with torch.no_grad():
            for hidden, extra in zip(inputs, extras):
                layer(hidden, *extra.args, **extra.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian for name, acc in accumulators.items()}


def _pack(
    result: QuantizedLinear, pack: Callable[..., tuple[torch.Tensor, torch.Tensor]], options: QuantizeOptions
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (on the CPU)."""
    qweight, qzeros = pack(
        result.intweight.cpu(), result.zeros.cpu(), options.bits, checkpoint_format=options.checkpoint_format
    )
    return {
        "qweight": qweight.contiguous(),
        "qzeros": qzeros.contiguous(),
        "scales": result.scales.cpu().contiguous(),
        "g_idx": result.g_idx.cpu().contiguous(),
    }


def _quantization_config(
    options: QuantizeOptions, prefix: str, block_groups: list[list[str]], tokenizer_kind: str
) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        quantizer = f"fms-acceleration-accelerate-peft:{version('fms-acceleration-accelerate-peft')}"
    except PackageNotFoundError:  # running from a source tree that is not installed
        quantizer = "fms-acceleration-accelerate-peft"
    return {
        "quant_method": "gptq",
        "bits": options.bits,
        "group_size": options.group_size,
        "desc_act": options.desc_act,
        "sym": options.sym,
        "checkpoint_format": options.checkpoint_format,
        "true_sequential": options.true_sequential,
        "damp_percent": options.damp_percent,
        "static_groups": False,
        "model_seqlen": options.seq_len,
        "block_name_to_quantize": prefix,
        "modules_in_block_to_quantize": block_groups,
        "meta": {
            "quantizer": [quantizer],
            "method": options.method,
            "calibration": "shipped" if options.calibration is None else Path(options.calibration).name,
            "num_samples": options.num_samples,
            "seq_len": options.seq_len,
            "tokenization": tokenizer_kind,
        },
    }


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_checkpoint(
    model: nn.Module,
    model_path: Path,
    out_path: Path,
    packed: dict[str, dict[str, torch.Tensor]],
    qconfig: dict[str, Any],
    out_dtype: torch.dtype,
    shard_bytes: int,
) -> tuple[list[str], int]:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in packed and leaf == "weight":
            for suffix, value in packed[module_name].items():
                tensors[f"{module_name}.{suffix}"] = value
            continue
        if module_name in packed and leaf == "bias":
            tensors[name] = tensor.detach().to(torch.float16).contiguous()
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if key is not None and key in seen_storage:
            continue  # a tied weight (lm_head sharing the embeddings): written once, tied again on load
        if key is not None:
            seen_storage.add(key)
        value = tensor.detach()
        tensors[name] = (value.to(out_dtype) if value.is_floating_point() else value).contiguous()

    out_path.mkdir(parents=True, exist_ok=True)
    for old in out_path.iterdir():
        if old.is_file() and _STALE_OUTPUTS.match(old.name):
            old.unlink()
    shards = _shards(tensors, shard_bytes)
    metadata = {"format": "pt"}
    files = []
    total = 0
    if len(shards) == 1:
        save_file(shards[0], str(out_path / WEIGHT_FILE), metadata=metadata)
        files.append(WEIGHT_FILE)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_path / filename), metadata=metadata)
            files.append(filename)
            weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    config = model.config
    config.quantization_config = qconfig
    config.use_cache = True
    config.dtype = out_dtype
    config.save_pretrained(str(out_path))
    (out_path / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n", encoding="utf-8")
    for filename in (*TOKENIZER_FILES, "generation_config.json"):
        source = model_path / filename
        if source.is_file():
            shutil.copyfile(source, out_path / filename)
    return files, total
