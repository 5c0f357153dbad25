"""fms-hf-tuning, the original framework's real client, driving this project through ``fms_acceleration``.

The acceleration flow of fms-hf-tuning is replayed (:mod:`.fms_hf_tuning_replay`): its flag dataclasses become a
``plugins:`` YAML in a temporary file, ``fms_acceleration.AccelerationFramework`` reads it, the model comes from
``model_loader`` (called with fms-hf-tuning's arguments), ``augmentation`` gets the peft ``LoraConfig``, TRL's
``SFTTrainer`` trains with the callbacks of ``get_callbacks_and_ready_for_train`` and of fms-hf-tuning's own
``get_additional_accel_framework_callbacks``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .fms_hf_tuning_replay import (
    AccelerationFrameworkConfig,
    AutoGPTQLoraConfig,
    BNBQLoraConfig,
    FastKernelsConfig,
    FastMoe,
    FusedLoraConfig,
    MultiPack,
    PaddingFree,
    additional_accel_framework_callbacks,
    get_data_collator,
    moe_checkpoint_conversion_available,
)
from .tiny_models import WORD_TOKENIZER_IDS, tiny_llama, tiny_mixtral

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fms_acceleration") is None,
    reason="installed without fms_acceleration_accelerate_upstream_names.pth",
)

WORDS = "the a lora shard kernel token layer norm fast slow big small fused packed quant block".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def _load_as_fms_hf_tuning(loader, path: Path):
    """``loader(path)`` with the keyword arguments fms-hf-tuning passes when it loads the model."""
    import torch

    return loader(str(path), use_cache=False, cache_dir=None, torch_dtype=torch.float32, attn_implementation=None)


def _pretokenized_sft_config(tmp_path: Path):
    """The SFTConfig of the short runs over a pretokenized dataset (4 steps of 4 examples, CPU)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_length=32,
        packing=False,
        seed=5,
    )


