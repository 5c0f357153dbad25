"""The multipack plugin: upstream's keys, padding-free required, the sampler installed through
``Accelerator.prepare`` and through the HF Trainer (framework API), resume through the trainer's checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from fms_acceleration_accelerate_aadp.multipack import MultipackBatchSampler
from fms_acceleration_accelerate_aadp.multipack_plugin import (
    MultipackAccelerationPlugin,
    MultipackConfig,
    find_multipack_sampler,
)
from torch.utils.data import DataLoader

from fms_acceleration_accelerate import AccelerationFramework
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .multipack_helpers import shipped_lengths

PADDING_FREE = {"padding_free": {"method": "huggingface"}}


def _body(**multipack):
    return {"training": {"attention": PADDING_FREE, "dataloader": {"multipack": multipack}}}


def _examples(count=48, scale=16, vocab=60):
    """Examples with the shipped length distribution scaled down (``scale`` times shorter), with their index."""
    generator = torch.Generator().manual_seed(0)
    lengths = [max(2, n // scale) for n in shipped_lengths()[:count]]
    return [
        {"idx": i, "input_ids": torch.randint(3, vocab, (n,), generator=generator).tolist()}
        for i, n in enumerate(lengths)
    ]


class RecordingCollator:
    """Pads like DataCollatorForSeq2Seq (labels = input_ids, -100 on pads) and records each batch's indices."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __call__(self, examples):
        self.batches.append(sorted(e["idx"] for e in examples))
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.zeros(len(examples), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(examples):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[row, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ------------------------------------------------------------------------------------------------ config
def test_upstream_keys_activate_both_plugins():
    fms_hf_tuning = AccelerationFramework({"plugins": _body(num_processes=16)})  # fms-hf-tuning's MultiPack
    assert fms_hf_tuning.active_plugin_names == ("padding_free", "multipack")
    assert fms_hf_tuning.passthrough == ()
    original = AccelerationFramework({"plugins": _body(num_workers=4, max_number_tokens=60000, pad_token_id=None)})
    plugin = original.plugin("multipack")
    assert isinstance(plugin, MultipackAccelerationPlugin)
    assert plugin.config.length_processes == 4 and plugin.config.max_number_tokens == 60000
    assert AccelerationFramework(_body(effective_batch_size=128)).plugin("multipack").config.effective_batch_size == 128


def test_multipack_without_padding_free_is_refused_naming_the_fix():
    body = {"training": {"dataloader": {"multipack": {"num_processes": 16}}}}
    with pytest.raises(AccelerationConfigError) as caught:
        AccelerationFramework({"plugins": body})
    message = str(caught.value)
    assert "plugins.training.dataloader.multipack" in message and "needs the padding-free plugin" in message
    assert "add the section training.attention.padding_free" in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"pad_token_id": 0}, r"\[training\.dataloader\.multipack\] pad_token_id is 0.*padding-free"),
        ({"max_number_tokens": 0}, r"multipack\] max_number_tokens must be a positive int"),
        ({"num_workers": 4, "num_processes": 8}, "two names of one setting"),
        ({"max_tokens": 4096}, r"(?s)unknown key 'max_tokens'. Did you mean 'max_number_tokens'.*valid keys here"),
        ({"num_processes": "many"}, r"multipack\.num_processes"),
    ],
)
def test_bad_options_are_refused(options, expected):
    with pytest.raises(AccelerationConfigError, match=expected):
        AccelerationFramework(_body(**options))


def test_the_shipped_template_activates_with_padding_free():
    template = Path(__file__).resolve().parents[3] / "plugins/attention-and-distributed-packing/configs/multipack.yaml"
    body = yaml.safe_load(template.read_text(encoding="utf-8"))
    assert list(body) == ["plugins"] and list(body["plugins"]["training"]) == ["dataloader"]
    with pytest.raises(AccelerationConfigError, match="needs the padding-free plugin"):
        AccelerationFramework(body)
    body["plugins"]["training"]["attention"] = PADDING_FREE
    config = AccelerationFramework(body).plugin("multipack").config
    assert config == MultipackConfig(num_processes=16, max_number_tokens=None)


