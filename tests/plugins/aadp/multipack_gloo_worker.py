"""Worker of test_multipack_distributed.py, run by ``torchrun --nproc_per_node 2``: the multipack plugin through a
stock ``Accelerator(cpu=True)`` (gloo) with an ``AccelerationKwargs``; writes ``rank<r>.json`` into OUT_DIR.

    torchrun --nproc_per_node 2 multipack_gloo_worker.py OUT_DIR

OUT_DIR holds ``lengths.json`` (the examples' token lengths). Each rank records the example indices of every batch
it received: a full epoch 0, the first batches of epoch 1, then -- as a resumed HF Trainer does it -- epoch 1 again
from a sampler back at epoch 0, through Accelerate's ``skip_first_batches`` and the plugin's epoch callback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from accelerate import Accelerator
from fms_acceleration_accelerate_aadp.multipack_callback import MultipackEpochCallback
from fms_acceleration_accelerate_aadp.multipack_plugin import find_multipack_sampler
from torch.utils.data import DataLoader

from fms_acceleration_accelerate import accelerate_integration as ai

SKIPPED = 5


def collate(examples):
    return {"idx": torch.tensor([e["idx"] for e in examples]), "tokens": sum(len(e["input_ids"]) for e in examples)}


def indices(batch) -> list[int]:
    return sorted(batch["idx"].tolist())


def main() -> None:
    out = Path(sys.argv[1])
    lengths = json.loads((out / "lengths.json").read_text())
    ai.install()
    body = {
        "training": {
            "attention": {"padding_free": {"method": "huggingface", "flatten_batches": False}},
            "dataloader": {"multipack": {"max_number_tokens": 4096, "seed": 7, "num_processes": 2}},
        }
    }
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ai.AccelerationKwargs(config=body)])
    # a Hugging Face dataset: its lengths are measured by the main process first (Accelerate's main_process_first)
    data = datasets.Dataset.from_list([{"idx": i, "input_ids": [7] * n} for i, n in enumerate(lengths)])
    loader = accelerator.prepare(DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate))
    sampler = find_multipack_sampler(loader)
    report = {
        "world": accelerator.num_processes,
        "rank": accelerator.process_index,
        "max_tokens": sampler.max_tokens,
        "num_replicas": sampler.num_replicas,
        "sampler_rank": sampler.rank,
        "len": len(loader),
    }
    epoch0 = list(loader)
    report["epoch0"] = [indices(b) for b in epoch0]
    report["epoch0_tokens"] = [b["tokens"] for b in epoch0]
    loader.set_epoch(1)
    report["epoch_after_set_epoch"] = sampler.epoch
    head = []
    for batch in loader:
        head.append(indices(batch))
        if len(head) == SKIPPED:
            break
    report["epoch1_head"] = head

    # a resumed trainer: a sampler at epoch 0, the first batches of epoch 1 skipped, the epoch set by the callback
    sampler.set_epoch(0)
    skipped = accelerator.skip_first_batches(loader, SKIPPED)
    skipped.set_epoch(1)
    report["epoch_reached_by_skipped_set_epoch"] = sampler.epoch
    callback = MultipackEpochCallback(ai.get_framework(accelerator).plugin("multipack"))
    callback.on_epoch_begin(None, SimpleNamespace(epoch=1 + SKIPPED / len(loader)), None, train_dataloader=loader)
    report["epoch1_rest"] = [indices(b) for b in skipped]
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
