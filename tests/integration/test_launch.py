"""``accelerate launch`` / ``fms-accelerate launch`` with an ``acceleration:`` section, on CPU (gloo).

The worker script never imports this package: the start-up hook installed with it (``.pth``) does the work.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import _fms_acceleration_startup as startup

from .conftest import ACCELERATE, SCRIPTS, TORCHRUN, VENV_BIN, finish, free_port, run, start, write_config

pytestmark = pytest.mark.slow

WORKER = str(SCRIPTS / "report_worker.py")

CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: {machines}
num_processes: 2
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
rdzv_backend: static
same_network: true
use_cpu: false
acceleration:
  testing:
    toy_lora: {{r: 2, reduce_fp32: true}}
    marker: {{report_dir: {report}}}
"""


def _reports(env: dict[str, str]) -> list[dict]:
    folder = Path(env["REPORT_DIR"])
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def _check_two_ranks(env: dict[str, str], launchers: int = 1) -> None:
    reports = _reports(env)
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["world"] == 2
        assert r["sum"] == 3.0  # a real 2-process all-reduce
        assert r["plugins"] == ["toy_lora", "toy_marker"]
        assert r["script_imported_package"] is False
    markers = [json.loads(m.read_text())["rank"] for m in Path(env["REPORT_DIR"]).glob("marker_rank*.json")]
    assert sorted(m for m in markers if m is not None) == ["0", "1"]  # every worker activated the plugins
    assert markers.count(None) == launchers  # and each launcher validated the section before starting them


def _has_hook() -> bool:
    return any(
        p.endswith("fms_acceleration_accelerate.pth")
        for d in sys.path
        if os.path.isdir(d)
        for p in os.listdir(d)
        if p.endswith(".pth")
    )


def _start_machines(cfg: Path, machines: int, env: dict[str, str], cwd: Path) -> list:
    """Start one ``accelerate launch`` per machine rank on this host, all meeting at one loopback port."""
    port = str(free_port())
    return [
        start(
            [
                ACCELERATE,
                "launch",
                "--config_file",
                str(cfg),
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                WORKER,
            ],
            env,
            cwd,
        )
        for rank in range(machines)
    ]


needs_hook = pytest.mark.skipif(not _has_hook(), reason="package not installed with its start-up .pth hook")


