"""The cross-entropy row kernel's generated code for H100/H200 (sm_90), compiled offline (no GPU needed).

The row kernel's speed is bounded by the instructions it issues per element between its block reductions;
these checks keep the per-element instruction mix that the GPU sweeps measured from regressing. The compile
runs in a subprocess: in this process the kernels may be Triton-interpreter functions (TRITON_INTERPRET=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel-bench" / "codegen_stats.py"
if not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists():  # pragma: no cover - a wheel without them
    pytest.skip("this Triton wheel ships no ptxas/cuobjdump for offline sm_90 compilation", allow_module_level=True)


def _compile(*launches: tuple) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, str(SCRIPT), "--arch", "90", "--json"]
    for launch in launches:
        cmd += ["--launch", *(str(int(v)) for v in launch)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_row_kernel_codegen_for_sm90():
    from fms_acceleration_accelerate_kernels.cross_entropy import _LAUNCH

    default, without, with_fixup = _compile(
        _LAUNCH["fwd_grad"], (4096, 8, 0, False, False, False, False), (4096, 8, 0, False, False, False, True)
    )
    # one ex2.approx.ftz per element: the non-flushing form adds subnormal handling to every element
    assert "ex2.approx.ftz.f32" in default["ptx"]
    assert "ex2.approx.f32" not in default["ptx"]
    assert default["stack_bytes"] == 0 and default["opcodes"]["LDL"] == default["opcodes"]["STL"] == 0
    # FIXUP: no per-element select for the target column (16 elements per thread and block at 4096 / 8 warps)
    assert with_fixup["opcodes"]["FSEL"] + 16 <= without["opcodes"]["FSEL"]
    assert with_fixup["sass_instructions"] < without["sass_instructions"]
    assert with_fixup["opcodes"]["BAR"] == without["opcodes"]["BAR"] + 1  # the barrier before the target's store
