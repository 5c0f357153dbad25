"""Online data mixing through TRL's SFTTrainer (the stream as a ``datasets.IterableDataset``) and a plain Accelerate
loop (``RewardTracker``, ``evaluate``): the same learnable-vs-noise data as the HF Trainer tests, the velocity reward
moving the mixture to the learnable category."""

from __future__ import annotations

import pytest

pytest.importorskip("fms_acceleration_accelerate_odm")

from .test_odm_trainer import VOCAB, _data, _tiny_model, cpu_trainer_kwargs


def _mixing(**overrides):
    from fms_acceleration_accelerate_odm import OnlineMixingDataset

    options = {"sampling_interval": 4, "gamma": 0.1, "eta": 1.0, "reward_type": "velocity", "seed": 1, **overrides}
    return OnlineMixingDataset(_data(), **options)


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )


def test_trl_sft_trainer_mixture_moves_toward_the_learnable_category(tmp_path):
    """SFTTrainer accepts only Hugging Face datasets: ``to_iterable_dataset()`` wraps the stream. TRL reads one
    example before training to look at the data; the callback (here found behind the wrapper, as the plugin's is)
    gives it back, so the first batch trained is the stream's first four examples."""
    import torch
    from fms_acceleration_accelerate_odm import OnlineMixingCallback, read_metrics
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    mixing = _mixing()
    model = _tiny_model(tmp_path)
    trained: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: trained.extend(kwargs["input_ids"].tolist()) if module.training else None,
        with_kwargs=True,
    )
    args = SFTConfig(
        **cpu_trainer_kwargs(tmp_path / "out", max_steps=150, learning_rate=1e-2, lr_scheduler_type="constant",
                             logging_steps=50, max_length=None, dataset_kwargs={"skip_prepare_dataset": True},
                             disable_tqdm=True)
    )  # fmt: skip
    callback = OnlineMixingCallback(plot=False)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=mixing.to_iterable_dataset(),
        processing_class=_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()

    assert callback.dataset is mixing
    fresh = iter(_mixing())
    assert trained[:4] == [next(fresh)["input_ids"] for _ in range(4)]  # the stream from its first example
    records = read_metrics(tmp_path / "out")
    assert len(records) == 150 and records[-1]["examples"] == 600
    assert records[-1]["sampling_ratio"]["learnable"] > 0.85, [r["sampling_ratio"] for r in records[::15]]


def test_plain_accelerate_loop_with_reward_tracker(tmp_path):
    """A loop of one's own: ``Accelerator.prepare`` on a DataLoader of the dataset, ``RewardTracker`` attached to
    the model and stepped after each optimizer step; then ``evaluate()`` gives each category's evaluation loss
    (``eval_batch_size`` at a time) as the validation_loss reward."""
    import torch
    from accelerate import Accelerator
    from fms_acceleration_accelerate_odm import RewardTracker
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    data = _data()
    evaluation = {"learnable": data["learnable"][:6], "noise": data["noise"][:6]}
    mixing = _mixing(eval_dataset_dict=evaluation, eval_batch_size=4, output_dir=tmp_path / "odm")

    def collate(examples):
        return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels")}

    accelerator = Accelerator(cpu=True)
    model = _tiny_model(tmp_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(mixing, batch_size=4, collate_fn=collate)
    )
    tracker = RewardTracker(mixing, update_interval=1)
    tracker.attach(model)
    model.train()
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        tracker.step(step)
        if step == 150:
            break
    tracker.detach()

    assert len(mixing.history) == 150 and mixing.rewarded_until == 600
    assert mixing.probabilities()["learnable"] > 0.85, [r["sampling_ratio"] for r in mixing.history[::15]]

    before = mixing.bandit.updates
    losses = mixing.evaluate(model, step=150)
    assert mixing.bandit.updates == before + 1 and model.training  # one full-information update, mode restored
    with torch.no_grad():
        model.eval()
        expected = {name: model(**collate(rows)).loss.item() for name, rows in evaluation.items()}
        model.train()
    assert losses == pytest.approx(expected, rel=1e-5)  # batches of 4 + 2 averaged per example
    assert losses["learnable"] < 0.5 < losses["noise"]
    assert mixing.history[-1]["rewards"] == pytest.approx(losses)
