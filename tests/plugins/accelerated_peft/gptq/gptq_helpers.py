"""Tiny GPTQ checkpoints for the GPTQ plugin tests: a random-init Llama, quantized round-to-nearest here (per-group
min/max), packed with the kernels' ``pack_gptq`` and saved with ``save_pretrained`` (one file or shards).

Each checkpoint comes with its dense twin: the same model whose quantized linears hold the dequantized weights,
computed here from the integer codes, zeros and fp16 scales (not from the packed tensors), so comparing the GPTQ
model with it checks packing, the file format, the loader and the layer together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VOCAB = 96
HIDDEN = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0, *, tie: bool = False, bias: bool = False):
    """A random-init 2-layer Llama (hidden 64, intermediate 128, 4 heads, 2 KV heads) in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@dataclass(frozen=True)
class Quantized:
    """RTN result for one weight ``W (N, K)``: codes ``q (K, N)``, true zeros ``(G, N)``, fp16 scales ``(G, N)``,
    ``g_idx (K,)``."""

    intweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """``W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n])``, g = g_idx[k], in float32 ``(N, K)``."""
        g = self.g_idx.long()
        return (self.scales.float()[g] * (self.intweight - self.zeros[g]).float()).t().contiguous()


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, *, sym: bool, desc_act: bool, v1: bool, seed: int = 0
) -> Quantized:
    """Round-to-nearest GPTQ codes of ``weight (N, K)``: per group min/max (asym) or max-abs (sym); with
    ``desc_act`` the input channels go to groups in a random order (an act-order ``g_idx``)."""
    n, k = weight.shape
    maxq = 2**bits - 1
    gs = k if group_size == -1 else group_size
    if desc_act:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    groups = -(-k // gs)
    w = weight.detach().float().t()  # (K, N)
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        rows = w[g_idx == g]
        lo = rows.amin(0).clamp(max=0)
        hi = rows.amax(0).clamp(min=0)
        if sym:
            top = torch.maximum(lo.abs(), hi).clamp(min=1e-6)
            scale = 2 * top / maxq
            zero = torch.full((n,), 2 ** (bits - 1), dtype=torch.int64)
        else:
            scale = ((hi - lo) / maxq).clamp(min=1e-6)
            zero = torch.round(-lo / scale).to(torch.int64)
        scales[g] = scale.half().float()  # the stored fp16 scale is the one the codes are rounded against
        zeros[g] = zero.clamp(1 if v1 else 0, maxq)
    gl = g_idx.long()
    q = torch.round(w / scales[gl] + zeros[gl]).clamp(0, maxq).to(torch.int64)
    return Quantized(q.to(torch.int32), zeros.to(torch.int32), scales.half(), g_idx)


class _Packed(nn.Module):
    """Holds one quantized linear's checkpoint tensors as buffers, so ``save_pretrained`` writes them under the
    module's name (a stand-in for a quantizer's layer; no plugin code)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value)


@dataclass(frozen=True)
class GPTQCase:
    bits: int = 4
    group_size: int = 32
    sym: bool = False
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    sharded: bool = False
    legacy_config: bool = False  # quantize_config.json beside config.json instead of quantization_config
    drop_g_idx: bool = False
    tie: bool = False
    bias: bool = False
    lm_head: bool = False  # quantize the output embedding too

    @property
    def id(self) -> str:
        parts = [f"{self.bits}b", f"g{self.group_size}", "sym" if self.sym else "asym", self.checkpoint_format]
        parts += [
            p
            for p, on in (
                ("act", self.desc_act),
                ("shards", self.sharded),
                ("legacy", self.legacy_config),
                ("nogidx", self.drop_g_idx),
                ("tied", self.tie),
                ("bias", self.bias),
                ("lmhead", self.lm_head),
            )
            if on
        ]
        return "-".join(parts)


def quantization_config(case: GPTQCase) -> dict:
    return {
        "quant_method": "gptq",
        "bits": case.bits,
        "group_size": case.group_size,
        "desc_act": case.desc_act,
        "sym": case.sym,
        "checkpoint_format": case.checkpoint_format,
        "true_sequential": True,
        "damp_percent": 0.01,
    }


def make_gptq_checkpoint(path: Path, case: GPTQCase = GPTQCase(), *, seed: int = 0):
    """Write a GPTQ checkpoint of a tiny Llama to ``path`` (non-quantized weights in float16).

    Returns:
        ``(path, dense)``: ``dense`` is the float32 Llama whose linears hold the dequantized weights and whose other
        weights are the float16-rounded originals (what the checkpoint defines).
    """
    from fms_acceleration_accelerate_kernels.gptq import pack_gptq

    model = tiny_llama(seed, tie=case.tie, bias=case.bias)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    dense = tiny_llama(seed, tie=case.tie, bias=case.bias)
    dense.load_state_dict(model.state_dict())
    v1 = case.checkpoint_format == "gptq"
    for i, layer in enumerate(model.model.layers):
        for j, proj in enumerate(PROJECTIONS):
            owner = layer.self_attn if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            linear = getattr(owner, proj)
            quant = rtn_quantize(
                linear.weight,
                case.bits,
                case.group_size,
                sym=case.sym,
                desc_act=case.desc_act,
                v1=v1,
                seed=seed * 100 + i * 10 + j,
            )
            qweight, qzeros = pack_gptq(
                quant.intweight, quant.zeros, case.bits, checkpoint_format=case.checkpoint_format
            )
            tensors = {"qweight": qweight, "qzeros": qzeros, "scales": quant.scales}
            if not case.drop_g_idx:
                tensors["g_idx"] = quant.g_idx
            if linear.bias is not None:
                tensors["bias"] = linear.bias.detach().half()
            setattr(owner, proj, _Packed(tensors))
            with torch.no_grad():
                dense_owner = dense.model.layers[i].self_attn if owner is layer.self_attn else dense.model.layers[i].mlp
                getattr(dense_owner, proj).weight.copy_(quant.dequantized())
    if case.lm_head:
        quant = rtn_quantize(model.lm_head.weight, case.bits, case.group_size, sym=case.sym, desc_act=False, v1=v1)
        qweight, qzeros = pack_gptq(quant.intweight, quant.zeros, case.bits, checkpoint_format=case.checkpoint_format)
        model.lm_head = _Packed({"qweight": qweight, "qzeros": qzeros, "scales": quant.scales, "g_idx": quant.g_idx})
        with torch.no_grad():
            dense.lm_head.weight.copy_(quant.dequantized())
    model.half()
    qc = quantization_config(case)
    if not case.legacy_config:
        model.config.quantization_config = qc
    model.save_pretrained(path, max_shard_size="40KB" if case.sharded else "1GB")
    if case.legacy_config:
        legacy = {k: v for k, v in qc.items() if k not in ("quant_method", "checkpoint_format")}
        legacy["format"] = case.checkpoint_format  # gptqmodel's spelling
        (Path(path) / "quantize_config.json").write_text(json.dumps(legacy), encoding="utf-8")
    assert (Path(path) / "model.safetensors.index.json").is_file() == case.sharded
    return Path(path), dense


def token_batch(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def learnable_batches(n: int, *, batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """``n`` token batches drawn from 8 fixed sequences (a pattern LoRA learns quickly)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, VOCAB, (8, seq), generator=g)
    return [base[torch.randint(0, 8, (batch,), generator=g)] for _ in range(n)]


def edit_config(path: Path, **changes) -> None:
    """Change keys of ``quantization_config`` in ``path``/config.json (``None`` deletes a key)."""
    file = Path(path) / "config.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    qc = data["quantization_config"]
    for key, value in changes.items():
        if value is None:
            qc.pop(key, None)
        else:
            qc[key] = value
    file.write_text(json.dumps(data), encoding="utf-8")
