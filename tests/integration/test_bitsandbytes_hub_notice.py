"""bitsandbytes' notice about its optional CPU kernel from the Hugging Face hub is left out of our runs.

On CPUs with AVX512-BF16, importing bitsandbytes tries ``from kernels import get_kernel`` (Hugging Face's
``kernels`` package, to fetch a CPU kernel from the hub) and, without that package, logs "Failed to load CPU
gemm_4bit_forward from kernels-community: No module named 'kernels'...". The package is no dependency of this
project and nothing is downloaded at run time, so the line says nothing a user can act on. In a worker started by
``accelerate launch`` (whoever imports bitsandbytes first: ``import peft`` does) and in the bitsandbytes plugin's
loader, the first import of bitsandbytes runs with a filter for exactly that record, removed right after.

The processes run outside the checkout (``PYTHONSAFEPATH=1``), as the main job does, so no folder of the checkout
can stand in for the ``kernels`` package.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _fms_acceleration_startup as startup

from .conftest import ACCELERATE, REPO, free_port, run

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
OUR_DEBUG_LINE = "bitsandbytes: its optional CPU kernel from the Hugging Face hub is not used"
CPU_LOGGER = "bitsandbytes.backends.cpu.ops"

# after the imports: what is left installed (filters on bitsandbytes' CPU logger, our finders)
REPORT = f"""
import json, logging, sys
print(json.dumps({{
    "filters": len(logging.getLogger({CPU_LOGGER!r}).filters),
    "finders": [type(f).__name__ for f in sys.meta_path if type(f).__module__ == "_fms_acceleration_startup"],
}}))
"""


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    clean.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1", **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=clean, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def cpu_shows_notice(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without our filter, a plain ``import bitsandbytes`` on this machine logs the notice (the condition the
    other tests remove). Also: an already imported bitsandbytes is left alone by :func:`import_bitsandbytes`."""
    pytest.importorskip("bitsandbytes")
    code = (
        "import sys, logging\n"
        "import bitsandbytes\n"
        "from bitsandbytes.functional import has_avx512bf16\n"
        "from _fms_acceleration_startup import import_bitsandbytes\n"
        "finders = list(sys.meta_path)\n"
        "assert import_bitsandbytes() is bitsandbytes\n"
        f"assert sys.meta_path == finders and not logging.getLogger({CPU_LOGGER!r}).filters\n"
        "print('avx512bf16', bool(has_avx512bf16()))\n"
    )
    done = _python(code, tmp_path_factory.mktemp("plain"))
    assert done.returncode == 0, done.stderr[-3000:]
    if "avx512bf16 False" in done.stdout:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not look for its hub CPU kernel here")
    assert "avx512bf16 True" in done.stdout, done.stdout
    assert NOTICE in done.stderr, done.stderr[-3000:]


def test_launched_worker_leaves_out_the_notice(cpu_shows_notice: None, tmp_path: Path) -> None:
    """A worker of ``accelerate launch`` (the section variable set) whose script imports peft first, as the main
    job does: peft imports bitsandbytes before any code of ours runs; the start-up hook's finder scopes it."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format='%(levelname)s %(name)s: %(message)s')\n"
        "import peft\n" + REPORT
    )
    done = _python(code, tmp_path, FMS_ACCELERATION_SECTION=str(tmp_path / "section.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert NOTICE not in done.stderr, done.stderr[-3000:]
    ours = [ln for ln in done.stderr.splitlines() if OUR_DEBUG_LINE in ln]
    assert len(ours) == 1 and ours[0].startswith("DEBUG fms_acceleration_accelerate:"), done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["filters"] == 0, report  # the filter went with the import
    assert "_QuietBitsandbytesImport" not in report["finders"], report


def test_loader_import_leaves_out_the_notice(cpu_shows_notice: None, tmp_path: Path) -> None:
    """A plain process (no launcher): the bitsandbytes plugin's loader imports bitsandbytes through
    ``import_bitsandbytes``; the same record is left out, nothing stays installed."""
    code = (
        "from _fms_acceleration_startup import import_bitsandbytes\n"
        "bnb = import_bitsandbytes()\n"
        "assert bnb.nn.Linear4bit\n" + REPORT
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert NOTICE not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"filters": 0, "finders": []}, report


def test_loader_imports_bitsandbytes_through_the_scoped_import() -> None:
    """The loader's first bitsandbytes import is the scoped one (before transformers' own, while loading)."""
    source = (REPO / "plugins/accelerated-peft/src/fms_acceleration_accelerate_peft/loader.py").read_text("utf-8")
    body = source.split("def load_quantized_causal_lm(", 1)[1]
    assert body.index("import_bitsandbytes()") < body.index("from transformers import"), body[:1500]


def _record(name: str = CPU_LOGGER, msg: str = NOTICE + ": %s. Please ...", cause: object = None) -> logging.LogRecord:
    if cause is None:
        cause = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (cause,), None)


def test_filter_drops_exactly_that_record() -> None:
    notice = startup._HubKernelNotice()
    assert notice.filter(_record()) is False and notice.dropped
    passing = [
        # the `kernels` package found but unusable (e.g. a folder shadowing it, or no get_kernel)
        _record(cause=ImportError("cannot import name 'get_kernel' from 'kernels'", name="kernels")),
        # installed, but the hub could not be reached: worth seeing
        _record(cause=OSError("offline")),
        # another module missing
        _record(cause=ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub")),
        # another logger, another message
        _record(name="bitsandbytes.cextension"),
        _record(msg="Failed to load something else: %s"),
    ]
    for record in passing:
        notice = startup._HubKernelNotice()
        assert notice.filter(record) is True and not notice.dropped, record.getMessage()


@pytest.mark.slow
def test_main_job_launch_prints_no_notice(tmp_path: Path) -> None:
    """Stock ``accelerate launch`` of the main job's CPU config, run as ``scripts/run_main_job.sh`` runs it, with a
    script whose first import is peft (as ``examples/train_tiny.py``)."""
    pytest.importorskip("bitsandbytes")
    script = tmp_path / "imports_peft.py"
    script.write_text("import accelerate\nimport peft\nimport bitsandbytes\nprint('imported')\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1")
    done = run(
        [ACCELERATE, "launch", "--config_file", str(REPO / "launch_configs/accelerate-cpu-qlora-foak.yaml"),
         "--main_process_port", str(free_port()), str(script)],
        env, REPO, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "imported" in done.stdout
    assert NOTICE not in done.stdout + done.stderr, done.stderr[-3000:]
