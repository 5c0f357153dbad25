"""Bad configurations: each raises AccelerationConfigError naming the key path and how to fix it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import fms_acceleration_accelerate
from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework

from .helpers import registry


@dataclass(frozen=True)
class Yaml:
    """Config given as the text of a YAML file."""

    text: str


@dataclass(frozen=True)
class Missing:
    """Config given as the path of a file that does not exist."""


def K(**options: Any) -> dict:
    """A config with the test kernel plugin's section holding ``options``."""
    return {"plugins": {"training": {"test_kernels": options}}}


def Q(**options: Any) -> dict:
    return {"plugins": {"peft": {"quantization": {"testquant": options}}}}


KP = "plugins.training.test_kernels"
QP = "plugins.peft.quantization.testquant"

# (config, expected error path, substrings that must all be in the message[, model type to check])
CASES = [
    pytest.param(
        K(fast_rsm_layernorm=True),
        f"{KP}.fast_rsm_layernorm",
        ["unknown key 'fast_rsm_layernorm'", "Did you mean 'fast_rms_layernorm'?", "valid keys here:"],
        id="typo-key",
    ),
    pytest.param(
        K(fast_rope_embedings=True),
        f"{KP}.fast_rope_embedings",
        ["Did you mean 'fast_rope_embeddings'?"],
        id="typo-key-2",
    ),
    pytest.param(
        K(colour=1), f"{KP}.colour", ["unknown key 'colour'", "fast_loss, fast_rms_layernorm"], id="unknown-key"
    ),
    pytest.param(
        {"plugins": {"training": {"test_kernel": {}}}},
        "plugins.training.test_kernel",
        ["unknown section 'test_kernel'", "Did you mean 'test_kernels'?", "valid sections here:"],
        id="typo-section",
    ),
    pytest.param(
        {"plugins": {"peft": {"quantisation": {"testquant": {}}}}},
        "plugins.peft.quantisation",
        ["Did you mean 'quantization'?"],
        id="typo-prefix",
    ),
    pytest.param(
        {"plugins": {"trainng": {"test_kernels": {}}}},
        "plugins.trainng",
        ["Did you mean 'training'?", "valid sections here: peft, training"],
        id="typo-top-section",
    ),
    pytest.param(
        {"plugins": {"peft": {"quantization": {"bitsandbites": {}}}}},
        "plugins.peft.quantization.bitsandbites",
        ["Did you mean 'bitsandbytes'?"],
        id="typo-known-uninstalled-section",
    ),
    pytest.param(K(fast_loss="yes"), f"{KP}.fast_loss", ["expected true or false", "no quotes"], id="bool-string"),
    pytest.param(K(fast_loss=1), f"{KP}.fast_loss", ["expected true or false, got 1"], id="bool-int"),
    pytest.param(Q(group_size="64"), f"{QP}.group_size", ["expected an integer, got '64'"], id="int-string"),
    pytest.param(Q(group_size=True), f"{QP}.group_size", ["expected an integer, got True"], id="int-bool"),
    pytest.param(Q(group_size=1.5), f"{QP}.group_size", ["expected an integer", "whole number"], id="int-float"),
    pytest.param(K(scale="fast"), f"{KP}.scale", ["expected a number, got 'fast'"], id="float-string"),
    pytest.param(K(label=3), f"{KP}.label", ["expected a string, got int", "quote the value"], id="str-int"),
    pytest.param(
        Q(quant_type="nf5"),
        f"{QP}.quant_type",
        ["invalid value 'nf5'", "Did you mean 'nf4'?", "valid values: 'nf4', 'fp4'"],
        id="literal-typo",
    ),
    pytest.param(
        Q(quant_type=4), f"{QP}.quant_type", ["invalid value 4", "valid values: 'nf4', 'fp4'"], id="literal-type"
    ),
    pytest.param(
        K(backend="cuda"), f"{KP}.backend", ["invalid value 'cuda'", "valid values: 'triton', 'torch'"], id="enum-value"
    ),
    pytest.param(K(block_size="big"), f"{KP}.block_size", ["expected an integer, got 'big'"], id="optional-int"),
    pytest.param(
        K(loss="fused_linar"),
        f"{KP}.loss",
        [
            "invalid value 'fused_linar'. Did you mean 'fused_linear'?",
            "true | false | 'cross_entropy' | 'fused_linear'",
        ],
        id="union-typo",
    ),
    pytest.param(
        K(layers="q_proj"), f"{KP}.layers", ["expected a list, got str", "e.g. ['q_proj']"], id="list-expected"
    ),
    pytest.param(K(layers=["q", 1]), f"{KP}.layers[1]", ["expected a string, got int"], id="list-item-type"),
    pytest.param(
        K(inner={"deph": 2}), f"{KP}.inner.deph", ["unknown key 'deph'", "Did you mean 'depth'?"], id="nested-typo"
    ),
    pytest.param(K(inner=3), f"{KP}.inner", ["must be a mapping of options", "valid keys: depth"], id="nested-scalar"),
    pytest.param(
        {"plugins": {"training": {"test_kernels": [1, 2]}}},
        KP,
        ["must be a mapping of options, got list", "valid keys: backend, block_size"],
        id="section-list",
    ),
    pytest.param(
        {"plugins": {"training": {"test_kernels": "fast"}}}, KP, ["must be a mapping of options"], id="section-string"
    ),
    pytest.param(
        {"plugins": {"training": 5}},
        "plugins.training",
        ["must be a mapping of plugin sections, got 5", "alpha", "test_kernels"],
        id="prefix-scalar",
    ),
    pytest.param({"plugins": ["peft"]}, "plugins", ["must be a mapping of plugin sections, got list"], id="body-list"),
    pytest.param({"plugins": {1: {}}}, "plugins", ["keys must be strings, got 1", "quote the key"], id="int-key"),
    pytest.param({"acceleration": 5}, "acceleration", ["must be a mapping of plugin sections"], id="acceleration-int"),
    pytest.param(
        {"plugins": {}, "acceleration": {}}, None, ["both 'plugins:' and 'acceleration:'", "keep one"], id="both-roots"
    ),
    pytest.param(
        {"acceleration": {"plugins": {}, "training": {}}},
        "acceleration",
        ["holds 'plugins:' next to other keys (training)"],
        id="acceleration-plugins-and-sections",
    ),
    pytest.param(
        Yaml("- peft\n- training\n"),
        None,
        ["must hold a mapping at the top level, got list", "'plugins:'"],
        id="yaml-list",
    ),
    pytest.param(
        Yaml("distributed_type: 'NO'\nnum_processes: 1\n"),
        None,
        ["has no 'plugins:' or 'acceleration:' section", "top-level 'plugins:'"],
        id="accelerate-config-without-section",
    ),
    pytest.param(Missing(), None, ["does not exist", "pass the path of an existing YAML file"], id="missing-file"),
    pytest.param(
        Yaml("plugins:\n  training: {test_kernels: {fast_loss: true}\n"),
        None,
        ["is not valid YAML", "fix the YAML syntax"],
        id="invalid-yaml",
    ),
    pytest.param(
        Yaml("plugins:\n  training:\n    test_kernels:\n  fast_loss: true\n   bad: 1\n"),
        None,
        ["is not valid YAML", "line"],
        id="invalid-indentation",
    ),
    pytest.param(
        Yaml("plugins: !!python/object/apply:os.system ['echo hacked']\n"),
        None,
        ["is not valid YAML", "python/object/apply:os.system"],
        id="python-tag-refused",
    ),
    pytest.param(
        Yaml("acceleration: no_such_file.yaml\n"), None, ["no_such_file.yaml", "does not exist"], id="redirect-missing"
    ),
    pytest.param(42, None, ["must be a YAML path, a dict or None, got int"], id="wrong-source-type"),
    pytest.param(
        {"plugins": {"training": {"needs_missing": {}}}},
        "plugins.training.needs_missing",
        ["needs fms-nonexistent-package-xyz>=1.0", "is not installed", "pip install fms-nonexistent-package-xyz"],
        id="missing-package",
    ),
    pytest.param(
        {"plugins": {"training": {"needs_option": None}}},
        "plugins.training.needs_option",
        ["missing required key 'rank'", "add 'rank: ...'", "required option"],
        id="missing-required-option",
    ),
    pytest.param(
        K(fast_rope_embeddings=True),
        KP,
        ["fast_rope_embeddings needs fast_rms_layernorm", "set fast_rms_layernorm: true"],
        id="cross-field",
    ),
    pytest.param(
        {"plugins": {"training": {"exclusive": {}, "test_kernels": {}}}},
        "plugins.training.test_kernels",
        ["'exclusive' cannot be combined with 'kernels'", "remove either plugins.training.exclusive"],
        id="conflicting-plugins",
    ),
    pytest.param(
        {"plugins": {"training": {"picky": {}}, "peft": {"quantization": {"testquant": {}}}}},
        "plugins.training.picky",
        ["picky cannot run with 4-bit loading", "remove training.picky"],
        id="check-compatibility",
    ),
    pytest.param(
        {"plugins": {"peft": {"quantization": {"testquant": {}, "otherquant": {}}}}},
        None,
        ["more than one active plugin loads the model", "quant-loader (plugins.peft.quantization.testquant)"],
        id="two-loaders",
    ),
    pytest.param(
        {"plugins": {"training": {"alpha": {"group_size": 1}, "beta": {"group_size": 2}}}},
        "plugins.training.beta.group_size",
        ["option 'group_size' is set twice (also at plugins.training.alpha.group_size)"],
        id="and-option-twice",
    ),
    pytest.param(
        {"plugins": {"training": {"alpha": {"group_sise": 1}, "beta": {}}}},
        "plugins.training.alpha.group_sise",
        ["Did you mean 'group_size'?"],
        id="and-section-typo",
    ),
    pytest.param(
        Q(quant_type="nf4"),
        QP,
        ["plugin 'quant-loader' does not support model type 'mistral'", "supported model types: llama"],
        "mistral",
        id="unsupported-model-type",
    ),
]


