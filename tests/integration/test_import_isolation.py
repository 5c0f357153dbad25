"""Only this project's packages are importable from the checkout, never its other folders.

The checkout's root holds folders that are not packages (``kernels/``, ``plugins/``, ``tests/``, ``benchmarks/``,
``examples/``...). With the root (or such a folder) on ``sys.path``, Python imports any of them as a namespace
package: ``import kernels`` then succeeds with an empty module instead of failing, so bitsandbytes, which probes
Hugging Face's ``kernels`` package, reports "cannot import name 'get_kernel' from 'kernels' (unknown location)".

Covered here: what the venv's installs put on ``sys.path`` (a process started outside the checkout), the editable
wheels setuptools builds from our ``setup.py`` (default and strict modes; compat, which adds the root, is
refused), the environment the launch tests give their workers, and the main job's launch (stock
``accelerate launch`` with what ``scripts/run_main_job.sh`` exports), with bitsandbytes imported in the worker.

A ``python -c`` / ``python -m`` started in the checkout's root still sees the root (Python puts the current folder
first on ``sys.path``), and so does the pytest process (``tests`` is imported from the root): both are
interactive or development use, not something the project launches.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ACCELERATE, REPO, free_port, run

# What a process reports about its imports: where `kernels` resolves, its sys.path, and where every
# identifier-named folder of the checkout's root resolves when imported by that name.
PROBE = """
import importlib.util, json, os, sys
repo = os.path.realpath(sys.argv[1])
def where(name):
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return [os.path.realpath(p) for p in (spec.submodule_search_locations or [spec.origin])]
names = sorted(n for n in os.listdir(repo) if n.isidentifier() and os.path.isdir(os.path.join(repo, n)))
report = {"kernels": where("kernels"), "path": [os.path.realpath(p) for p in sys.path if p], "top": {n: where(n) for n in names}}
for extra in sys.argv[2:]:
    report[extra] = where(extra)
out = os.environ.get("PROBE_OUT")
if out:
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
else:
    print(json.dumps(report))
"""

OUR_TOP_LEVEL = ("fms_acceleration_accelerate", "_fms_acceleration_startup")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _under_repo(locations: list[str] | None) -> list[str]:
    """The locations inside the checkout, less the venv (which may live there, as .venv/ does)."""
    root, venv = os.path.realpath(REPO), os.path.realpath(sys.prefix)
    inside = [p for p in locations or [] if p == root or p.startswith(root + os.sep)]
    return [p for p in inside if not (p == venv or p.startswith(venv + os.sep))]


def _non_package_folders(entry: str) -> list[str]:
    """Folders directly in ``entry`` that an import would take for a namespace package."""
    if not os.path.isdir(entry):
        return []
    return sorted(
        name
        for name in os.listdir(entry)
        if name.isidentifier()
        and name != "__pycache__"
        and os.path.isdir(os.path.join(entry, name))
        and not any(os.path.exists(os.path.join(entry, name, f"__init__{s}")) for s in (".py", ".pyc"))
    )


def _check_report(report: dict, who: str) -> None:
    assert not _under_repo(report["kernels"]), f"{who}: 'import kernels' finds {report['kernels']}"
    root = os.path.realpath(REPO)
    assert root not in report["path"], f"{who}: the checkout's root is on sys.path: {report['path']}"
    for entry in report["path"]:
        if _under_repo([entry]):
            assert not _non_package_folders(entry), (
                f"{who}: sys.path entry {entry} holds folders that import as namespace packages: "
                f"{_non_package_folders(entry)}"
            )
    for name, locations in report["top"].items():
        if name not in OUR_TOP_LEVEL:
            assert not _under_repo(locations), f"{who}: 'import {name}' finds the checkout's folder {locations}"


def test_installed_venv_outside_the_checkout(tmp_path: Path) -> None:
    """A process of this venv started elsewhere: the installs' .pth lines and finders expose our packages only."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO), "fms_acceleration_accelerate_kernels", "fms_acceleration_accelerate"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    _check_report(report, "venv process")
    # the editable installs still work: the packages resolve (to the checkout when installed editable)
    assert report["fms_acceleration_accelerate"] and report["fms_acceleration_accelerate_kernels"]
    assert report["kernels"] is None or "site-packages" in report["kernels"][0], report["kernels"]


def test_the_root_folder_is_what_python_c_in_the_root_sees(tmp_path: Path) -> None:
    """The probe can fail: Python's own rule (the current folder first for ``-c``) exposes ``kernels/``."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO)], cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert _under_repo(report["kernels"]) == [os.path.realpath(REPO / "kernels")]
    with pytest.raises(AssertionError, match="'import kernels' finds"):
        _check_report(report, "python -c in the root")


def test_launch_tests_worker_environment(launch_env: dict[str, str], tmp_path: Path) -> None:
    """The environment the launch tests give their workers: toy plugins importable, the checkout's root not."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO), "tests.integration.toy_plugins"],
        cwd=tmp_path, env=launch_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tests.integration.toy_plugins"] == [os.path.realpath(REPO / "tests/integration/toy_plugins.py")]
    report["top"].pop("tests")  # importable on purpose, through a link in the toy site folder
    _check_report(report, "launch test worker")


