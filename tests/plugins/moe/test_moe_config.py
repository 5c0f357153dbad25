"""Options of the MoE plugin and bad input: clear errors naming the key path and the fix, before any model is
loaded (architecture, run settings), or at patch time for what only the model tells (its expert count)."""

from __future__ import annotations

import pytest
import yaml

from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import AccelerationFramework

from .moe_helpers import load, make_framework

PATH = "training.moe.scattermoe"


def _plugin(section=None):
    return make_framework(section).plugins[0]


def test_discovered_through_its_entry_point():
    framework = AccelerationFramework({"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": 1}}}}})
    assert framework.active_plugin_names == ("scattermoe",)
    assert not framework.passthrough


def test_the_shipped_config_activates_the_plugin():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[3] / "plugins" / "accelerated-moe" / "configs" / "scattermoe.yaml"
    framework = AccelerationFramework(str(shipped))
    assert framework.active_plugin_names == ("scattermoe",)
    plugin = framework.plugins[0]
    assert plugin.config.ep_degree == 1 and plugin.config.routing_stats
    assert any("moe_experts" in line for line in plugin.describe())


def test_defaults_and_upstreams_empty_section():
    for section in (None, {}, {"ep_degree": 1}):
        body = {"training": {"moe": {"scattermoe": section}}}
        from fms_acceleration_accelerate_moe import ScatterMoEPlugin

        from fms_acceleration_accelerate.registry import PluginRegistry

        plugin = AccelerationFramework(body, registry=PluginRegistry([ScatterMoEPlugin])).plugins[0]
        assert (plugin.config.ep_degree, plugin.config.disable_distributed) == (1, False)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"ep_degree": 0}, (1, True)),  # upstream: experts not sharded
        ({"ep_degree": True}, (1, True)),  # fms-hf-tuning's flag form
        ({"ep_degree": False}, (1, False)),
        ({"ep_degree": 0, "disable_distributed": True}, (1, True)),
        ({"ep_degree": 1, "disable_distributed": True}, (1, True)),
    ],
)
def test_upstream_and_fms_hf_tuning_spellings(section, expected):
    config = _plugin(section).config
    assert (config.ep_degree, config.disable_distributed) == expected


def _error(section) -> AccelerationConfigError:
    with pytest.raises(AccelerationConfigError) as excinfo:
        make_framework(section)
    return excinfo.value


@pytest.mark.parametrize(
    ("section", "path", "words"),
    [
        ({"ep_degre": 2}, f"{PATH}.ep_degre", ["unknown key", "Did you mean 'ep_degree'"]),
        ({"ep_degree": -2}, f"{PATH}", ["ep_degree must be a positive integer", "fix:"]),
        ({"ep_degree": "two"}, f"{PATH}.ep_degree", ["expected an integer"]),
        ({"ep_degree": 2, "disable_distributed": True}, f"{PATH}", ["contradicts ep_degree: 2"]),
        ({"ep_degree": 0, "disable_distributed": False}, f"{PATH}.ep_degree", ["means disable_distributed"]),
        ({"routing_stats": "yes"}, f"{PATH}.routing_stats", ["expected true or false"]),
    ],
)
def test_bad_options(section, path, words):
    error = _error(section)
    assert error.path == path, str(error)
    for word in words:
        assert word in str(error)


@pytest.mark.parametrize(
    ("model_type", "words"),
    [
        ("llama", ["'llama' is a dense architecture", "mixtral, granitemoe"]),
        ("opt", ["'opt' is not in the spec table", "add a MoESpec"]),
        (None, ["None is not in the spec table"]),
    ],
)
def test_architectures_without_a_moe_spec_are_refused_before_loading(model_type, words):
    framework = make_framework()
    with pytest.raises(AccelerationConfigError) as excinfo:
        framework.check_model_type(model_type)
    assert excinfo.value.path == f"{PATH}"
    for word in words:
        assert word in str(excinfo.value)
    for ok in ("mixtral", "granitemoe", "qwen2_moe", "qwen3_moe", "olmoe"):
        framework.check_model_type(ok)


@pytest.mark.parametrize(
    ("ep_degree", "context", "words"),
    [
        (3, RunContext(world_size=4), ["ep_degree 3 does not divide the world size 4", "1, 2, 4"]),
        (2, RunContext(world_size=4, fsdp_version=1, distributed_type="FSDP"), ["not supported with FSDP1"]),
        (2, RunContext(world_size=4, distributed_type="DEEPSPEED"), ["not supported with DeepSpeed"]),
    ],
)
def test_expert_parallel_run_settings(ep_degree, context, words):
    plugin = _plugin({"ep_degree": ep_degree})
    with pytest.raises(AccelerationConfigError) as excinfo:
        plugin.check_run_settings(context)
    assert excinfo.value.path == f"{PATH}.ep_degree"
    for word in words:
        assert word in str(excinfo.value)


def test_no_expert_parallelism_accepts_any_run():
    plugin = _plugin({"ep_degree": 1})
    for context in (RunContext(world_size=3), RunContext(world_size=2, fsdp_version=1, distributed_type="FSDP")):
        plugin.check_run_settings(context)


def test_ep_degree_must_divide_the_expert_count(saved_models, reference_kernels):
    model = load(saved_models("mixtral"))  # 4 experts
    plugin = _plugin({"ep_degree": 3})
    with pytest.raises(AccelerationConfigError, match=r"ep_degree 3 does not divide the 4 experts .*num_local_experts"):
        plugin.patch_model(model, RunContext(world_size=3))
    assert model.config._experts_implementation == "grouped_mm"  # nothing patched
    assert len(plugin.patches.records) == 0


def test_check_run_settings_runs_when_the_accelerator_is_created(monkeypatch):
    """Through Accelerate (the section in the accelerate config): a degree that does not fit is refused when
    the Accelerator is created, before the script loads a model."""
    from accelerate import Accelerator

    from fms_acceleration_accelerate import AccelerationKwargs

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(AccelerationConfigError, match=r"ep_degree 2 does not divide the world size 1"):
        Accelerator(
            cpu=True, kwargs_handlers=[AccelerationKwargs({"training": {"moe": {"scattermoe": {"ep_degree": 2}}}})]
        )


def test_a_model_without_experts_is_refused_at_prepare(saved_models):
    from tests.plugins.fused_ops.tiny_models import tiny_model

    plugin = _plugin()
    with pytest.raises(AccelerationConfigError, match="'llama' is a dense architecture"):
        plugin.check_prepared_model(tiny_model("llama"), RunContext())
    dense = load(saved_models("qwen3_moe", mlp_only_layers=[0, 1]))  # every layer dense
    with pytest.raises(AccelerationConfigError, match=r"found 2 decoder layers but 0 MoE blocks"):
        plugin.check_prepared_model(dense, RunContext())


def test_switching_the_experts_implementation_back_is_refused_after_prepare(saved_models, reference_kernels):
    model = load(saved_models("mixtral"))
    framework = make_framework()
    framework.augmentation(model)
    model.set_experts_implementation("eager")
    with pytest.raises(AccelerationConfigError, match="experts implementation was changed to 'eager'"):
        framework.plugins[0].after_prepare(model, RunContext())
    framework.revert()


def test_yaml_round_trip_of_an_fms_hf_tuning_section(tmp_path):
    """fms-hf-tuning's --fast_moe writes ep_degree and disable_distributed under training.moe.scattermoe."""
    path = tmp_path / "accel.yaml"
    body = {"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": 1, "disable_distributed": False}}}}}
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    framework = AccelerationFramework(str(path))
    assert framework.active_plugin_names == ("scattermoe",)
