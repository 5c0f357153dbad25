"""Test-suite wide settings.

Triton kernels run in interpreter mode on machines without a CUDA device; the variable must be set before
Triton is imported anywhere, hence here, at the top of the root conftest.
"""

import os

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
