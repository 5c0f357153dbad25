"""GPTQ-LoRA end to end on CPU: the framework API path (``AccelerationFramework`` with a plugins dict ->
``model_loader`` -> ``augmentation``), LoRA training in bfloat16 and float16, adapters in PEFT format loaded back
onto a fresh GPTQ base, merging refused, ``from_pretrained`` routed to the plugin, and no bitsandbytes needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fms_acceleration_accelerate_peft.gptq.layer import GPTQLinear
from fms_acceleration_accelerate_peft.gptq.plugin import AutoGPTQAccelerationPlugin

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework

from .gptq_helpers import GPTQCase, learnable_batches, make_gptq_checkpoint, tiny_llama, token_batch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UPSTREAM = {"kernel": "triton_v2", "from_quantized": True, "use_external_lib": False}  # upstream's sample values


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path, _ = make_gptq_checkpoint(tmp_path_factory.mktemp("gptq") / "ckpt", GPTQCase(desc_act=True, sharded=True))
    return path


@pytest.fixture
def reference_kernels(monkeypatch):
    """The kernels' pure-torch references instead of the Triton interpreter, for the tests that train for many
    steps (the interpreter runs each dequant kernel in Python; the Triton kernels are checked against the references
    in tests/kernels and run here in the loading tests and the short runs below)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def lora_config(targets=ALL_LINEAR, r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")


def framework(**options) -> AccelerationFramework:
    return AccelerationFramework({"plugins": {"peft": {"quantization": {"auto_gptq": {**UPSTREAM, **options}}}}})


def load_and_augment(path: Path, dtype: torch.dtype, *, seed: int = 0, **options):
    fw = framework(**options)
    assert fw.requires_custom_loading and fw.requires_augmentation
    model = fw.model_loader(str(path), torch_dtype=dtype)
    torch.manual_seed(seed)
    model, args = fw.augmentation(model, None, (lora_config(),))
    assert args == (None,)  # a trainer must not add the adapters again
    return fw, model


def train(model, steps: int = 24, lr: float = 1e-2, scaler=None) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids in learnable_batches(steps):
        loss = model(input_ids=ids, labels=ids).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_learns(losses: list[float]) -> None:
    assert all(torch.isfinite(torch.tensor(losses))), losses
    tail = sum(losses[-5:]) / 5
    assert tail < losses[0] - 0.3, losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lora_trains_in_half_precision(ckpt, dtype, reference_kernels):
    _, model = load_and_augment(ckpt, dtype)
    base = model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, GPTQLinear)  # PEFT's ordinary LoRA Linear around the GPTQ layer
    assert type(q).__module__.startswith("peft.tuners.lora")
    lora_a = q.lora_A["default"].weight
    assert lora_a.dtype == torch.float32 and lora_a.device == q.base_layer.qweight.device  # fp32_lora_params
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert base.model.embed_tokens.weight.dtype == dtype and not base.model.embed_tokens.weight.requires_grad
    before = q.base_layer.qweight.clone()
    assert_learns(train(model))
    assert torch.equal(q.base_layer.qweight, before)  # the packed base is untouched
    assert q.lora_B["default"].weight.abs().sum() > 0


def test_fp16_with_a_grad_scaler(ckpt, reference_kernels):
    """float16 as HF Trainer's fp16 runs it: float32 adapters (the master weights) and a grad scaler."""
    _, model = load_and_augment(ckpt, torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert_learns(train(model, scaler=scaler))
    assert scaler.get_scale() > 0


def test_adapters_in_the_training_dtype(ckpt, reference_kernels):
    """fp32_lora_params: false keeps the adapters in the training dtype (bfloat16 here)."""
    _, model = load_and_augment(ckpt, torch.bfloat16, fp32_lora_params=False)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.dtype == torch.bfloat16
    assert_learns(train(model))


def test_gradient_checkpointing_backward_reaches_the_adapters(ckpt):
    fw = framework()
    model = fw.model_loader(str(ckpt), torch_dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})

    class Args:
        gradient_checkpointing = True

    model, _ = fw.augmentation(model, Args(), (lora_config(),))
    model.train()
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's are 0 while B == 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_round_trip_onto_a_fresh_gptq_base(ckpt, tmp_path):
    from peft import PeftModel

    _, model = load_and_augment(ckpt, torch.bfloat16)
    train(model, steps=2)
    model.eval()
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    fresh = framework(no_peft_model=True).model_loader(str(ckpt), torch_dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        actual = loaded(ids).logits
    assert torch.equal(actual, expected)
    with torch.no_grad(), loaded.disable_adapter():  # and the adapters matter: the bare base gives other logits
        assert not torch.allclose(loaded(ids).logits, expected)


def test_merging_into_the_packed_base_is_refused(ckpt):
    _, model = load_and_augment(ckpt, torch.bfloat16)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    before = q.base_layer.qweight.clone()
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="Cannot merge LORA layers when the model is gptq quantized"):
            merge()
    with pytest.raises(AttributeError):  # a direct layer merge fails on the missing dense weight, changing nothing
        q.merge()
    assert not q.merged and torch.equal(q.base_layer.qweight, before)
    model.unload()  # removing the adapters without merging works


