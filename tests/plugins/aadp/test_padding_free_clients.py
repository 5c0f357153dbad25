"""Real clients train under the padding-free section and match their own padded runs step for step.

* HF ``Trainer`` with ``DataCollatorForSeq2Seq`` (framework API: ``augmentation`` + the callbacks of
  ``get_callbacks_and_ready_for_train``): the model sees one flattened row per step, and the per-step losses equal
  those of the same Trainer run padded without the plugin.
* The HF ``Trainer`` whose own Accelerator reads the section (as in a launched worker): flattened by the
  DataLoader ``prepare`` hook.
* TRL ``SFTTrainer`` with ``padding_free=True`` against TRL's padded run.
* A plain Accelerate loop under stock ``accelerate launch --config_file launch_configs/accelerate-cpu-padding-free.yaml``
  (nothing in the script mentions the plugin) against the same loop run padded in this process.

Tiny Llama saved to a temporary folder, fp32, CPU, SGD, no dropout: the runs compute the same sums in a different
layout, so the losses agree to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import ACCELERATE, REPO, free_port, run

from .padding_free_helpers import instruction_examples, load_tiny, padding_free_framework, save_tiny, tiny_tokenizer

WORKER = Path(__file__).resolve().parent / "padding_free_loop_worker.py"
STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = save_tiny("llama", tmp_path_factory.mktemp("tiny-llama") / "model")
    tiny_tokenizer().save_pretrained(folder)
    return folder


class _SeenBatches:
    """Forward pre-hook recording the shape of every batch the model receives."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shapes: list[tuple[tuple[int, ...], bool]] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.shapes.append((tuple(kwargs["input_ids"].shape), "attention_mask" in kwargs))


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _common_args(tmp_path: Path, **extra):
    return dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=3,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **extra,
    )


def test_hf_trainer_with_seq2seq_collator(model_dir, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = Dataset.from_list(instruction_examples())

    def trainer_for(model):
        args = TrainingArguments(**_common_args(tmp_path))
        collator = DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True)
        return Trainer(model=model, args=args, train_dataset=data, data_collator=collator), args

    padded_model = load_tiny(model_dir)
    seen_padded = _SeenBatches(padded_model)
    padded, _ = trainer_for(padded_model)
    padded.train()

    model = load_tiny(model_dir)
    framework = padding_free_framework()
    with framework:
        args = TrainingArguments(**_common_args(tmp_path))
        model, _ = framework.augmentation(model, args)
        seen = _SeenBatches(model)
        trainer, _ = trainer_for(model)
        for callback in framework.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
            trainer.add_callback(callback)
        trainer.train()
        assert str(model.config._attn_implementation).startswith("fms_padding_free_sdpa")

    assert all(rows > 1 and has_mask for (rows, _), has_mask in seen_padded.shapes) and len(seen_padded.shapes) == STEPS
    assert all(shape[0] == 1 and not has_mask for shape, has_mask in seen.shapes) and len(seen.shapes) == STEPS
    assert sum(shape[1] for shape, _ in seen.shapes) < sum(r * n for (r, n), _ in seen_padded.shapes)  # no pads
    torch.testing.assert_close(torch.tensor(_losses(trainer)), torch.tensor(_losses(padded)), rtol=1e-4, atol=1e-5)


