"""LoRA on MoE experts in bf16: how much of the adapter survives PEFT's merged-weight route, on CPU.

PEFT's ``target_parameters`` route hands the experts ``W + s B A``, formed in the dtype of ``W`` (``baddbmm`` into
the bf16 expert stack), before the grouped GEMM. bf16 keeps 8 significant bits, so any element of the adapter delta
smaller than half a unit in the last place of its ``W`` element is rounded away: with Mixtral's init (std 0.02,
ulp 2^-13 ~ 1.2e-4 for most weights) and a LoRA B that Adam has moved by ~lr per step, the delta of the first steps
is mostly below that. The plugin computes ``x W^T + s (x A^T) B^T`` from the factors, so the adapter term is only
rounded relative to its own size.

This script trains a small Mixtral-shaped model (Mixtral's init std and the 14336/4096 expert intermediate ratio,
hidden size configurable) with LoRA r16/alpha16 on q,k,v,o and PEFT ``target_parameters`` on the two expert stacks,
AdamW, the same batches and adapter init for every route:

* ``hf-fp32``: fp32 model and adapters, transformers' experts (the reference curve);
* ``hf-bf16``: bf16 model, fp32 adapters (PEFT's default), bf16 autocast as ``TrainingArguments(bf16=True)``,
  transformers' experts with PEFT's merged route;
* ``ours-bf16``: the same with the scattermoe plugin (its torch reference path, or the Triton kernels in the
  interpreter with ``TRITON_INTERPRET=1``), adapters computed from the factors;
* ``attn-only-bf16``: as ``hf-bf16`` with LoRA on q,k,v,o only (what ``hf-bf16`` would give if the expert adapters
  had no effect at all).

It prints each loss curve and its distance from ``hf-fp32``, then, for the trained expert adapters of ``hf-fp32``,
the relative error of the bf16 merge ``(bf16(W + s B A) - W) / (s B A)`` and the fraction of delta elements rounded
away completely, at the model's shape and, for one expert, at Mixtral's real shape (A drawn as PEFT initialises it,
B with the trained adapters' root-mean-square).

Run (a few minutes on two CPU cores)::

    OMP_NUM_THREADS=2 PYTHONPATH=kernels/src python benchmarks/moe_lora_bf16_numerics.py --out /tmp/moe-lora-bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ROUTES = ("hf-fp32", "hf-bf16", "ours-bf16", "attn-only-bf16")


def build_model(directory: Path, hidden: int, layers: int, experts: int, vocab: int) -> None:
    """Save a random-init Mixtral-shaped model (transformers' own init: std ``initializer_range`` = 0.02)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    intermediate = round(hidden * 14336 / 4096 / 64) * 64
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 512),
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(directory)


def batches(steps: int, rows: int, seq: int, vocab: int) -> list[torch.Tensor]:
    """Rows of independent tokens from a Zipf-like unigram distribution over a shuffled vocabulary (what the first
    steps of real training mostly learn: the token frequencies), a fresh batch per step."""
    g = torch.Generator().manual_seed(1234)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    probs = probs[torch.randperm(vocab, generator=g)]
    return [torch.multinomial(probs, rows * seq, replacement=True, generator=g).view(rows, seq) for _ in range(steps)]


def lora_config(experts: bool) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=EXPERTS if experts else None,
    )


