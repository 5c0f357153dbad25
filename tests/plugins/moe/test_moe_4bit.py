"""4-bit expert weights (``quantize_experts`` with the bitsandbytes plugin) on tiny Mixtral and GraniteMoe models.

What is checked: bitsandbytes' own ``load_in_4bit`` leaves the 3-D expert stacks unquantized; with both plugins the
stacks are bitsandbytes 4-bit parameters with the model's ``Linear4bit`` settings and their bytes drop; the 4-bit
route gives the same loss and gradients as the same kernels on the dequantized weights (Triton in the interpreter
and the torch reference) and keeps no dequantized copy between the forward and the backward; activation
checkpointing; LoRA training lowers the loss and the saved adapter reloads (PEFT wrapping the already-4-bit stacks)
with identical logits; revert; bad combinations refused when the framework is created or before loading."""

from __future__ import annotations

import weakref

import pytest
import torch

from fms_acceleration_accelerate.errors import AccelerationConfigError

from .moe_helpers import batch

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
BNB = {"quant_type": "nf4"}


def _body(moe: dict | None = None, bnb: dict | None = BNB) -> dict:
    body: dict = {"training": {"moe": {"scattermoe": moe if moe is not None else {"ep_degree": 1}}}}
    if bnb is not None:
        body["peft"] = {"quantization": {"bitsandbytes": dict(bnb)}}
    return body


def _framework(moe: dict | None = None, bnb: dict | None = BNB):
    from fms_acceleration_accelerate import AccelerationFramework

    return AccelerationFramework(_body(moe, bnb))