def _source(config: Any, tmp_path) -> Any:
    if isinstance(config, Yaml):
        path = tmp_path / "config.yaml"
        path.write_text(config.text, encoding="utf-8")
        return path
    if isinstance(config, Missing):
        return str(tmp_path / "missing.yaml")
    return config


@pytest.mark.parametrize(
    ("config", "path", "expected", "model_type"),
    [
        pytest.param(*case.values, None, id=case.id, marks=case.marks) if len(case.values) == 3 else case
        for case in CASES
    ],
)
def test_bad_config(config, path, expected, model_type, tmp_path):
    with pytest.raises(AccelerationConfigError) as err:
        framework = AccelerationFramework(_source(config, tmp_path), registry=registry())
        assert model_type is not None, "the configuration was accepted"
        framework.check_model_type(model_type)
    message = str(err.value)
    assert err.value.path == path, message
    if path is not None:
        assert message.startswith(f"[{path}] "), message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert isinstance(err.value, ValueError)  # the package's error is a ValueError


def test_there_are_at_least_thirty_distinct_bad_configs():
    assert len({case.id for case in CASES}) == len(CASES) >= 30


def test_python_object_tag_is_never_constructed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f"plugins: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n",
        encoding="utf-8",
    )
    with pytest.raises(AccelerationConfigError, match="not valid YAML"):
        AccelerationFramework(path, registry=registry())
    assert not marker.exists()
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(path.read_text())


def test_unknown_plugin_names_are_not_imported():
    """A section naming a module is only ever data: nothing in a config is imported by name."""
    assert "this" not in sys.modules  # the stdlib's Zen module prints when imported
    fw = AccelerationFramework(
        {
            "plugins": {
                "this": {"zen": {}},
                "os": {"system": {"command": "echo hacked"}},
                "training": {"test_kernels": {}},
            }
        },
        registry=registry(),
    )
    assert fw.active_plugin_names == ("kernels",)
    assert [s.path for s in fw.passthrough] == ["plugins.os", "plugins.this"]
    assert "this" not in sys.modules


def test_framework_reads_yaml_only_with_safe_load():
    package = Path(fms_acceleration_accelerate.__file__).parent
    for source in sorted(package.glob("*.py")):
        text = source.read_text(encoding="utf-8")
        for unsafe in (
            "yaml.load(",
            "yaml.unsafe_load",
            "yaml.full_load",
            "yaml.Loader",
            "pickle.load",
            "eval(",
            "exec(",
        ):
            assert unsafe not in text, f"{source.name} uses {unsafe}"
