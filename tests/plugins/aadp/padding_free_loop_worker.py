"""A plain Accelerate training loop over ``DataCollatorForSeq2Seq`` batches (the padding-free client test's worker).

``python padding_free_loop_worker.py MODEL_DIR EXAMPLES_JSON REPORT_JSON`` (under ``accelerate launch`` with an
``acceleration:`` section, or imported by the test for the padded baseline): trains the saved model for one epoch
with SGD and writes the per-step losses, what each batch looked like and the model's attention implementation.
Imports nothing from fms-acceleration: the section does the work.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, PreTrainedTokenizerFast


def train(model_dir: str, examples: list[dict[str, Any]], accelerator: Accelerator) -> dict[str, Any]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(examples, batch_size=3, collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    report: dict[str, Any] = {"losses": [], "batches": []}
    for batch in loader:
        report["batches"].append({key: list(value.shape) for key, value in batch.items() if torch.is_tensor(value)})
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        report["losses"].append(loss.item())
    report["attn_implementation"] = str(accelerator.unwrap_model(model).config._attn_implementation)
    return report


if __name__ == "__main__":
    model_dir, examples_path, report_path = sys.argv[1:4]
    with open(examples_path, encoding="utf-8") as f:
        examples = json.load(f)
    result = train(model_dir, examples, Accelerator())
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
