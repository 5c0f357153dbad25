"""Model-state bytes one rank holds after the FSDP2 prepare of a 4-bit QLoRA model, per decoder layer (CPU, gloo).

Two gloo processes load a random-init Llama (hidden 512, intermediate 2048; 2 and then 4 layers) through the
bitsandbytes + fused-ops plugins, shard it with the framework's FSDP2 plan, and sum the bytes of every live
tensor storage on rank 0 (``gc``). The difference between the 4- and the 2-layer model, per layer, is what one
more decoder layer costs a rank before any activation: about half of a layer's packed 4-bit bytes (its shard)
plus scales and adapters. A retained unsharded copy shows up as one extra full packed layer per layer.

The same count right after every ``fully_shard`` of the prepare gives the most a rank held while preparing
(``during_prepare_*``): the loaded model plus the shards made so far, less what was freed unit by unit.

    python benchmarks/fsdp2_held_bytes.py
"""

import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch


def _import_checkout_tests() -> None:
    """The checkout's ``tests`` package, imported by location: its root stays off ``sys.path`` (its folders that
    are not packages, kernels/ among them, would import there as namespace packages)."""
    folder = Path(__file__).resolve().parents[1] / "tests"
    spec = importlib.util.spec_from_file_location(
        "tests", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests"] = module
    spec.loader.exec_module(module)


_import_checkout_tests()
from tests.plugins.accelerated_peft.helpers import free_port, init_gloo, lora_config, prepare_fsdp2, spawn_workers  # noqa: E402


def build(path, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def live_bytes():
    gc.collect()
    seen = {}
    for t in gc.get_objects():
        if isinstance(t, torch.Tensor):
            for x in (t, getattr(t, "_local_tensor", None), getattr(t, "packed", None), getattr(t, "absmax", None)):
                if (isinstance(x, torch.Tensor) and type(x) in (torch.Tensor, torch.nn.Parameter)) or type(
                    x
                ).__name__ == "Params4bit":
                    try:
                        st = x.untyped_storage()
                        seen[st.data_ptr()] = st.nbytes()
                    except Exception:
                        pass
    return sum(seen.values())


def worker(rank, path, port, out):
    try:
        from fms_acceleration_accelerate import AccelerationFramework

        init_gloo(rank, 2, port)
        fw = AccelerationFramework(
            {
                "peft": {
                    "quantization": {
                        "bitsandbytes": {"quant_type": "nf4"},
                        "fused_ops_and_kernels": {
                            "base_layer": "bitsandbytes",
                            "fused_lora": True,
                            "fused_dequant": True,
                        },
                    }
                }
            }
        )
        model = fw.model_loader(path, dtype=torch.float32, low_cpu_mem_usage=True)
        model, _ = fw.augmentation(model, None, (lora_config(),))
        import torch.distributed.fsdp as fsdp

        fully_shard, samples = fsdp.fully_shard, []

        def sampled(*args, **kwargs):
            result = fully_shard(*args, **kwargs)
            samples.append(live_bytes())
            return result

        fsdp.fully_shard = sampled
        try:
            prepare_fsdp2(fw, model, 2, shard=True)
        finally:
            fsdp.fully_shard = fully_shard
        b = live_bytes()
        if rank == 0:
            open(out, "w").write(json.dumps({"after": b, "during": max(samples)}))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:
        traceback.print_exc()
        raise


def main():
    res = {}
    tmp = tempfile.mkdtemp(prefix="fms_held_")
    for layers in (2, 4):
        p = os.path.join(tmp, f"llama{layers}")
        build(p, layers)
        spawn_workers(worker, (p, free_port(), p + ".json"), 2, timeout=300)
        res[layers] = json.load(open(p + ".json"))
    # one layer's 4-bit weights: q,o 512x512, k,v 512x128, mlp 3 x 512x2048 -> packed bytes = numel / 2
    full = (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 2048) // 2
    report = {"full_packed_layer": full}
    for key in ("after", "during"):
        per_layer = (res[4][key] - res[2][key]) / 2
        prefix = "" if key == "after" else "during_prepare_"
        report.update({
            f"{prefix}live_bytes_2l": res[2][key], f"{prefix}live_bytes_4l": res[4][key],
            f"{prefix}per_layer": per_layer, f"{prefix}ratio_per_layer_to_full_packed": per_layer / full,
        })  # fmt: skip
    print(json.dumps(report))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