def test_hf_trainer_under_the_launched_section(model_dir, tmp_path, monkeypatch):
    """The HF Trainer's own Accelerator picks the section up (as in a worker of ``accelerate launch``): its
    DataLoader-only ``prepare`` flattens the training batches, its model ``prepare`` patches the attention."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from fms_acceleration_accelerate import accelerate_integration

    data = Dataset.from_list(instruction_examples())
    collator = DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True)
    padded = Trainer(model=load_tiny(model_dir), args=TrainingArguments(**_common_args(tmp_path)),
                     train_dataset=data, data_collator=collator)  # fmt: skip
    padded.train()

    accelerate_integration.install()
    section = {"training": {"attention": {"padding_free": {"method": "huggingface"}}}}
    monkeypatch.setenv(accelerate_integration.ENV_SECTION, json.dumps(section))
    model = load_tiny(model_dir)
    seen = _SeenBatches(model)
    trainer = Trainer(model=model, args=TrainingArguments(**_common_args(tmp_path)), train_dataset=data,
                      data_collator=collator)  # fmt: skip
    framework = accelerate_integration.get_framework(trainer.accelerator)
    assert framework is not None and framework.active_plugin_names[0] == "padding_free"
    try:
        trainer.train()
        assert str(model.config._attn_implementation).startswith("fms_padding_free_sdpa")
    finally:
        framework.revert()
    assert all(shape[0] == 1 and not has_mask for shape, has_mask in seen.shapes) and len(seen.shapes) == STEPS
    torch.testing.assert_close(torch.tensor(_losses(trainer)), torch.tensor(_losses(padded)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("multiple", [0, 16])
def test_trl_sft_trainer_padding_free(model_dir, tmp_path, multiple):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"input_ids": e["input_ids"]} for e in instruction_examples()])

    def run_trl(model, padding_free: bool, callbacks_from=None):
        config = SFTConfig(**_common_args(tmp_path, bf16=False, padding_free=padding_free, max_length=None))
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer())
        if callbacks_from is not None:
            for callback in callbacks_from.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
                trainer.add_callback(callback)
        seen = _SeenBatches(trainer.model)
        trainer.train()
        return _losses(trainer), seen.shapes

    padded_losses, padded_shapes = run_trl(load_tiny(model_dir), padding_free=False)
    framework = padding_free_framework(pad_to_multiple_of=multiple)
    with framework:
        model, _ = framework.augmentation(load_tiny(model_dir), None)
        losses, shapes = run_trl(model, padding_free=True, callbacks_from=framework)
        assert framework.plugin("padding_free").backend_of(model).name == "sdpa"
    assert all(shape[0] == 1 for shape, _ in shapes) and all(shape[0] == 3 for shape, _ in padded_shapes)
    if multiple:  # every flattened row rounded up by the filler example, the losses still those of the padded run
        assert all(shape[1] % multiple == 0 for shape, _ in shapes), shapes
    else:  # without the option some rows are not multiples of 16 (so the check above means something)
        assert any(shape[1] % 16 for shape, _ in shapes), shapes
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(padded_losses), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_accelerate_loop_under_accelerate_launch(model_dir, tmp_path):
    examples = instruction_examples()
    (tmp_path / "examples.json").write_text(json.dumps(examples), encoding="utf-8")
    config = REPO / "launch_configs" / "accelerate-cpu-padding-free.yaml"  # the shipped CPU configuration
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    report = tmp_path / "report.json"
    result = run(
        [ACCELERATE, "launch", "--config_file", str(config), "--main_process_port", str(free_port()), str(WORKER),
         str(model_dir), str(tmp_path / "examples.json"), str(report)],
        env,
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    launched = json.loads(report.read_text(encoding="utf-8"))
    assert "padding_free" in result.stdout and "LlamaForCausalLM.config._attn_implementation" in result.stdout
    assert launched["attn_implementation"].startswith("fms_padding_free_sdpa")
    assert all(b["input_ids"][0] == 1 and "attention_mask" not in b for b in launched["batches"])

    spec = importlib.util.spec_from_file_location("padding_free_loop_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    from accelerate import Accelerator

    padded = worker.train(str(model_dir), examples, Accelerator(cpu=True))
    assert padded["attn_implementation"] == "eager" and all(b["input_ids"][0] == 3 for b in padded["batches"])
    assert len(launched["losses"]) == len(padded["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(launched["losses"]), torch.tensor(padded["losses"]), rtol=1e-4, atol=1e-5)
