"""Bad configurations: each raises AccelerationConfigError naming the key path and how to fix it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import fms_acceleration_accelerate
from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework, cli

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


# ----------------------------------------------------------------------------------------------------------
# Hostile and careless input files, against the installed plugins: each one through the framework API and
# through `fms-accelerate check` (in process); a few through AccelerationKwargs, a real subprocess, and stock
# `accelerate launch` (tests/integration/test_launch.py).

MAX_MESSAGE = 4096

QLORA = "acceleration:\n  peft:\n    quantization:\n      bitsandbytes: {quant_type: nf4}\n"
KERNELS = "acceleration:\n  training:\n    fused_ops_and_kernels: {fast_loss: true}\n"
ACCEL = "distributed_type: 'NO'\nnum_processes: 1\n"
P_BNB = "plugins.peft.quantization.bitsandbytes"
P_FOAK = "plugins.peft.quantization.fused_ops_and_kernels"
P_FOAK_T = "plugins.training.fused_ops_and_kernels"


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"plugins:\n  training:\n    fused_ops_and_kernels: {{fast_loss: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


def _nested(depth: int) -> str:
    return "plugins:\n  vendor: " + "{a: " * depth + "1" + "}" * depth + "\n"


# (file content, substrings the message must hold: the first is the key path or the file's problem)
HOSTILE = [
    # -- the Accelerate part, checked with Accelerate's own config classes
    pytest.param(
        "distributed_type: FSPD\n" + KERNELS,
        ["[distributed_type] invalid distributed_type 'FSPD'. Did you mean 'FSDP'?", "valid values: NO, MULTI_CPU"],
        id="distributed-type-typo",
    ),
    pytest.param("distributed_type: fsdp\n" + KERNELS, ["[distributed_type]", "Did you mean 'FSDP'?"], id="enum-case"),
    pytest.param(
        ACCEL + "compute_environment: LOCAL\n" + KERNELS,
        ["[compute_environment] invalid compute environment 'LOCAL'", "LOCAL_MACHINE"],
        id="compute-environment",
    ),
    pytest.param(
        ACCEL + "mixed_precision: no\n" + KERNELS,
        ["[mixed_precision] invalid mixed_precision False", "unquoted no", "'bf16'"],
        id="unquoted-no",
    ),
    pytest.param(ACCEL + "mixed_precision: bf17\n" + KERNELS, ["[mixed_precision]", "Did you mean 'bf16'?"], id="bf17"),
    pytest.param(
        "distributed_type: MULTI_GPU\nnum_processes: '2'\n" + KERNELS,
        ["[num_processes] expected an integer, got '2'"],
        id="num-processes-string",
    ),
    pytest.param(
        "distributed_type: MULTI_GPU\nnum_processes: -3\n" + KERNELS,
        ["[num_processes] must be at least 1"],
        id="negative",
    ),
    pytest.param(
        ACCEL + "num_machines: 2\nmachine_rank: 2\n" + KERNELS, ["[machine_rank] must be between 0"], id="machine-rank"
    ),
    pytest.param(ACCEL + "main_process_port: 70000\n" + KERNELS, ["[main_process_port] is not a TCP port"], id="port"),
    pytest.param(
        "distributed_type: FSDP\nfsdp_config: [fsdp_version, 2]\n" + KERNELS,
        ["[fsdp_config] must be a mapping, got list"],
        id="fsdp-config-list",
    ),
    pytest.param(
        "distributed_type: FSDP\nfsdp_config: {fsdp_verison: 2}\n" + KERNELS,
        ["[fsdp_config.fsdp_verison] unknown key 'fsdp_verison'", "Did you mean 'fsdp_version'?"],
        id="fsdp-key-typo",
    ),
    pytest.param(
        "distributed_type: FSDP\nfsdp_config: {fsdp_version: 3}\n" + KERNELS,
        ["[fsdp_config.fsdp_version] invalid fsdp_version 3", "1, 2"],
        id="fsdp-version",
    ),
    pytest.param(
        "distributed_type: FSDP\nfsdp_config: {fsdp_cpu_ram_efficient_loading: true, fsdp_sync_module_states: false}\n"
        + KERNELS,
        ["[fsdp_config.fsdp_sync_module_states]", "fsdp_cpu_ram_efficient_loading needs fsdp_sync_module_states"],
        id="fsdp-option-pair",
    ),
    pytest.param(
        ACCEL + "use_cpu: 'false'\n" + KERNELS, ["[use_cpu] expected true or false, got 'false'"], id="bool-str"
    ),
    pytest.param(ACCEL + "gpu_ids: 0\n" + KERNELS, ["[gpu_ids] expected a string, got int", "quote"], id="gpu-ids"),
    pytest.param(
        "distributed_typ: 'NO'\n" + KERNELS,
        ["[distributed_typ] unknown top-level key 'distributed_typ'", "Did you mean 'distributed_type'?"],
        id="accelerate-key-typo",
    ),
    pytest.param(
        "num_processes: 1\n" + KERNELS, ["[distributed_type] Accelerate needs a 'distributed_type'"], id="no-type"
    ),
    pytest.param(
        "compute_environment: AMAZON_SAGEMAKER\ndistributed_type: DATA_PARALLEL\n" + KERNELS,
        ["Accelerate refuses the settings", "ec2_instance_type"],
        id="sagemaker-incomplete",
    ),
    # -- top-level keys
    pytest.param(
        ACCEL + KERNELS.replace("acceleration:", "acceleraton:"),
        ["[acceleraton] unknown top-level key 'acceleraton'", "Did you mean 'acceleration'?"],
        id="acceleraton",
    ),
    pytest.param(
        "pluginss:\n  training: {}\n", ["[pluginss] unknown top-level key", "Did you mean 'plugins'?"], id="pluginss"
    ),
    pytest.param(
        "plugins:\n  training:\n    fused_ops_and_kernels: {fast_loss: true}\nversion: 2\n",
        ["[version] unknown top-level key 'version'"],
        id="extra-top-level-key",
    ),
    pytest.param(
        ACCEL + KERNELS.replace("acceleration:", "plugins:"),
        ["[plugins] ", "is an Accelerate config", "rename 'plugins:' to 'acceleration:'"],
        id="plugins-in-accelerate-config",
    ),
    pytest.param("1: x\nplugins: {}\n", ["top-level keys must be strings, got 1"], id="int-top-level-key"),
    pytest.param("- plugins\n- acceleration\n", ["must hold a mapping at the top level, got list"], id="top-list"),
    pytest.param("just a string\n", ["must hold a mapping at the top level, got str"], id="top-string"),
    # -- empty bodies and nothing activated: the original framework's message
    pytest.param(
        "plugins: null\n", ["No plugins could be configured", "'plugins:'", "is empty (null)"], id="plugins-null"
    ),
    pytest.param("plugins: {}\n", ["No plugins could be configured", "is empty ({})"], id="plugins-empty"),
    pytest.param(
        ACCEL + "acceleration: {}\n", ["No plugins could be configured", "'acceleration:'"], id="section-empty"
    ),
    pytest.param(ACCEL + "acceleration:\n", ["No plugins could be configured", "'acceleration:'"], id="section-null"),
    pytest.param(
        ACCEL + "acceleration: {plugins: null}\n",
        ["No plugins could be configured", "acceleration.plugins"],
        id="inner",
    ),
    pytest.param("{}\n", ["No plugins could be configured", "is empty"], id="empty-mapping"),
    pytest.param("", ["No plugins could be configured", "is empty"], id="empty-file"),
    pytest.param("# only a comment\n", ["No plugins could be configured"], id="comment-only"),
    pytest.param(
        "plugins:\n  training:\n    odm: {update_interval: 1}\n",
        [
            "No plugins could be configured",
            "plugins.training.odm.update_interval (no installed plugin registers this section)",
        ],
        id="passthrough-only-misplaced-odm-key",
    ),
    pytest.param(
        "plugins:\n  vendor:\n    turbo: {speed: 11}\n",
        ["No plugins could be configured", "plugins.vendor (no installed plugin registers this section)"],
        id="passthrough-only-unknown",
    ),
    pytest.param("plugins:\n  peft:\n", ["[plugins.peft] is empty", "quantization"], id="prefix-null"),
    pytest.param(
        "plugins:\n  peft: 5\n", ["[plugins.peft] must be a mapping of plugin sections, got 5"], id="prefix-int"
    ),
    pytest.param(ACCEL + "acceleration: [peft, training]\n", ["[acceleration] must be a mapping"], id="section-list"),
    pytest.param(
        ACCEL + "acceleration: 5\n", ["[acceleration] must be a mapping of plugin sections, got int"], id="int"
    ),
    pytest.param(ACCEL + "acceleration: ''\n", ["[acceleration] is an empty string"], id="section-empty-string"),
    pytest.param(
        ACCEL + "acceleration: no_such_dir/accel.yaml\n",
        ["no_such_dir/accel.yaml", "does not exist"],
        id="section-path-missing",
    ),
    # -- plugin options
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes: [nf4]\n",
        [f"[{P_BNB}] must be a mapping of options, got list"],
        id="plugin-section-list",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes: {quant_type: nf5}\n",
        [f"[{P_BNB}.quant_type] invalid value 'nf5'. Did you mean 'nf4'?", "valid values: 'nf4', 'fp4'"],
        id="enum-value",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes: {quant_typ: nf4}\n",
        [f"[{P_BNB}.quant_typ] unknown key 'quant_typ'. Did you mean 'quant_type'?", "valid keys here:"],
        id="plugin-key-typo",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes: {no_peft_model: 'yes'}\n",
        [f"[{P_BNB}.no_peft_model] expected true or false, got 'yes'"],
        id="plugin-bool-string",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes:\n        bnb_4bit_compute_dtype: float16\n"
        "        bnb_4bit_quant_storage: bfloat16\n",
        [f"[{P_BNB}]", "mixes two 16-bit training dtypes"],
        id="plugin-cross-field",
    ),
    pytest.param(
        "plugins:\n  training:\n    fused_ops_and_kernels: {fast_loss: false}\n",
        [f"[{P_FOAK_T}] no kernel is enabled"],
        id="nothing-enabled",
    ),
    pytest.param(
        "plugins:\n  training:\n    fused_ops_and_kernels: {fast_rope_embedings: true}\n",
        [f"[{P_FOAK_T}.fast_rope_embedings]", "Did you mean 'fast_rope_embeddings'?"],
        id="foak-key-typo",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      fused_ops_and_kernels: {fused_lora: true, base_layer: gptq}\n",
        [f"[{P_FOAK}.base_layer] invalid value 'gptq'"],
        id="foak-base-layer-value",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      fused_ops_and_kernels: {fused_lora: true, base_layer: auto_gptq}\n",
        [f"[{P_FOAK}.base_layer] base_layer: auto_gptq needs a GPTQ dequant backend"],
        id="foak-gptq-without-gptq-plugin",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes: {quant_type: nf4}\n"
        "      fused_ops_and_kernels: {fused_lora: true}\n",
        [f"[{P_FOAK}.base_layer] fused_lora over the 4-bit layers that plugin 'bitsandbytes' loads needs base_layer"],
        id="foak-qlora-without-base-layer",
    ),
    pytest.param(
        "plugins:\n  training:\n    fused_ops_and_kernels: {fused_lora: true, checkpoint_keep_attention: true}\n",
        [f"[{P_FOAK_T}] checkpoint_keep_attention cannot be combined with fused_lora"],
        id="foak-cross-field",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes: {quant_type: nf5, colour: red}\n  trainng:\n"
        "    fused_ops_and_kernels: {fast_loss: true}\n",
        [
            "[plugins.trainng] unknown section 'trainng'. Did you mean 'training'?",
            f"[{P_BNB}.quant_type] invalid value 'nf5'",
            f"[{P_BNB}.colour] unknown key 'colour'",
            "(3 problems)",
        ],
        id="several-problems-at-once",
    ),
    pytest.param(
        "distributed_type: FSPD\nacceleraton: {}\nfsdp_config: {fsdp_verison: 2}\n",
        ["[acceleraton]", "Did you mean 'acceleration'?"],
        id="typo-with-accelerate-problems",
    ),
    # -- the file itself
    pytest.param(
        "plugins:\n  training: {fused_ops_and_kernels: {fast_loss: true}\n", ["is not valid YAML"], id="syntax"
    ),
    pytest.param("plugins:\n\ttraining: {}\n", ["is not valid YAML", "cannot start any token"], id="tab-indent"),
    pytest.param(
        "plugins:\n  training:\n    fused_ops_and_kernels: {fast_loss: true}\n  training: {}\n",
        ["[plugins.training] key 'training' is given twice in one mapping (line 4", "keep one"],
        id="duplicate-key",
    ),
    pytest.param("plugins: {}\n---\nplugins: {}\n", ["is not valid YAML", "expected a single document"], id="two-docs"),
    pytest.param(
        b"plugins:\n  training: {fused_ops_and_kernels: {fast_loss: \xff\xfe}}\n", ["is not UTF-8"], id="latin1"
    ),
    pytest.param(_alias_bomb(), ["holds more than 20000 values", "YAML alias"], id="billion-laughs"),
    pytest.param(_nested(40), ["nests mappings or lists more than 32 levels deep"], id="deep-40"),
    pytest.param(_nested(3000), ["nested too deeply to read"], id="deep-3000"),
    pytest.param(
        "plugins:\n  training:\n    fused_ops_and_kernels: {fast_loss: '" + "x" * 1_000_000 + "'}\n",
        [f"[{P_FOAK_T}.fast_loss] invalid value 'xxxx", "xxx...xxx"],
        id="huge-value",
    ),
    pytest.param(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes:\n        ? " + "k" * 200_000 + "\n        : 1\n",
        ["unknown key 'kkkk", "valid keys here"],
        id="huge-key",
    ),
]


class _Hostile:
    """The path of a bad input (a file written from ``content``, or a special path)."""

    @staticmethod
    def write(content: str | bytes, tmp_path: Path) -> Path:
        path = tmp_path / "config.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a model (every bad input must be refused before)."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad configuration")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def _assert_good_message(message: str, expected: list[str]) -> None:
    assert len(message) <= MAX_MESSAGE, f"message of {len(message)} characters"
    assert "Traceback" not in message
    for text in expected:
        assert text in message, f"{text!r} not in {message[:3000]!r}"


@pytest.mark.parametrize(("content", "expected"), HOSTILE)
def test_hostile_file_through_framework_and_check(content, expected, tmp_path, capsys, no_model_loads):
    path = _Hostile.write(content, tmp_path)
    with pytest.raises(AccelerationConfigError) as err:
        AccelerationFramework(path)
    (message,) = err.value.args  # one argument: the message (clients unpack it)
    _assert_good_message(message, expected)
    assert cli.main(["check", str(path)]) == 2
    out, stderr = capsys.readouterr()
    assert "ok:" not in out
    assert stderr.startswith("error: ")
    _assert_good_message(stderr[len("error: ") :], expected)


def test_the_battery_is_large_and_distinct():
    ids = [case.id for case in HOSTILE]
    assert len(set(ids)) == len(ids) >= 60


@pytest.mark.parametrize(
    ("make_path", "expected"),
    [
        pytest.param(lambda tmp: tmp, ["is a directory", "not of a folder"], id="directory"),
        pytest.param(lambda tmp: tmp / "missing.yaml", ["does not exist", "missing.yaml"], id="missing"),
        pytest.param(lambda tmp: tmp / "sub", ["is a directory"], id="section-redirect-to-directory"),
    ],
)
def test_bad_paths(make_path, expected, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    path = make_path(tmp_path)
    if path.name == "sub":  # an Accelerate config whose section names a folder
        path = _Hostile.write(ACCEL + "acceleration: sub\n", tmp_path)
    with pytest.raises(AccelerationConfigError) as err:
        AccelerationFramework(path)
    _assert_good_message(str(err.value), expected)
    assert cli.main(["check", str(path)]) == 2
    _assert_good_message(capsys.readouterr().err, expected)


def test_section_naming_an_accelerate_config_is_refused(tmp_path):
    (tmp_path / "other.yaml").write_text(ACCEL + KERNELS, encoding="utf-8")
    path = _Hostile.write(ACCEL + "acceleration: other.yaml\n", tmp_path)
    with pytest.raises(AccelerationConfigError, match="is an Accelerate config itself") as err:
        AccelerationFramework(path)
    assert err.value.path == "acceleration"


def test_alias_bomb_is_refused_quickly_and_its_message_is_small(tmp_path):
    """A 10-level alias bomb (10**10 values once expanded) is refused in well under a second."""
    import time

    path = _Hostile.write(_alias_bomb(10), tmp_path)
    start = time.perf_counter()
    with pytest.raises(AccelerationConfigError) as err:
        AccelerationFramework(path)
    assert time.perf_counter() - start < 5
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf")],
    ids=["nan", "inf"],
)
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(AccelerationConfigError, match="expected a finite number") as err:
        AccelerationFramework(K(scale=value), registry=registry())
    assert err.value.path == f"{KP}.scale"


def test_every_problem_of_a_file_is_reported_with_its_path():
    bad = {
        "plugins": {
            "training": {"test_kernels": {"fast_loss": "yes", "colour": 1, "layers": ["a", 2, 3]}},
            "trainng": {},
            "peft": {"quantization": {"testquant": {"quant_type": "nf5"}}},
        }
    }
    with pytest.raises(AccelerationConfigError) as err:
        AccelerationFramework(bad, registry=registry())
    assert sorted(p.path for p in err.value.problems) == [
        "plugins.peft.quantization.testquant.quant_type",
        "plugins.training.test_kernels.colour",
        "plugins.training.test_kernels.fast_loss",
        "plugins.training.test_kernels.layers[1]",
        "plugins.training.test_kernels.layers[2]",
        "plugins.trainng",
    ]
    message = str(err.value)
    assert message.splitlines()[0] == f"[{err.value.path}] {err.value.problem}"  # the first line says what is wrong
    assert message.endswith("(6 problems)")
    for problem in err.value.problems:
        assert f"[{problem.path}] {problem.problem}\n  fix: {problem.fix}" in message


def test_many_problems_stay_within_the_message_bound():
    bad = {"plugins": {"training": {"test_kernels": {f"unknown_{i}_{'x' * 50}": i for i in range(200)}}}}
    with pytest.raises(AccelerationConfigError) as err:
        AccelerationFramework(bad, registry=registry())
    message = str(err.value)
    assert err.value.count == 200
    assert len(message) <= MAX_MESSAGE
    assert "(200 problems;" in message and "more not shown" in message


def test_errors_survive_pickling_with_all_problems():
    """Errors cross process boundaries (multiprocessing, torch elastic): all problems and the class stay."""
    import pickle

    from fms_acceleration_accelerate.errors import NoPluginsConfiguredError

    with pytest.raises(AccelerationConfigError) as err:
        AccelerationFramework({"plugins": {"training": {"test_kernels": {"a": 1, "b": 2}}}}, registry=registry())
    copy = pickle.loads(pickle.dumps(err.value))
    assert copy.args == err.value.args and copy.problems == err.value.problems
    with pytest.raises(NoPluginsConfiguredError) as none:
        AccelerationFramework({}, registry=registry())
    copy = pickle.loads(pickle.dumps(none.value))
    assert type(copy) is NoPluginsConfiguredError and copy.args == none.value.args


def test_quote_bounds_every_value():
    from fms_acceleration_accelerate.errors import MAX_QUOTED, quote

    nested: list = [1]
    for _ in range(50):
        nested = [nested] * 9  # shared: 9**50 leaves once expanded
    assert len(quote(nested)) <= MAX_QUOTED
    assert len(quote("y" * 10**6)) <= MAX_QUOTED
    assert quote({"a": 1}) == "{'a': 1}"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("distributed_type: FSPD\n" + KERNELS, id="accelerate-setting"),
        pytest.param("plugins: null\n", id="empty"),
        pytest.param("plugins:\n  peft:\n    quantization:\n      bitsandbytes: {quant_type: nf5}\n", id="option"),
    ],
)
def test_acceleration_kwargs_refuse_bad_configs_before_any_model(text, tmp_path, no_model_loads):
    from accelerate import Accelerator

    from fms_acceleration_accelerate import accelerate_integration as ai

    path = _Hostile.write(text, tmp_path)
    was = ai.is_installed()
    try:
        with pytest.raises(AccelerationConfigError) as err:
            Accelerator(cpu=True, kwargs_handlers=[ai.AccelerationKwargs(config=str(path))])
        assert len(str(err.value)) <= MAX_MESSAGE
        with pytest.raises(AccelerationConfigError):
            ai.AccelerationKwargs(config=str(path)).build_framework()
    finally:
        if not was:
            ai.uninstall()


def test_check_subprocess_reports_every_problem_without_traceback(tmp_path):
    """The real console script: exit status 2, all problems, no traceback."""
    from .test_cli import run_cli

    path = _Hostile.write(
        "distributed_type: FSPD\nmixed_precision: no\nacceleration:\n  peft:\n    quantization:\n"
        "      bitsandbytes: {quant_type: nf5}\n",
        tmp_path,
    )
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout and "ok:" not in result.stdout
    for text in (
        "[distributed_type] invalid distributed_type 'FSPD'. Did you mean 'FSDP'?",
        "[mixed_precision] invalid mixed_precision False",
        "[acceleration.peft.quantization.bitsandbytes.quant_type] invalid value 'nf5'",
        "(3 problems)",
    ):
        assert text in result.stderr


def test_fused_kernels_over_another_loaders_format_are_refused_at_config_time(no_model_loads):
    """base_layer: bitsandbytes while a plugin that loads no bitsandbytes layers loads the model: refused before
    anything is loaded (the kernels would find no 4-bit layer after loading)."""
    from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin

    from fms_acceleration_accelerate import PluginRegistry

    from .helpers import QuantLoader

    config = {
        "peft": {
            "quantization": {
                "testquant": {},
                "fused_ops_and_kernels": {"base_layer": "bitsandbytes", "fused_lora": True},
            }
        }
    }
    with pytest.raises(AccelerationConfigError) as err:
        AccelerationFramework(config, registry=PluginRegistry([QuantLoader, FusedOpsAndKernelsPlugin]))
    assert err.value.path == "peft.quantization.fused_ops_and_kernels.base_layer"
    assert "the model is loaded by plugin 'quant-loader', which loads no bitsandbytes 4-bit layers" in str(err.value)


def test_known_accelerate_keys_follow_accelerates_config_classes():
    """The top-level keys used to tell an Accelerate config apart (without importing Accelerate) are exactly
    the fields of Accelerate's config classes plus the legacy keys its process_config converts."""
    import dataclasses

    from accelerate.commands.config.config_args import ClusterConfig, SageMakerConfig

    from fms_acceleration_accelerate.config import accelerate_setting_names

    fields = {f.name for cls in (ClusterConfig, SageMakerConfig) for f in dataclasses.fields(cls)}
    assert accelerate_setting_names() == fields | {"fp16", "dynamo_backend"}