def train(route: str, directory: Path, data: list[torch.Tensor], lr: float) -> tuple[list[float], Any, Any]:
    """Loss per step of one route; returns (losses, trained PEFT model, framework or None)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if route == "hf-fp32" else torch.bfloat16
    impl = None if route == "ours-bf16" else os.environ.get("HF_EXPERTS", "eager")
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation="eager")
    if impl is not None:
        kwargs["experts_implementation"] = impl
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs).train()
    torch.manual_seed(0)  # the same adapter init in every route
    model = get_peft_model(model, lora_config(experts=route != "attn-only-bf16"))
    framework = None
    if route == "ours-bf16":
        from fms_acceleration_accelerate_moe import ScatterMoEPlugin

        from fms_acceleration_accelerate.framework import AccelerationFramework
        from fms_acceleration_accelerate.registry import PluginRegistry

        framework = AccelerationFramework(
            {"training": {"moe": {"scattermoe": {"ep_degree": 1}}}}, registry=PluginRegistry([ScatterMoEPlugin])
        )
        model, _ = framework.augmentation(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for ids in data:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if framework is not None:
        plugin = framework.plugins[0]
        calls = plugin.expert_adapters.factored_calls
        assert calls == len(data) * model.config.num_hidden_layers, f"factored route ran {calls} times"
    return losses, model, framework


def merge_error(w: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """What a bf16 merge keeps of ``delta``: ||(bf16(W + delta) - W) - delta|| / ||delta|| and the fraction of
    nonzero delta elements whose merged weight equals ``W`` (rounded away)."""
    w16 = w.to(torch.bfloat16)
    merged = (w16.float() + delta).to(torch.bfloat16).float()  # the sum rounded once (baddbmm in bf16 rounds once)
    kept = merged - w16.float()
    nonzero = delta != 0
    return {
        "rel_err": float((kept - delta).norm() / delta.norm()),
        "lost_fraction": float(((kept == 0) & nonzero).sum() / nonzero.sum()),
        "delta_rms": float(delta.pow(2).mean().sqrt()),
    }


def factored_error(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> float:
    """Relative error of the factored term ``s (x A^T) B^T`` computed in bf16 against fp32."""
    want = s * (x @ a.T) @ b.T
    got = (s * (x.bfloat16() @ a.bfloat16().T) @ b.bfloat16().T).float()
    return float((got - want).norm() / want.norm())


def stacks(model: Any) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, float, bool]]:
    """(name, W (E, out, in) fp32, A (E, r, in), B (E, out, r), scaling, transposed) of each adapted expert stack."""
    from peft.tuners.lora.layer import ParamWrapper

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        e = module.num_experts
        a = module.lora_A["default"].weight.detach().float()
        b = module.lora_B["default"].weight.detach().float()
        a = a.reshape(e, -1, a.shape[-1])
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)
        w = module.get_param().detach().float()
        transposed = not module._did_swap_in_out_features  # stored (E, in, out)
        if transposed:
            w = w.transpose(1, 2)
        out.append((f"{name}.{module.parameter_name}", w, a, b, float(module.scaling["default"]), transposed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    routes = args.routes.split(",")
    data = batches(args.steps, args.rows, args.seq, args.vocab)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "losses": {}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "mixtral"
        build_model(directory, args.hidden, args.layers, args.experts, args.vocab)
        trained = None
        for route in routes:
            losses, model, framework = train(route, directory, data, args.lr)
            results["losses"][route] = losses
            print(route.ljust(15), " ".join(f"{v:.4f}" for v in losses), flush=True)
            if route == "hf-fp32":
                trained = model
            if framework is not None:
                framework.revert()

    if "hf-fp32" in results["losses"]:
        ref = results["losses"]["hf-fp32"]
        results["distance_from_fp32"] = {}
        for route, losses in results["losses"].items():
            if route == "hf-fp32":
                continue
            diffs = [abs(a - b) for a, b in zip(losses, ref, strict=True)]
            results["distance_from_fp32"][route] = {"mean_abs": sum(diffs) / len(diffs), "last_abs": diffs[-1]}
            print(f"{route:15s} |loss - fp32|: mean {sum(diffs) / len(diffs):.5f}  last {diffs[-1]:.5f}")

    if trained is not None:
        results["merge"] = {}
        b_rms = []
        g = torch.Generator().manual_seed(5)
        for name, w, a, b, s, _ in stacks(trained):
            delta = s * torch.bmm(b, a)
            row = merge_error(w, delta)
            x = torch.randn(64, a.shape[-1], generator=g) * (1.0 if "gate_up" in name else 0.05)
            row["factored_rel_err"] = factored_error(x, a[0], b[0], s)
            row["w_std"] = float(w.std())
            results["merge"][name] = row
            b_rms.append(float(b.pow(2).mean().sqrt()))
            print(
                f"{name}: bf16 merge keeps delta with rel. error {row['rel_err']:.3f}, "
                f"{100 * row['lost_fraction']:.1f}% of its elements rounded away (delta rms {row['delta_rms']:.2e}, "
                f"W std {row['w_std']:.3f}); factored bf16 term rel. error {row['factored_rel_err']:.4f}"
            )
        # one expert at Mixtral's real shape: W ~ N(0, 0.02), A as PEFT initialises it (kaiming uniform a=sqrt(5):
        # U(+-1/sqrt(in))), B with the trained adapters' rms
        rms = sum(b_rms) / len(b_rms)
        results["mixtral_shape"] = {"b_rms": rms}
        for proj, (out_f, in_f) in {"gate_up": (2 * 14336, 4096), "down": (4096, 14336)}.items():
            rows = 4096  # a slice of the output rows (the rounding is elementwise)
            w = torch.randn(rows, in_f, generator=g) * 0.02
            a = (torch.rand(16, in_f, generator=g) * 2 - 1) / math.sqrt(in_f)
            b = torch.randn(rows, 16, generator=g) * rms
            row = merge_error(w, b @ a)
            results["mixtral_shape"][proj] = row
            print(
                f"Mixtral {proj} ({out_f}x{in_f}), B rms {rms:.2e}: bf16 merge rel. error {row['rel_err']:.3f}, "
                f"{100 * row['lost_fraction']:.1f}% rounded away (delta rms {row['delta_rms']:.2e})"
            )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "numerics.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
