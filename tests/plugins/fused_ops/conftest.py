"""Fixtures of the fused-ops plugin tests.

The root conftest turns on the Triton interpreter (``TRITON_INTERPRET=1``) on machines without CUDA, which
sends every kernel call of CPU tensors through Triton. Most tests here check the *patching* (which module
runs which kernel, equality, reverts), so they run the kernels' pure-torch references (``reference_kernels``,
autouse); tests that exercise the Triton path opt in with the ``triton_interpreter`` fixture.
"""

from __future__ import annotations

import importlib

import pytest

# Import the kernel modules now, while TRITON_INTERPRET still has the root conftest's value: @triton.jit decides
# between the interpreter and the GPU launcher when a kernel is defined, not when it runs.
for _name in ("rms_norm", "rope", "glu", "cross_entropy", "fused_linear_cross_entropy", "nf4", "dequant", "lora"):
    importlib.import_module(f"fms_acceleration_accelerate_kernels.{_name}")


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_fsdp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
