"""Test-suite wide settings.

Triton kernels run in interpreter mode on machines without a CUDA device; the variable must be set before
Triton is imported anywhere, hence here, at the top of the root conftest.
"""

import os
import sys

import pytest

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency of the suite
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_PROCESS_ENV_PREFIXES = ("FMS_ACCELERATION", "ACCELERATE_")


@pytest.fixture(autouse=True)
def _isolate_process_state():
    """Leave no process-wide state from one test to the next.

    - This package's environment variables: ``export_section`` (the launcher's hand-off) sets
      ``FMS_ACCELERATION_SECTION`` in the process that calls it; a value left behind makes every later
      ``Accelerator()`` and routed ``from_pretrained`` of the test process, and every process it spawns, read that
      section. Accelerate's own ``ACCELERATE_*`` variables likewise: ``Accelerator(deepspeed_plugin=...)`` sets
      ``ACCELERATE_USE_DEEPSPEED=true``, which would send every later ``prepare`` of the process to DeepSpeed.
    - Accelerate's shared state: a trainer's ``Accelerator`` (e.g. TRL's, whose ``SFTConfig`` turns bf16 on by
      default) would otherwise hand its mixed precision to every later ``Accelerator()`` of the process."""
    before = {k: v for k, v in os.environ.items() if k.startswith(_PROCESS_ENV_PREFIXES)}
    yield
    for key in [k for k in os.environ if k.startswith(_PROCESS_ENV_PREFIXES) and k not in before]:
        del os.environ[key]
    os.environ.update(before)
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()
