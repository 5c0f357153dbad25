"""Configuration parsing and every bad input raising before any weight is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fms_acceleration_accelerate import AccelerationFramework
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .helpers import framework, tiny_llama

TEMPLATE = Path(__file__).resolve().parents[3] / "plugins" / "accelerated-peft" / "configs" / "bnb.yaml"


@pytest.fixture
def no_from_pretrained(monkeypatch):
    """Fail the test if any weights are loaded."""
    from transformers import AutoModelForCausalLM

    def boom(*a, **k):
        raise AssertionError("from_pretrained was called: the error must come before loading")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


def test_template_is_valid_and_activates_the_plugin():
    fw = AccelerationFramework(str(TEMPLATE))
    assert fw.active_plugin_names == ("bitsandbytes",)
    assert fw.requires_custom_loading and fw.requires_augmentation
    cfg = fw.plugins[0].config
    assert (cfg.quant_type, cfg.bnb_4bit_use_double_quant, cfg.no_peft_model) == ("nf4", True, False)


def test_quant_type_typo_is_rejected_with_suggestion():
    with pytest.raises(AccelerationConfigError, match=r"quant_type.*Did you mean 'nf4'"):
        framework({"quant_type": "nf5"})


def test_unknown_option_names_valid_keys():
    with pytest.raises(AccelerationConfigError, match="bnb_4bit_use_double_quant"):
        framework({"double_quant": True})


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_storage_dtype_that_cannot_shard_fails_before_loading(llama_dir, no_from_pretrained, storage):
    fw = framework({"bnb_4bit_quant_storage": storage})
    with pytest.raises(AccelerationConfigError, match=r"bnb_4bit_quant_storage.*FSDP"):
        fw.model_loader(str(llama_dir), dtype=torch.float32)


def test_already_quantized_checkpoint_fails_before_loading(tmp_path, no_from_pretrained):
    path = tiny_llama(tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AccelerationConfigError, match="already quantized"):
        framework().model_loader(str(path), dtype=torch.float32)


def test_not_a_causal_lm_fails_before_loading(tmp_path, no_from_pretrained):
    from transformers import T5Config

    T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(AccelerationConfigError, match="not a causal LM"):
        framework().model_loader(str(tmp_path), dtype=torch.float32)


_NO_LINEAR_MODEL = """
import torch
from transformers import PretrainedConfig, PreTrainedModel


class NoLinearConfig(PretrainedConfig):
    model_type = "no_linear_lm"

    def __init__(self, vocab_size=16, hidden_size=8, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class NoLinearForCausalLM(PreTrainedModel):
    config_class = NoLinearConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = torch.nn.Conv1d(config.hidden_size, config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        return self.mix(self.embed(input_ids).transpose(1, 2))
"""


def test_model_without_linear_layers_fails_before_loading(tmp_path, no_from_pretrained):
    (tmp_path / "modeling_nolinear.py").write_text(_NO_LINEAR_MODEL)
    config = {
        "model_type": "no_linear_lm",
        "vocab_size": 16,
        "hidden_size": 8,
        "auto_map": {
            "AutoConfig": "modeling_nolinear.NoLinearConfig",
            "AutoModelForCausalLM": "modeling_nolinear.NoLinearForCausalLM",
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AccelerationConfigError, match="no linear layer"):
        framework().model_loader(str(tmp_path), dtype=torch.float32, trust_remote_code=True)


def test_missing_bitsandbytes_names_the_pip_command(monkeypatch, llama_dir):
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(
        AccelerationConfigError, match=r"pip install 'fms-acceleration-accelerate-peft\[bitsandbytes\]'"
    ):
        framework()


def test_loader_without_bitsandbytes_fails_before_loading(monkeypatch, llama_dir, no_from_pretrained):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(AccelerationConfigError, match="pip install"):
        framework().model_loader(str(llama_dir), dtype=torch.float32)


def test_non_float_training_dtype_and_quantization_config_argument(llama_dir, no_from_pretrained):
    with pytest.raises(AccelerationConfigError, match="floating-point"):
        framework().model_loader(str(llama_dir), dtype=torch.int8)
    with pytest.raises(AccelerationConfigError, match="quantization_config"):
        framework().model_loader(str(llama_dir), dtype=torch.float32, quantization_config=object())


def test_augmentation_needs_lora_config_and_a_4bit_model(llama_dir):
    from transformers import AutoModelForCausalLM

    from .helpers import lora_config

    fw = framework()
    with pytest.raises(AccelerationConfigError, match="without 4-bit layers"):
        fw.augmentation(AutoModelForCausalLM.from_pretrained(str(llama_dir)), None, (lora_config(),))
    model = fw.model_loader(str(llama_dir), dtype=torch.float32)
    with pytest.raises(AccelerationConfigError, match="LoraConfig"):
        fw.augmentation(model, None, ())
