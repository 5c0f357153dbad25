"""The original fms-acceleration's import names (``fms_acceleration``, ``fms_acceleration_peft``,
``fms_acceleration_foak``, ``fms_acceleration_aadp``, ``fms_acceleration_moe``) as this project provides them, and
the original winning wherever it is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import fms_acceleration_accelerate
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .helpers import NeedsMissing, QuantLoader, registry

REPO = Path(__file__).resolve().parents[2]
STAND_IN_DIRS = (
    REPO / "fms_acceleration_accelerate" / "upstream_names",
    REPO / "plugins" / "accelerated-peft" / "src" / "fms_acceleration_accelerate_peft" / "upstream_names",
    REPO / "plugins" / "fused-ops-and-kernels" / "src" / "fms_acceleration_accelerate_foak" / "upstream_names",
    REPO
    / "plugins"
    / "attention-and-distributed-packing"
    / "src"
    / "fms_acceleration_accelerate_aadp"
    / "upstream_names",
    REPO / "plugins" / "accelerated-moe" / "src" / "fms_acceleration_accelerate_moe" / "upstream_names",
    REPO / "plugins" / "online-data-mixing" / "src" / "fms_acceleration_accelerate_odm" / "upstream_names",
)


def _stand_in_found() -> bool:
    spec = importlib.util.find_spec("fms_acceleration")
    return spec is not None and "upstream_names" in str(spec.origin)


pytestmark = pytest.mark.skipif(
    not _stand_in_found(), reason="installed without fms_acceleration_accelerate_upstream_names.pth (or the original)"
)


def _python(code: str, tmp_path: Path, **env_updates: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION") and k != "PYTHONPATH"}
    env.update(env_updates)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_names_fms_hf_tuning_imports():
    import fms_acceleration
    import fms_acceleration_foak
    import fms_acceleration_peft
    from fms_acceleration import AccelerationFramework, AccelerationPlugin, AccelerationPluginConfigError
    from fms_acceleration.constants import ACCELERATION_FRAMEWORK_ENV_KEY, PLUGIN_PREFIX, PLUGINS
    from fms_acceleration.framework import KEY_PLUGINS
    from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin
    from fms_acceleration_accelerate_peft.plugin import BitsAndBytesAccelerationPlugin

    assert Path(fms_acceleration.__file__).parent.parent == STAND_IN_DIRS[0]
    assert issubclass(AccelerationFramework, fms_acceleration_accelerate.AccelerationFramework)
    assert AccelerationPlugin is fms_acceleration_accelerate.AccelerationPlugin
    assert AccelerationPluginConfigError is AccelerationConfigError
    assert issubclass(AccelerationPluginConfigError, ValueError)
    assert (KEY_PLUGINS, ACCELERATION_FRAMEWORK_ENV_KEY, PLUGIN_PREFIX) == (
        "plugins",
        "ACCELERATION_FRAMEWORK_CONFIG_FILE",
        "fms_acceleration_",
    )
    assert PLUGINS == ("peft", "foak", "aadp", "moe", "odm")
    assert fms_acceleration_peft.BitsAndBytesAccelerationPlugin is BitsAndBytesAccelerationPlugin
    assert fms_acceleration_foak.FusedOpsAndKernelsPlugin is FusedOpsAndKernelsPlugin
    # the original's class names, which fms-hf-tuning's tests import
    from fms_acceleration_accelerate_peft.gptq.plugin import AutoGPTQAccelerationPlugin
    from fms_acceleration_foak import FastKernelsAccelerationPlugin, FastQuantizedPeftAccelerationPlugin
    from fms_acceleration_peft import BNBAccelerationPlugin

    assert fms_acceleration_peft.AutoGPTQAccelerationPlugin is AutoGPTQAccelerationPlugin
    assert BNBAccelerationPlugin is BitsAndBytesAccelerationPlugin
    assert FastKernelsAccelerationPlugin is FastQuantizedPeftAccelerationPlugin is FusedOpsAndKernelsPlugin


def test_aadp_name_exports_the_originals_plugin_classes():
    """The original's ``fms_acceleration_aadp`` exported ``PaddingFreeAccelerationPlugin`` and
    ``MultipackDataloaderAccelerationPlugin``; both names are this project's plugin classes, which the framework
    activates for the original's sections."""
    import fms_acceleration_aadp
    from fms_acceleration import AccelerationFramework
    from fms_acceleration_aadp import MultipackDataloaderAccelerationPlugin, PaddingFreeAccelerationPlugin
    from fms_acceleration_accelerate_aadp import MultipackAccelerationPlugin, PaddingFreePlugin

    assert Path(fms_acceleration_aadp.__file__).parent.parent == STAND_IN_DIRS[3]
    assert PaddingFreeAccelerationPlugin is PaddingFreePlugin
    assert MultipackDataloaderAccelerationPlugin is MultipackAccelerationPlugin
    assert {"PaddingFreeAccelerationPlugin", "MultipackDataloaderAccelerationPlugin"} <= set(
        fms_acceleration_aadp.__all__
    )
    body = {
        "training": {
            "attention": {"padding_free": {"method": "huggingface"}},
            "dataloader": {"multipack": {"num_processes": 16}},
        }
    }
    framework = AccelerationFramework({"plugins": body})
    assert [type(plugin) for _name, plugin in framework.active_plugins] == [
        PaddingFreeAccelerationPlugin,
        MultipackDataloaderAccelerationPlugin,
    ]


