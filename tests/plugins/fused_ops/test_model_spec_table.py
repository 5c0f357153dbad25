"""The architecture spec table, field by field, against its recorded copy (``data/architecture_specs.json``).

The specs are written with shared helpers; this keeps a rewrite of those helpers from changing any spec unseen.
After an intended change to a spec, rewrite the recorded copy and review its diff:
``python tests/plugins/fused_ops/test_model_spec_table.py --write``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from fms_acceleration_accelerate.model_specs import ARCHITECTURE_SPECS

RECORDED = Path(__file__).resolve().parent / "data" / "architecture_specs.json"


def spec_table() -> dict:
    """Every spec as plain data (tuples as lists, as JSON keeps them), in declaration order."""
    return json.loads(json.dumps({name: dataclasses.asdict(spec) for name, spec in ARCHITECTURE_SPECS.items()}))


def test_spec_table_is_the_recorded_one():
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    table = spec_table()
    assert list(table) == list(recorded)  # the same architectures, in the same order
    for name, spec in table.items():
        assert spec == recorded[name], f"the {name} spec differs from {RECORDED.name} (see this module's docstring)"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {sys.argv[0]} --write  (rewrites {RECORDED})")
    RECORDED.write_text(json.dumps(spec_table(), indent=1) + "\n", encoding="utf-8")