def test_worker_scripts_import_tests_without_the_root(tmp_path: Path) -> None:
    """The torchrun worker scripts' way to the tests package adds nothing to sys.path."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from checkout_tests import import_checkout_tests;"
        "import_checkout_tests(); import tests.integration.toy_plugins as t; import importlib.util as u;"
        "s = u.find_spec('kernels'); sys.path.pop(0);"
        "print(json.dumps([t.__file__, s and list(s.submodule_search_locations or [s.origin]), sys.path]))"
    )
    scripts = REPO / "tests" / "integration" / "scripts"
    done = subprocess.run(
        [sys.executable, "-c", code, str(scripts), str(REPO)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    toy_file, kernels, path = json.loads(done.stdout)
    assert Path(toy_file).resolve() == (REPO / "tests/integration/toy_plugins.py").resolve()
    assert not _under_repo([os.path.realpath(p) for p in kernels or []]), kernels
    assert not _under_repo([os.path.realpath(p) for p in path if p]) or all(
        not _non_package_folders(p) for p in path if _under_repo([os.path.realpath(p)])
    ), path


def _copy_for_build(dest: Path) -> Path:
    """The files setuptools reads to build the root package, plus a decoy kernels/ folder like the checkout's."""
    for name in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "fms_acceleration_accelerate.pth",
        "_fms_acceleration_startup.py",
    ):
        shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fms_acceleration_accelerate", "launch_configs"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    (dest / "kernels" / "src").mkdir(parents=True)
    return dest


def _build_editable(project: Path, out: Path, mode: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from setuptools import build_meta;"
        "print(build_meta.build_editable(sys.argv[1], config_settings={'editable_mode': sys.argv[2]}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(out), mode], cwd=project, env=_clean_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_editable_wheel_maps_only_our_packages(tmp_path: Path, mode: str) -> None:
    pytest.importorskip("setuptools")
    (tmp_path / "project").mkdir()
    project = _copy_for_build((tmp_path / "project").resolve())
    out = tmp_path / "out"
    out.mkdir()
    done = _build_editable(project, out, mode)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    folders = []  # the folders the wheel's .pth lines put on sys.path
    finders = {}  # top-level name -> folder, from setuptools' editable finder
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            text = archive.read(name).decode("utf-8", "replace")
            if name.endswith(".pth"):
                lines = [ln.strip() for ln in text.splitlines()]
                folders += [ln for ln in lines if ln and not ln.startswith(("#", "import ", "import\t"))]
            elif name.startswith("__editable__") and name.endswith("_finder.py"):
                match = re.search(r"^MAPPING\b.*?=\s*(\{.*?\})\s*$", text, re.MULTILINE)
                assert match, text[:2000]
                finders.update(ast.literal_eval(match.group(1)))
    assert str(project) not in {os.path.realpath(f) for f in folders if os.path.isabs(f)}, folders
    for folder in folders:
        if os.path.isabs(folder):
            assert not _non_package_folders(folder), (folder, _non_package_folders(folder))
    if mode == "lenient":
        assert set(finders) == {
            "fms_acceleration_accelerate",
            "fms_acceleration_accelerate.launch_configs",
            "_fms_acceleration_startup",
        }, finders
        assert str(project) not in finders.values()
    else:  # strict: a link tree under build/ that holds our names only
        (tree,) = (f for f in folders if "__editable__" in f)
        assert sorted(os.listdir(tree)) == ["_fms_acceleration_startup.py", "fms_acceleration_accelerate"]
    # the start-up hook and the upstream-names folders come with every mode
    assert any(n.endswith("fms_acceleration_accelerate.pth") for n in zipfile.ZipFile(wheel).namelist())


def test_editable_compat_mode_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    (tmp_path / "project").mkdir()
    project = _copy_for_build(tmp_path / "project")
    out = tmp_path / "out"
    out.mkdir()
    done = _build_editable(project, out, "compat")
    assert done.returncode != 0
    assert "editable_mode=compat is not supported" in done.stdout + done.stderr
    assert not list(out.glob("*.whl"))


def test_setup_stamp_covers_setup_py() -> None:
    """setup.py decides the installed .pth files, so a change to it must re-run the editable installs."""
    script = (REPO / "scripts" / "setup_env.sh").read_text(encoding="utf-8")
    (stamp_line,) = [ln for ln in script.splitlines() if ln.startswith("want=")]
    assert "setup.py" in stamp_line.split() and "fms_acceleration_accelerate.pth" in stamp_line.split()


@pytest.mark.slow
def test_main_job_launch_sees_no_checkout_folder(tmp_path: Path) -> None:
    """The main job's launch: stock ``accelerate launch`` of the CPU QLoRA config from the checkout's root, with
    what ``scripts/run_main_job.sh`` exports. The worker imports bitsandbytes, whose CPU back end looks for
    Hugging Face's ``kernels`` package: it must not find our folder."""
    pytest.importorskip("bitsandbytes")
    script = (REPO / "scripts" / "run_main_job.sh").read_text(encoding="utf-8")
    assert re.search(r"^export PYTHONSAFEPATH=1$", script, re.MULTILINE), (
        "run_main_job.sh no longer sets PYTHONSAFEPATH"
    )
    probe = tmp_path / "probe.py"
    probe.write_text("import bitsandbytes\n" + PROBE, encoding="utf-8")
    report = tmp_path / "report.json"
    env = _clean_env(PYTHONSAFEPATH="1", PROBE_OUT=str(report))
    done = run(
        [ACCELERATE, "launch", "--config_file", str(REPO / "launch_configs/accelerate-cpu-qlora-foak.yaml"),
         "--main_process_port", str(free_port()), str(probe), str(REPO)],
        env, REPO, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "(unknown location)" not in output, output[-3000:]
    assert "cannot import name 'get_kernel'" not in output, output[-3000:]
    _check_report(json.loads(report.read_text(encoding="utf-8")), "main job worker")
