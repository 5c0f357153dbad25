"""Plugins are told the run's shape (a RunContext) and never read it themselves: no plugin source reads the
environment or Accelerate's internals. Only the framework's ``accelerate_integration`` and ``launch_environment``
modules do."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN_NAMES = frozenset({"environ", "getenv", "putenv", "AcceleratorState", "PartialState", "_shared_state"})
"""Names that read (or lead to) the environment or Accelerate's process state, wherever they appear in code."""
LAUNCHER_VARIABLE = re.compile(r"ACCELERATE_[A-Z0-9_]+|FSDP_[A-Z0-9_]+|(LOCAL_)?(RANK|WORLD_SIZE)|MASTER_(ADDR|PORT)")
"""A string literal that is exactly one of these is the name of a variable the launcher exports: reading it is the
only use such a literal has (prose that mentions one, in a docstring or a message, is never exactly the name)."""
READER_MODULES = (
    "fms_acceleration_accelerate.accelerate_integration",
    "fms_acceleration_accelerate.launch_environment",
)
"""The framework's modules that read them; a plugin importing from one would read through it."""


def environment_reads(source: str, filename: str = "<source>") -> list[str]:
    """``"line: what"`` for every read of the environment or of Accelerate's internals in ``source``."""
    found: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            hit(node, node.id)
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_NAMES:
            hit(node, f".{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "state" and _dotted(node.value) == "accelerate":
            hit(node, "accelerate.state")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "accelerate.state" or alias.name.startswith("accelerate.state."):
                    hit(node, f"import {alias.name}")
                if alias.name in READER_MODULES:
                    hit(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "accelerate.state" or module.startswith("accelerate.state."):
                hit(node, f"from {module} import ...")
            if module in READER_MODULES or (node.level == 0 and _imports_reader(module, node.names)):
                hit(node, f"from {module} import ...")
            for alias in node.names:
                if alias.name in FORBIDDEN_NAMES or (module == "accelerate" and alias.name == "state"):
                    hit(node, f"from {module} import {alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.strip()
            if LAUNCHER_VARIABLE.fullmatch(value) or value in FORBIDDEN_NAMES or value.startswith("accelerate.state"):
                hit(node, repr(node.value))
    return sorted(set(found), key=lambda line: (int(line.split(":")[0]), line))


def _imports_reader(module: str, names: list[ast.alias]) -> bool:
    """``from fms_acceleration_accelerate import accelerate_integration`` and the like."""
    return any(f"{module}.{alias.name}" in READER_MODULES for alias in names)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def plugin_sources(root: Path) -> list[Path]:
    """Every Python file of every plugin package (``plugins/*/src/**``)."""
    return sorted(root.glob("plugins/*/src/**/*.py"))


def plugin_environment_reads(root: Path) -> dict[str, list[str]]:
    reads = {}
    for path in plugin_sources(root):
        found = environment_reads(path.read_text(encoding="utf-8"), str(path))
        if found:
            reads[str(path.relative_to(root))] = found
    return reads


def test_no_plugin_reads_the_environment_or_accelerate_internals():
    assert len(plugin_sources(ROOT)) >= 10  # both plugins' packages are scanned
    assert plugin_environment_reads(ROOT) == {}, (
        "plugins get the run's shape as a RunContext (the context argument of the prepare-time hooks, "
        "self.run_context elsewhere); read the environment / Accelerate state only in "
        "fms_acceleration_accelerate/accelerate_integration.py or launch_environment.py"
    )


PLANTED = [
    'import os\nUSE_FSDP = os.environ.get("ACCELERATE_USE_FSDP", "false")\n',
    'import os\nWORLD = int(os.getenv("WORLD_SIZE", "1"))\n',
    "from os import environ\n",
    'import os\nrank = os.environ["LOCAL_RANK"]\n',
    'def version(env):\n    return env.get("FSDP_VERSION")\n',
    "from accelerate.state import AcceleratorState\n",
    "from accelerate import PartialState\n",
    "from accelerate import state\n",
    "import accelerate.state\n",
    "import accelerate\nshared = accelerate.state.AcceleratorState._shared_state\n",
    "def f(accelerator):\n    return type(accelerator.state)._shared_state\n",
    'import importlib\nstate = importlib.import_module("accelerate.state")\n',
    'import os\nvalue = getattr(os, "environ")\n',
    "from fms_acceleration_accelerate.accelerate_integration import expected_fsdp_version\n",
    "from fms_acceleration_accelerate import launch_environment\n",
]


@pytest.mark.parametrize("source", PLANTED, ids=range(len(PLANTED)))
def test_a_planted_read_is_caught(source):
    assert environment_reads(source)


def test_a_read_planted_in_a_plugin_tree_is_reported(tmp_path):
    package = tmp_path / "plugins" / "my-plugin" / "src" / "my_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Mentions ACCELERATE_USE_FSDP in prose only."""\n')
    (package / "plugin.py").write_text(
        '"""Docstring naming os.environ and AcceleratorState."""\n'
        "import os  # os.environ would be a read; a comment is not\n\n\n"
        "def fsdp():\n"
        '    return os.environ.get("ACCELERATE_USE_FSDP") == "true"\n'
    )
    assert plugin_environment_reads(tmp_path) == {
        "plugins/my-plugin/src/my_plugin/plugin.py": ["6: 'ACCELERATE_USE_FSDP'", "6: .environ"]
    }


def test_prose_is_not_a_read():
    source = (
        '"""Under accelerate launch (ACCELERATE_USE_FSDP=true) the run context says FSDP."""\n'
        "# os.environ, AcceleratorState._shared_state and accelerate.state are named here only\n"
        "def warn(n):\n"
        '    return f"set ACCELERATE_USE_FSDP=true (as accelerate launch does) for {n} layers"\n'
        "def f(accelerator, run_context):\n"
        "    return accelerator.state, run_context.world_size\n"
    )
    assert environment_reads(source) == []


def test_loading_a_plugin_imports_no_training_library() -> None:
    """The framework loads every installed plugin's entry point wherever it reads a configuration, the `accelerate
    launch` launcher included: a plugin module that imported peft / bitsandbytes / transformers' trainer there would
    slow every launch and print their import-time messages (bitsandbytes' hub-kernel notice) from the launcher,
    where nothing of ours can scope them."""
    import os
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "eps = list(entry_points(group='fms_acceleration_accelerate.plugins'))\n"
        "assert eps, 'no plugin installed'\n"
        "for ep in eps: ep.load()\n"
        "heavy = sorted(m for m in ('peft', 'bitsandbytes', 'trl', 'transformers.trainer') if m in sys.modules)\n"
        "print(len(eps), ','.join(heavy))\n"
    )
    # PYTHONSAFEPATH: `-c` would otherwise put the working directory first on sys.path, where any stray module
    # (a `signal.py` in the repository's parent folder, say) would shadow the standard library
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT.parent, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    count, heavy = (
        done.stdout.strip().splitlines()[-1].split(" ", 1) if " " in done.stdout.strip() else (done.stdout.strip(), "")
    )
    assert int(count) >= 2 and heavy == "", f"loading the plugins imported: {heavy}"
