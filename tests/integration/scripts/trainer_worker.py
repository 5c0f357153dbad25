"""Worker for the Trainer test: HF Trainer and TRL SFTTrainer each create their own Accelerator.

Writes ``$REPORT_DIR/trainer.json``. Never imports fms_acceleration_accelerate except to read the result
through ``get_callbacks_and_ready_for_train`` (the documented one-liner for Trainer users).
"""

import json
import os
import sys

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

report_dir = os.environ["REPORT_DIR"]
words = "the a lora shard kernel token layer norm fast slow big small".split()
vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
raw.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config)


texts = [" ".join(words[(i + j) % len(words)] for j in range(8)) for i in range(16)]
report = {"script_imported_package": "fms_acceleration_accelerate.cli" in sys.modules}

# HF Trainer
ids = [tokenizer(t)["input_ids"] for t in texts]
data = Dataset.from_dict({"input_ids": ids, "labels": ids})
args = TrainingArguments(
    output_dir=os.path.join(report_dir, "hf"),
    max_steps=2,
    per_device_train_batch_size=4,
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
)
trainer = Trainer(model=tiny_model(), args=args, train_dataset=data)
from fms_acceleration_accelerate.accelerate_integration import get_callbacks_and_ready_for_train, get_framework  # noqa: E402

for callback in get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
    trainer.add_callback(callback)
trainer.train()
framework = get_framework(trainer.accelerator)
report["trainer"] = {
    "plugins": list(framework.active_plugin_names) if framework else None,
    "events": framework.plugin("toy_lora").events if framework else None,
}

# TRL SFTTrainer
sft_args = SFTConfig(
    output_dir=os.path.join(report_dir, "sft"),
    max_steps=1,
    per_device_train_batch_size=4,
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    max_length=16,
    disable_tqdm=True,
    dataset_text_field="text",
    packing=False,
)
sft = SFTTrainer(
    model=tiny_model(), args=sft_args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
)
for callback in get_callbacks_and_ready_for_train(sft.model, sft.accelerator):
    sft.add_callback(callback)
sft.train()
framework = get_framework(sft.accelerator)
report["sft"] = {
    "plugins": list(framework.active_plugin_names) if framework else None,
    "events": framework.plugin("toy_lora").events if framework else None,
}
with open(os.path.join(report_dir, "trainer.json"), "w", encoding="utf-8") as handle:
    json.dump(report, handle)