@pytest.mark.slow
def test_qlora_flag_set_trains_through_fms_acceleration(tmp_path, request):
    """``--bitsandbytes nf4 False --fused_lora bitsandbytes True --fast_kernels True True True`` (fms-hf-tuning's
    documented QLoRA flag set, which writes both fused-ops sections)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from fms_acceleration import AccelerationFramework
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    acceleration = AccelerationFrameworkConfig(
        bitsandbytes=BNBQLoraConfig(quant_type="nf4", no_peft_model=False),
        fused_lora=FusedLoraConfig(base_layer="bitsandbytes", fused_lora=True),
        fast_kernels=FastKernelsConfig(fast_loss=True, fast_rms_layernorm=True, fast_rope_embeddings=True),
    )
    tree = acceleration.to_dict()
    assert tree["peft"]["quantization"]["fused_ops_and_kernels"] == {"base_layer": "bitsandbytes", "fused_lora": True}
    assert tree["training"]["fused_ops_and_kernels"] == {
        "fast_loss": True,
        "fast_rms_layernorm": True,
        "fast_rope_embeddings": True,
    }

    framework = acceleration.get_framework()
    assert isinstance(framework, AccelerationFramework)
    # fms-hf-tuning never reverts (its process ends); here later tests share the process and its
    # module-level patches (rotary embedding)
    request.addfinalizer(framework.revert)
    names = [name for name, _plugin in framework.active_plugins]
    assert names == ["bitsandbytes", "fused_ops_and_kernels"]
    assert framework.requires_custom_loading and framework.plugins_require_custom_loading == ["bitsandbytes"]
    assert framework.requires_augmentation and framework.requires_agumentation
    kernels = framework.plugin("fused_ops_and_kernels")
    options = kernels.config
    assert (options.base_layer, options.fused_lora, options.loss_mode) == ("bitsandbytes", True, "cross_entropy")
    assert options.fast_rms_layernorm and options.fast_rope_embeddings

    tokenizer = _tokenizer()
    path = tiny_llama(tmp_path / "model", len(tokenizer), **WORD_TOKENIZER_IDS)
    model_loader = framework.model_loader if framework.requires_custom_loading else AutoModelForCausalLM.from_pretrained
    model = _load_as_fms_hf_tuning(model_loader, path)
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 2 * 7

    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(32)]
    train_args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_length=16,
        dataset_text_field="text",
        packing=False,
    )
    peft_config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    if framework is not None and framework.requires_augmentation:
        model, (peft_config,) = framework.augmentation(model, train_args, modifiable_args=(peft_config,))
    assert peft_config is None  # the plugin added the adapters; the trainer must not add them again
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": texts}),
        args=train_args,
        callbacks=[],
        peft_config=peft_config,
    )
    for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(callback)
    assert additional_accel_framework_callbacks(active_plugins=framework.active_plugins, trainer=trainer) == []
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.1, losses
    for option in ("fused_lora", "fast_rms_layernorm", "fast_rope_embeddings", "fast_loss"):
        assert kernels.patch_counts.get(option, 0) > 0, (option, kernels.patch_counts)


def test_no_acceleration_flag_means_no_framework_unless_the_environment_names_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATION_FRAMEWORK_CONFIG_FILE", raising=False)
    assert AccelerationFrameworkConfig().get_framework() is None  # fms-hf-tuning's catch of the empty config
    env_file = tmp_path / "accel.yaml"
    env_file.write_text(
        yaml.safe_dump({"plugins": {"training": {"fused_ops_and_kernels": {"fast_rms_layernorm": True}}}}),
        encoding="utf-8",
    )
    monkeypatch.setenv("ACCELERATION_FRAMEWORK_CONFIG_FILE", str(env_file))
    framework = AccelerationFrameworkConfig().get_framework()
    assert [name for name, _ in framework.active_plugins] == ["fused_ops_and_kernels"]


def test_gptq_flag_activates_the_gptq_plugin():
    framework = AccelerationFrameworkConfig(auto_gptq=AutoGPTQLoraConfig()).get_framework()
    assert [name for name, _ in framework.active_plugins] == ["auto_gptq"]
    assert framework.requires_custom_loading


def test_padding_free_flag_activates_the_padding_free_plugin():
    framework = AccelerationFrameworkConfig(padding_free=PaddingFree()).get_framework()
    assert [name for name, _ in framework.active_plugins] == ["padding_free"]
    assert framework.plugin("padding_free").config.method == "huggingface"


def _padding_free_multipack_run(tmp_path: Path, request, collator_of) -> tuple[object, object, list]:
    """fms-hf-tuning's flow for ``--padding_free huggingface --multipack 16`` (full fine-tuning of a tiny Llama on a
    pretokenized dataset with TRL's SFTTrainer, as its sft_trainer.py drives it): the framework from the flags, the
    model from ``from_pretrained`` (no plugin loads it), ``augmentation``, the trainer, the callbacks of
    ``get_callbacks_and_ready_for_train`` with the trainer's Accelerator, 4 steps. Returns the framework, the trainer
    and the ``(input_ids shape, attention_mask given)`` of every batch the model saw."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    acceleration = AccelerationFrameworkConfig(padding_free=PaddingFree(method="huggingface"), multipack=MultiPack(16))
    assert acceleration.to_dict() == {
        "training": {
            "attention": {"padding_free": {"method": "huggingface"}},
            "dataloader": {"multipack": {"num_processes": 16}},
        }
    }
    framework = acceleration.get_framework()
    request.addfinalizer(framework.revert)  # fms-hf-tuning's process ends instead; here later tests share it
    assert [name for name, _plugin in framework.active_plugins] == ["padding_free", "multipack"]
    assert not framework.requires_custom_loading and framework.requires_augmentation

    tokenizer = _tokenizer()
    path = tiny_llama(tmp_path / "model", len(tokenizer), **WORD_TOKENIZER_IDS)
    model = _load_as_fms_hf_tuning(AutoModelForCausalLM.from_pretrained, path)
    lengths = [4 + (7 * i) % 11 for i in range(32)]  # 4 .. 14 tokens
    ids = [[3 + (i + j) % len(WORDS) for j in range(n)] + [2] for i, n in enumerate(lengths)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})  # a pretokenized dataset
    train_args = _pretokenized_sft_config(tmp_path)
    model, (peft_config,) = framework.augmentation(model, train_args, modifiable_args=(None,))
    assert peft_config is None
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=data,
        args=train_args,
        data_collator=collator_of(tokenizer, 32),
        peft_config=peft_config,
    )
    for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(callback)
    assert additional_accel_framework_callbacks(active_plugins=framework.active_plugins, trainer=trainer) == []
    seen: list[tuple[tuple[int, ...], bool]] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append((tuple(kwargs["input_ids"].shape), "attention_mask" in kwargs)),
        with_kwargs=True,
    )
    trainer.train()
    return framework, trainer, seen


