"""``python -m fms_acceleration.cli``: the original's plugin commands, for this project's plugins.

fms-hf-tuning tells users to run ``python -m fms_acceleration.cli install fms_acceleration_<name>`` when a plugin
import name is missing. Here:

* ``install NAME``: ``pip install`` of the fms-acceleration-accelerate package behind ``NAME``
  (``fms_acceleration_peft`` / ``peft``, ``fms_acceleration_foak`` / ``foak``, ``fms_acceleration_aadp`` /
  ``aadp``, ``fms_acceleration_moe`` / ``moe``, ``fms_acceleration_odm`` / ``odm``). A plugin of the original
  without a counterpart in this project (none at present, see ``NOT_PROVIDED``) gets a message and exit code 2.
* ``plugins``: each plugin import name, the package behind it and whether it is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from collections.abc import Sequence

from .constants import PLUGIN_PREFIX

DISTRIBUTIONS = {
    "peft": (
        "fms-acceleration-accelerate-peft",
        "fms_acceleration_accelerate_peft",
        "bitsandbytes QLoRA (peft.quantization.bitsandbytes)",
    ),
    "foak": (
        "fms-acceleration-accelerate-foak",
        "fms_acceleration_accelerate_foak",
        "fused ops and kernels (training.fused_ops_and_kernels, peft.quantization.fused_ops_and_kernels)",
    ),
    "aadp": (
        "fms-acceleration-accelerate-aadp",
        "fms_acceleration_accelerate_aadp",
        "padding-free and multipack (training.attention.padding_free, training.dataloader.multipack)",
    ),
    "moe": (
        "fms-acceleration-accelerate-moe",
        "fms_acceleration_accelerate_moe",
        "mixture-of-experts kernels (training.moe.scattermoe)",
    ),
    "odm": (
        "fms-acceleration-accelerate-odm",
        "fms_acceleration_accelerate_odm",
        "online data mixing (training.odm.odm)",
    ),
}
"""Plugin short name -> (package to pip install, its import name, what it provides)."""

NOT_PROVIDED: tuple[str, ...] = ()
"""The original's plugins that have no counterpart in this project."""


def short_name(name: str) -> str:
    """``fms_acceleration_peft`` / ``fms-acceleration-peft`` / ``peft`` -> ``peft``."""
    name = name.strip().replace("-", "_")
    return name[len(PLUGIN_PREFIX) :] if name.startswith(PLUGIN_PREFIX) else name


def install_command(name: str) -> list[str]:
    """The pip command that installs the package behind plugin ``name``.

    Raises:
        ValueError: ``name`` is none of this project's plugins (the message says what to do instead).
    """
    short = short_name(name)
    if short in DISTRIBUTIONS:
        return [sys.executable, "-m", "pip", "install", DISTRIBUTIONS[short][0]]
    if short in NOT_PROVIDED:
        raise ValueError(
            f"{PLUGIN_PREFIX}{short} is a plugin of the original fms-acceleration; fms-acceleration-accelerate has "
            f"no counterpart for it. Its configuration sections are passed through with a message. To use it, "
            "install the original framework and its plugin instead of fms-acceleration-accelerate's stand-in."
        )
    known = ", ".join(f"{PLUGIN_PREFIX}{s}" for s in DISTRIBUTIONS)
    raise ValueError(f"unknown plugin {name!r}; the plugins of fms-acceleration-accelerate are: {known}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fms_acceleration.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="pip install the package behind a plugin import name")
    install.add_argument("name", help="e.g. fms_acceleration_foak")
    sub.add_parser("plugins", help="list the plugin import names and whether they are installed")
    args = parser.parse_args(argv)
    if args.command == "plugins":
        for short, (dist, module, what) in DISTRIBUTIONS.items():
            found = importlib.util.find_spec(module) is not None
            print(f"{PLUGIN_PREFIX}{short}: {'installed' if found else 'not installed'} ({dist}: {what})")
        for short in NOT_PROVIDED:
            if importlib.util.find_spec(f"{PLUGIN_PREFIX}{short}") is not None:
                print(f"{PLUGIN_PREFIX}{short}: a package of the original fms-acceleration, not used by this framework")
            else:
                print(f"{PLUGIN_PREFIX}{short}: not available (no counterpart in fms-acceleration-accelerate)")
        return 0
    try:
        command = install_command(args.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
