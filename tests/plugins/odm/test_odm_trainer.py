"""Short HF Trainer runs: the mixture moves toward the category with the larger reward (train_loss: the noise
category, whose loss stays at log(vocab) while the learnable one's falls; velocity: the learnable category, whose
loss falls), and an interrupted run resumes with the same mixture."""

from __future__ import annotations

import json
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


def cpu_trainer_kwargs(output_dir, **overrides):
    """The keyword arguments every short CPU Trainer / SFTTrainer run here shares (batch 4, no saving, no
    reporting, no workers), with ``overrides`` on top."""
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        **overrides,
    }


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
        **cpu_trainer_kwargs(tmp_path / "out", max_steps=120, learning_rate=2e-2, lr_scheduler_type="constant",
                             logging_steps=20)
    )  # fmt: skip
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


class _Interrupted(RuntimeError):
    pass


def _resume_run(tmp_path, out, *, crash_at=None, resume=False, attach="constructor"):
    """One Trainer run of 10 steps (checkpoint at 5); returns (dataset, callback, trainer, ids read by the
    collator in stream order)."""
    import torch
    from fms_acceleration_accelerate_odm import OnlineMixingCallback, OnlineMixingDataset
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    data = _data()
    for name, examples in data.items():
        for index, example in enumerate(examples):
            example["id"] = f"{name}:{index}"
    read: list[str] = []

    def collate(examples):
        read.extend(example["id"] for example in examples)
        return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels")}

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == crash_at:
                raise _Interrupted(state.global_step)

    dataset = OnlineMixingDataset(data, sampling_interval=2, gamma=0.1, eta=0.5, reward_type="train_loss", seed=3)
    args = TrainingArguments(
        **cpu_trainer_kwargs(out, max_steps=10, learning_rate=2e-2, lr_scheduler_type="linear", logging_steps=1,
                             save_strategy="steps", save_steps=5, remove_unused_columns=False)
    )  # fmt: skip
    callback = OnlineMixingCallback(update_interval=2)  # the checkpoint at step 5 holds a pending reward
    callbacks = [callback] if attach == "constructor" else []
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=callbacks)
    if attach == "add_callback":  # as the plugin's callbacks are added: after the trainer is built
        trainer.add_callback(callback)
    if crash_at is not None:
        trainer.add_callback(Crash())
    trainer.train(resume_from_checkpoint=True if resume else None)
    return dataset, callback, trainer, read


@pytest.mark.parametrize("attach", ["constructor", "add_callback"])
def test_trainer_resume_continues_the_mixture_exactly(tmp_path, attach):
    """Run A: 10 steps. Run B: interrupted after step 6 (checkpoint at 5), then a new trainer resumes to 10. After
    the checkpoint B trains the same examples (categories and ids), ends with the same bandit and the same losses,
    and its odm.jsonl equals A's."""
    from fms_acceleration_accelerate_odm import read_metrics

    _tiny_model(tmp_path)
    dataset_a, _, trainer_a, read_a = _resume_run(tmp_path, tmp_path / "a")

    with pytest.raises(_Interrupted):
        _resume_run(tmp_path, tmp_path / "b", crash_at=6)
    saved = json.loads((tmp_path / "b" / "checkpoint-5" / "odm_state.json").read_text())
    assert saved["global_step"] == 5 and saved["produced"] == 20  # read-ahead examples given back
    assert saved["pending_reward"]["examples"] == 4 and saved["rewarded_until"] == 16
    assert len(read_metrics(tmp_path / "b")) == 3  # updates at steps 2, 4 and 6 (after the checkpoint)

    dataset_b, callback_b, trainer_b, read_b = _resume_run(tmp_path, tmp_path / "b", resume=True, attach=attach)

    assert trainer_b.args.ignore_data_skip and callback_b.dataset is dataset_b
    assert read_b[:20] == read_a[20:40]  # the examples (so the categories) trained after the checkpoint
    assert {i.split(":")[0] for i in read_a[20:40]} == {"learnable", "noise"}
    assert dataset_b.bandit.weights == dataset_a.bandit.weights
    assert dataset_b.probabilities() == dataset_a.probabilities()
    assert read_metrics(tmp_path / "b") == read_metrics(tmp_path / "a")
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [2, 4, 6, 8, 10]
    losses = {
        run: [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h and h["step"] > 5]
        for run, trainer in (("a", trainer_a), ("b", trainer_b))
    }
    assert losses["b"] == losses["a"] and len(losses["a"]) == 5


def test_trainer_velocity_reward_moves_the_mixture_toward_the_learnable_category(tmp_path):
    """reward_type 'velocity' (how fast each category's training loss falls): within 150 steps the mixture moves
    to the learnable category, whose loss the model brings down, away from noise, whose loss cannot fall below
    log(vocab) (and rises as the model learns the pattern). With the rewards ignored the mixture would stay at its
    start (1/2 each); train_loss (the test above) goes the other way."""
    import math

    import torch
    from fms_acceleration_accelerate_odm import OnlineMixingCallback, OnlineMixingDataset, read_metrics
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    dataset = OnlineMixingDataset(_data(), sampling_interval=4, gamma=0.1, eta=1.0, reward_type="velocity", seed=1)
    args = TrainingArguments(
        **cpu_trainer_kwargs(tmp_path / "out", max_steps=150, learning_rate=1e-2, lr_scheduler_type="constant",
                             logging_steps=50)
    )  # fmt: skip
    trainer = Trainer(
        model=_tiny_model(tmp_path), args=args, train_dataset=dataset, callbacks=[OnlineMixingCallback(plot=False)]
    )
    trainer.train()

    records = read_metrics(tmp_path / "out")
    assert len(records) == 150 and records[0]["sampling_ratio"]["learnable"] == pytest.approx(0.5)
    ratio = [r["sampling_ratio"]["learnable"] for r in records]
    assert ratio[-1] > 0.85, ratio[::10]
    learnable = sum(r["rewards"]["learnable"] for r in records if "learnable" in r["rewards"])
    noise = sum(r["rewards"]["noise"] for r in records if "noise" in r["rewards"])
    assert learnable > 2.0 and noise < 0.5, (learnable, noise)
    last_loss = dict(zip(dataset.categories, dataset.state_dict()["last_loss"]))
    assert last_loss["learnable"] < 0.5 < math.log(VOCAB) < last_loss["noise"], last_loss


def test_trainer_counts_examples_flattened_into_one_row(tmp_path):
    """With HF's padding-free collator each batch is one row holding 4 examples: the trained examples are still
    counted one by one (position_ids restarting at 0), so the mixture's bookkeeping matches the padded layout."""
    import torch
    from fms_acceleration_accelerate_odm import OnlineMixingCallback, OnlineMixingDataset, read_metrics
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    torch.manual_seed(0)
    dataset = OnlineMixingDataset(_data(), sampling_interval=4, reward_type="train_loss", seed=1)
    args = TrainingArguments(**cpu_trainer_kwargs(tmp_path / "out", max_steps=6))
    seen_rows = []

    def collate(examples):
        batch = DataCollatorWithFlattening()(examples)
        seen_rows.append(batch["input_ids"].shape[0])
        return batch

    trainer = Trainer(model=_tiny_model(tmp_path), args=args, train_dataset=dataset, data_collator=collate,
                      callbacks=[OnlineMixingCallback(update_interval=1)])  # fmt: skip
    trainer.train()
    assert set(seen_rows) == {1}  # flattened: one row per batch
    assert read_metrics(tmp_path / "out")[-1]["examples"] == 24