@needs_hook
def test_accelerate_launch_two_processes(launch_env, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", CONFIG.format(machines=1, report=launch_env["REPORT_DIR"]))
    result = run(
        [ACCELERATE, "launch", "--config_file", str(cfg), "--main_process_port", str(free_port()), WORKER],
        launch_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    _check_two_ranks(launch_env)


@needs_hook
def test_fms_accelerate_launch_same_arguments(launch_env, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", CONFIG.format(machines=1, report=launch_env["REPORT_DIR"]))
    cli = str(VENV_BIN / "fms-accelerate")
    result = run(
        [cli, "launch", "--config_file", str(cfg), "--main_process_port", str(free_port()), WORKER],
        launch_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    _check_two_ranks(launch_env)


@needs_hook
def test_two_node_loopback(launch_env, tmp_path):
    """Two launches on one machine, machine ranks 0 and 1, one process each."""
    cfg = write_config(tmp_path / "cfg.yaml", CONFIG.format(machines=2, report=launch_env["REPORT_DIR"]))
    procs = _start_machines(cfg, 2, launch_env, tmp_path)
    results = [finish(p) for p in procs]
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    _check_two_ranks(launch_env, launchers=2)
    assert sorted(r["node_rank"] for r in _reports(launch_env)) == ["0", "1"]


BAD = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: {machines}
num_processes: 2
machine_rank: 0
rdzv_backend: static
acceleration:
  testing:
    toy_lora: {{rank: 2}}
"""


@needs_hook
@pytest.mark.parametrize("machines", [1, 2])
def test_bad_section_fails_in_every_launcher_before_workers(launch_env, tmp_path, machines):
    cfg = write_config(tmp_path / "bad.yaml", BAD.format(machines=machines))
    procs = _start_machines(cfg, machines, launch_env, tmp_path)
    for proc in procs:
        result = finish(proc, timeout=60)
        assert result.returncode == 2
        assert "[acceleration.testing.toy_lora.rank] unknown key 'rank'" in result.stderr
        assert "valid keys here" in result.stderr
        assert "Traceback" not in result.stderr
    assert not list(Path(launch_env["REPORT_DIR"]).glob("started_*")), "a worker started"


def test_bad_section_in_environment_fails_on_every_rank(launch_env, tmp_path):
    """A worker that gets a bad section (e.g. set by hand) fails at Accelerator() on every rank, no hang."""
    env = dict(launch_env, FMS_ACCELERATION_SECTION=json.dumps({"testing": {"toy_lora": {"r": 0}}}))
    script = tmp_path / "w.py"
    script.write_text(
        # importing the integration module before accelerate: the hook must still install the wrapper
        "import fms_acceleration_accelerate.accelerate_integration\n"
        "from accelerate import Accelerator\n"
        "Accelerator(cpu=True)\n",
        encoding="utf-8",
    )
    result = run(
        [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)], env, tmp_path, timeout=90
    )
    assert result.returncode != 0
    assert result.stderr.count("[acceleration.testing.toy_lora] r must be positive") == 2


# the config file's problems, under stock `accelerate launch`: exit 2, the message, no traceback, no worker
LAUNCH_BAD = [
    pytest.param(
        "distributed_type: FSPD\nnum_processes: 1\nacceleration:\n  testing:\n    toy_lora: {r: 2}\n",
        ["[distributed_type] invalid distributed_type 'FSPD'. Did you mean 'FSDP'?", "valid values: NO, MULTI_CPU"],
        id="fspd-with-section",
    ),
    pytest.param(
        "distributed_type: FSPD\nnum_processes: 1\n",
        ["[distributed_type] invalid distributed_type 'FSPD'. Did you mean 'FSDP'?"],
        id="fspd-stock-config",
    ),
    pytest.param(
        "- distributed_type\n- FSDP\n", ["must hold a mapping at the top level, got list"], id="not-a-mapping"
    ),
    pytest.param(
        "distributed_type: 'NO'\nnum_processes: 1\nacceleration: {}\n",
        ["No plugins could be configured. Please check the acceleration framework configuration file.", "is empty"],
        id="empty-section",
    ),
    pytest.param(
        "distributed_type: 'NO'\nnum_processes: 1\nacceleraton:\n  testing:\n    toy_lora: {r: 2}\n",
        ["[acceleraton] unknown top-level key 'acceleraton'", "Did you mean 'acceleration'?"],
        id="top-level-typo",
    ),
    pytest.param(
        "distributed_type: 'NO'\nnum_processes: 1\nmixed_precision: no\nacceleration:\n  vendor: {turbo: {}}\n",
        ["[mixed_precision] invalid mixed_precision False", "(2 problems)", "acceleration.vendor"],
        id="several-problems",
    ),
]


@needs_hook
@pytest.mark.parametrize(("text", "expected"), LAUNCH_BAD)
def test_bad_config_under_stock_accelerate_launch(launch_env, tmp_path, text, expected):
    cfg = write_config(tmp_path / "bad.yaml", text)
    result = run(
        [ACCELERATE, "launch", "--config_file", str(cfg), "--main_process_port", str(free_port()), WORKER],
        launch_env,
        tmp_path,
        timeout=90,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert f"fms-acceleration: error in {cfg} (machine 0): " in result.stderr
    for text_part in expected:
        assert text_part in result.stderr, result.stderr[-3000:]
    assert len(result.stderr) < 6000
    assert not list(Path(launch_env["REPORT_DIR"]).glob("started_*")), "a worker started"


@needs_hook
def test_section_larger_than_an_environment_variable_reaches_every_worker(launch_env, tmp_path):
    """Linux caps one environment variable at 128 KiB: a 300 KB section travels in a file named by the variable;
    the launcher removes the file when it exits."""
    blob = "x" * 300_000
    cfg = write_config(
        tmp_path / "cfg.yaml",
        CONFIG.format(machines=1, report=launch_env["REPORT_DIR"]) + f"  vendor:\n    payload: {{blob: {blob}}}\n",
    )
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    env = dict(launch_env, TMPDIR=str(private_tmp))
    result = run(
        [ACCELERATE, "launch", "--config_file", str(cfg), "--main_process_port", str(free_port()), WORKER],
        env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    _check_two_ranks(launch_env)
    assert "acceleration section acceleration.vendor passed through" in result.stderr + result.stdout
    assert not list(private_tmp.glob("fms_acceleration_section_*")), "the section file outlived its launcher"


# ----------------------------------------------------------------------------- the section hand-off


def test_export_writes_a_private_file_that_workers_read(tmp_path, monkeypatch):
    from fms_acceleration_accelerate import accelerate_integration as ai

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.delenv(ai.ENV_SECTION, raising=False)
    body = {"testing": {"toy_lora": {"r": 2}}, "vendor": {"blob": "y" * 200_000}}
    path = ai.export_section(body, "cfg.yaml")
    assert os.environ[ai.ENV_SECTION] == path and len(path) < 4096
    assert Path(path).parent == tmp_path and (Path(path).stat().st_mode & 0o777) == 0o600
    assert os.environ[ai.ENV_SECTION_ORIGIN] == "cfg.yaml"
    assert ai.section_from_environment() == {"acceleration": body}
    assert startup.mode(environ={"FMS_ACCELERATION_SECTION": path}, argv=["x.py"], orig_argv=[]) == "worker"
    # an inline JSON value (set by hand, or by an older launcher) is still read
    monkeypatch.setenv(ai.ENV_SECTION, json.dumps({"testing": {}}))
    assert ai.section_from_environment() == {"acceleration": {"testing": {}}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("/nonexistent/fms_acceleration_section_x.json", "cannot read the section file", id="missing"),
        pytest.param("{not json", "is not valid JSON", id="bad-inline-json"),
    ],
)
def test_worker_section_errors_are_clear(value, expected, monkeypatch):
    from fms_acceleration_accelerate import AccelerationConfigError
    from fms_acceleration_accelerate import accelerate_integration as ai

    monkeypatch.setenv(ai.ENV_SECTION, value)
    with pytest.raises(AccelerationConfigError, match=expected) as err:
        ai.section_from_environment()
    assert "FMS_ACCELERATION_SECTION" in str(err.value)


def test_section_file_is_removed_when_the_exporting_process_exits(tmp_path):
    code = (
        "from fms_acceleration_accelerate.accelerate_integration import export_section\n"
        "import os\n"
        "path = export_section({'testing': {'toy_lora': {}}}, 'cfg.yaml')\n"
        "assert os.path.exists(path)\n"
        "print(path)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    env["FMS_ACCELERATION_DISABLE_HOOK"] = "1"
    env["TMPDIR"] = str(tmp_path)
    result = run([sys.executable, "-c", code], env, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path and path.name.startswith("fms_acceleration_section_")
    assert not path.exists()


def test_launcher_check_of_a_config_in_process(tmp_path, monkeypatch, capsys):
    """What the launcher hook does with each config file (without starting processes)."""
    from accelerate.commands.config import config_args

    from fms_acceleration_accelerate import accelerate_integration as ai

    monkeypatch.delenv(ai.ENV_SECTION, raising=False)
    installed_here = ai.install_launcher_support()
    try:
        cfg = write_config(tmp_path / "list.yaml", "- a\n")
        with pytest.raises(SystemExit) as exit_info:
            config_args.load_config_from_file(str(cfg))
        assert exit_info.value.code == 2
        assert "must hold a mapping at the top level, got list" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            config_args.load_config_from_file(str(tmp_path / "missing.yaml"))
        assert "does not exist" in capsys.readouterr().err
        good = write_config(tmp_path / "good.yaml", "distributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n")
        assert config_args.load_config_from_file(str(good)).distributed_type == "NO"  # stock config: unchanged
    finally:
        if installed_here:
            ai.uninstall_launcher_support()


def test_hook_can_be_switched_off(launch_env, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", CONFIG.format(machines=1, report=launch_env["REPORT_DIR"]))
    env = dict(launch_env, FMS_ACCELERATION_DISABLE_HOOK="1")
    port = str(free_port())
    result = run(
        [ACCELERATE, "launch", "--config_file", str(cfg), "--main_process_port", port, WORKER],
        env,
        tmp_path,
        timeout=60,
    )
    assert result.returncode != 0
    assert "unknown keys (['acceleration'])" in result.stderr  # stock Accelerate behaviour


# ----------------------------------------------------------------------------- start-up hook functions


def test_startup_mode_detection():
    assert startup.mode(environ={}, argv=["x.py"], orig_argv=["python", "x.py"]) is None
    assert startup.mode(environ={"FMS_ACCELERATION_SECTION": "{}"}, argv=["x.py"], orig_argv=[]) == "worker"
    assert startup.mode(environ={}, argv=["/v/bin/accelerate", "launch", "t.py"], orig_argv=[]) == "launcher"
    assert startup.mode(environ={}, argv=["/v/bin/accelerate", "env"], orig_argv=[]) is None
    assert startup.mode(environ={}, argv=["/v/bin/accelerate-launch", "t.py"], orig_argv=[]) == "launcher"
    assert (
        startup.mode(environ={}, argv=["-m"], orig_argv=["py", "-m", "accelerate.commands.launch", "t.py"])
        == "launcher"
    )
    disabled = {"FMS_ACCELERATION_DISABLE_HOOK": "1", "FMS_ACCELERATION_SECTION": "{}"}
    assert startup.mode(environ=disabled, argv=["/v/bin/accelerate", "launch"], orig_argv=[]) is None


def test_pth_line_is_inactive_and_cheap(tmp_path):
    """The installed .pth line imports nothing for an ordinary process: every interpreter start runs it, so an
    ordinary process must pay no more than a few environment and argv lookups (checked structurally, not by
    timing it: a wall-clock bound flakes on a loaded CI machine)."""
    pth = Path(startup.__file__).with_name("fms_acceleration_accelerate.pth")
    line = pth.read_text(encoding="utf-8").strip()
    assert line.startswith("import ")
    code = (
        "import sys\n"
        "sys.modules.pop('_fms_acceleration_startup', None)\n"
        f"line = {line!r}\n"
        "before = set(sys.modules)\n"
        "exec(line, {})\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    result = run([sys.executable, "-c", code], env, tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the .pth line imported {result.stdout.strip()} in an ordinary process"
