"""A short HF Trainer run: the mixture moves toward the category with the larger reward (train_loss: the noise
category, whose loss stays at log(vocab) while the learnable one's falls)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("fms_acceleration_accelerate_odm")

VOCAB = 32
LENGTH = 16


def _tiny_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    return LlamaForCausalLM.from_pretrained(tmp_path / "model")


def _data():
    rng = random.Random(0)
    learnable = [{"input_ids": [(s + i) % VOCAB for i in range(LENGTH)]} for s in range(64)]
    noise = [{"input_ids": [rng.randrange(VOCAB) for _ in range(LENGTH)]} for _ in range(256)]
    for example in learnable + noise:
        example["labels"] = list(example["input_ids"])
    return {"learnable": learnable, "noise": noise}


def test_trainer_mixture_moves_toward_the_rewarded_category(tmp_path):
    import torch
    from fms_acceleration_accelerate_odm import OnlineMixingCallback, OnlineMixingDataset, read_metrics
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    dataset = OnlineMixingDataset(_data(), sampling_interval=4, gamma=0.1, eta=0.05, reward_type="train_loss", seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=120,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    callback = OnlineMixingCallback(update_interval=1)
    trainer = Trainer(model=_tiny_model(tmp_path), args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()

    records = read_metrics(tmp_path / "out")
    assert len(records) == 120 and callback.dataset is dataset
    assert records[-1]["examples"] == 480  # every trained example attributed once
    first, last = records[0]["sampling_ratio"]["noise"], records[-1]["sampling_ratio"]["noise"]
    assert last > 0.7 and last > first, (first, last)
    noise_losses = [r["rewards"]["noise"] for r in records[-10:] if "noise" in r["rewards"]]
    learnable_losses = [r["rewards"]["learnable"] for r in records if "learnable" in r["rewards"]]
    assert min(learnable_losses) < min(noise_losses)  # the learnable category was learnt
    assert (tmp_path / "out" / "odm_mixture.png").is_file()
