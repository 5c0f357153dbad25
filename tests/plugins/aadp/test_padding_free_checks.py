"""What the padding-free plugin refuses or repairs: models it cannot serve, attention implementations changed behind
its back, the model's key/value-cache default, and a model that reaches it only through ``Accelerator.prepare``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from fms_acceleration_accelerate_aadp import PaddingFreePlugin
from fms_acceleration_accelerate_aadp.collate import flatten_batch

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework
from fms_acceleration_accelerate.accelerate_integration import AccelerationKwargs
from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.registry import PluginRegistry

from .padding_free_helpers import load_tiny, padded_batch, padding_free_framework, save_tiny

SECTION = {"plugins": {"training": {"attention": {"padding_free": {"method": "huggingface"}}}}}


SHIPPED = sorted((Path(__file__).resolve().parents[3] / "launch_configs").glob("*padding-free*.yaml"))
_QLORA_FOAK = ("bitsandbytes", "padding_free", "fused_ops_and_kernels")
ACTIVE = {
    "aadp-padding-free-sample-configuration.yaml": ("padding_free",),
    "aadp-padding-free-multipack-sample-configuration.yaml": ("padding_free", "multipack"),
    "aadp-padding-free-multipack-foak-sample-configuration.yaml": (
        "padding_free",
        "fused_ops_and_kernels",
        "multipack",
    ),
    "accelerate-cpu-padding-free.yaml": ("padding_free",),
    "accelerate-single-gpu-padding-free.yaml": ("padding_free",),
    "accelerate-single-gpu-qlora-foak-padding-free.yaml": _QLORA_FOAK,
    "accelerated-peft-autogptq-foak-padding-free-sample-configuration.yaml": (
        "auto_gptq",
        "padding_free",
        "fused_ops_and_kernels",
    ),
    "accelerated-peft-autogptq-padding-free-sample-configuration.yaml": ("auto_gptq", "padding_free"),
    "accelerated-peft-bnb-nf4-foak-padding-free-sample-configuration.yaml": _QLORA_FOAK,
    "accelerated-peft-bnb-nf4-padding-free-sample-configuration.yaml": ("bitsandbytes", "padding_free"),
    "foak-fast-lora-padding-free-sample-configuration.yaml": ("padding_free", "fused_ops_and_kernels"),
}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_padding_free_configurations_activate_the_plugin(path):
    framework = AccelerationFramework(str(path))
    assert framework.passthrough == () and framework.active_plugin_names == ACTIVE.get(path.name, "?")
    config = framework.plugin("padding_free").config
    assert (config.method, config.attention_backend, config.flatten_batches) == ("huggingface", "auto", True)


def test_every_upstream_padding_free_sample_is_shipped():
    names = {p.name for p in SHIPPED}
    for upstream in ("aadp-padding-free", "accelerated-peft-bnb-nf4-padding-free", "accelerated-peft-autogptq-padding-free",
                     "accelerated-peft-bnb-nf4-foak-padding-free", "accelerated-peft-autogptq-foak-padding-free"):  # fmt: skip
        assert f"{upstream}-sample-configuration.yaml" in names, upstream


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_an_architecture_without_a_spec_is_refused_before_anything_is_patched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    framework = padding_free_framework()
    with pytest.raises(AccelerationConfigError, match="'gpt2'") as err:
        framework.augmentation(model)
    assert "llama" in str(err.value) and framework.patches.records == ()
    assert model.config._attn_implementation != "fms_padding_free"


def test_the_cache_default_is_switched_off_and_an_explicit_cache_still_keeps_examples_apart(llama_dir):
    model = load_tiny(llama_dir)
    flat, _ = flatten_batch(padded_batch())
    with padding_free_framework() as framework:
        framework.augmentation(model)
        assert model.config.use_cache is False
        with torch.no_grad():
            plain = model(**flat).logits
            cached = model(**flat, use_cache=True)
        assert cached.past_key_values is not None  # the cache was made, and did not change what attends to what
        torch.testing.assert_close(cached.logits, plain, rtol=0, atol=0)
    assert model.config.use_cache is True


def test_an_implementation_changed_before_prepare_is_set_again(llama_dir):
    model = load_tiny(llama_dir)
    framework = padding_free_framework()
    with framework:
        framework.augmentation(model)
        ours = model.config._attn_implementation
        model.set_attn_implementation("sdpa")  # e.g. a script that sets its preferred kernel after loading
        plugin = framework.plugin("padding_free")
        plugin.prepare_contribution(model, RunContext())
        assert model.config._attn_implementation == ours
        plugin.after_prepare(model, RunContext())
        model.config._attn_implementation = "sdpa"
        with pytest.raises(AccelerationConfigError, match="changed to 'sdpa' after the padding-free plugin set it"):
            plugin.after_prepare(model, RunContext())
        model.config._attn_implementation = ours


def test_a_model_seen_only_by_accelerator_prepare_is_patched_there(llama_dir, capsys):
    handler = AccelerationKwargs(config=SECTION, registry=PluginRegistry([PaddingFreePlugin]))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    model = load_tiny(llama_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    framework = accelerator._fms_acceleration_framework
    try:
        assert str(model.config._attn_implementation).startswith("fms_padding_free_sdpa")
        table = capsys.readouterr().out
        assert "fms-acceleration patches:" in table and "padding-free attention [sdpa" in table
        flat, _ = flatten_batch(padded_batch())
        loss = model(**flat).loss
        loss.backward()
        assert torch.isfinite(loss)
    finally:
        framework.revert()
    assert model.config._attn_implementation == "eager"


def test_an_older_transformers_is_refused_with_the_fix(llama_dir, monkeypatch):
    import transformers

    model = load_tiny(llama_dir)
    monkeypatch.setattr(transformers, "__version__", "4.50.0")
    framework = padding_free_framework()
    with pytest.raises(AccelerationConfigError, match=r"needs transformers >= 4\.56.*4\.50\.0") as err:
        framework.augmentation(model)
    assert "pip install -U 'transformers>=4.56'" in str(err.value) and framework.patches.records == ()


def test_two_frameworks_revert_in_any_order(llama_dir):
    """Each framework registers its own attention entry; reverting one leaves the other's model working."""
    from transformers.modeling_utils import AttentionInterface

    before = vars(AttentionInterface)["_global_mapping"]
    first, second = load_tiny(llama_dir), load_tiny(llama_dir)
    a, b = padding_free_framework(), padding_free_framework()
    a.augmentation(first)
    b.augmentation(second)
    flat, _ = flatten_batch(padded_batch())
    a.revert()  # out of order: b's entry must survive
    assert str(second.config._attn_implementation) in vars(AttentionInterface)["_global_mapping"]
    assert torch.isfinite(second(**flat).loss)
    b.revert()
    mapping = vars(AttentionInterface)["_global_mapping"]
    assert not any(name.startswith("fms_padding_free") for name in mapping)
    assert mapping.keys() == before.keys()