def test_moe_name_exports_the_originals_plugin_class():
    """The original's ``fms_acceleration_moe`` exported ``ScatterMoEAccelerationPlugin``; the name is this
    project's plugin class, which the framework activates for fms-hf-tuning's ``--fast_moe`` section. There is no
    ``fms_acceleration_moe.utils`` (checkpoints are the model's own safetensors), so fms-hf-tuning's import of its
    DCP-conversion function fails with ``ImportError`` and it adds no conversion callback."""
    import fms_acceleration_moe
    from fms_acceleration import AccelerationFramework
    from fms_acceleration_accelerate_moe import ScatterMoEPlugin
    from fms_acceleration_moe import ScatterMoEAccelerationPlugin

    assert Path(fms_acceleration_moe.__file__).parent.parent == STAND_IN_DIRS[4]
    assert ScatterMoEAccelerationPlugin is ScatterMoEPlugin
    assert "ScatterMoEAccelerationPlugin" in fms_acceleration_moe.__all__
    with pytest.raises(ImportError):
        from fms_acceleration_moe.utils import recover_safetensors_from_dcp  # noqa: F401
    body = {"training": {"moe": {"scattermoe": {"ep_degree": 1, "disable_distributed": False}}}}
    framework = AccelerationFramework({"plugins": body})
    assert [type(plugin) for _name, plugin in framework.active_plugins] == [ScatterMoEAccelerationPlugin]


def test_availability_checked_the_way_fms_hf_tuning_checks_it():
    from tests.integration.fms_hf_tuning_replay import is_fms_accelerate_available

    assert is_fms_accelerate_available()
    assert is_fms_accelerate_available("peft") and is_fms_accelerate_available(["peft", "foak", "aadp", "moe", "odm"])
    # a plugin the original never had reads "not available"
    assert not is_fms_accelerate_available("nope")


