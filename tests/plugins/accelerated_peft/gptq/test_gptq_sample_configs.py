"""Upstream fms-acceleration's five GPTQ-LoRA sample configurations, and the GPTQ files shipped here.

Each upstream sample's plugin body (the keys and values of its ``accelerated-peft-autogptq-*-sample-configuration``
file, comments left out) goes through ``AccelerationFramework`` and ``fms-accelerate check``: the ``auto_gptq``
plugin is active, the fused-ops plugin too where the sample has its section (reading upstream's spellings), and
the padding-free plugin where the sample has its section (``training.attention.padding_free``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fms_acceleration_accelerate import AccelerationFramework, cli

ROOT = Path(__file__).resolve().parents[4]
LAUNCH_CONFIGS = ROOT / "launch_configs"

_GPTQ = """\
peft:
  quantization:
    auto_gptq:
      kernel: triton_v2
      from_quantized: true
"""
_GPTQ_EXTERNAL_FALSE = _GPTQ + "      use_external_lib: false\n"
_FOAK = """\
    fused_ops_and_kernels:
      base_layer: auto_gptq
      fused_lora: true
      fast_loss: true
      fast_rsm_layernorm: true
      fast_rope_embeddings: true
"""
_FOAK_LIGER = """\
    fused_ops_and_kernels:
      base_layer: auto_gptq
      fused_lora: true
      fast_loss: false
      fast_rsm_layernorm: true
      fast_rope_embeddings: true
      fused_linear_loss: true
"""
_PADDING_FREE = """\
training:
  attention:
    padding_free:
      method: huggingface
"""

# file name (without -sample-configuration.yaml) -> plugin body, as upstream writes it
UPSTREAM_SAMPLES = {
    "accelerated-peft-autogptq": _GPTQ,
    "accelerated-peft-autogptq-foak": _GPTQ + _FOAK,
    "accelerated-peft-autogptq-foak-liger": _GPTQ_EXTERNAL_FALSE + _FOAK_LIGER,
    "accelerated-peft-autogptq-padding-free": _PADDING_FREE + _GPTQ_EXTERNAL_FALSE,
    "accelerated-peft-autogptq-foak-padding-free": _PADDING_FREE + _GPTQ_EXTERNAL_FALSE + _FOAK,
}


def _write_sample(folder: Path, name: str) -> Path:
    path = folder / f"{name}-sample-configuration.yaml"
    body = yaml.safe_load(UPSTREAM_SAMPLES[name])
    path.write_text(yaml.safe_dump({"plugins": body}, sort_keys=False), encoding="utf-8")
    return path


def test_the_five_samples_are_distinct_and_parse():
    bodies = [yaml.safe_load(text) for text in UPSTREAM_SAMPLES.values()]
    assert len(bodies) == 5 and all(b["peft"]["quantization"]["auto_gptq"]["kernel"] == "triton_v2" for b in bodies)
    assert len({yaml.safe_dump(b, sort_keys=True) for b in bodies}) == 5


@pytest.mark.parametrize("name", sorted(UPSTREAM_SAMPLES))
def test_upstream_sample_activates_the_gptq_plugin(name, tmp_path):
    fw = AccelerationFramework(str(_write_sample(tmp_path, name)))
    with_foak = "foak" in name
    expected = ("auto_gptq", "padding_free") if "padding-free" in name else ("auto_gptq",)
    assert fw.active_plugin_names == expected + (("fused_ops_and_kernels",) if with_foak else ())
    gptq = fw.plugin("auto_gptq").config
    assert (gptq.kernel, gptq.from_quantized, gptq.use_external_lib) == ("triton_v2", True, False)
    assert fw.requires_custom_loading
    assert fw.dequant_registry.for_base_layer("auto_gptq")[0].name == "gptq"
    if with_foak:
        foak = fw.plugin("fused_ops_and_kernels").config
        assert foak.base_layer == "auto_gptq" and foak.fused_lora
        assert foak.fast_rms_layernorm and foak.fast_rope_embeddings  # fast_rsm_layernorm: upstream's spelling
        assert foak.loss_mode == ("fused_linear" if "liger" in name else "cross_entropy")
    assert fw.passthrough == ()
    if "padding-free" in name:
        assert fw.plugin("padding_free").config.method == "huggingface"


@pytest.mark.parametrize("name", sorted(UPSTREAM_SAMPLES))
def test_upstream_sample_passes_check(name, tmp_path, capsys):
    path = _write_sample(tmp_path, name)
    assert cli.main(["check", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "activate auto_gptq " in out and out.rstrip().endswith("ok: configuration is valid")
    assert ("activate fused_ops_and_kernels " in out) == ("foak" in name)
    assert ("activate padding_free " in out) == ("padding-free" in name) and "pass through" not in out


@pytest.mark.parametrize(
    ("shipped", "upstream"),
    [
        ("accelerated-peft-autogptq", "accelerated-peft-autogptq"),
        ("accelerated-peft-autogptq-foak", "accelerated-peft-autogptq-foak"),
    ],
)
def test_shipped_sample_holds_upstreams_keys_and_values(shipped, upstream):
    """The shipped acceleration-only GPTQ files have upstream's keys with upstream's values (our fused-ops
    template spells fast_rms_layernorm correctly), plus options of this project's plugins."""
    ours = yaml.safe_load((LAUNCH_CONFIGS / f"{shipped}-sample-configuration.yaml").read_text(encoding="utf-8"))
    theirs = yaml.safe_load(UPSTREAM_SAMPLES[upstream])

    def check(mine: dict, want: dict, where: str) -> None:
        for key, value in want.items():
            key_here = "fast_rms_layernorm" if key == "fast_rsm_layernorm" else key
            assert key_here in mine, f"{where}.{key_here} missing"
            if isinstance(value, dict):
                check(mine[key_here], value, f"{where}.{key_here}")
            else:
                assert mine[key_here] == value, f"{where}.{key_here}"

    check(ours["plugins"], theirs, "plugins")


@pytest.mark.parametrize(
    "name",
    [
        "accelerated-peft-autogptq-sample-configuration.yaml",
        "accelerated-peft-autogptq-foak-sample-configuration.yaml",
        "accelerate-single-gpu-gptq-lora.yaml",
        "accelerate-single-gpu-gptq-lora-foak.yaml",
        "accelerate-fsdp2-gptq-lora-foak.yaml",
        "accelerate-cpu-gptq-lora-foak.yaml",
    ],
)
def test_shipped_gptq_configs_activate_the_gptq_plugin(name):
    fw = AccelerationFramework(str(LAUNCH_CONFIGS / name))
    assert fw.active_plugin_names[0] == "auto_gptq" and fw.passthrough == ()
    assert "bitsandbytes" not in fw.active_plugin_names
    if "foak" in name:
        foak = fw.plugin("fused_ops_and_kernels").config
        assert foak.base_layer == "auto_gptq" and foak.fused_lora and foak.fused_dequant
        assert fw.dequant_registry.for_base_layer("auto_gptq")[0].name == "gptq"
