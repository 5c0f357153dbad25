"""Upstream fms-acceleration's sample configurations that use padding-free and / or multipack.

Each upstream sample's plugin body (the keys and values of its ``*-sample-configuration.yaml`` file, comments left
out) goes through ``AccelerationFramework`` and ``fms-accelerate check``: the padding-free plugin is active in every
one, the multipack plugin where the sample has ``training.dataloader.multipack``, and the loading / kernel plugins
where the sample has their sections (reading upstream's spellings). The ScatterMoE samples' MoE section activates
the plugin installed for it, or, where none is, is passed through with its message next to the active padding-free
plugin. The shipped files of upstream's multipack names activate the same plugins.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fms_acceleration_accelerate import AccelerationFramework, cli
from fms_acceleration_accelerate.registry import PluginRegistry

ROOT = Path(__file__).resolve().parents[3]
LAUNCH_CONFIGS = ROOT / "launch_configs"

_PADDING_FREE = """\
training:
  attention:
    padding_free:
      method: huggingface
"""
# upstream's multipack stanza, as its generated samples wrote it over time
_MULTIPACK_NUM_WORKERS = """\
  dataloader:
    multipack:
      num_workers: 16
"""
_MULTIPACK_NUM_PROCESSES = """\
  dataloader:
    multipack:
      num_processes: 16
"""
_MULTIPACK_FIRST_TEMPLATE = """\
  dataloader:
    multipack:
      max_number_tokens: 60000
      pad_token_id: null
"""
_FAST_KERNELS = """\
  fused_ops_and_kernels:
    fast_loss: true
    fast_rms_layernorm: true
    fast_rope_embeddings: true
"""
_BNB = """\
peft:
  quantization:
    bitsandbytes:
      quant_type: nf4
      no_peft_model: false
"""
_BNB_FOAK = """\
    fused_ops_and_kernels:
      base_layer: bitsandbytes
      fused_lora: true
      fast_loss: true
      fast_rsm_layernorm: true
      fast_rope_embeddings: true
"""
_GPTQ = """\
peft:
  quantization:
    auto_gptq:
      kernel: triton_v2
      from_quantized: true
      use_external_lib: false
"""
_GPTQ_FOAK = _BNB_FOAK.replace("base_layer: bitsandbytes", "base_layer: auto_gptq")


def _scattermoe(ep_degree: int) -> str:
    return f"  moe:\n    scattermoe:\n      ep_degree: {ep_degree}\n"


# sample name (file name without -sample-configuration.yaml; a suffix after '@' tells versions apart) -> body
UPSTREAM_SAMPLES = {
    "aadp-padding-free": _PADDING_FREE,
    "aadp-padding-free-multipack": _PADDING_FREE + _MULTIPACK_NUM_WORKERS,
    "aadp-padding-free-multipack@num_processes": _PADDING_FREE + _MULTIPACK_NUM_PROCESSES,
    "aadp-padding-free-multipack@first-template": _PADDING_FREE + _MULTIPACK_FIRST_TEMPLATE,
    "aadp-padding-free-multipack-foak": _PADDING_FREE + _MULTIPACK_NUM_PROCESSES + _FAST_KERNELS,
    "accelerated-peft-bnb-nf4-padding-free": _PADDING_FREE + _BNB,
    "accelerated-peft-bnb-nf4-foak-padding-free": _PADDING_FREE + _BNB + _BNB_FOAK,
    "accelerated-peft-autogptq-padding-free": _PADDING_FREE + _GPTQ,
    "accelerated-peft-autogptq-foak-padding-free": _PADDING_FREE + _GPTQ + _GPTQ_FOAK,
    **{f"moe-scattermoe-granite-ep{n}-padding-free": _PADDING_FREE + _scattermoe(n) for n in (1, 2, 4, 8)},
    "moe-scattermoe-granite-ep8-padding-free-foak": _PADDING_FREE + _FAST_KERNELS + _scattermoe(8),
}


SCATTERMOE = "training.moe.scattermoe"
_MOE_ENTRY = PluginRegistry.discover().paths.get(SCATTERMOE)
MOE_PLUGIN = _MOE_ENTRY.name if _MOE_ENTRY is not None else None
"""The installed plugin of upstream's ScatterMoE section, if any."""


