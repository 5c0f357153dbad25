"""Ending a multi-process training run so that every process exits.

Why a plain ``accelerator.end_training()`` is not enough on CPU (gloo): every backward pass stores a Python
object in PyTorch's thread-local state, and each gradient all-reduce that DDP (or FSDP) starts during the
backward keeps a copy of that state. Gloo's worker thread drops the finished all-reduce afterwards, which needs
the GIL. If the main thread destroys the process group in that short window (it holds the GIL while the
process group's destructor joins the worker thread), the two threads wait on each other forever: the job
finishes training and then hangs at exit. ``destroy_process_group()`` alone does not help, because DDP's
reducer keeps the process group alive, so the destructor runs later, when the script's last reference to the
wrapped model goes away, without any wait in between.

:func:`end_training` orders the teardown so that this cannot happen:

1. the Accelerator's own references to the prepared model, optimizer, scheduler and data loaders are dropped
   and garbage is collected, so DDP's reducer dies now (the process group survives it: the group registry
   still holds it) when the script has dropped its references as well;
2. a barrier: every process has finished its collectives, and while it waits the GIL is free, so the worker
   threads finish dropping the last all-reduce;
3. ``accelerator.end_training()``: trackers are closed and the process group is destroyed, while its worker
   threads are idle.

Usage, at the end of the training function::

    from fms_acceleration_accelerate import end_training

    ...                      # train, save
    del model, optimizer     # your own references to the prepared objects
    end_training(accelerator)

A bounded collective timeout makes a lost peer an error instead of a wait without end, e.g.
``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=5))])``; the barrier here uses
the process group's timeout.
"""

from __future__ import annotations

import gc
from typing import Any


def end_training(accelerator: Any) -> None:
    """Release the Accelerator's prepared objects, wait for every process, then run
    ``accelerator.end_training()`` (trackers closed, process group destroyed).

    Drop your own references to the prepared model and optimizer first (``del model, optimizer``): the
    process group is then destroyed here, right after the barrier. References still held only delay its
    destruction to when they go away, which the barrier has made safe. Works without a process group too
    (one process): then it only releases and ends training.
    """
    if not callable(getattr(accelerator, "end_training", None)) or not callable(
        getattr(accelerator, "free_memory", None)
    ):
        raise TypeError(
            f"end_training(accelerator) needs an accelerate.Accelerator, got {type(accelerator).__name__}; "
            "pass the Accelerator that prepared the model"
        )
    accelerator.free_memory()  # drops its lists of prepared objects (its own gc ran before that)
    gc.collect()  # DDP's reducer, when nothing else holds the wrapped model; the group registry keeps the group

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every process has finished its collectives; the GIL is free while this waits, so gloo's worker
        # threads can drop the all-reduces of the last backward before the group's destructor joins them
        dist.barrier()
    accelerator.end_training()