@pytest.mark.slow
def test_padding_free_and_multipack_flags_train_through_fms_acceleration(tmp_path, request):
    """``--padding_free huggingface --multipack 16`` activate both plugins; the trainer's training batches are
    multipack's token-budget batches, flattened into one row of real tokens, and training runs. The batches come
    from the padding ``DataCollatorForSeq2Seq`` (fms-hf-tuning's for pretokenized data without ``--padding_free``)."""
    pytest.importorskip("trl")
    import torch
    from fms_acceleration_accelerate_aadp.multipack_plugin import find_multipack_sampler

    def padding_collator(tokenizer, max_seq_length):
        return get_data_collator(tokenizer, max_seq_length, is_padding_free=False)

    framework, trainer, seen = _padding_free_multipack_run(tmp_path, request, padding_collator)
    sampler = find_multipack_sampler(trainer.get_train_dataloader())
    assert sampler is not None and framework.plugin("multipack").seed == 5  # the training arguments' seed
    assert len(seen) == 4 and all(rows == 1 and not has_mask for (rows, _), has_mask in seen), seen
    assert all(tokens <= sampler.max_tokens for (_, tokens), _ in seen), (seen, sampler.max_tokens)
    assert len({tokens for (_, tokens), _ in seen}) > 1  # token-budget batches, not a fixed shape
    model = trainer.model
    assert str(model.config._attn_implementation).startswith("fms_padding_free")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_padding_free_flags_with_fms_hf_tunings_non_padding_collator(tmp_path, request):
    """With --padding_free, fms-hf-tuning hands the trainer a DataCollatorForSeq2Seq with padding=False, which cannot
    stack examples of different lengths; the plugin calls it padding to the longest example and flattens that."""
    pytest.importorskip("trl")

    def fms_hf_tuning_collator(tokenizer, max_seq_length):
        return get_data_collator(tokenizer, max_seq_length, is_padding_free=True)

    _framework, _trainer, seen = _padding_free_multipack_run(tmp_path, request, fms_hf_tuning_collator)
    assert len(seen) == 4 and all(rows == 1 and not has_mask for (rows, _), has_mask in seen), seen


def test_fast_moe_flag_activates_the_scattermoe_plugin():
    """``--fast_moe 1`` and the flag form ``--fast_moe True`` write ``training.moe.scattermoe``; the plugin behind
    it is the class fms-hf-tuning imports as ``fms_acceleration_moe.ScatterMoEAccelerationPlugin``."""
    from fms_acceleration_moe import ScatterMoEAccelerationPlugin

    for flag, section, disabled in (
        (FastMoe(ep_degree=1), {"ep_degree": 1, "disable_distributed": False}, False),
        (FastMoe(ep_degree=True), {"ep_degree": 1, "disable_distributed": True}, True),
    ):
        acceleration = AccelerationFrameworkConfig(fast_moe=flag)
        assert acceleration.to_dict() == {"training": {"moe": {"scattermoe": section}}}
        framework = acceleration.get_framework()
        assert [name for name, _ in framework.active_plugins] == ["scattermoe"]
        plugin = framework.plugin("scattermoe")
        assert isinstance(plugin, ScatterMoEAccelerationPlugin)
        assert (plugin.config.ep_degree, plugin.config.disable_distributed) == (1, disabled)
        assert not framework.requires_custom_loading and framework.requires_augmentation
        # fms-hf-tuning's checkpoint-conversion callback is not made: its conversion function is not provided
        assert not moe_checkpoint_conversion_available()
        assert additional_accel_framework_callbacks(active_plugins=framework.active_plugins) == []


