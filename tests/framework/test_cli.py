"""The fms-accelerate command: plugins, configs, configs show, check (run as a real subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fms_acceleration_accelerate import cli
from fms_acceleration_accelerate.registry import PluginRegistry

from .helpers import write_fake_distribution

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    """Run ``fms-accelerate ARGS`` (the installed console script when present) in a fresh process."""
    script = shutil.which("fms-accelerate", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "fms_acceleration_accelerate.cli"]
    env = dict(os.environ)
    env.pop("ACCELERATION_FRAMEWORK_CONFIG_FILE", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False
    )


def test_plugins_lists_installed_plugins_with_versions_and_paths(tmp_path):
    write_fake_distribution(tmp_path, dist="fake-cli-plugin", version="9.8.7", module="fake_cli_plugin")
    result = run_cli("plugins", extra_path=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fake = next(line for line in lines if line.startswith("fake "))
    assert "fake-cli-plugin 9.8.7" in fake and "OR training.fake" in fake
    # the project's own plugin packages (installed by scripts/setup_env.sh) are found through entry points
    names = {line.split()[0] for line in lines if line.strip()}
    assert {"bitsandbytes", "fused_ops_and_kernels"} <= names, result.stdout
    assert "FAILED TO LOAD" not in result.stdout
    for entry in PluginRegistry.discover().entries:  # every plugin installed here, with its paths
        assert entry.name in names
        if entry.plugin_class is not None:
            assert all(path in result.stdout for path in entry.plugin_class.all_paths())


def test_configs_lists_and_shows_shipped_configurations(capsys):
    shipped = cli.shipped_configs()
    assert shipped, "launch_configs/CONTENTS.yaml lists no configuration"
    result = run_cli("configs")
    assert result.returncode == 0, result.stderr
    for name, item in shipped.items():
        assert any(line.split()[:2] == [name, item["filename"]] for line in result.stdout.splitlines()), name
    name = sorted(shipped)[0]
    shown = run_cli("configs", "show", name)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == shipped[name]["path"].read_text(encoding="utf-8")
    assert cli.main(["configs", "show", "no-such-config"]) == 2
    assert "no shipped configuration named 'no-such-config'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["configs", "show"])
    assert exit_info.value.code == 2 and "configs show needs a NAME" in capsys.readouterr().err


def test_check_by_shortname_in_process(capsys):
    name = sorted(cli.shipped_configs())[0]
    assert cli.main(["check", name]) == 0
    assert "ok: configuration is valid" in capsys.readouterr().out


def test_check_typo_exits_nonzero_with_path_and_suggestion_and_no_traceback(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(
        "plugins:\n  training:\n    fused_ops_and_kernels:\n      fast_rms_layernom: true\n", encoding="utf-8"
    )
    result = run_cli("check", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout and "ok:" not in result.stdout
    assert "[plugins.training.fused_ops_and_kernels.fast_rms_layernom]" in result.stderr
    assert "Did you mean 'fast_rms_layernorm'?" in result.stderr
    assert "valid keys here:" in result.stderr


def test_check_third_party_plugin_in_process(tmp_path, monkeypatch, capsys):
    module = f"fake_cli_plugin_{abs(hash(str(tmp_path)))}"
    write_fake_distribution(tmp_path, dist="fake-cli-plugin", version="9.8.7", module=module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    config = tmp_path / "typo.yaml"
    config.write_text("distributed_type: 'NO'\nacceleration:\n  training:\n    fake: {sped: 2}\n", encoding="utf-8")
    assert cli.main(["check", str(config)]) == 2
    assert "[acceleration.training.fake.sped] unknown key 'sped'. Did you mean 'speed'?" in capsys.readouterr().err
    config.write_text("distributed_type: 'NO'\nacceleration:\n  training:\n    fake: {speed: 2}\n", encoding="utf-8")
    assert cli.main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "activate fake fake-cli-plugin 9.8.7 <- acceleration.training.fake" in out
    assert "options: speed=2" in out
    sys.modules.pop(module, None)


def test_check_section_typo_in_process(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("distributed_type: 'NO'\nacceleration:\n  pfet:\n    quantization: {}\n", encoding="utf-8")
    assert cli.main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "[acceleration.pfet] unknown section 'pfet'. Did you mean 'peft'?" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plugins: [\n", "is not valid YAML"),
        ("plugins: !!python/object/apply:os.system ['echo hacked']\n", "is not valid YAML"),
    ],
)
def test_check_bad_files_in_process(tmp_path, capsys, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text, encoding="utf-8")
    assert cli.main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert cli.main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_check_of_an_accelerate_config_without_section_reports_its_settings_too(tmp_path, capsys):
    config = tmp_path / "accelerate.yaml"
    config.write_text("distributed_type: FSPD\nnum_processes: 0\nfsdp_config: {fsdp_verison: 2}\n", encoding="utf-8")
    assert cli.main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [distributed_type] invalid distributed_type 'FSPD'. Did you mean 'FSDP'?")
    assert "[num_processes] must be at least 1, got 0" in err
    assert "[fsdp_config.fsdp_verison] unknown key 'fsdp_verison' (Accelerate would ignore it). Did you mean" in err
    assert "has no 'plugins:' or 'acceleration:' section" in err and "(4 problems)" in err


def test_check_notes_what_a_kernels_only_qlora_section_expects_from_the_script(tmp_path, capsys):
    """base_layer: bitsandbytes without the bitsandbytes plugin is valid (the script may load the model in 4 bit
    with transformers), and check says so; next to a loader of another format it is refused."""
    config = tmp_path / "foak.yaml"
    config.write_text(
        "plugins:\n  peft:\n    quantization:\n      fused_ops_and_kernels: {base_layer: bitsandbytes, fused_lora: true}\n",
        encoding="utf-8",
    )
    assert cli.main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "note: no active plugin loads the model in 4 bit" in out and "BitsAndBytesConfig(load_in_4bit=True)" in out
    config.write_text(
        "plugins:\n  peft:\n    quantization:\n      bitsandbytes: {quant_type: nf4}\n"
        "      fused_ops_and_kernels: {base_layer: bitsandbytes, fused_lora: true}\n",
        encoding="utf-8",
    )
    assert cli.main(["check", str(config)]) == 0
    assert "note: no active plugin loads the model in 4 bit" not in capsys.readouterr().out
