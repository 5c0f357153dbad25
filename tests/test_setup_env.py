"""The set-up scripts' pins against what a fresh machine installs.

``scripts/setup_env.sh`` installs torch first, then this repository's packages, with ``scripts/constraints.txt``
applied to every install. On a machine with an NVIDIA GPU and no torch it installs ``torch==X`` from PyPI: the
CUDA build, which pins its own triton and CUDA packages exactly. A pin in ``constraints.txt`` that contradicts
one of those (as ``triton==3.9.0`` against torch 2.13.0's ``triton==3.7.1`` once did) makes that set-up
impossible while the CPU set-up (torch ``+cpu``, which pins no triton) still works, so nothing else notices.

The resolution test asks pip, against PyPI itself (this machine's pip configuration and local wheels
ignored), whether one set of versions satisfies at once: the torch release the script installs, every
requirement that torch wheel declares for Linux (triton, nvidia-*, cuda-* ...), every requirement of this
repository's packages with the extras the script installs, and ``constraints.txt``. It runs pip's real
resolver in dry-run mode and reads dependency metadata through HTTP range requests (pip's ``fast-deps``), so
no multi-GB wheel is downloaded: a few MB and seconds. A pinned recent pip runs it (from its wheel, not
installed): older pips download every wheel of a dry run in full.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup_env.sh"
CONSTRAINTS = ROOT / "scripts" / "constraints.txt"
CPU_CONSTRAINTS = ROOT / "scripts" / "constraints-cpu.txt"
PYPI = "https://pypi.org/simple"
RESOLVER_PIP = "26.3"  # a pip whose dry run downloads no wheel it only needs metadata of
OWN_PACKAGES = re.compile(r"^fms[-_.]acceleration", re.IGNORECASE)
SOURCE_ONLY = ("deepspeed",)  # PyPI has no wheel of these; setup_env.sh builds them pure Python (DS_BUILD_OPS=0)


def _script_setting(name: str) -> str:
    match = re.search(rf"^{name}=([^\s#]+)", SETUP.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"scripts/setup_env.sh has no {name}= line"
    return match.group(1)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a constraints file (nested ``-c`` files not
    followed)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: '{line}' is not a name==version pin"
            pins[_canonical(name)] = version.strip()
    return pins


def _project_requirements() -> list[str]:
    """Requirements of this repository's packages as setup_env.sh installs them (root with its extras,
    kernels and plugins without), less the packages themselves (they are not on PyPI)."""
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11 (tomllib)")
    extras = _script_setting("ROOT_EXTRAS").split(",")
    reqs: list[str] = []
    for pyproject in [
        ROOT / "pyproject.toml",
        ROOT / "kernels" / "pyproject.toml",
        *ROOT.glob("plugins/*/pyproject.toml"),
    ]:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        reqs += project.get("dependencies", [])
        if pyproject.parent == ROOT:
            optional = project.get("optional-dependencies", {})
            for extra in extras:
                assert extra in optional, f"setup_env.sh installs extra '{extra}' that pyproject.toml lacks"
                reqs += optional[extra]
    return sorted({r for r in reqs if not OWN_PACKAGES.match(r)})


def _isolated_pip_env() -> dict[str, str]:
    """This process's environment without pip configuration: no config files, no local indexes or wheels."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _resolver_pip(tmp: Path, env: dict[str, str]) -> list[str]:
    """The command that runs the pinned pip from its wheel (downloaded from PyPI, not installed)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--index-url", PYPI,
         "-d", str(tmp), f"pip=={RESOLVER_PIP}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"could not fetch pip {RESOLVER_PIP} from PyPI:\n{done.stdout}\n{done.stderr}"
    (wheel,) = tmp.glob(f"pip-{RESOLVER_PIP}-*.whl")
    unpacked = tmp / "pip"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    return [sys.executable, str(unpacked / "pip")]  # pip's __main__ runs from a directory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyPI's CUDA torch wheels are the Linux ones")
def test_constraints_admit_the_cuda_torch_line(tmp_path: Path) -> None:
    torch_version = _script_setting("TORCH_VERSION")
    pins = _pins(CONSTRAINTS)
    env = _isolated_pip_env()
    pip = _resolver_pip(tmp_path, env)
    report = tmp_path / "report.json"
    requirements = [f"torch=={torch_version}", *_project_requirements()]
    done = subprocess.run(
        [*pip, "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
         *(f"--no-binary={name}" for name in SOURCE_ONLY), "--use-feature=fast-deps",
         "--index-url", PYPI, "--report", str(report), "-c", str(CONSTRAINTS), *requirements],
        env={**env, "DS_BUILD_OPS": "0"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"a fresh GPU machine cannot install torch=={torch_version} from PyPI with scripts/constraints.txt "
        f"(a pin there contradicts torch's own pins or our requirements):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    resolved = {_canonical(item["metadata"]["name"]): item for item in json.loads(report.read_text())["install"]}

    # the CUDA line: PyPI's torch wheel itself (no local +cpu build) with the CUDA packages it requires
    torch_item = resolved["torch"]
    assert torch_item["metadata"]["version"] == torch_version
    assert torch_item["download_info"]["url"].startswith("https://files.pythonhosted.org/"), torch_item["download_info"]
    assert any(name.startswith(("nvidia-", "cuda-")) for name in resolved), sorted(resolved)

    # every exact pin of that torch wheel is what was resolved, and constraints.txt pins none of those packages
    torch_pins = {}
    for requirement in torch_item["metadata"].get("requires_dist", []):
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*\(?\s*==\s*([^\s;,)]+)", requirement)
        if match:
            torch_pins[_canonical(match.group(1))] = match.group(3)
    assert "triton" in torch_pins, torch_item["metadata"].get("requires_dist")
    for name, version in torch_pins.items():
        if name in resolved:  # (requirements behind markers of other platforms are not installed)
            assert Version(resolved[name]["metadata"]["version"]) == Version(version), (name, version)
    assert not set(torch_pins) & set(pins), (
        f"constraints.txt pins packages that CUDA torch pins: {set(torch_pins) & set(pins)}"
    )

    # and the resolution honours our pins
    for name, version in pins.items():
        if name in resolved:
            assert Version(resolved[name]["metadata"]["version"]) == Version(version), (name, version)


def test_cpu_pins_extend_the_shared_ones() -> None:
    """constraints-cpu.txt (CPU set-up) includes constraints.txt and adds triton only; constraints.txt pins
    no triton (the CUDA build pins its own)."""
    assert "triton" not in _pins(CONSTRAINTS)
    lines = [line.strip() for line in CPU_CONSTRAINTS.read_text(encoding="utf-8").splitlines()]
    assert "-c constraints.txt" in lines
    assert set(_pins(CPU_CONSTRAINTS)) == {"triton"}


def test_run_tests_reports_no_collected_tests_as_failure(tmp_path: Path) -> None:
    """pytest's exit status 5 (nothing collected) is a failure of scripts/run_tests.sh, not a pass."""
    tree = tmp_path / "repo"
    (tree / "scripts").mkdir(parents=True)
    (tree / "scripts" / "run_tests.sh").write_text((ROOT / "scripts" / "run_tests.sh").read_text())
    # a set-up stand-in that names this interpreter (the real one would build a venv)
    (tree / "scripts" / "setup_env.sh").write_text(f"#!/usr/bin/env bash\necho {sys.executable}\n")
    (tree / "tests").mkdir()
    (tree / "tests" / "test_one.py").write_text("def test_one():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    run = [
        "bash",
        str(tree / "scripts" / "run_tests.sh"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tree),
        "-c",
        os.devnull,
    ]
    passed = subprocess.run([*run, "tests"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    empty = subprocess.run(
        [*run, "tests", "-k", "no_such_test"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )
    assert empty.returncode == 1, empty.stdout + empty.stderr
    assert "collected no tests" in empty.stderr