def test_describe_names_the_budget_rule():
    lines = AccelerationFramework(_body(max_number_tokens=8192)).plugin("multipack").describe()
    assert any("8192 tokens per process batch" in line for line in lines)


# ------------------------------------------------------------------------------------------------ Accelerate
@pytest.fixture
def accelerate_integration(monkeypatch):
    from fms_acceleration_accelerate import accelerate_integration as ai

    monkeypatch.delenv(ai.ENV_SECTION, raising=False)
    was = ai.is_installed()
    ai.install()
    yield ai
    ai.uninstall()
    if was:
        ai.install()


def test_accelerator_prepare_packs_shuffled_loaders_and_leaves_evaluation_alone(accelerate_integration):
    from accelerate import Accelerator

    data = _examples()
    lengths = [len(e["input_ids"]) for e in data]
    handler = accelerate_integration.AccelerationKwargs(config=_body(seed=5))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    collator = RecordingCollator()
    train = accelerator.prepare(DataLoader(data, batch_size=4, shuffle=True, collate_fn=collator))
    sampler = find_multipack_sampler(train)
    assert isinstance(sampler, MultipackBatchSampler) and sampler.rank is None and sampler.seed == 5
    mean = sum(lengths) / len(lengths)
    assert sampler.max_tokens == max(max(lengths), -(-4 * mean // 1))  # batch_size x mean length (upstream's rule)
    batches = list(train)
    assert len(batches) == len(train) == len(sampler.plan(0))
    assert collator.batches == [sorted(step[0]) for step in sampler.plan(0)]
    # padding-free flattened them (its collator wraps ours and was kept by the rebuilt DataLoader)
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= sampler.max_tokens for b in batches)
    assert sorted(i for b in collator.batches for i in b) == list(range(len(data)))
    # evaluation: order kept, batch_size kept
    evaluation = accelerator.prepare(DataLoader(data, batch_size=4, collate_fn=RecordingCollator()))
    assert find_multipack_sampler(evaluation) is None and len(evaluation) == len(data) // 4
    # the prepared loader's set_epoch reaches the sampler
    train.set_epoch(2)
    assert sampler.epoch == 2
    accelerate_integration.get_framework(accelerator).revert()


def test_length_grouped_loaders_are_packed_and_custom_samplers_left_with_a_warning(accelerate_integration, caplog):
    from accelerate import Accelerator
    from torch.utils.data import WeightedRandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    data = _examples()
    accelerator = Accelerator(cpu=True, kwargs_handlers=[accelerate_integration.AccelerationKwargs(config=_body())])
    grouped = LengthGroupedSampler(4, lengths=[len(e["input_ids"]) for e in data])
    loader = accelerator.prepare(DataLoader(data, batch_size=4, sampler=grouped, collate_fn=RecordingCollator()))
    assert find_multipack_sampler(loader) is not None
    weighted = WeightedRandomSampler([1.0] * len(data), len(data))
    with caplog.at_level("WARNING", logger="fms_acceleration_accelerate_aadp"):
        loader = accelerator.prepare(DataLoader(data, batch_size=4, sampler=weighted, collate_fn=RecordingCollator()))
    assert find_multipack_sampler(loader) is None and len(loader) == len(data) // 4
    assert "sampler WeightedRandomSampler left unchanged" in caplog.text


def test_max_number_tokens_and_effective_batch_size_set_the_budget(accelerate_integration):
    from accelerate import Accelerator

    data = _examples()
    lengths = [len(e["input_ids"]) for e in data]
    mean = sum(lengths) / len(lengths)

    def budget(**options):
        handler = accelerate_integration.AccelerationKwargs(config=_body(**options))
        accelerator = Accelerator(cpu=True, kwargs_handlers=[handler], gradient_accumulation_steps=2)
        loader = accelerator.prepare(DataLoader(data, batch_size=4, shuffle=True, collate_fn=RecordingCollator()))
        return find_multipack_sampler(loader).max_tokens

    assert budget(max_number_tokens=500) == 500
    assert budget(effective_batch_size=24) == max(max(lengths), -(-12 * mean // 1))  # 24 / (1 rank x 2 accumulation)
    assert budget(effective_batch_size=24, max_number_tokens=max(lengths)) == max(lengths)  # the cap
    with pytest.raises(AccelerationConfigError, match=r"(?s)max_number_tokens is 3, but the longest .*at least"):
        budget(max_number_tokens=3)


def test_split_batches_and_dispatch_batches_are_refused(accelerate_integration):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    for settings, name in ((dict(split_batches=True), "split_batches"), (dict(dispatch_batches=True), "dispatch")):
        handler = accelerate_integration.AccelerationKwargs(config=_body())
        with pytest.raises(AccelerationConfigError, match=f"(?s){name}.*fix: .*{name}"):
            Accelerator(cpu=True, kwargs_handlers=[handler], dataloader_config=DataLoaderConfiguration(**settings))


def test_a_single_rank_sampler_is_rebuilt_for_all_ranks(accelerate_integration):
    from accelerate import Accelerator

    data = _examples()
    lengths = [len(e["input_ids"]) for e in data]
    accelerator = Accelerator(cpu=True, kwargs_handlers=[accelerate_integration.AccelerationKwargs(config=_body())])
    mine = MultipackBatchSampler(lengths, 600, rank=0, seed=9)
    loader = accelerator.prepare(DataLoader(data, batch_sampler=mine, collate_fn=RecordingCollator()))
    twin = find_multipack_sampler(loader)
    assert twin is not mine and twin.rank is None and twin.plan(0) == mine.plan(0)
    wrong = MultipackBatchSampler(lengths, 600, num_replicas=2)
    with pytest.raises(AccelerationConfigError, match=r"plans for 2 processes, but the run has 1"):
        accelerator.prepare(DataLoader(data, batch_sampler=wrong, collate_fn=RecordingCollator()))


def test_a_dataset_without_input_ids_is_refused(accelerate_integration):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, kwargs_handlers=[accelerate_integration.AccelerationKwargs(config=_body())])
    with pytest.raises(
        AccelerationConfigError, match=r"(?s)token counts: example 0 has no .input_ids. field.*fix: .*lengths_column"
    ):
        accelerator.prepare(DataLoader([{"text": "a"}] * 4, batch_size=2, shuffle=True, collate_fn=list))


# ------------------------------------------------------------------------------------------------ HF Trainer
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def _trainer(tmp_path, data, collator, **overrides):
    from transformers import Trainer, TrainingArguments

    framework = AccelerationFramework(_body())
    model = _tiny_llama()
    arguments = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=3,
    )
    arguments.update(overrides)
    args = TrainingArguments(**arguments)
    model, _ = framework.augmentation(model, args, (None,))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(callback)
    return framework, trainer


def test_hf_trainer_trains_on_multipack_batches_and_resumes_with_the_remaining_ones(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(_examples())
    lengths = [len(ids) for ids in data["input_ids"]]
    collator = RecordingCollator()
    framework, trainer = _trainer(tmp_path, data, collator, save_strategy="steps", save_steps=4)
    result = trainer.train()
    sampler = find_multipack_sampler(trainer.get_train_dataloader())
    plugin = framework.plugin("multipack")
    assert plugin.seed == 3  # the training arguments' seed
    plans = [MultipackBatchSampler(lengths, sampler.max_tokens, seed=3).plan(e) for e in (0, 1)]
    expected = [sorted(step[0]) for plan in plans for step in plan]
    assert collator.batches == expected  # both epochs, in the plan's order (epoch 1 reshuffled)
    assert plans[0] != plans[1]
    assert result.global_step == len(expected) and all(
        sum(lengths[i] for i in b) <= sampler.max_tokens for b in expected
    )
    assert result.training_loss > 0
    framework.revert()

    # resume from a checkpoint in the middle of the second epoch: exactly the remaining batches follow
    steps_per_epoch = len(plans[0])
    resume_at = next(s for s in range(4, 2 * steps_per_epoch, 4) if s > steps_per_epoch)
    checkpoint = tmp_path / "out" / f"checkpoint-{resume_at}"
    assert checkpoint.is_dir()
    again = RecordingCollator()
    framework, resumed = _trainer(tmp_path, data, again)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert again.batches == expected[resume_at:]
    framework.revert()