def test_no_peft_model_loads_only_and_prepare_check(ckpt):
    fw = framework(no_peft_model=True)
    assert fw.requires_custom_loading and not fw.requires_augmentation
    model = fw.model_loader(str(ckpt))
    plugin = fw.plugins[0]
    assert isinstance(plugin, AutoGPTQAccelerationPlugin)
    plugin.check_prepared_model(model, plugin.run_context)  # GPTQ layers present: accepted
    with pytest.raises(AccelerationConfigError, match="the model has no GPTQ layers") as info:
        plugin.check_prepared_model(tiny_llama(), plugin.run_context)
    assert "load the GPTQ checkpoint through the plugin" in info.value.fix
    with pytest.raises(AccelerationConfigError, match="augmentation got a model without GPTQ layers"):
        framework().plugins[0].augmentation(tiny_llama(), None, (lora_config(),))


def test_fp32_norm_compute_and_describe(ckpt):
    fw = framework(fp32_norm_compute=True)
    lines = "\n".join(fw.describe())
    assert "read natively: no auto-gptq / gptqmodel" in lines and "norms computed in float32" in lines
    assert "'gptq' dequant backend" in lines
    model = fw.model_loader(str(ckpt), torch_dtype=torch.bfloat16)
    model, _ = fw.augmentation(model, None, (lora_config(),))
    norms = [r for r in fw.patches.records if r.replacement == "fp32 norm compute"]
    assert len(norms) == 2 * 2 + 1  # two per decoder layer and the final norm
    ids = token_batch()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    fw.revert()


def test_upstream_sample_configuration_activates_the_plugin(tmp_path):
    """The shape of upstream's accelerated-peft-autogptq-foak sample: both sections activate, none is passed
    through, and the GPTQ backend feeds the fused kernels."""
    sample = tmp_path / "accelerated-peft-autogptq-foak-sample-configuration.yaml"
    sample.write_text(
        textwrap.dedent(
            """\
            plugins:
              peft:
                quantization:
                  auto_gptq:
                    kernel: triton_v2
                    from_quantized: true
                    use_external_lib: false
                  fused_ops_and_kernels:
                    base_layer: auto_gptq
                    fused_lora: true
                    fast_loss: true
                    fast_rsm_layernorm: true
                    fast_rope_embeddings: true
            """
        ),
        encoding="utf-8",
    )
    fw = AccelerationFramework(str(sample))
    assert [name for name, _ in fw.active_plugins] == ["auto_gptq", "fused_ops_and_kernels"]
    assert fw.passthrough == ()
    assert fw.dequant_registry.names[0] == "gptq"
    assert fw.dequant_registry.for_base_layer("auto_gptq")[0].name == "gptq"


def test_from_pretrained_is_routed_to_the_plugin(ckpt):
    """Under an acceleration config (here an ``AccelerationKwargs``), a script's own ``from_pretrained`` of the
    GPTQ checkpoint loads through the plugin."""
    from transformers import AutoModelForCausalLM

    from fms_acceleration_accelerate import accelerate_integration as ai

    was = ai.is_installed()
    ai.uninstall()
    try:
        handler = ai.AccelerationKwargs(config={"peft": {"quantization": {"auto_gptq": {}}}})  # held while loading
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16)
        layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
        assert len(layers) == 2 * 7 and layers[0].compute_dtype == torch.bfloat16
        assert handler is not None
    finally:
        ai.uninstall()
        if was:
            ai.install()


def test_gptq_needs_no_bitsandbytes(ckpt, tmp_path):
    """With bitsandbytes unimportable, the framework activates the GPTQ plugin, loads, adds LoRA and trains (the
    bitsandbytes plugin's entry point still loads; it is only refused when its own section is configured)."""
    script = tmp_path / "no_bnb.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import sys
            sys.modules["bitsandbytes"] = None  # import bitsandbytes -> ImportError
            import torch
            from peft import LoraConfig
            from fms_acceleration_accelerate import AccelerationFramework
            fw = AccelerationFramework({{"peft": {{"quantization": {{"auto_gptq": {{}}}}}}}})
            model = fw.model_loader({str(ckpt)!r}, torch_dtype=torch.bfloat16)
            model, _ = fw.augmentation(model, None, (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),))
            ids = torch.randint(0, 96, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            assert sys.modules["bitsandbytes"] is None
            print("OK", [name for name, _ in fw.active_plugins])
            """
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ['auto_gptq']" in result.stdout


def test_trl_sft_trainer_given_the_checkpoint_path(ckpt, tmp_path):
    """TRL's SFTTrainer given the GPTQ checkpoint as a path and a LoraConfig, with the section in an
    AccelerationKwargs: the trainer's own from_pretrained loads through the plugin, TRL adds the adapters, and the
    adapters train over the packed base."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from fms_acceleration_accelerate import accelerate_integration as ai

    vocab = {f"t{i}": i for i in range(96)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )
    data = Dataset.from_dict({"input_ids": [ids[0].tolist() for ids in learnable_batches(12, batch=1)]})
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataset_kwargs={"skip_prepare_dataset": True},
        model_init_kwargs={"dtype": "bfloat16"},
    )
    was = ai.is_installed()
    ai.uninstall()
    try:
        handler = ai.AccelerationKwargs(config={"peft": {"quantization": {"auto_gptq": {"no_peft_model": True}}}})
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        trainer = SFTTrainer(
            model=str(ckpt), args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
        )
        q = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
        assert isinstance(q.base_layer, GPTQLinear) and q.base_layer.compute_dtype == torch.bfloat16
        trainer.train()
        assert handler is not None
    finally:
        ai.uninstall()
        if was:
            ai.install()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert q.lora_B["default"].weight.abs().sum() > 0
