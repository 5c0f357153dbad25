"""Reading and checking a Hugging Face GPTQ checkpoint before any model is built.

The format (as auto-gptq, gptqmodel and optimum write it):

* ``config.json`` holds ``quantization_config`` (``quant_method: gptq``, ``bits``, ``group_size``, ``desc_act``,
  ``sym``, ``checkpoint_format``: ``gptq`` (v1, the default) or ``gptq_v2``); older checkpoints keep the same keys
  in ``quantize_config.json`` beside it (``checkpoint_format`` may be spelled ``format``, or sit under ``meta``).
* Each quantized linear ``<name>`` of logical weight ``(N, K)`` = (out_features, in_features) is stored as
  ``<name>.qweight`` int32 ``[K // pf, N]`` (pf = 32 // bits codes per word), ``<name>.qzeros`` int32
  ``[G, N // pf]``, ``<name>.scales`` ``[G, N]`` (float16), ``<name>.g_idx`` int32 ``[K]`` (the group of each input
  channel; any assignment with ``desc_act``) and optionally ``<name>.bias`` ``[N]``; G = ceil(K / group_size), or 1
  for ``group_size: -1``. Which linears are quantized is decided by which ``.qweight`` keys exist.
* Everything else (embeddings, norms, an unquantized ``lm_head``) is an ordinary floating-point tensor, in one
  ``model.safetensors`` or in shards listed by ``model.safetensors.index.json``.

Everything here reads ``config.json`` / ``quantize_config.json`` and the safetensors *headers* only
(``safetensors.safe_open``: shapes and dtypes, no tensor data), so every problem a user can have with a
checkpoint is reported before a model is built: :func:`read_quantization_config`, :func:`parse_gptq_format`,
:func:`inspect_gptq_checkpoint` (tensor presence, dtypes, and shapes against each other and the config); then
:func:`check_against_model` compares the quantized modules with the linear layers of the model's module tree
(built on the ``meta`` device, which holds no memory).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fms_acceleration_accelerate.errors import AccelerationConfigError

from .config import CONFIG_PATH, QUANTIZE_COMMAND

SUPPORTED_BITS = (2, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")

_SAFETENSORS_DTYPES = MappingProxyType(
    {
        "I32": torch.int32,
        "I64": torch.int64,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "BOOL": torch.bool,
    }
)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _error(problem: str, fix: str, key: str | None = None) -> AccelerationConfigError:
    return AccelerationConfigError(problem, path=CONFIG_PATH if key is None else f"{CONFIG_PATH}.{key}", fix=fix)


def not_gptq_error(path: str | Path, why: str) -> AccelerationConfigError:
    """The error for a model path that is not a GPTQ checkpoint although ``from_quantized: true``."""
    return AccelerationConfigError(
        f"{str(path)!r} is not a GPTQ checkpoint: {why}",
        path=f"{CONFIG_PATH}.from_quantized",
        fix=f"quantize the model first with `{QUANTIZE_COMMAND}` and load OUT, or use "
        "peft.quantization.bitsandbytes to train QLoRA on an unquantized model",
    )


# ------------------------------------------------------------------------------------------ quantization config
def read_quantization_config(path: str | Path, model_config: Any = None) -> tuple[dict[str, Any], str] | None:
    """The raw ``quantization_config`` of the checkpoint at ``path`` and where it was found, or ``None``.

    Looks at ``model_config.quantization_config`` (a loaded ``PretrainedConfig``, e.g. one the caller passes), then
    ``config.json``'s ``quantization_config``, then ``quantize_config.json``.

    Returns:
        ``(mapping, source)`` with ``source`` one of ``"config.json"`` / ``"quantize_config.json"``.
    """
    root = Path(path)
    found = getattr(model_config, "quantization_config", None) if model_config is not None else None
    if found is not None:
        if hasattr(found, "to_dict"):
            found = found.to_dict()
        if isinstance(found, Mapping):
            return dict(found), "config.json"
    config_file = root / "config.json"
    if config_file.is_file():
        data = _read_json(config_file)
        if isinstance(data.get("quantization_config"), Mapping):
            return dict(data["quantization_config"]), "config.json"
    legacy = root / "quantize_config.json"
    if legacy.is_file():
        return dict(_read_json(legacy)), "quantize_config.json"
    return None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AccelerationConfigError(
            f"cannot read {file}: {exc}",
            path=CONFIG_PATH,
            fix="pass a checkpoint folder written by save_pretrained / a GPTQ quantizer",
        ) from None
    if not isinstance(data, Mapping):
        raise AccelerationConfigError(
            f"{file} does not hold a JSON object",
            path=CONFIG_PATH,
            fix="pass a checkpoint folder written by save_pretrained",
        )
    return dict(data)


@dataclass(frozen=True)
class GPTQFormat:
    """A validated GPTQ ``quantization_config``.

    Attributes:
        bits: bits per code (2, 4 or 8).
        group_size: input channels per quantization group, or -1 (one group of all input channels).
        desc_act: act-order quantization (``g_idx`` is an arbitrary assignment of channels to groups).
        sym: symmetric quantization (all zero points ``2**(bits-1)``).
        checkpoint_format: ``"gptq"`` (v1: stored zero points are one less than the true ones) or ``"gptq_v2"``.
        source: where it was read (``config.json`` or ``quantize_config.json``).
        raw: the mapping as read (unknown keys such as ``damp_percent`` kept, for saving).
    """

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str
    source: str = "config.json"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def pack_factor(self) -> int:
        """Codes per int32 word."""
        return 32 // self.bits

    def groups(self, in_features: int) -> int:
        """Number of quantization groups of a layer with ``in_features`` inputs."""
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def as_quantization_config(self) -> dict[str, Any]:
        """The ``quantization_config`` to keep on the model's config, so ``save_pretrained`` writes a checkpoint
        any GPTQ loader (and this plugin) reads: the raw keys, with the validated values and spellings."""
        out = {k: v for k, v in self.raw.items() if k not in ("format", "meta")}
        meta = self.raw.get("meta")
        if isinstance(meta, Mapping):
            out["meta"] = {k: v for k, v in meta.items() if k not in ("format", "checkpoint_format")} or None
            if out["meta"] is None:
                del out["meta"]
        out.update(
            quant_method="gptq",
            bits=self.bits,
            group_size=self.group_size,
            desc_act=self.desc_act,
            sym=self.sym,
            checkpoint_format=self.checkpoint_format,
        )
        return out


def parse_gptq_format(raw: Mapping[str, Any], source: str = "config.json") -> GPTQFormat:
    """Validate a GPTQ ``quantization_config`` (lenient in spelling, strict in values).

    Raises:
        AccelerationConfigError: another quantization method, unsupported bits (3 included), a bad group size, a
            non-boolean ``desc_act`` / ``sym``, an unsupported ``checkpoint_format``, per-module ``dynamic``
            overrides; every problem at once, each naming the key (in ``source``) and the fix.
    """
    where = f"{source} quantization_config" if source == "config.json" else source
    method = raw.get("quant_method", "gptq" if source == "quantize_config.json" else None)
    method_name = str(getattr(method, "value", method)).lower() if method is not None else None
    if method_name != "gptq":
        raise AccelerationConfigError(
            f"the checkpoint is quantized with quant_method={method!r} ({where}), not GPTQ",
            path=f"{CONFIG_PATH}.from_quantized",
            fix="load a GPTQ checkpoint (quant_method 'gptq'), e.g. one written by "
            f"`{QUANTIZE_COMMAND}`; a bitsandbytes model is trained with peft.quantization.bitsandbytes from its "
            "unquantized checkpoint",
        )
    problems: list[AccelerationConfigError] = []
    bits = raw.get("bits")
    if bits == 3 and not isinstance(bits, bool):
        problems.append(
            _error(
                f"bits: 3 in {where}: 3-bit GPTQ packs codes across int32 word boundaries, which this plugin does "
                "not read",
                f"quantize with --bits 4 (or 2 / 8): `{QUANTIZE_COMMAND}`",
            )
        )
    elif not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        problems.append(
            _error(
                f"bits: {bits!r} in {where} is not a supported GPTQ bit width",
                f"use a checkpoint quantized with 2, 4 or 8 bits, e.g. `{QUANTIZE_COMMAND}`",
            )
        )
    group_size = raw.get("group_size", -1)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        problems.append(
            _error(
                f"group_size: {group_size!r} in {where} is neither a positive number of input channels nor -1 "
                "(one group per row)",
                "re-quantize with a positive --group-size (128 is usual) or -1",
            )
        )
    flags = {}
    for key, default in (("desc_act", False), ("sym", True)):
        value = raw.get(key, default)
        if not isinstance(value, bool):
            problems.append(_error(f"{key}: {value!r} in {where} is not true or false", f"write {key}: true or false"))
        flags[key] = bool(value)
    checkpoint_format = _checkpoint_format(raw)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        problems.append(
            _error(
                f"checkpoint_format: {checkpoint_format!r} in {where} is not a GPTQ storage format this plugin reads "
                f"({', '.join(CHECKPOINT_FORMATS)}); other formats (marlin, bitblas, awq, ...) repack the weights "
                "for one kernel",
                "convert the checkpoint to the standard gptq format with the tool that wrote it, or quantize the "
                f"original model with `{QUANTIZE_COMMAND}`",
            )
        )
    dynamic = raw.get("dynamic")
    if dynamic:
        problems.append(
            _error(
                f"dynamic: per-module quantization overrides in {where} ({len(dynamic)} rules) are not supported; "
                "every quantized module must use the same bits and group_size",
                f"quantize without per-module overrides, e.g. `{QUANTIZE_COMMAND}`",
            )
        )
    error = AccelerationConfigError.combine(problems)
    if error is not None:
        raise error
    return GPTQFormat(
        bits=int(bits),
        group_size=int(group_size),
        desc_act=flags["desc_act"],
        sym=flags["sym"],
        checkpoint_format=str(checkpoint_format),
        source=source,
        raw=MappingProxyType(dict(raw)),
    )


def _checkpoint_format(raw: Mapping[str, Any]) -> Any:
    """``checkpoint_format`` under any of its spellings (top level, ``format``, or inside ``meta``); default
    ``gptq``."""
    for key in ("checkpoint_format", "format"):
        if raw.get(key) is not None:
            return str(raw[key]).lower() if isinstance(raw[key], str) else raw[key]
    meta = raw.get("meta")
    if isinstance(meta, Mapping):
        for key in ("checkpoint_format", "format"):
            if meta.get(key) is not None:
                return str(meta[key]).lower() if isinstance(meta[key], str) else meta[key]
    return "gptq"


# ------------------------------------------------------------------------------------------ safetensors headers
@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and file of one checkpoint tensor (from the safetensors header)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    file: Path


@dataclass(frozen=True)
class QuantizedModule:
    """One quantized linear of a checkpoint, checked against the format.

    Attributes:
        name: qualified module name (``model.layers.0.self_attn.q_proj``).
        in_features: K (from ``qweight``: rows times the pack factor).
        out_features: N.
        has_g_idx: the checkpoint stores ``g_idx`` (else it is ``k // group_size``, built at load).
        has_bias: the checkpoint stores ``bias``.
        scales_dtype: dtype of the stored ``scales``.
    """

    name: str
    in_features: int
    out_features: int
    has_g_idx: bool
    has_bias: bool
    scales_dtype: torch.dtype


@dataclass(frozen=True)
class GPTQCheckpoint:
    """A GPTQ checkpoint folder, checked from its headers.

    Attributes:
        path: the folder.
        format: its validated ``quantization_config``.
        files: its safetensors files.
        tensors: every tensor's header, by key.
        modules: the quantized linears, by module name.
    """

    path: Path
    format: GPTQFormat
    files: tuple[Path, ...]
    tensors: Mapping[str, TensorInfo]
    modules: Mapping[str, QuantizedModule]

    def quantized_keys(self) -> frozenset[str]:
        """Checkpoint keys that belong to quantized modules."""
        return frozenset(f"{name}.{suffix}" for name in self.modules for suffix in QUANTIZED_SUFFIXES) & frozenset(
            self.tensors
        )


def safetensors_files(path: str | Path) -> tuple[Path, ...]:
    """The safetensors files of a checkpoint folder (one ``model.safetensors`` or the shards of its index).

    Raises:
        AccelerationConfigError: no safetensors checkpoint in the folder, or an index naming missing shards.
    """
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise not_gptq_error(root, f"{index.name} has no weight_map")
        files = tuple(sorted({root / str(name) for name in weight_map.values()}))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise AccelerationConfigError(
                f"{index} lists shards that are not in the folder: {', '.join(missing[:5])}",
                path=CONFIG_PATH,
                fix="copy the whole checkpoint folder (every model-*.safetensors shard the index names)",
            )
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return (single,)
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    why = "no model.safetensors or model.safetensors.index.json" + (
        f" (found {', '.join(others[:3])}: pickled checkpoints are not read)" if others else ""
    )
    raise AccelerationConfigError(
        f"GPTQ checkpoint {str(root)!r} has {why}",
        path=CONFIG_PATH,
        fix="save the quantized model with safetensors (save_pretrained(..., safe_serialization=True)), or "
        f"quantize it with `{QUANTIZE_COMMAND}`",
    )


def read_headers(files: tuple[Path, ...]) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor in ``files``, from the headers (no tensor data is read)."""
    from safetensors import safe_open

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                tensors[key] = TensorInfo(
                    tuple(int(d) for d in piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype()), file
                )
    return tensors


def inspect_gptq_checkpoint(path: str | Path, fmt: GPTQFormat) -> GPTQCheckpoint:
    """List and check the quantized modules of the checkpoint at ``path`` from its safetensors headers.

    Checks, per module with a ``.qweight``: ``qzeros`` and ``scales`` present, ``g_idx`` present when ``desc_act``;
    integer / float dtypes; ``qweight [K // pf, N]``, ``qzeros [G, N // pf]``, ``scales [G, N]``, ``g_idx [K]``,
    ``bias [N]`` against each other and ``fmt`` (bits, group_size); ``group_size`` divides K.

    Raises:
        AccelerationConfigError: no safetensors files, no ``.qweight`` tensor at all (not a GPTQ checkpoint), or
            any module that fails a check (every such module at once; each names the module, the tensor, the
            expected and the found shape, and the fix).
    """
    root = Path(path)
    files = safetensors_files(root)
    tensors = read_headers(files)
    names = sorted(key[: -len(".qweight")] for key in tensors if key.endswith(".qweight"))
    if not names:
        raise not_gptq_error(
            root,
            f"its {fmt.source} declares GPTQ quantization, but its safetensors files hold no '<module>.qweight' "
            "tensor (they hold unquantized weights)",
        )
    problems: list[AccelerationConfigError] = []
    if fmt.desc_act:
        lacking = [name for name in names if f"{name}.g_idx" not in tensors]
        if lacking:
            problems.append(
                _error(
                    f"{len(lacking)} of the {len(names)} quantized modules have no g_idx tensor (e.g. "
                    f"{', '.join(f'{n}.g_idx' for n in lacking[:3])}), but desc_act: true ({fmt.source}) means the "
                    "input channels are assigned to groups in activation order, which only g_idx records",
                    "use the complete checkpoint (with every .g_idx tensor), or re-quantize the model with "
                    f"`{QUANTIZE_COMMAND} --desc-act`",
                )
            )
    modules: dict[str, QuantizedModule] = {}
    for name in names:
        module = _check_module(name, tensors, fmt, problems)
        if module is not None:
            modules[name] = module
    error = AccelerationConfigError.combine(problems)
    if error is not None:
        raise error
    return GPTQCheckpoint(root, fmt, files, MappingProxyType(tensors), MappingProxyType(modules))


_REQUANTIZE = f"re-quantize the model with `{QUANTIZE_COMMAND}` (the checkpoint does not match its quantization_config)"


def _check_module(
    name: str, tensors: Mapping[str, TensorInfo], fmt: GPTQFormat, problems: list[AccelerationConfigError]
) -> QuantizedModule | None:
    pf = fmt.pack_factor
    before = len(problems)

    def add(problem: str, fix: str = _REQUANTIZE) -> None:
        problems.append(_error(f"quantized module {name}: {problem}", fix))

    info = {s: tensors.get(f"{name}.{s}") for s in QUANTIZED_SUFFIXES}
    for suffix in ("qzeros", "scales"):
        if info[suffix] is None:
            add(f"{name}.{suffix} is missing (a GPTQ module stores qweight, qzeros, scales and g_idx)")
    qweight = info["qweight"]
    assert qweight is not None
    if len(qweight.shape) != 2:
        add(f"qweight has {len(qweight.shape)} dimensions {list(qweight.shape)}, expected 2 [K // {pf}, N]")
        return None
    for suffix, wanted in (
        ("qweight", (torch.int32,)),
        ("qzeros", (torch.int32,)),
        ("g_idx", (torch.int32, torch.int64)),
    ):
        if info[suffix] is not None and info[suffix].dtype not in wanted:
            add(f"{suffix} is stored as {info[suffix].dtype}, expected int32 (packed GPTQ codes)")
    for suffix in ("scales", "bias"):
        if info[suffix] is not None and info[suffix].dtype not in _FLOATS:
            add(f"{suffix} is stored as {info[suffix].dtype}, expected float16 (or bfloat16 / float32)")
    k, n = qweight.shape[0] * pf, qweight.shape[1]
    if fmt.group_size != -1 and k % fmt.group_size:
        add(
            f"group_size {fmt.group_size} does not divide its {k} input channels",
            "re-quantize with a --group-size that divides every layer's in_features (e.g. 32, 64, 128), or -1",
        )
    if n % pf:
        add(f"its {n} output channels are not a multiple of {pf}, so its zero points cannot be packed {pf} per int32")
    g = fmt.groups(k)
    expected = {"qzeros": (g, n // pf), "scales": (g, n), "g_idx": (k,), "bias": (n,)}
    for suffix, shape in expected.items():
        found = info[suffix]
        if found is not None and found.shape != shape:
            add(
                f"{suffix} has shape {list(found.shape)}, expected {list(shape)} for a {n}x{k} weight with bits "
                f"{fmt.bits} and group_size {fmt.group_size} ({g} group{'s' if g != 1 else ''}; qweight "
                f"{list(qweight.shape)})"
            )
    if len(problems) > before:
        return None
    scales = info["scales"]
    assert scales is not None and scales.dtype is not None
    return QuantizedModule(
        name=name,
        in_features=k,
        out_features=n,
        has_g_idx=info["g_idx"] is not None,
        has_bias=info["bias"] is not None,
        scales_dtype=scales.dtype,
    )


# ------------------------------------------------------------------------------------------ against the model
def check_against_model(checkpoint: GPTQCheckpoint, model: nn.Module) -> None:
    """Compare the checkpoint with ``model``'s module tree (on ``meta``): every quantized module is a linear layer
    of the same shape and bias; every parameter of the model that is not part of a quantized module is in the
    checkpoint (tied output embeddings may be omitted).

    Raises:
        AccelerationConfigError: every mismatch at once, naming the module, the expected and the found shapes.
    """
    problems: list[AccelerationConfigError] = []
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    for name, spec in checkpoint.modules.items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            problems.append(
                _error(
                    f"the checkpoint quantizes {name}, which the {model_type} model built from its config.json does "
                    "not have",
                    "use the config.json that was saved with the quantized weights",
                )
            )
            continue
        if not isinstance(target, nn.Linear):
            problems.append(
                _error(
                    f"the checkpoint quantizes {name}, which is a {type(target).__name__} in the {model_type} model, "
                    "not a linear layer",
                    "use the config.json that was saved with the quantized weights",
                )
            )
            continue
        model_shape = (target.out_features, target.in_features)
        found = (spec.out_features, spec.in_features)
        if model_shape != found:
            pf = checkpoint.format.pack_factor
            problems.append(
                _error(
                    f"quantized module {name}: the model's linear layer is out x in = {model_shape[0]}x{model_shape[1]} "
                    f"(qweight [{model_shape[1] // pf}, {model_shape[0]}] with bits {checkpoint.format.bits}), but the "
                    f"checkpoint's qweight [{spec.in_features // pf}, {spec.out_features}] is {found[0]}x{found[1]}",
                    "use the config.json saved with the quantized weights (hidden_size / intermediate_size / heads "
                    "must match), or re-quantize the model",
                )
            )
        if target.bias is not None and not spec.has_bias:
            problems.append(
                _error(
                    f"quantized module {name}: the model's layer has a bias, the checkpoint has no {name}.bias",
                    "use the complete checkpoint (quantizers save the bias next to qweight)",
                )
            )
    quantized_modules = set(checkpoint.modules)
    tied = _tied_parameter_names(model)
    tied_quantized = sorted(quantized_modules & {name.rpartition(".")[0] for name in tied})
    if tied_quantized:
        problems.append(
            _error(
                f"the checkpoint quantizes the output embedding {tied_quantized[0]}, but the model's config.json has "
                "tie_word_embeddings: true, which would replace it by the (unquantized) input embedding",
                "set tie_word_embeddings: false in config.json (the quantized output embedding is its own weight)",
            )
        )
    missing = []
    for pname, _ in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if owner in quantized_modules or pname in checkpoint.tensors or pname in tied:
            continue
        missing.append(pname)
    if missing:
        problems.append(
            _error(
                f"the checkpoint lacks {len(missing)} non-quantized weights of the {model_type} model: "
                f"{', '.join(missing[:5])}" + (", ..." if len(missing) > 5 else ""),
                "use the complete checkpoint folder (every safetensors shard), saved with the model's own parameter "
                "names",
            )
        )
    error = AccelerationConfigError.combine(problems)
    if error is not None:
        raise error


def _tied_parameter_names(model: nn.Module) -> set[str]:
    """Parameter names a checkpoint may omit because they are tied to another (the output embedding)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return set()
    output = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is output and output is not None}
