"""Worker for the real-client tests: ordinary training scripts, as a new user writes them.

Modes (``--mode``):

* ``sft-path``: TRL ``SFTTrainer`` given the model as a *path* and a peft ``LoraConfig`` (TRL loads the model with
  ``from_pretrained`` before its Accelerator exists, then adds LoRA itself).
* ``framework-api``: the original framework API: ``AccelerationFramework(--framework-config)``,
  ``model_loader`` + ``augmentation``, then ``SFTTrainer`` with the accelerated model and
  ``get_callbacks_and_ready_for_train``.

``sft-path`` never imports fms_acceleration_accelerate before training: everything comes from the section that
``accelerate launch`` hands to the process (scripts that load the model themselves are the examples
``trl_sft.py --preloaded`` and ``hf_trainer.py``, run by ``test_examples.py``). The report (``--out``, JSON) is written after training; the reading of
the framework attached to the trainer's Accelerator happens only then.
"""

from __future__ import annotations

import argparse
import json

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = "the a lora shard kernel token layer norm fast slow big small fused packed quant block".split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def texts() -> list[str]:
    # a fixed, learnable sequence pattern (each word follows the previous one in WORDS)
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(32)]


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )


def sft_config(out: str, steps: int):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        seed=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=16,
        disable_tqdm=True,
        dataset_text_field="text",
        packing=False,
    )


def is_4bit(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit layer or this project's packed form of one (not peft's LoRA wrapper of one)."""
    cls = type(module)
    return (cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")) or (
        cls.__name__ == "Packed4bitLinear"
    )


def describe(model: torch.nn.Module) -> dict:
    four_bit = [m for m in model.modules() if is_4bit(m)]
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    bases = sorted({type(m.base_layer).__name__ for n, m in model.named_modules() if n in set(lora)})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {
        "four_bit_layers": len(four_bit),
        "four_bit_kinds": sorted({f"{type(m).__name__}:{getattr(m.weight, 'quant_type', '?')}" for m in four_bit}),
        "lora_layers": len(lora),
        "lora_bases": bases,
        "trainable": len(trainable),
        "trainable_not_lora": [n for n in trainable if "lora_" not in n],
    }


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=["sft-path", "framework-api"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--framework-config", default=None)
    args = parser.parse_args()
    tok = tokenizer()
    data = Dataset.from_dict({"text": texts()})
    report: dict = {"mode": args.mode}

    if args.mode == "sft-path":
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=args.model,
            args=sft_config(args.out + ".run", args.steps),
            train_dataset=data,
            processing_class=tok,
            peft_config=lora_config(),
        )
    else:  # framework-api
        from transformers import set_seed
        from trl import SFTTrainer

        from fms_acceleration_accelerate import AccelerationFramework

        framework = AccelerationFramework(args.framework_config)
        train_args = sft_config(args.out + ".run", args.steps)
        set_seed(train_args.seed)  # as SFTTrainer does before it loads a model from a path
        if framework.requires_custom_loading:
            model = framework.model_loader(args.model, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model, (lora,) = framework.augmentation(model, train_args, modifiable_args=(lora_config(),))
        trainer = SFTTrainer(model=model, args=train_args, train_dataset=data, processing_class=tok, peft_config=lora)
        for callback in framework.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
            trainer.add_callback(callback)
        report["own_framework_plugins"] = list(framework.active_plugin_names)

    report["before_train"] = describe(trainer.model)
    trainer.train()
    report["losses"] = losses_of(trainer)
    report["after_train"] = describe(trainer.model)

    from fms_acceleration_accelerate.accelerate_integration import get_framework

    attached = get_framework(trainer.accelerator)
    report["accelerator_plugins"] = list(attached.active_plugin_names) if attached is not None else None
    if args.mode == "framework-api":
        report["accelerator_uses_own_framework"] = attached is framework
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
