"""The validation_loss reward through the HF Trainer (per-category evaluation losses from the trainer, or from the
dataset's own evaluation data), and its bad set-ups: no evaluation at all (refused before the first step), an
evaluation without per-category losses, evaluation data missing or empty in ``evaluate()``."""

from __future__ import annotations

import pytest

pytest.importorskip("fms_acceleration_accelerate_odm")

from .test_odm_trainer import _data, _tiny_model, cpu_trainer_kwargs


def _trainer(tmp_path, mixing, *, eval_dataset=None, eval_strategy="steps"):
    import torch
    from fms_acceleration_accelerate_odm import OnlineMixingCallback
    from transformers import Trainer, TrainingArguments

    def collate(examples):
        return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels")}

    args = TrainingArguments(
        **cpu_trainer_kwargs(tmp_path / "out", per_device_eval_batch_size=4, max_steps=6, eval_strategy=eval_strategy,
                             eval_steps=2, learning_rate=1e-2, disable_tqdm=True)
    )  # fmt: skip
    return Trainer(
        model=_tiny_model(tmp_path),
        args=args,
        train_dataset=mixing,
        eval_dataset=eval_dataset,
        data_collator=collate,
        callbacks=[OnlineMixingCallback(plot=False)],
    )


def _mixing(**kwargs):
    from fms_acceleration_accelerate_odm import OnlineMixingDataset

    return OnlineMixingDataset(_data(), sampling_interval=4, reward_type="validation_loss", seed=1, **kwargs)


def _evaluation():
    data = _data()
    return {"learnable": data["learnable"][:4], "noise": data["noise"][:4]}


def test_trainer_per_category_evaluation_losses_are_the_rewards(tmp_path):
    mixing = _mixing()
    trainer = _trainer(tmp_path, mixing, eval_dataset=_evaluation())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "eval_learnable_loss" in h or "eval_noise_loss" in h]
    rewards = [record["rewards"] for record in mixing.history]
    # one update per category and evaluation (steps 2, 4, 6), each with that category's loss
    assert [r["step"] for r in mixing.history] == [2, 2, 4, 4, 6, 6]
    assert rewards == [
        {name: pytest.approx(entry[f"eval_{name}_loss"])}
        for entry in logged
        for name in ("learnable", "noise")
        if f"eval_{name}_loss" in entry
    ]
    assert mixing.probabilities()["noise"] > 0.5  # validation_loss: the higher loss is drawn more


def test_trainer_single_evaluation_dataset_uses_the_datasets_own_evaluation_data(tmp_path):
    """The trainer evaluates one dataset (eval_loss only): the per-category losses come from the
    OnlineMixingDataset's eval_dataset_dict, evaluated at each of the trainer's evaluations."""
    evaluation = _evaluation()
    mixing = _mixing(eval_dataset_dict=evaluation, eval_batch_size=2)
    trainer = _trainer(tmp_path, mixing, eval_dataset=evaluation["learnable"] + evaluation["noise"])
    trainer.train()
    assert [r["step"] for r in mixing.history] == [2, 4, 6]
    assert all(set(r["rewards"]) == {"learnable", "noise"} for r in mixing.history)


def test_validation_loss_without_evaluation_is_refused_clearly(tmp_path):
    from fms_acceleration_accelerate_odm import OnlineMixingDataset

    # the trainer never evaluates: refused when training begins, before the first step
    trainer = _trainer(tmp_path, _mixing(), eval_strategy="no")
    with pytest.raises(ValueError, match=r"never evaluates \(eval_strategy='no'\)"):
        trainer.train()
    assert trainer.state.global_step == 0

    # the trainer's evaluation has no per-category loss, and the dataset has no evaluation data
    trainer = _trainer(tmp_path, _mixing(), eval_dataset=_data()["noise"][:4])
    with pytest.raises(ValueError, match=r"needs one evaluation loss per category.*eval_dataset=\{category: dataset\}"):
        trainer.train()
    assert trainer.state.global_step == 2  # the first evaluation

    # loops of one's own: evaluate() without evaluation data, or with an empty category
    model = _tiny_model(tmp_path)
    with pytest.raises(ValueError, match=r"evaluate\(\) needs evaluation data per category"):
        _mixing().evaluate(model)
    with pytest.raises(ValueError, match="evaluation data of category 'noise' is empty"):
        _mixing(eval_dataset_dict={"learnable": _data()["learnable"][:2], "noise": []}).evaluate(model)
    with pytest.raises(ValueError, match="not training categories"):
        OnlineMixingDataset(_data(), eval_dataset_dict={"learnable": [], "other": []})
