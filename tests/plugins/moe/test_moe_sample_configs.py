"""Upstream fms-acceleration's ScatterMoE sample configurations (``moe-scattermoe-granite-ep{1,2,4,8}``).

Each upstream sample's plugin body (its keys and values; the rest of the file is comments) is
``training.moe.scattermoe.ep_degree: N``. The ep1 body, and the shipped file of upstream's ep1 name, activate the
plugin. The expert-parallel bodies (ep2/4/8) read as valid configurations (the degree can only be judged against the
run) and are checked when the ``Accelerator`` is created: a degree that does not divide the world size is refused
with the divisors to choose from. Expert-parallel training itself is tested in ``test_moe_ep.py``; the padding-free
variants of these samples in ``tests/plugins/aadp/test_aadp_sample_configs.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fms_acceleration_accelerate_moe import ScatterMoEPlugin

from fms_acceleration_accelerate import AccelerationFramework, cli
from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError

ROOT = Path(__file__).resolve().parents[3]
SHIPPED_EP1 = ROOT / "launch_configs" / "moe-scattermoe-granite-ep1-sample-configuration.yaml"
PATH = "plugins.training.moe.scattermoe"  # the sample files hold the body under plugins:


def _upstream_body(ep_degree: int) -> dict:
    return {"training": {"moe": {"scattermoe": {"ep_degree": ep_degree}}}}


def _write_sample(folder: Path, ep_degree: int) -> Path:
    path = folder / f"moe-scattermoe-granite-ep{ep_degree}-sample-configuration.yaml"
    path.write_text(yaml.safe_dump({"plugins": _upstream_body(ep_degree)}), encoding="utf-8")
    return path


def test_shipped_ep1_file_holds_upstreams_body_and_activates_the_plugin(capsys):
    body = yaml.safe_load(SHIPPED_EP1.read_text(encoding="utf-8"))["plugins"]
    section = body["training"]["moe"]["scattermoe"]
    assert section["ep_degree"] == 1 and set(section) <= {"ep_degree", "routing_stats"}
    framework = AccelerationFramework(str(SHIPPED_EP1))
    assert framework.active_plugin_names == ("scattermoe",) and not framework.passthrough
    framework.plugins[0].check_run_settings(RunContext(world_size=8))  # any run: no expert parallelism
    assert cli.main(["configs", "show", "moe-scattermoe-granite-ep1"]) == 0
    assert capsys.readouterr().out == SHIPPED_EP1.read_text(encoding="utf-8")
    assert cli.main(["check", "moe-scattermoe-granite-ep1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ok: configuration is valid")


@pytest.mark.parametrize("ep_degree", [1, 2, 4, 8])
def test_upstream_sample_bodies_read_as_configurations(ep_degree, tmp_path):
    """Nothing about the degree can be refused before the run is known: every body activates the plugin."""
    framework = AccelerationFramework(str(_write_sample(tmp_path, ep_degree)))
    assert framework.active_plugin_names == ("scattermoe",)
    plugin = framework.plugins[0]
    assert isinstance(plugin, ScatterMoEPlugin) and plugin.config.ep_degree == ep_degree


@pytest.mark.parametrize("ep_degree", [2, 4, 8])
def test_expert_parallel_samples_are_checked_when_the_accelerator_is_created(ep_degree, tmp_path, monkeypatch):
    """A stock one-process ``Accelerator`` given an expert-parallel sample refuses it at creation (before any
    model is loaded): the degree does not divide the world size. Upstream ran these samples on 8 GPUs: the run
    settings of such a launch (data parallel or FSDP2) accept them, FSDP1 is refused."""
    from accelerate import Accelerator

    from fms_acceleration_accelerate import AccelerationKwargs

    sample = _write_sample(tmp_path, ep_degree)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(AccelerationConfigError) as excinfo:
        Accelerator(cpu=True, kwargs_handlers=[AccelerationKwargs(str(sample))])
    assert excinfo.value.path == f"{PATH}.ep_degree"
    assert f"ep_degree {ep_degree} does not divide the world size 1" in str(excinfo.value)

    plugin = AccelerationFramework(str(sample)).plugins[0]
    assert plugin.expert_parallel is not None
    for context in (RunContext(world_size=8), RunContext(world_size=8, fsdp_version=2, distributed_type="FSDP")):
        plugin.check_run_settings(context)
    with pytest.raises(AccelerationConfigError, match="not supported with FSDP1"):
        plugin.check_run_settings(RunContext(world_size=8, fsdp_version=1, distributed_type="FSDP"))
