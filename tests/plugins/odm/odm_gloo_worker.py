"""Worker of test_odm_distributed.py, run by ``torchrun --nproc_per_node 2`` (gloo on CPU): the HF Trainer with an
OnlineMixingDataset and the plugin's callback, Accelerate reading the stream on every process
(``dispatch_batches=False``: each process keeps its slice of every global batch, so each process draws the
categories itself). Writes ``rank<r>.json``: the examples this process trained, its local training losses, its
dataset's mixture history and state, and the categories auto-categorisation gave 60 shipped examples here.

    torchrun --nproc_per_node 2 odm_gloo_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB = 32
LENGTH = 12
STEPS = 8
PER_DEVICE = 2


def categories() -> dict[str, list[dict]]:
    """Three categories with different token statistics (so the losses, hence the rewards, differ)."""
    import random

    rng = random.Random(0)
    data = {
        "count": [[(s + i) % VOCAB for i in range(LENGTH)] for s in range(16)],
        "noise": [[rng.randrange(VOCAB) for _ in range(LENGTH)] for _ in range(16)],
        "repeat": [[s % VOCAB] * LENGTH for s in range(16)],
    }
    return {
        name: [{"id": f"{name}:{i}", "input_ids": ids, "labels": list(ids)} for i, ids in enumerate(rows)]
        for name, rows in data.items()
    }


def main(out: Path) -> None:
    import torch
    from fms_acceleration_accelerate_odm import OnlineMixingCallback, OnlineMixingDataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=PER_DEVICE,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        accelerator_config={"dispatch_batches": False},
        disable_tqdm=True,
        seed=0,
    )
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_backend() == "gloo", "torchrun with the HF Trainer on CPU starts gloo"
    rank, world = dist.get_rank(), dist.get_world_size()

    dataset = OnlineMixingDataset(
        categories(), sampling_interval=2, gamma=0.1, eta=0.5, reward_type="train_loss", seed=3
    )
    read: list[list[str]] = []

    def collate(examples):
        read.append([e["id"] for e in examples])
        return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels")}

    torch.manual_seed(0)  # the same initial weights on both processes
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    losses: list[float] = []
    model.register_forward_hook(
        lambda module, _args, output: losses.append(float(output.loss.detach())) if module.training else None
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[OnlineMixingCallback(update_interval=1, plot=False)],
    )
    trainer.train()
    state = dataset.state_dict()

    # auto-categorisation under the process group: process 0 embeds and clusters, the others get its labels
    from fms_acceleration_accelerate_odm import DatasetAutoCategorizer

    shipped = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "instructions.jsonl"
    with open(shipped, encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(60), handle)]
    categorizer = DatasetAutoCategorizer(
        {"input_column": "instruction", "num_categories": 3, "show_progress_bar": False}
    )
    groups = categorizer.fit(rows)
    report = {
        "rank": rank,
        "world": world,
        "read": read,
        "losses": losses,
        "history": dataset.history,
        "probabilities": dataset.probabilities(),
        "counts": state["counts"],
        "positions": state["positions"],
        "produced": state["produced"],
        "rewarded_until": state["rewarded_until"],
        "auto_categories": {name: [row["id"] for row in group] for name, group in groups.items()},
        "embedded_here": categorizer._embedder is not None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # every process exits: the prepared objects released, a barrier, then the process group destroyed
    from fms_acceleration_accelerate import end_training

    accelerator = trainer.accelerator
    del trainer, model
    end_training(accelerator)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