def _lora(**overrides):
    from peft import LoraConfig

    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _randomise_b(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: make the adapters' effect visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _qlora(directory, **bnb):
    """(framework, PEFT model) loaded and augmented by the bitsandbytes + MoE plugins, LoRA on attention and experts."""
    framework = _framework(bnb={**BNB, **bnb})
    model = framework.model_loader(str(directory), dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(0)
    model, _ = framework.augmentation(model, None, (_lora(),))
    _randomise_b(model)
    return framework, model.train()


def _moe_plugin(framework):
    return next(p for p in framework.plugins if p.plugin_name() == "scattermoe")


def _stacks(model):
    from fms_acceleration_accelerate_moe.quantized_experts import is_4bit_stack

    return {n: p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")) and is_4bit_stack(p)}


def _loss_and_grads(model, data):
    loss = model(**data).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.fixture
def dequant_calls(monkeypatch):
    """Counts bitsandbytes dequantizations of expert stacks and keeps weak references to their buffers."""
    from fms_acceleration_accelerate_moe import quantized_experts

    original = quantized_experts.dequantize_stack
    buffers: list[weakref.ref] = []

    def counted(value):
        out = original(value)
        buffers.append(weakref.ref(out))
        return out

    monkeypatch.setattr(quantized_experts, "dequantize_stack", counted)
    return buffers


def test_bitsandbytes_alone_leaves_the_expert_stacks_unquantized(saved_models):
    from fms_acceleration_accelerate_moe.quantized_experts import is_4bit_stack

    framework = _framework(moe={"ep_degree": 1, "quantize_experts": False})
    model = framework.model_loader(str(saved_models("mixtral")), dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    assert type(experts.gate_up_proj) is torch.nn.Parameter and experts.gate_up_proj.dtype == torch.float32
    model, _ = framework.augmentation(model, None, (_lora(target_parameters=None),))
    assert not any(is_4bit_stack(p) for p in model.parameters())


@pytest.mark.parametrize("model_type", ["mixtral", "granitemoe"])
def test_expert_stacks_stored_in_4bit(model_type, saved_models):
    import bitsandbytes.functional as bnb_functional
    from fms_acceleration_accelerate_moe.quantized_experts import dequantize_stack, stack_shape

    directory = saved_models(model_type)
    dense = _framework(moe={"ep_degree": 1, "quantize_experts": False})
    dense_model = dense.model_loader(str(directory), dtype=torch.float32)
    dense_bytes = {
        n: p.numel() * p.element_size()
        for n, p in dense_model.named_parameters()
        if n.endswith(("_proj",)) and p.dim() == 3
    }
    _fw, model = _qlora(directory)
    stacks = _stacks(model)
    layers = model.config.num_hidden_layers
    assert len(stacks) == 2 * layers
    attention = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    for name, stack in stacks.items():
        state = stack.quant_state
        assert not stack.requires_grad and stack.dtype == torch.float32  # packed codes in the training dtype
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", attention.blocksize, attention.nested)
        short = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert stack_shape(stack) == dense_model.get_parameter(short).shape
        assert stack.numel() * stack.element_size() * 8 == dense_bytes[short]  # 4 bits instead of 32
        # the codes and scales are bitsandbytes' quantization of the checkpoint's weights with those settings
        weight = dense_model.get_parameter(short).detach()
        codes, reference = bnb_functional.quantize_4bit(
            weight,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type="nf4",
            quant_storage=weight.dtype,
        )
        assert torch.equal(stack.data.view(torch.uint8), codes.view(torch.uint8))  # the bytes (NaN patterns too)
        assert torch.equal(dequantize_stack(stack), bnb_functional.dequantize_4bit(codes, reference))
        assert not torch.equal(dequantize_stack(stack), weight)


@pytest.mark.parametrize("model_type", ["mixtral", "granitemoe"])
def test_4bit_route_equals_dense_route_on_dequantized_weights(model_type, kernel_path, saved_models, dequant_calls):
    """Same loss and gradients as the same plugin computing on 16/32-bit stacks holding the dequantized weights;
    no dequantized buffer survives the forward; the backward dequantizes again."""
    from fms_acceleration_accelerate_moe.quantized_experts import dequantize_stack

    framework, model = _qlora(saved_models(model_type))
    data = batch()
    loss = model(**data).loss
    layers = model.config.num_hidden_layers
    assert len(dequant_calls) == 2 * layers
    assert all(ref() is None for ref in dequant_calls), "a dequantized expert stack is kept for the backward"
    loss.backward()
    assert len(dequant_calls) == 4 * layers  # once per stack in the forward, once in the backward
    assert all(ref() is None for ref in dequant_calls), "a dequantized expert stack outlived the backward"
    want_loss = loss.detach()
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert any("experts" in n and "lora_A" in n for n in got) and any("q_proj" in n for n in got)
    assert _moe_plugin(framework).expert_adapters.factored_calls == layers

    for name, stack in _stacks(model).items():  # the same model on the dequantized weights in the stack's dtype
        owner, _, leaf = name.rpartition(".")
        dense = torch.nn.Parameter(dequantize_stack(stack), requires_grad=False)
        setattr(model.get_submodule(owner), leaf, dense)
    assert not _stacks(model)
    dense_loss, dense_grads = _loss_and_grads(model, data)
    torch.testing.assert_close(want_loss, dense_loss, rtol=0, atol=0)
    assert dense_grads.keys() == got.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_activation_checkpointing_same_gradients(saved_models, dequant_calls):
    _fw, model = _qlora(saved_models("mixtral"))
    data = batch()
    want_loss, want = _loss_and_grads(model, data)
    for reentrant in (False, True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
        loss, grads = _loss_and_grads(model, data)
        model.gradient_checkpointing_disable()
        torch.testing.assert_close(loss, want_loss)
        assert grads.keys() == want.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_lora_trains_and_adapter_reloads_with_identical_logits(saved_models, tmp_path):
    from peft import PeftModel

    directory = saved_models("granitemoe")
    _fw, model = _qlora(directory)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not any(p.requires_grad for p in _stacks(model).values())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    data = batch()
    losses = []
    for _ in range(6):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # logits in train mode (no dropout in the tiny models): bitsandbytes' CPU inference path repacks Linear4bit
    # weights of eval-mode layers, which is not what is checked here
    with torch.no_grad():
        want = model(input_ids=data["input_ids"]).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = set(__import__("safetensors.torch").torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved) and any("experts" in k for k in saved)

    # a fresh run: the plugins load and quantize, then PEFT wraps the 4-bit stacks (no adapters from the plugin)
    fresh = _framework(bnb={**BNB, "no_peft_model": True})
    base = fresh.model_loader(str(directory), dtype=torch.float32, attn_implementation="eager")
    base, _ = fresh.augmentation(base, None, (None,))
    assert _stacks(base)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    with torch.no_grad():
        got = reloaded(input_ids=data["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _moe_plugin(fresh).expert_adapters.factored_calls > 0


def test_revert_puts_back_dequantized_stacks(saved_models):
    from fms_acceleration_accelerate_moe.quantized_experts import dequantize_stack

    framework = _framework()
    model = framework.model_loader(str(saved_models("mixtral")), dtype=torch.float32)
    model, _ = framework.augmentation(model, None, (_lora(target_parameters=None),))
    experts = model.base_model.model.model.layers[0].mlp.experts
    values = dequantize_stack(experts.gate_up_proj)
    framework.revert()
    assert type(experts.gate_up_proj) is torch.nn.Parameter and experts.gate_up_proj.dtype == torch.float32
    assert torch.equal(experts.gate_up_proj, values)


def test_4bit_stack_set_to_train_is_refused(saved_models):
    _fw, model = _qlora(saved_models("mixtral"))
    next(iter(_stacks(model).values())).requires_grad_(True)
    with pytest.raises(RuntimeError, match="4-bit expert weights are frozen"):
        model(**batch())


def test_quantize_experts_true_needs_the_bitsandbytes_plugin():
    with pytest.raises(AccelerationConfigError, match=r"peft\.quantization\.bitsandbytes is not active") as info:
        _framework(moe={"quantize_experts": True}, bnb=None)
    assert "quantize_experts" in str(info.value)


def test_quantize_experts_default_without_bitsandbytes_keeps_the_experts():
    framework = _framework(bnb=None)
    assert not _moe_plugin(framework).quantizes_experts


def test_4bit_experts_with_expert_parallelism_refused_or_declined(caplog):
    with pytest.raises(AccelerationConfigError, match="not supported with expert parallelism") as info:
        _framework(moe={"ep_degree": 2, "quantize_experts": True})
    assert "quantize_experts" in str(info.value)
    with caplog.at_level("INFO", logger="fms_acceleration_accelerate_moe"):
        assert not _moe_plugin(_framework(moe={"ep_degree": 2})).quantizes_experts  # auto: the experts stay 16-bit
    assert "keeps the experts in the training dtype (expert parallelism" in caplog.text


@pytest.mark.parametrize(
    "run",
    [
        {"distributed_type": "FSDP", "fsdp_version": 2, "world_size": 2},
        {"distributed_type": "DEEPSPEED", "zero_stage": 3, "world_size": 2},
    ],
)
def test_4bit_experts_under_fsdp_and_zero3_refused_or_declined(run):
    from fms_acceleration_accelerate.distributed import RunContext

    context = RunContext(**run)
    plugin = _moe_plugin(_framework(moe={"ep_degree": 1, "quantize_experts": True}))
    with pytest.raises(AccelerationConfigError, match=r"not supported with (FSDP|DeepSpeed ZeRO-3)"):
        plugin.check_run_settings(context)
    auto = _moe_plugin(_framework())
    assert auto.quantizes_experts
    auto.check_run_settings(context)
    assert not auto.quantizes_experts


def test_4bit_experts_declined_at_patch_time_under_fsdp(saved_models):
    """A run whose settings reach the plugin only with the model (its run context when it patches): auto keeps the
    experts 16-bit there too."""
    from fms_acceleration_accelerate.distributed import RunContext

    framework = _framework()
    model = framework.model_loader(str(saved_models("mixtral")), dtype=torch.float32)
    plugin = _moe_plugin(framework)
    plugin.patch_model(model, RunContext(distributed_type="FSDP", fsdp_version=2, world_size=2))
    assert not _stacks(model) and not plugin.quantizes_experts


def test_4bit_stacks_refused_at_prepare_under_fsdp(saved_models):
    """Stacks quantized before the run's settings were known (augmentation on one process's view), then an FSDP
    prepare: refused with the fix named."""
    from fms_acceleration_accelerate.distributed import RunContext

    framework = _framework()
    model = framework.model_loader(str(saved_models("mixtral")), dtype=torch.float32)
    model, _ = framework.augmentation(model, None, (_lora(target_parameters=None),))
    assert _stacks(model)
    with pytest.raises(AccelerationConfigError, match="expert stacks are 4-bit") as info:
        _moe_plugin(framework).check_prepared_model(model, RunContext(distributed_type="FSDP", fsdp_version=2))
    assert "quantize_experts: false" in str(info.value)


def test_trl_sft_trainer_peft_config_on_4bit_experts(saved_models, tmp_path):
    """The framework API with TRL's SFTTrainer: the plugins load and quantize (``no_peft_model``), the trainer wraps
    the 4-bit stacks with its ``peft_config`` (attention and experts) and trains; the expert adapters move, the
    stacks stay 4-bit and untouched, the adapters were computed from their factors."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.plugins.aadp.padding_free_helpers import tiny_tokenizer
    from tests.plugins.odm.test_odm_trainer import cpu_trainer_kwargs

    framework = _framework(bnb={**BNB, "no_peft_model": True})
    model = framework.model_loader(str(saved_models("mixtral")), dtype=torch.float32, attn_implementation="eager")
    model, (peft_config,) = framework.augmentation(model, None, (_lora(),))
    codes = {n: p.data.clone() for n, p in _stacks(model).items()}
    assert codes and peft_config is not None  # the trainer adds the adapters
    g = torch.Generator().manual_seed(0)
    ramp = torch.arange(3, 15)
    rows = [((ramp + torch.randint(0, 20, (1,), generator=g)) % 60 + 3).tolist() for _ in range(24)]
    args = SFTConfig(
        **cpu_trainer_kwargs(tmp_path / "out", max_steps=6, learning_rate=1e-2, lr_scheduler_type="constant",
                             logging_steps=2, max_length=None, dataset_kwargs={"skip_prepare_dataset": True},
                             disable_tqdm=True, seed=0)
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": r, "labels": r} for r in rows]),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
    )
    for callback in framework.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
        trainer.add_callback(callback)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "experts" in n and "lora_A" in n}
    assert before
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in before.items())
    stacks = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in _stacks(trainer.model).items()
    }
    assert stacks.keys() == {n.replace(".base_layer", "") for n in codes}
    for name, data in codes.items():
        assert torch.equal(stacks[name.replace(".base_layer", "")].data.view(torch.uint8), data.view(torch.uint8))
    assert _moe_plugin(framework).expert_adapters.factored_calls > 0


def test_accelerate_prepare_quantizes_a_peft_wrapped_model(saved_models):
    """The sections given to a stock Accelerator (AccelerationKwargs): from_pretrained loads through the bitsandbytes
    plugin, the script wraps the model with PEFT (LoRA on the 16-bit stacks), and Accelerator.prepare quantizes the
    stacks under PEFT's wrappers; training steps compute the adapters from their factors on the 4-bit stacks."""
    from accelerate import Accelerator
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fms_acceleration_accelerate import AccelerationKwargs
    from fms_acceleration_accelerate.accelerate_integration import get_framework

    accelerator = Accelerator(cpu=True, kwargs_handlers=[AccelerationKwargs(_body(bnb={**BNB, "no_peft_model": True}))])
    framework = get_framework(accelerator)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(saved_models("granitemoe")), dtype=torch.float32, attn_implementation="eager"
        )
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
        torch.manual_seed(0)
        model = get_peft_model(model, _lora())
        assert not _stacks(model)  # PEFT wrapped the 16-bit stacks
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        assert len(_stacks(model)) == 2 * model.config.num_hidden_layers
        model.train()  # the loader hands the model over in eval mode
        losses = []
        for _ in range(4):
            loss = model(**batch()).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        assert _moe_plugin(framework).expert_adapters.factored_calls == 4 * model.config.num_hidden_layers
    finally:
        framework.revert()
