"""This checkout's ``tests`` package for the worker scripts here, imported from its folder.

Putting the checkout's root on ``sys.path`` instead would make every folder there that is not a package
importable as a namespace package: ``import kernels`` would then find the ``kernels/`` distribution folder rather
than fail (or find Hugging Face's ``kernels`` package), and libraries that probe for that package (bitsandbytes)
take the wrong branch. Importing ``tests`` by location adds nothing to ``sys.path``; ``tests.integration...`` then
resolves through the package's own ``__path__``. The workers find this module as a sibling (Python puts a
script's folder first on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parents[2]


def import_checkout_tests() -> ModuleType:
    """Import (once) this checkout's ``tests`` package; an already imported ``tests`` must be this one."""
    loaded = sys.modules.get("tests")
    if loaded is not None:
        locations = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if TESTS not in locations:
            raise ImportError(f"another 'tests' package is already imported (from {locations}), not {TESTS}")
        return loaded
    spec = importlib.util.spec_from_file_location(
        "tests", TESTS / "__init__.py", submodule_search_locations=[str(TESTS)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the tests package from {TESTS}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests"] = module
    spec.loader.exec_module(module)
    return module
