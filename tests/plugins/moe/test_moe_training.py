"""Training through the MoE plugin: full fine-tuning with the HF Trainer (loss decreases, the routing load balance
is logged, the run matches the eager experts step for step) and LoRA on attention and experts through PEFT's
``target_parameters`` (same loss and adapter gradients as eager, trains, adapter reloads with identical logits)."""

from __future__ import annotations

import pytest
import torch

from .moe_helpers import assert_grads_close, batch, load, loss_and_grads, make_framework


def _dataset(rows: int = 24, seq: int = 12):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    pattern = torch.arange(3, 3 + seq)  # learnable: a fixed ramp with a random offset per row
    examples = []
    for _ in range(rows):
        ids = ((pattern + torch.randint(0, 20, (1,), generator=g)) % 60 + 3).tolist()
        examples.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * seq})
    return Dataset.from_list(examples)


def _train(model, tmp_path, callbacks=(), steps=6):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("model_type", ["granitemoe", "qwen2_moe"])
def test_full_fine_tune_with_the_hf_trainer(model_type, triton_interpreter, saved_models, tmp_path):
    directory = saved_models(model_type)
    baseline = _train(load(directory, experts_implementation="eager"), tmp_path / "eager")

    model = load(directory)
    framework = make_framework()
    with framework:
        model, _ = framework.augmentation(model)
        callbacks = framework.get_callbacks_and_ready_for_train(model)
        history = _train(model, tmp_path / "plugin", callbacks)
        assert model.config._experts_implementation == framework.plugins[0].experts_key
    assert len(history) == len(baseline) == 3
    assert history[-1]["loss"] < history[0]["loss"]  # it learns
    for want, got in zip(baseline, history):  # and takes the eager experts' path through the steps
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
        assert "moe/load_max_over_mean" not in want
        assert got["moe/load_max_over_mean"] >= 1.0 >= got["moe/load_min_over_mean"] >= 0.0
        assert got["moe/idle_experts"] >= 0


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )


def _lora_model(directory, experts_implementation=None):
    from peft import get_peft_model

    model = load(directory, experts_implementation=experts_implementation)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, _lora_config())
    with torch.no_grad():  # B starts at zero: make the adapters' effect visible
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return peft_model


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "gpt_oss"])
def test_lora_on_attention_and_experts(model_type, kernel_path, saved_models, tmp_path):
    from peft import PeftModel

    directory = saved_models(model_type)
    reference = _lora_model(directory, experts_implementation="eager")
    want_loss, want_grads = loss_and_grads(reference, batch())
    assert any("experts" in n and "lora_A" in n for n in want_grads)

    model = _lora_model(directory)
    framework = make_framework()
    model, _ = framework.augmentation(model)  # the PEFT model: the plugin finds the experts inside its wrappers
    assert len(framework.plugins[0]._plans) == model.config.num_hidden_layers
    loss, grads = loss_and_grads(model, batch())
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(want_grads, grads, rtol=1e-4, atol=1e-7)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**batch(seed=3)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        trained = model(**batch(seed=4)).logits
    framework.revert()

    # the adapter reloads in plain transformers + PEFT (eager experts, no plugin) with the same logits
    base = load(directory, experts_implementation="eager")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch(seed=4)).logits, trained, rtol=1e-4, atol=1e-5)


def test_accelerate_only_script_prepare_patches_the_model(reference_kernels, saved_models):
    """The section given to a stock Accelerator (AccelerationKwargs): a script that only calls prepare gets its model
    patched there (check_prepared_model, prepare_contribution, after_prepare), and trains as with eager experts."""
    from accelerate import Accelerator

    from fms_acceleration_accelerate import AccelerationKwargs
    from fms_acceleration_accelerate.accelerate_integration import get_framework

    directory = saved_models("qwen3_moe")
    reference = load(directory, experts_implementation="eager")
    want_loss, want_grads = loss_and_grads(reference, batch())

    handler = AccelerationKwargs({"training": {"moe": {"scattermoe": {"ep_degree": 1}}}})
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    framework = get_framework(accelerator)
    model = load(directory)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    plugin = framework.plugin("scattermoe")
    assert model.config._experts_implementation == plugin.experts_key
    loss, grads = loss_and_grads(model, batch())
    torch.testing.assert_close(loss, want_loss)
    assert_grads_close(want_grads, grads)
    assert len(plugin.routing_stats) == model.config.num_hidden_layers
    framework.revert()


@pytest.mark.parametrize("model_type", ["mixtral"])
def test_full_fine_tune_with_the_fused_ops_plugin(model_type, triton_interpreter, saved_models, tmp_path):
    """The MoE plugin stacked with the fused-ops plugin's kernels (fused linear cross-entropy, RMSNorm, RoPE), as
    the GPU benchmark's full fine-tuning rows run them: first-step loss and gradients equal to eager experts + HF's
    modules, and the HF Trainer's run follows eager's loss step by step (float32)."""
    from fms_acceleration_accelerate.framework import AccelerationFramework

    body = {
        "training": {
            "moe": {"scattermoe": {"ep_degree": 1}},
            "fused_ops_and_kernels": {
                "fast_loss": "fused_linear",
                "fast_rms_layernorm": True,
                "fast_rope_embeddings": True,
            },
        }
    }
    directory = saved_models(model_type)
    want_loss, want_grads = loss_and_grads(load(directory, experts_implementation="eager"), batch())
    baseline = _train(load(directory, experts_implementation="eager"), tmp_path / "eager")

    framework = AccelerationFramework(body)
    assert {name for name, _ in framework.active_plugins} >= {"scattermoe", "fused_ops_and_kernels"}, (
        framework.active_plugins
    )
    with framework:
        model, _ = framework.augmentation(load(directory))
        plugins = {record.plugin for record in framework.patches.records}
        loss, grads = loss_and_grads(model, batch())
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close(want_grads, grads, rtol=1e-4, atol=1e-6)
        history = _train(model, tmp_path / "stack", framework.get_callbacks_and_ready_for_train(model))
    assert plugins >= {"scattermoe", "fused_ops_and_kernels"}, plugins  # both plugins patched the model
    assert len(history) == len(baseline) == 3 and history[-1]["loss"] < history[0]["loss"]
    for want, got in zip(baseline, history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
