"""TRL's fused LM head (per-token log-probs, entropy, top-1) vs this package's per-token kernels, one GPU.

What SFTTrainer runs per micro-batch on the scored tokens: ``hidden (N, H) @ weight.T (V, H)`` -> per-token
log-probabilities (with gradient), entropy and top-1 flag, then ``loss = -log_probs.sum() / N`` and its backward.

Implementations:
  * ``trl``: TRL's ``ChunkedLogProbFunction`` (token x vocabulary tiles; the backward recomputes every tile).
  * ``ours``: ``fused_linear_cross_entropy_per_token`` (row chunks over the whole vocabulary; the gradient is
    written in the forward pass, the backward only scales it).
  * ``ours_scalar``: the scalar-loss ``fused_linear_cross_entropy`` (HF Trainer path), for the per-token cost.
  * ``eager``: full logits, fp32 log-softmax (what a model's own loss does).

Each with a frozen weight (LoRA: no weight gradient) and a trainable one (full fine-tuning). Reports the median
forward+backward time (``triton.testing.do_bench``), the peak extra memory, and the largest differences of
log-probs, entropy and gradients from ``trl``.

TRL is imported from the installed ``trl``; without it, ``--trl-file PATH`` loads ``trl/kernels/chunked_logprob.py``
from a copy (its DeepSpeed ZeRO-3 gather helper, a no-op elsewhere, is replaced by a null context).

Usage (repository root, CUDA machine)::

    PYTHONPATH=kernels/src python benchmarks/kernel-bench/bench_trl_head.py --out OUT_DIR [--tokens 8192]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def load_trl_function(path: str | None):
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        return ChunkedLogProbFunction, "installed trl"
    except ImportError:
        if path is None:
            raise
    package = types.ModuleType("trl_copy")
    package.__path__ = []
    trainer = types.ModuleType("trl_copy.trainer")
    trainer.__path__ = []
    utils = types.ModuleType("trl_copy.trainer.utils")
    utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    kernels = types.ModuleType("trl_copy.kernels")
    kernels.__path__ = []
    for name, module in (("trl_copy", package), ("trl_copy.trainer", trainer), ("trl_copy.trainer.utils", utils),
                         ("trl_copy.kernels", kernels)):  # fmt: skip
        sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("trl_copy.kernels.chunked_logprob", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ChunkedLogProbFunction, f"copy of {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--trl-file", default=None)
    args = parser.parse_args()

    from fms_acceleration_accelerate_kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_per_token,
    )
    from triton.testing import do_bench

    chunked, trl_source = load_trl_function(args.trl_file)
    device = torch.device("cuda")
    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden0 = (torch.randn(n, h, device=device) * 1.0).to(torch.bfloat16)
    weight0 = (torch.randn(v, h, device=device) / h**0.5 * 2).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), device=device)

    def trl(hidden, weight):
        logp, entropy, _, _, top1 = chunked.apply(
            hidden, weight, None, target, 1.0, 32768, None, 1.0, ("log_probs", "entropy", "is_top1")
        )
        return -logp, entropy, top1

    def ours(hidden, weight):
        return fused_linear_cross_entropy_per_token(hidden, weight, target)

    def ours_scalar(hidden, weight):
        return fused_linear_cross_entropy(hidden, weight, target, reduction="sum"), None, None

    def eager(hidden, weight):
        log_p = F.linear(hidden, weight).float().log_softmax(-1)
        nll = -log_p.gather(1, target[:, None]).squeeze(1)
        with torch.no_grad():
            entropy = -(log_p.exp() * log_p).sum(-1)
            top1 = log_p.argmax(-1) == target
        return nll, entropy, top1

    impls = {"trl": trl, "ours": ours, "ours_scalar": ours_scalar, "eager": eager}
    rows = []
    for weight_grad in (False, True):
        outputs = {}
        for name, fn in impls.items():
            hidden = hidden0.clone().requires_grad_(True)
            weight = weight0.clone().requires_grad_(weight_grad)

            def step(fn=fn, hidden=hidden, weight=weight):
                hidden.grad = None
                weight.grad = None
                nll, _entropy, _top1 = fn(hidden, weight)
                (nll.sum() / n).backward()

            step()
            nll, entropy, top1 = fn(hidden, weight)
            (nll.sum() / n).backward()
            outputs[name] = (nll.detach(), entropy, top1, hidden.grad, weight.grad)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = do_bench(step, warmup=5, rep=50)
            rows.append({"impl": name, "weight_grad": weight_grad, "ms": ms, "peak_extra_gib": peak})
            print(json.dumps(rows[-1]), flush=True)
        ref = outputs["trl"]
        for name in ("ours", "eager", "ours_scalar"):
            got = outputs[name]
            diff = {}
            if got[0].dim() == 1:
                diff["nll"] = (got[0] - ref[0]).abs().max().item()
                diff["entropy"] = (got[1].float() - ref[1].float()).abs().max().item()
                diff["top1_mismatch"] = int((got[2] != ref[2]).sum())
            diff["grad_hidden"] = (got[3].float() - ref[3].float()).abs().max().item()
            diff["grad_hidden_ref_max"] = ref[3].float().abs().max().item()
            if weight_grad:
                diff["grad_weight"] = (got[4].float() - ref[4].float()).abs().max().item()
                diff["grad_weight_ref_max"] = ref[4].float().abs().max().item()
            rows.append({"impl": name, "weight_grad": weight_grad, "vs_trl": diff})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "trl_source": trl_source,
        "shape": {"tokens": n, "hidden": h, "vocab": v, "dtype": "bf16"},
    }
    (args.out / "trl_head.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