@pytest.mark.slow
def test_fast_moe_flag_trains_a_tiny_mixtral_through_fms_acceleration(tmp_path, request):
    """fms-hf-tuning's flow for ``--fast_moe 1`` (full fine-tuning of a tiny Mixtral on a pretokenized dataset with
    TRL's SFTTrainer): the framework from the flag, the model from ``from_pretrained``, ``augmentation`` switches
    the experts to the plugin's forward, the callbacks of ``get_callbacks_and_ready_for_train``, 4 steps that lower
    the loss with the routing load balance in the log; ``trainer.save_model`` (fms-hf-tuning's save) writes the
    model's own safetensors, which plain transformers loads."""
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    framework = AccelerationFrameworkConfig(fast_moe=FastMoe(ep_degree=1)).get_framework()
    request.addfinalizer(framework.revert)  # fms-hf-tuning's process ends instead; here later tests share it
    assert [name for name, _plugin in framework.active_plugins] == ["scattermoe"]

    tokenizer = _tokenizer()
    path = tiny_mixtral(tmp_path / "model", len(tokenizer), **WORD_TOKENIZER_IDS)
    model = _load_as_fms_hf_tuning(AutoModelForCausalLM.from_pretrained, path)
    ids = [[3 + (i + j) % len(WORDS) for j in range(10)] + [2] for i in range(32)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})  # a pretokenized dataset
    train_args = _pretokenized_sft_config(tmp_path)
    model, (peft_config,) = framework.augmentation(model, train_args, modifiable_args=(None,))
    assert peft_config is None
    plugin = framework.plugin("scattermoe")
    assert model.config._experts_implementation == plugin.experts_key
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=data,
        args=train_args,
        data_collator=get_data_collator(tokenizer, 32, is_padding_free=False),
        peft_config=peft_config,
    )
    for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(callback)
    assert additional_accel_framework_callbacks(active_plugins=framework.active_plugins, trainer=trainer) == []
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logs]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert all(entry["moe/load_max_over_mean"] >= 1.0 for entry in logs), logs  # the plugin's forward counted
    assert len(plugin.routing_stats) == model.config.num_hidden_layers

    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    reloaded = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    assert reloaded.config._experts_implementation != plugin.experts_key  # not serialised
    trained = {name: p.detach() for name, p in model.named_parameters()}
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0, msg=name)


