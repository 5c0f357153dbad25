"""Timing and run-record helpers shared by the kernel benchmarks of this folder.

The scripts import it as a sibling module (``sys.path[0]`` is this folder when they run).
"""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from importlib import metadata


def cuda_median_ms(fn: Callable[[], object], warmup: int, reps: int, inner: int = 1) -> float:
    """Median time of one ``fn`` call in ms over ``reps`` measurements, after ``warmup`` calls: CUDA events around
    ``inner`` back-to-back calls, divided by ``inner``.

    ``inner > 1`` measures device throughput (launch overhead hidden behind the previous call, as in training);
    ``inner == 1`` includes the host-side launch latency of a single call.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return sorted(times)[len(times) // 2]


def wall_ms_once(fn: Callable[[], object]) -> float:
    """Wall-clock ms of one ``fn`` call after one warm-up call (the CPU smoke runs: checks the script, times
    nothing meaningful)."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run_environment(device, packages: Iterable[str], **extra: object) -> dict:
    """Where and when a benchmark ran: the device (``cpu (Triton interpreter)`` off CUDA), CUDA and the
    versions of Python and ``packages`` (``None``: not installed), the UTC date, the command line; then ``extra``;
    on CUDA the device's memory."""
    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "cuda": torch.version.cuda,
        "versions": versions,
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        **extra,
    }
    if device.type == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env
