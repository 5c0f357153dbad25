"""Helpers shared by the kernel modules: dispatch rule, block sizes, launch settings, dtype checks.

Nothing here imports Triton, so the package can be imported (and the references used) cheaply.
"""

from __future__ import annotations

import os

import torch

# dtypes every kernel accepts for its floating inputs.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

# Largest block (in elements) one program loads for a row-wise kernel; wider rows are looped over.
MAX_FUSED_BLOCK = 65536


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in interpreter mode (``TRITON_INTERPRET=1``), e.g. on CPU in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Dispatch rule of every public op: Triton for CUDA tensors or in interpreter mode, else the reference.

    Args:
        *tensors: the op's tensor arguments; ``None`` entries are ignored.

    Returns:
        True when the Triton implementation should run.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    if interpreter_enabled():
        return True
    return all(t.is_cuda for t in present)


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    """Raise a ``TypeError`` naming the argument when ``tensor`` is not fp32, bf16 or fp16."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; the kernels support float32, bfloat16 and float16. "
            f"Cast it first, e.g. {name}.to(torch.bfloat16)."
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Warps for a program that handles ``block`` elements of a row at a time."""
    if block >= 32768:
        return 16
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def row_block(n_cols: int) -> int:
    """Block size that holds one row of ``n_cols`` elements in a single program (row-wise fused kernels)."""
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_BLOCK:
        raise ValueError(
            f"rows of {n_cols} elements exceed the fused row kernel limit of {MAX_FUSED_BLOCK}; "
            "use the reference implementation for such shapes."
        )
    return block


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small constant elsewhere (interpreter mode)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` (..., C) as (rows, C) with unit stride on the last dim, copying only when required."""
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension, got a scalar")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2
