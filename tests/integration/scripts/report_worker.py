"""Worker for launch tests: a script that never imports fms_acceleration_accelerate.

It creates a plain ``Accelerator(cpu=True)`` (a gloo group under a MULTI_GPU launch on a machine without GPU),
all-reduces its rank, and writes ``$REPORT_DIR/rank<R>.json`` with the active plugins it sees.
"""

import json
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

report_dir = os.environ["REPORT_DIR"]
with open(os.path.join(report_dir, f"started_{os.getpid()}"), "w", encoding="utf-8") as handle:
    handle.write("started")
# a bounded collective timeout: a rank whose peer died fails instead of outliving the test
accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
framework = getattr(accelerator, "_fms_acceleration_framework", None)
total = accelerator.reduce(torch.ones(1) * (accelerator.process_index + 1), "sum").item()
report = {
    "rank": accelerator.process_index,
    "world": accelerator.num_processes,
    "plugins": list(framework.active_plugin_names) if framework is not None else None,
    "sum": total,
    "script_imported_package": "fms_acceleration_accelerate.cli" in sys.modules,
    "node_rank": os.environ.get("GROUP_RANK"),
}
with open(os.path.join(report_dir, f"rank{accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
    json.dump(report, handle)
accelerator.wait_for_everyone()
accelerator.end_training()