def test_upstream_liger_sample_configuration_is_accepted(tmp_path, caplog):
    """The shape of upstream's ``accelerated-peft-bnb-nf4-foak-liger`` sample (with its spellings)."""
    pytest.importorskip("bitsandbytes")
    from fms_acceleration import AccelerationFramework

    sample = tmp_path / "accelerated-peft-bnb-nf4-foak-liger-sample-configuration.yaml"
    sample.write_text(
        "plugins:\n"
        "  peft:\n"
        "    quantization:\n"
        "      bitsandbytes:\n"
        "        quant_type: nf4\n"
        "        no_peft_model: false\n"
        "      fused_ops_and_kernels:\n"
        "        base_layer: bitsandbytes\n"
        "        fused_lora: true\n"
        "        fast_loss: fused_ce_liger\n"
        "        fast_rsm_layernorm: true\n"
        "        fast_rope_embeddings: true\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.INFO, logger="fms_acceleration_accelerate_foak"):
        framework = AccelerationFramework(str(sample))
    options = framework.plugin("fused_ops_and_kernels").config
    assert options.loss_mode == "fused_linear" and options.fast_rms_layernorm and options.fused_lora
    notes = [r.getMessage() for r in caplog.records if r.name == "fms_acceleration_accelerate_foak"]
    assert len(notes) == 2 and all("\n" not in n for n in notes), notes
    assert any("fused_ce_liger" in n and "fused_linear" in n for n in notes)
    assert any("fast_rsm_layernorm" in n for n in notes)


def _copy_project(source: Path, target: Path, names: tuple[str, ...] | None = None) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    target.mkdir(parents=True)
    for name in names or tuple(p.name for p in source.iterdir()):
        item = source / name
        if item.is_dir():
            shutil.copytree(item, target / name, ignore=ignore)
        elif item.is_file():
            shutil.copy2(item, target / name)
    return target


def _run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


@pytest.mark.slow
def test_installed_wheels_stand_in_only_until_the_original_is_installed(tmp_path):
    """Real wheels in a fresh virtual environment: the names appear with the packages behind them, and an
    original ``fms-acceleration`` installed into the same site-packages takes ``fms_acceleration`` over."""
    pytest.importorskip("setuptools")
    sources = tmp_path / "src"
    core = _copy_project(
        REPO,
        sources / "core",
        (
            "pyproject.toml",
            "setup.py",
            "README.md",
            "_fms_acceleration_startup.py",
            "fms_acceleration_accelerate.pth",
            "fms_acceleration_accelerate",
            "launch_configs",
        ),
    )
    peft = _copy_project(REPO / "plugins" / "accelerated-peft", sources / "peft")
    foak = _copy_project(REPO / "plugins" / "fused-ops-and-kernels", sources / "foak")
    original = sources / "original"
    (original / "fms_acceleration").mkdir(parents=True)
    (original / "fms_acceleration" / "__init__.py").write_text("ORIGINAL = True\n", encoding="utf-8")
    (original / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "fms-acceleration"\nversion = "0.6.4"\n\n'
        '[tool.setuptools]\npackages = ["fms_acceleration"]\n',
        encoding="utf-8",
    )
    wheels = tmp_path / "wheels"
    projects = (core, peft, foak, original)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheels),
            *map(str, projects),
        ],
        tmp_path,
    )

    def wheel(prefix: str) -> str:
        (found,) = [str(w) for w in wheels.glob(f"{prefix}-*.whl")]
        return found

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    install = [*pip, "--python", python, "install", "--no-deps", "--no-index", "-q"]
    names = ("fms_acceleration", "fms_acceleration_peft", "fms_acceleration_foak", "fms_acceleration_aadp")
    probe = (
        "import importlib.util, json\n"
        f"print(json.dumps({{n: getattr(importlib.util.find_spec(n), 'origin', None) for n in {names!r}}}))\n"
    )

    def origins() -> dict[str, str | None]:
        return json.loads(_run([python, "-c", probe], tmp_path))

    _run([*install, wheel("fms_acceleration_accelerate"), wheel("fms_acceleration_accelerate_peft")], tmp_path)
    found = origins()
    assert found["fms_acceleration"].endswith(
        "site-packages/fms_acceleration_accelerate/upstream_names/fms_acceleration/__init__.py"
    ), found
    assert found["fms_acceleration_peft"].endswith(
        "site-packages/fms_acceleration_accelerate_peft/upstream_names/fms_acceleration_peft/__init__.py"
    ), found
    assert found["fms_acceleration_foak"] is None and found["fms_acceleration_aadp"] is None  # not installed

    _run([*install, wheel("fms_acceleration_accelerate_foak")], tmp_path)
    assert origins()["fms_acceleration_foak"] is not None

    _run([*install, wheel("fms_acceleration")], tmp_path)  # the original, into the same site-packages
    found = origins()
    assert found["fms_acceleration"].endswith("site-packages/fms_acceleration/__init__.py"), found
    assert _run([python, "-c", "import fms_acceleration; print(fms_acceleration.ORIGINAL)"], tmp_path).strip() == "True"

    _run([*pip, "--python", python, "uninstall", "-y", "-q", "fms-acceleration"], tmp_path)
    assert "upstream_names" in origins()["fms_acceleration"]


def test_upstream_odm_section_activates_next_to_other_sections():
    """Upstream's ODM section (training.odm.odm) next to QLoRA, padding-free and ScatterMoE sections; an unknown
    section still passes through."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("fms_acceleration_accelerate_odm")
    from fms_acceleration import AccelerationFramework

    body = {
        "training": {
            "attention": {"padding_free": {"method": "huggingface"}},
            "moe": {"scattermoe": {"ep_degree": 1}},
            "odm": {"odm": {"update_interval": 1, "sampling_interval": 1, "reward_type": "train_loss"}},
        },
        "peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}},
        "vendor": {"turbo": {"speed": 11}},
    }
    framework = AccelerationFramework({"plugins": body})
    assert set(framework.active_plugin_names) == {"bitsandbytes", "padding_free", "scattermoe", "odm"}
    passed = {section.path: section.reason for section in framework.passthrough}
    assert set(passed) == {"plugins.vendor"}, passed