def test_stand_in_directories_are_appended_after_site_packages(tmp_path):
    result = _python(
        """
        import json, site, sys
        print(json.dumps({"path": sys.path, "site": site.getsitepackages()}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    path = report["path"]
    site_dirs = [path.index(d) for d in report["site"] if d in path]
    assert site_dirs, report
    for folder in STAND_IN_DIRS:
        assert str(folder) in path, folder
        assert path.index(str(folder)) > max(site_dirs), (folder, path)


def test_an_original_earlier_on_sys_path_wins(tmp_path):
    original = tmp_path / "original"
    for name in ("fms_acceleration", "fms_acceleration_foak"):
        (original / name).mkdir(parents=True)
        (original / name / "__init__.py").write_text("ORIGINAL = True\n", encoding="utf-8")
    result = _python(
        """
        import fms_acceleration, fms_acceleration_foak, fms_acceleration_peft
        print(fms_acceleration.__file__)
        print(fms_acceleration_foak.__file__)
        print(fms_acceleration_peft.__file__)
        print(fms_acceleration.ORIGINAL, fms_acceleration_foak.ORIGINAL)
        """,
        tmp_path,
        PYTHONPATH=str(original),
    )
    assert result.returncode == 0, result.stderr
    framework, foak, peft, flags = result.stdout.splitlines()
    assert Path(framework).parent.parent == original and Path(foak).parent.parent == original
    assert Path(peft).parent.parent == STAND_IN_DIRS[1]  # a name the original does not provide stays ours
    assert flags == "True True"


def test_stand_in_refuses_to_stand_in_for_an_installed_original(tmp_path):
    site = tmp_path / "site"
    info = site / "fms_acceleration-0.6.4.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fms-acceleration\nVersion: 0.6.4\n", encoding="utf-8")
    result = _python("import fms_acceleration\n", tmp_path, PYTHONPATH=str(site))
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "the original fms-acceleration 0.6.4 is installed" in result.stderr
    assert "upstream_names.pth" in result.stderr


def test_constructor_takes_the_original_arguments(tmp_path, monkeypatch):
    from fms_acceleration import AccelerationFramework

    config = tmp_path / "accel.yaml"
    config.write_text(yaml.safe_dump({"plugins": {"training": {"needs_missing": None}}}), encoding="utf-8")
    plugins = registry(NeedsMissing, QuantLoader)
    with pytest.raises(AccelerationConfigError, match="needs fms-nonexistent-package-xyz"):
        AccelerationFramework(str(config), registry=plugins)
    framework = AccelerationFramework(str(config), False, registry=plugins)  # require_packages_check, positional
    assert framework.active_plugins[0][0] == "needs-missing"
    assert framework.plugins_require_custom_loading == [] and not framework.requires_custom_loading
    loader = tmp_path / "loader.yaml"
    loader.write_text(yaml.safe_dump({"plugins": {"peft": {"quantization": {"testquant": None}}}}), encoding="utf-8")
    framework = AccelerationFramework(str(loader), require_packages_check=True, registry=plugins)
    assert framework.plugins_require_custom_loading == ["quant-loader"] and framework.requires_custom_loading


def test_empty_body_gives_way_to_the_environment_file_as_in_the_original(tmp_path, monkeypatch):
    from fms_acceleration import AccelerationFramework

    empty = tmp_path / "empty.yaml"
    empty.write_text("plugins: {}\n", encoding="utf-8")
    monkeypatch.delenv("ACCELERATION_FRAMEWORK_CONFIG_FILE", raising=False)
    with pytest.raises(ValueError) as excinfo:
        AccelerationFramework(str(empty), registry=registry(QuantLoader))
    (message,) = excinfo.value.args  # fms-hf-tuning unpacks exactly one argument
    assert message.startswith("No plugins could be configured")
    from_env = tmp_path / "from_env.yaml"
    from_env.write_text(yaml.safe_dump({"plugins": {"peft": {"quantization": {"testquant": None}}}}), encoding="utf-8")
    monkeypatch.setenv("ACCELERATION_FRAMEWORK_CONFIG_FILE", str(from_env))
    framework = AccelerationFramework(str(empty), registry=registry(QuantLoader))
    assert framework.config.origin == str(from_env)
    assert [name for name, _ in framework.active_plugins] == ["quant-loader"]
    # a file that configures something is read, the variable notwithstanding
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"plugins": {"training": {"needs_missing": None}}}), encoding="utf-8")
    framework = AccelerationFramework(str(own), False, registry=registry(QuantLoader, NeedsMissing))
    assert framework.active_plugin_names == ("needs-missing",)


def test_cli_maps_plugin_names_to_this_projects_packages(capsys):
    from fms_acceleration import cli

    assert cli.install_command("fms_acceleration_foak")[-1] == "fms-acceleration-accelerate-foak"
    assert cli.install_command("peft")[-1] == "fms-acceleration-accelerate-peft"
    assert cli.install_command("fms_acceleration_aadp")[-1] == "fms-acceleration-accelerate-aadp"
    assert cli.install_command("moe")[-1] == "fms-acceleration-accelerate-moe"
    assert cli.install_command("fms_acceleration_odm")[-1] == "fms-acceleration-accelerate-odm"
    assert cli.main(["install", "fms_acceleration_nope"]) == 2
    assert "unknown plugin" in capsys.readouterr().err
    assert cli.main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "fms_acceleration_peft: installed" in listing and "fms_acceleration_foak: installed" in listing
    assert "fms_acceleration_aadp: installed" in listing and "fms_acceleration_moe: installed" in listing
    assert "fms_acceleration_odm: installed" in listing


def test_the_start_up_file_only_names_folders():
    """Every interpreter start reads it: directory lines cost an existence check each and import nothing."""
    import site

    files = [Path(d) / "fms_acceleration_accelerate_upstream_names.pth" for d in site.getsitepackages()]
    (pth,) = [f for f in files if f.is_file()]
    lines = [line.strip() for line in pth.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines and all(line.startswith("#") or not line.startswith(("import ", "import\t")) for line in lines)
    folders = [line for line in lines if not line.startswith("#")]
    assert {
        "fms_acceleration_accelerate/upstream_names",
        "fms_acceleration_accelerate_foak/upstream_names",
        "fms_acceleration_accelerate_moe/upstream_names",
    } <= set(folders)


def test_plugin_names_warn_when_the_original_framework_would_import_them(tmp_path):
    """The original framework imports every ``fms_acceleration_<plugin>`` it finds, so in a mixed installation
    it imports these stand-ins; they say that the original does not use this project's plugins."""
    site = tmp_path / "site"
    info = site / "fms_acceleration-0.6.4.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fms-acceleration\nVersion: 0.6.4\n", encoding="utf-8")
    imports = "import fms_acceleration_foak, fms_acceleration_peft, fms_acceleration_aadp, fms_acceleration_moe\n"
    result = _python(imports, tmp_path, PYTHONPATH=str(site))
    assert result.returncode == 0, result.stderr
    for name, dist in (
        ("fms_acceleration_foak", "fms-acceleration-foak"),
        ("fms_acceleration_peft", "fms-acceleration-peft"),
        ("fms_acceleration_aadp", "fms-acceleration-aadp"),
        ("fms_acceleration_moe", "fms-acceleration-moe"),
    ):
        assert f"{name} is fms-acceleration-accelerate's stand-in" in result.stderr
        assert f"Install the original's {dist}" in result.stderr
    plain = _python(imports, tmp_path)
    assert plain.returncode == 0 and "stand-in" not in plain.stderr, plain.stderr
