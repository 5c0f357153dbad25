"""``load_staging``: the streamed safetensors load (quantize each weight, keep it on the staging device) and the
choice of where the 4-bit model waits for FSDP2 (CPU: quantization and staging on the host)."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .helpers import tiny_llama

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)  # a device object only: nothing here allocates on it


def _plan(path, config, dtype=torch.bfloat16):
    from fms_acceleration_accelerate_peft import loader
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path)
    plan = loader.plan_quantization(model_config, config, dtype)
    return model_config, loader.make_hf_bnb_config(config, plan), plan


def _stream(path, config=None, **kwargs):
    from fms_acceleration_accelerate_peft import loader
    from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig

    model_config, bnb_config, plan = _plan(path, config or BnbQuantizationConfig())
    return loader.stream_quantized_causal_lm(str(path), model_config, bnb_config, plan, CPU, CPU, kwargs)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit storage compared as bytes (viewed as bf16 some codes are NaN, and NaN != NaN)."""
    return t.detach().contiguous().view(torch.uint8)


def _assert_same_model(ours, ref):
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert sorted(ours_state) == sorted(ref_state)
    different = [k for k in ref_state if not torch.equal(_bytes(ours_state[k]), _bytes(ref_state[k]))]
    assert not different, different[:5]
    ours_buffers, ref_buffers = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert sorted(ours_buffers) == sorted(ref_buffers)
    assert all(torch.equal(ours_buffers[k], ref_buffers[k]) for k in ref_buffers)
    assert [(n, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.dtype, p.requires_grad) for n, p in ref.named_parameters()
    ]
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("shards", [False, True], ids=["one-file", "indexed-shards"])
def test_streamed_load_equals_the_transformers_bitsandbytes_load(tmp_path, shards):
    from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
    from fms_acceleration_accelerate_peft.loader import load_quantized_causal_lm
    from transformers import AutoModelForCausalLM

    path = tiny_llama(tmp_path / "m", dtype=torch.bfloat16)
    if shards:  # re-save as several files with an index, as large checkpoints are
        AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "s", max_shard_size="100KB")
        path = tmp_path / "s"
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    config = BnbQuantizationConfig()
    ref = load_quantized_causal_lm(str(path), config, dtype=torch.bfloat16)
    ours = _stream(path, config)
    assert ours is not None
    _assert_same_model(ours, ref)
    layer = ours.model.layers[0].mlp.up_proj
    assert layer.quant_state is layer.weight.quant_state  # the object FSDP1 / dequant code read
    assert ours.is_loaded_in_4bit and not ours.training
    assert not hasattr(ours, "hf_device_map")  # Accelerate would otherwise check the load device


def test_streamed_load_reties_tied_embeddings(tmp_path):
    path = tiny_llama(tmp_path / "tied", tie=True, dtype=torch.bfloat16)
    ours = _stream(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_streamed_load_declines_checkpoints_it_cannot_read(tmp_path, caplog):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    path = tiny_llama(tmp_path / "m", dtype=torch.bfloat16)
    legacy = tmp_path / "bin"  # a pytorch_model.bin checkpoint (transformers 5 saves only safetensors)
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    torch.save(load_file(path / "model.safetensors"), legacy / "pytorch_model.bin")
    renamed = tmp_path / "renamed"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.norm.gamma"] = tensors.pop("model.norm.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate_peft"):
        assert _stream(legacy) is None
        assert _stream(renamed) is None
    text = caplog.text
    assert "no model.safetensors" in text
    assert "lacks 1 of the model's parameters, e.g. ['model.norm.weight']" in text


def test_streamed_load_declines_models_that_keep_modules_in_float32(tmp_path, monkeypatch, caplog):
    from transformers import LlamaForCausalLM

    path = tiny_llama(tmp_path / "m", dtype=torch.bfloat16)
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["norm"])
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate_peft"):
        assert _stream(path) is None
    assert "keeps ['norm'] in float32" in caplog.text


