"""Bad input to the GPTQ plugin: each case is a clear ``AccelerationConfigError`` naming the key or module and the
fix, raised before the model is built (header-level problems) or before any tensor is read (problems found by
comparing with the model's module tree on ``meta``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fms_acceleration_accelerate_peft.gptq import loader as gptq_loader
from fms_acceleration_accelerate_peft.gptq.config import GPTQLoraConfig
from safetensors.torch import load_file, save_file

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework

from .gptq_helpers import GPTQCase, edit_config, make_gptq_checkpoint, tiny_llama

QUANTIZE = "fms-accelerate quantize MODEL OUT --bits 4 --group-size 128"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path, _ = make_gptq_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", GPTQCase())
    return path


@pytest.fixture
def copy_of(good, tmp_path):
    """A writable copy of the good checkpoint."""
    import shutil

    def make() -> Path:
        target = tmp_path / "copy"
        shutil.copytree(good, target)
        return target

    return make


class _Built(AssertionError):
    pass


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if the loader builds the module tree (header-level problems must be found before)."""

    def refuse(*args, **kwargs):
        raise _Built("the model was built before the problem was reported")

    monkeypatch.setattr(gptq_loader, "build_skeleton", refuse)


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if the loader reads any tensor (model-shape problems must be found before)."""

    def refuse(*args, **kwargs):
        raise _Built("tensors were read before the problem was reported")

    monkeypatch.setattr(gptq_loader, "load_tensors", refuse)


def _load(path, **kwargs):
    return gptq_loader.load_gptq_causal_lm(str(path), GPTQLoraConfig(), **kwargs)


def _rewrite(path: Path, change) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------- quantization_config
@pytest.mark.parametrize(
    ("changes", "expected", "fix"),
    [
        ({"bits": 3}, "bits: 3 in config.json quantization_config: 3-bit GPTQ packs codes across", "--bits 4"),
        ({"bits": 5}, "bits: 5 in config.json quantization_config is not a supported", "2, 4 or 8 bits"),
        ({"bits": "4"}, "bits: '4' in config.json", "2, 4 or 8 bits"),
        ({"group_size": 0}, "group_size: 0 in config.json quantization_config is neither", "--group-size"),
        ({"desc_act": "yes"}, "desc_act: 'yes' in config.json quantization_config is not true or false", "desc_act"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format: 'marlin' in config.json", "standard gptq format"),
        ({"quant_method": "awq"}, "quantized with quant_method='awq' (config.json quantization_config), not GPTQ", ""),
        ({"dynamic": {"r'.*down.*'": {"bits": 8}}}, "per-module quantization overrides", "without per-module"),
    ],
)
def test_bad_quantization_config(copy_of, nothing_built, changes, expected, fix):
    path = copy_of()
    edit_config(path, **changes)
    with pytest.raises(AccelerationConfigError) as info:
        _load(path)
    assert expected in str(info.value)
    assert fix in info.value.fix
    assert info.value.path.startswith("peft.quantization.auto_gptq")


def test_every_config_problem_at_once(copy_of, nothing_built):
    path = copy_of()
    edit_config(path, bits=3, group_size=-2, checkpoint_format="bitblas")
    with pytest.raises(AccelerationConfigError) as info:
        _load(path)
    assert info.value.count == 3


def test_bad_legacy_quantize_config(tmp_path, nothing_built):
    path, _ = make_gptq_checkpoint(tmp_path / "ckpt", GPTQCase(legacy_config=True))
    legacy = json.loads((path / "quantize_config.json").read_text())
    legacy["bits"] = 3
    (path / "quantize_config.json").write_text(json.dumps(legacy))
    with pytest.raises(AccelerationConfigError, match=r"bits: 3 in quantize_config\.json"):
        _load(path)


def test_not_a_gptq_checkpoint(tmp_path, nothing_built):
    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(plain)
    with pytest.raises(AccelerationConfigError) as info:
        _load(plain)
    message = str(info.value)
    assert f"{str(plain)!r} is not a GPTQ checkpoint" in message
    assert "no quantization_config" in message
    assert QUANTIZE in info.value.fix and info.value.path == "peft.quantization.auto_gptq.from_quantized"


def test_quantization_config_without_packed_tensors(tmp_path, nothing_built):
    plain = tmp_path / "plain"
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    model.save_pretrained(plain)
    with pytest.raises(AccelerationConfigError, match=r"hold no '<module>\.qweight' tensor") as info:
        _load(plain)
    assert QUANTIZE in info.value.fix


def test_not_a_local_folder_and_no_safetensors(tmp_path, nothing_built, copy_of):
    with pytest.raises(AccelerationConfigError, match="is not a local folder"):
        _load("org/some-gptq-model")
    path = copy_of()
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(AccelerationConfigError, match=r"no model.safetensors .*pytorch_model.bin"):
        _load(path)


# ------------------------------------------------------------------------------------------- tensors (headers)
def test_missing_g_idx_with_desc_act(tmp_path, nothing_built):
    path, _ = make_gptq_checkpoint(tmp_path / "ckpt", GPTQCase(desc_act=True, drop_g_idx=True))
    with pytest.raises(AccelerationConfigError) as info:
        _load(path)
    message = str(info.value)
    assert "14 of the 14 quantized modules have no g_idx tensor (e.g. model.layers.0.mlp.down_proj.g_idx" in message
    assert "desc_act: true (config.json)" in message and "--desc-act" in info.value.fix
    assert info.value.count == 1


def test_tensor_shapes_that_do_not_match_the_config(copy_of, nothing_built):
    path = copy_of()

    def damage(tensors):
        tensors["model.layers.1.mlp.down_proj.scales"] = tensors["model.layers.1.mlp.down_proj.scales"][
            :, :32
        ].contiguous()

    _rewrite(path, damage)
    with pytest.raises(AccelerationConfigError) as info:
        _load(path)
    message = str(info.value)
    assert "quantized module model.layers.1.mlp.down_proj: scales has shape [4, 32], expected [4, 64]" in message
    assert "bits 4 and group_size 32" in message


def test_group_size_that_does_not_match_the_tensors(copy_of, nothing_built):
    path = copy_of()
    edit_config(path, group_size=64)  # tensors were written with 32
    with pytest.raises(AccelerationConfigError, match=r"qzeros has shape \[2, 8\], expected \[1, 8\]"):
        _load(path)


def test_missing_qzeros_and_wrong_dtype(copy_of, nothing_built):
    path = copy_of()

    def damage(tensors):
        del tensors["model.layers.0.mlp.up_proj.qzeros"]
        tensors["model.layers.0.mlp.gate_proj.qweight"] = tensors["model.layers.0.mlp.gate_proj.qweight"].float()

    _rewrite(path, damage)
    with pytest.raises(AccelerationConfigError) as info:
        _load(path)
    message = str(info.value)
    assert "model.layers.0.mlp.up_proj.qzeros is missing" in message
    assert "model.layers.0.mlp.gate_proj: qweight is stored as torch.float32, expected int32" in message


# ------------------------------------------------------------------------------------------- against the model
def test_checkpoint_shapes_that_do_not_match_the_model(copy_of, nothing_read):
    path = copy_of()
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 256  # the model built from config.json no longer fits the packed weights
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AccelerationConfigError) as info:
        _load(path)
    message = str(info.value)
    assert (
        "quantized module model.layers.0.mlp.gate_proj: the model's linear layer is out x in = 256x64 "
        "(qweight [8, 256] with bits 4), but the checkpoint's qweight [8, 128] is 128x64"
    ) in message
    assert "config.json saved with the quantized weights" in info.value.fix


def test_quantized_output_embedding_cannot_be_tied(tmp_path, nothing_read):
    path, _ = make_gptq_checkpoint(tmp_path / "ckpt", GPTQCase(lm_head=True))
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AccelerationConfigError) as info:
        _load(path)
    assert "quantizes the output embedding lm_head, but the model's config.json has tie_word_embeddings" in str(
        info.value
    )
    assert "tie_word_embeddings: false" in info.value.fix


def test_missing_non_quantized_weights(copy_of, nothing_read):
    path = copy_of()
    _rewrite(path, lambda tensors: tensors.pop("model.norm.weight"))
    with pytest.raises(AccelerationConfigError, match=r"lacks 1 non-quantized weights of the llama model: model.norm"):
        _load(path)


# ------------------------------------------------------------------------------------------- loader arguments
def test_bad_loader_arguments(good, nothing_built):
    with pytest.raises(AccelerationConfigError, match="training dtype float64 is not supported for GPTQ-LoRA"):
        _load(good, torch_dtype=torch.float64)
    with pytest.raises(AccelerationConfigError, match="torch_dtype 'int8' is not a training dtype"):
        _load(good, dtype="int8")
    with pytest.raises(AccelerationConfigError, match="places the model over several devices"):
        _load(good, device_map={"model.layers.0": "cpu", "model.layers.1": "meta"})
    with pytest.raises(AccelerationConfigError, match="does not take: not_an_option"):
        _load(good, not_an_option=1)
    with pytest.raises(AccelerationConfigError, match="reads the checkpoint's own"):
        _load(good, quantization_config={"bits": 4})


# ------------------------------------------------------------------------------------------- plugin options
@pytest.mark.parametrize(
    ("options", "expected", "fix"),
    [
        (
            {"kernel": "exllama"},
            "kernel 'exllama' is not available: it names auto-gptq's exllama CUDA kernel",
            "triton_v2",
        ),
        ({"kernel": "marlin"}, "kernel 'marlin' is not available", "kernel: triton_v2 (the only valid value)"),
        ({"from_quantized": False}, "from_quantized: false would quantize the model while loading", QUANTIZE),
        ({"use_external_lib": True}, "auto-gptq, which is archived and does not install on current torch", "false"),
    ],
)
def test_bad_plugin_options_are_refused_when_the_framework_is_created(options, expected, fix):
    with pytest.raises(AccelerationConfigError) as info:
        AccelerationFramework({"peft": {"quantization": {"auto_gptq": options}}})
    assert expected in str(info.value) and fix in info.value.fix
    assert info.value.path == "peft.quantization.auto_gptq"


def test_unknown_option_names_the_valid_keys():
    with pytest.raises(AccelerationConfigError) as info:
        AccelerationFramework({"peft": {"quantization": {"auto_gptq": {"bits": 4}}}})
    assert info.value.path == "peft.quantization.auto_gptq.bits"
    assert "from_quantized" in info.value.fix and "use_external_lib" in info.value.fix
