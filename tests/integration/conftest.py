"""Fixtures for the integration tests: a temporary plugin distribution, free ports, subprocess launches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
VENV_BIN = Path(sys.executable).parent
ACCELERATE = str(VENV_BIN / "accelerate")
TORCHRUN = str(VENV_BIN / "torchrun")
LAUNCH_TIMEOUT = 150


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def toy_site(tmp_path: Path) -> Path:
    """A directory with a fake installed distribution whose entry points register the toy plugins."""
    site = tmp_path / "site"
    dist = site / "toy_plugins-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.0\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [fms_acceleration_accelerate.plugins]
            toy_lora = tests.integration.toy_plugins:ToyLoraPlugin
            toy_marker = tests.integration.toy_plugins:ToyMarkerPlugin
            """
        ),
        encoding="utf-8",
    )
    # the toy plugins' module (tests.integration.toy_plugins) importable through this folder: the checkout's root
    # stays off launched processes' sys.path (its folders that are not packages, kernels/ among them, would import
    # there as namespace packages, e.g. a `kernels` hiding the absence of Hugging Face's kernels package)
    (site / "tests").symlink_to(REPO / "tests", target_is_directory=True)
    return site


@pytest.fixture
def launch_env(toy_site: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for launched processes: toy plugins importable and discoverable, a report dir."""
    report = tmp_path / "report"
    report.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(toy_site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["REPORT_DIR"] = str(report)
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def write_config(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    if not os.path.isdir("/proc"):
        return []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # ended meanwhile
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> tuple[str, str]:
    """Kill a timed-out launch: its process group and every process below it (torchrun starts its workers in
    sessions of their own, which the group kill misses and which would keep the output pipes open), then
    collect what it printed."""
    tree = _descendants(proc.pid)
    os.killpg(proc.pid, 9)
    for pid in tree:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return proc.communicate()


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill it with every process it started, and fail."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _kill_tree(proc)
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _kill_tree(proc)
        pytest.fail(f"timed out after {timeout}s: {proc.args}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_torchrun_worker(
    script: str, env: dict[str, str], out_dir: Path, timeout: int = LAUNCH_TIMEOUT, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` under torchrun with 2 local processes; ``out_dir`` (its first argument, then
    ``args``) is also the cwd."""
    cmd = [
        TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(SCRIPTS / script),
        str(out_dir),
        *args,
    ]
    return run(cmd, env, out_dir, timeout=timeout)


@pytest.fixture
def fresh_install(monkeypatch):
    """Each test starts from an un-wrapped Accelerator (and transformers' own from_pretrained) and leaves it so."""
    from fms_acceleration_accelerate import accelerate_integration as ai

    monkeypatch.delenv(ai.ENV_SECTION, raising=False)
    was = ai.is_installed()
    ai.uninstall()
    yield
    ai.uninstall()
    if was:
        ai.install()