def test_streamed_load_skips_checkpoint_tensors_the_model_has_no_place_for(tmp_path, caplog):
    """A model with fewer layers than its checkpoint (the benchmarks' layer slices) loads like transformers does."""
    from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
    from fms_acceleration_accelerate_peft.loader import load_quantized_causal_lm
    from transformers import AutoConfig

    path = tiny_llama(tmp_path / "m", dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = 1
    config.save_pretrained(path)
    ref = load_quantized_causal_lm(str(path), BnbQuantizationConfig(), dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate_peft"):
        ours = _stream(path)
    assert ours is not None and len(ours.model.layers) == 1
    assert "9 checkpoint tensors not used by the model, e.g. ['model.layers.1.input_layernorm.weight'" in caplog.text
    _assert_same_model(ours, ref)


def test_loader_routes_host_staging_through_the_streamed_load(tmp_path, monkeypatch, caplog):
    """With staging != device, load_quantized_causal_lm quantizes tensor by tensor; a device_map argument wins."""
    from fms_acceleration_accelerate_peft import loader
    from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig

    path = tiny_llama(tmp_path / "m", dtype=torch.bfloat16)
    config = BnbQuantizationConfig(load_staging="cpu")
    ref = loader.load_quantized_causal_lm(str(path), config, dtype=torch.bfloat16)  # CPU run: no staging
    quant_device = torch.device("cpu", 0)  # compares unequal to the staging device "cpu"
    context = RunContext(device=quant_device)  # the run's device, as the plugin hands it to the loader
    monkeypatch.setattr(loader, "resolve_load_staging", lambda config, **_: CPU)  # as on a GPU under FSDP2
    with caplog.at_level(logging.INFO, logger="fms_acceleration_accelerate_peft"):
        ours = loader.load_quantized_causal_lm(str(path), config, dtype=torch.bfloat16, run_context=context)
        assert "quantized on cpu:0 and staged on cpu" in caplog.text
        _assert_same_model(ours, ref)
        loader.load_quantized_causal_lm(
            str(path), config, dtype=torch.bfloat16, device_map={"": "cpu"}, run_context=context
        )
        assert "load_staging ignored" in caplog.text


@pytest.mark.parametrize(
    ("choice", "world", "device", "fsdp", "expected"),
    [
        ("auto", 2, GPU, 2, CPU),
        ("auto", 1, GPU, 2, GPU),  # one process: nothing to shard across
        ("auto", 4, GPU, 1, GPU),  # FSDP1 flattens layers where they are
        ("auto", 4, GPU, None, GPU),  # not FSDP, or not known before prepare
        ("device", 4, GPU, 2, GPU),
        ("cpu", 1, GPU, None, CPU),  # Accelerate's device placement moves it (single GPU, DDP)
        ("cpu", 4, CPU, 2, CPU),
        ("auto", 4, CPU, 2, CPU),
    ],
)
def test_resolve_load_staging(choice, world, device, fsdp, expected):
    from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
    from fms_acceleration_accelerate_peft.loader import resolve_load_staging

    config = BnbQuantizationConfig(load_staging=choice)
    assert resolve_load_staging(config, world_size=world, device=device, fsdp_version=fsdp) == expected


def test_host_staging_under_fsdp1_is_refused_before_loading(tmp_path, monkeypatch):
    from fms_acceleration_accelerate_peft import loader
    from fms_acceleration_accelerate_peft.config import BnbQuantizationConfig
    from transformers import AutoModelForCausalLM

    path = tiny_llama(tmp_path / "m", dtype=torch.bfloat16)
    fsdp1 = RunContext(distributed_type="FSDP", fsdp_version=1)  # the run context the plugin hands the loader
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the error"))
    with pytest.raises(AccelerationConfigError) as info:
        loader.load_quantized_causal_lm(
            str(path), BnbQuantizationConfig(load_staging="cpu"), dtype=torch.bfloat16, run_context=fsdp1
        )
    message = str(info.value)
    assert "plugins.peft.quantization.bitsandbytes.load_staging" in message and "fsdp_version: 2" in message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, 2),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, 1),
        ({"ACCELERATE_USE_FSDP": "true"}, 1),  # Accelerate's own default
        ({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "2"}, None),
        ({}, None),
    ],
)
def test_expected_fsdp_version_from_the_launcher_environment(monkeypatch, env, expected):
    from accelerate.state import AcceleratorState

    from fms_acceleration_accelerate.accelerate_integration import expected_fsdp_version

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # no Accelerator in this process yet
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert expected_fsdp_version() == expected


@pytest.mark.parametrize(("kind", "version", "expected"), [("FSDP", 2, 2), ("FSDP", 1, 1), ("MULTI_GPU", None, None)])
def test_expected_fsdp_version_from_an_existing_accelerator_wins_over_the_environment(
    monkeypatch, kind, version, expected
):
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from fms_acceleration_accelerate.accelerate_integration import expected_fsdp_version

    plugin = SimpleNamespace(fsdp_version=version) if version else None
    state = {"distributed_type": DistributedType[kind], "fsdp_plugin": plugin}
    monkeypatch.setattr(AcceleratorState, "_shared_state", state)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1" if version == 2 else "2")
    assert expected_fsdp_version() == expected
    assert state["distributed_type"] == DistributedType[kind]  # read only: no re-sync from PartialState
