"""Fixtures of the MoE plugin tests.

The root conftest turns the Triton interpreter on (``TRITON_INTERPRET=1``) on machines without CUDA; the expert
kernels are imported here while it is on, since ``@triton.jit`` picks the interpreter when a kernel is defined.
Tests choose the path per call: ``reference_kernels`` runs the kernels' torch reference (``TRITON_INTERPRET=0`` on
CPU), ``triton_interpreter`` the Triton kernels in the interpreter (or on CUDA).
"""

from __future__ import annotations

import importlib

import pytest

importlib.import_module("fms_acceleration_accelerate_kernels.moe")


@pytest.fixture
def reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["triton", "reference"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both paths of the expert op: the Triton kernels (interpreter on CPU) and the torch reference."""
    import torch

    if request.param == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


@pytest.fixture(autouse=True)
def _no_fsdp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory):
    """``saved_models(model_type, **overrides)``: the directory of a tiny random-init model of that architecture,
    saved once per session with ``save_pretrained``."""
    from .moe_helpers import save_tiny

    cache: dict[tuple, object] = {}

    def get(model_type: str, **overrides):
        key = (model_type, repr(sorted(overrides.items())))
        if key not in cache:
            cache[key] = save_tiny(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"), **overrides)
        return cache[key]

    return get