def _expected_plugins(name: str) -> set[str]:
    expected = {"padding_free"}
    if "scattermoe" in name and MOE_PLUGIN is not None:
        expected.add(MOE_PLUGIN)
    if "multipack" in name:
        expected.add("multipack")
    if "bnb" in name:
        expected.add("bitsandbytes")
    if "autogptq" in name:
        expected.add("auto_gptq")
    if "foak" in name:
        expected.add("fused_ops_and_kernels")
    return expected


def _write_sample(folder: Path, name: str) -> Path:
    path = folder / f"{name.split('@')[0]}-sample-configuration.yaml"
    body = yaml.safe_load(UPSTREAM_SAMPLES[name])
    path.write_text(yaml.safe_dump({"plugins": body}, sort_keys=False), encoding="utf-8")
    return path


def test_the_samples_are_distinct_and_all_ask_for_padding_free():
    bodies = [yaml.safe_load(text) for text in UPSTREAM_SAMPLES.values()]
    assert len({yaml.safe_dump(b, sort_keys=True) for b in bodies}) == len(bodies) == 14
    assert all(b["training"]["attention"]["padding_free"] == {"method": "huggingface"} for b in bodies)
    assert sum("dataloader" in b["training"] for b in bodies) == 4


@pytest.mark.parametrize("name", sorted(UPSTREAM_SAMPLES))
def test_upstream_sample_activates_the_plugins(name, tmp_path):
    if "bnb" in name:
        pytest.importorskip("bitsandbytes")
    framework = AccelerationFramework(str(_write_sample(tmp_path, name)))
    assert set(framework.active_plugin_names) == _expected_plugins(name)
    assert framework.plugin("padding_free").config.method == "huggingface"
    if "multipack" in name:
        multipack = framework.plugin("multipack").config
        assert multipack.length_processes == 16 and multipack.pad_token_id is None
        assert multipack.max_number_tokens == (60000 if name.endswith("@first-template") else None)
    if "foak" in name:
        foak = framework.plugin("fused_ops_and_kernels").config
        assert foak.fast_rms_layernorm and foak.fast_rope_embeddings  # fast_rsm_layernorm: upstream's spelling
        assert foak.loss_mode == "cross_entropy"
        assert foak.fused_lora == ("peft" in name)
    passed = {section.path: section.reason for section in framework.passthrough}
    if "scattermoe" in name and MOE_PLUGIN is None:
        assert set(passed) == {f"plugins.{SCATTERMOE}"}, passed
        assert "no plugin in this release" in passed[f"plugins.{SCATTERMOE}"]
    else:
        assert passed == {}
    framework.revert()


@pytest.mark.parametrize("name", sorted(UPSTREAM_SAMPLES))
def test_upstream_sample_passes_check(name, tmp_path, capsys):
    if "bnb" in name:
        pytest.importorskip("bitsandbytes")
    path = _write_sample(tmp_path, name)
    assert cli.main(["check", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok: configuration is valid")
    plugins = ("padding_free", "multipack", "bitsandbytes", "auto_gptq", "fused_ops_and_kernels", MOE_PLUGIN)
    for plugin in filter(None, plugins):
        assert (f"activate {plugin} " in out) == (plugin in _expected_plugins(name)), plugin
    assert (f"pass through plugins.{SCATTERMOE}" in out) == ("scattermoe" in name and MOE_PLUGIN is None)


@pytest.mark.parametrize("name", ["aadp-padding-free-multipack", "aadp-padding-free-multipack-foak"])
def test_shipped_multipack_samples_hold_upstreams_keys_and_activate_the_same_plugins(name):
    """The shipped files of upstream's multipack names: upstream's keys with upstream's values (fms-hf-tuning's
    ``num_processes``, the name the newer samples use), plus options of this project's plugins."""
    ours = yaml.safe_load((LAUNCH_CONFIGS / f"{name}-sample-configuration.yaml").read_text(encoding="utf-8"))
    theirs = yaml.safe_load(UPSTREAM_SAMPLES[name])
    theirs["training"]["dataloader"]["multipack"] = {"num_processes": 16}

    def check(mine: dict, want: dict, where: str) -> None:
        for key, value in want.items():
            assert key in mine, f"{where}.{key} missing"
            if isinstance(value, dict):
                check(mine[key], value, f"{where}.{key}")
            else:
                assert mine[key] == value, f"{where}.{key}"

    check(ours["plugins"], theirs, "plugins")
    framework = AccelerationFramework(str(LAUNCH_CONFIGS / f"{name}-sample-configuration.yaml"))
    assert set(framework.active_plugin_names) == _expected_plugins(name) and framework.passthrough == ()
    framework.revert()
