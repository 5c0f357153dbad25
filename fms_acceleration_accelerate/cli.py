"""The ``fms-accelerate`` command.

Sub-commands:
    plugins              list installed plugins, their versions and config paths
    configs [show NAME]  list the shipped sample configurations / print one
    check CONFIG         validate a config and say what it will do, without loading any model
    launch ARGS...       ``accelerate launch ARGS...`` that accepts an ``acceleration:`` section in the config
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml

from .config import BODY_KEYS, accelerate_setting_names, read_yaml
from .errors import AccelerationConfigError
from .framework import AccelerationFramework
from .registry import PluginRegistry

CONTENTS_FILE = "CONTENTS.yaml"


def launch_configs_dir() -> Path:
    """Folder of the shipped sample configurations (installed as package data)."""
    return Path(str(resources.files("fms_acceleration_accelerate.launch_configs")))


def shipped_configs() -> dict[str, dict]:
    """``name -> {"path": Path, "description": str, ...}`` from launch_configs/CONTENTS.yaml."""
    folder = launch_configs_dir()
    contents_path = folder / CONTENTS_FILE
    if not contents_path.is_file():
        return {}
    contents = yaml.safe_load(contents_path.read_text(encoding="utf-8")) or {}
    out = {}
    for item in contents.get("framework_configs", []):
        out[item["shortname"]] = {**item, "path": folder / item["filename"]}
    return out


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = PluginRegistry.discover()
    if not registry.entries:
        print("no plugins installed (install e.g. plugins/accelerated-peft or plugins/fused-ops-and-kernels)")
        return 0
    for entry in registry.entries:
        origin = f"{entry.distribution} {entry.version}" if entry.distribution else "(not from a distribution)"
        if entry.plugin_class is None:
            print(f"{entry.name:<24} {origin:<48} FAILED TO LOAD: {entry.load_error}")
            continue
        cls = entry.plugin_class
        kind = "AND" if cls.configuration_and_paths else "OR"
        print(f"{entry.name:<24} {origin:<48} {kind} {', '.join(cls.all_paths())}")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    configs = shipped_configs()
    if args.action == "show":
        if args.name not in configs:
            print(
                f"error: no shipped configuration named {args.name!r}; run 'fms-accelerate configs' to list them",
                file=sys.stderr,
            )
            return 2
        sys.stdout.write(configs[args.name]["path"].read_text(encoding="utf-8"))
        return 0
    if not configs:
        print("no shipped configurations found")
        return 0
    width = max(len(n) for n in configs)
    for name, item in configs.items():
        print(f"{name:<{width}}  {item['filename']:<56} {item.get('description', '')}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    target = args.config
    configs = shipped_configs()
    if not Path(target).exists() and target in configs:
        target = str(configs[target]["path"])
    try:
        framework = AccelerationFramework(target)
    except AccelerationConfigError as exc:
        error = AccelerationConfigError.combine([*_accelerate_only_problems(target), exc])
        assert error is not None
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(framework.describe()))
    print("ok: configuration is valid")
    return 0


def _accelerate_only_problems(target: str) -> list[AccelerationConfigError]:
    """Problems of the Accelerate settings of an Accelerate config that has no ``acceleration:`` section (with
    a section, the framework reports them itself)."""
    try:
        document = read_yaml(target)
    except AccelerationConfigError:
        return []  # the framework's error says it already
    if not isinstance(document, dict) or any(k in document for k in BODY_KEYS):
        return []
    if not any(k in accelerate_setting_names() for k in document):
        return []
    from .accelerate_config import accelerate_settings_problems

    return accelerate_settings_problems(document, origin=target, strict=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fms-accelerate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list installed plugins").set_defaults(func=_cmd_plugins)
    p_cfg = sub.add_parser("configs", help="list shipped sample configurations, or 'configs show NAME'")
    p_cfg.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p_cfg.add_argument("name", nargs="?")
    p_cfg.set_defaults(func=_cmd_configs)
    p_check = sub.add_parser(
        "check", help="validate a config (acceleration or Accelerate YAML) without loading a model"
    )
    p_check.add_argument("config", help="path of the YAML file, or the name of a shipped configuration")
    p_check.set_defaults(func=_cmd_check)
    # 'launch' is dispatched in main() before parsing (every argument belongs to accelerate launch); the
    # entry here only lists it in --help
    sub.add_parser(
        "launch",
        add_help=False,
        help="'accelerate launch' (same arguments) accepting an 'acceleration:' section in --config_file",
    )
    return parser


def _cmd_launch(argv: Sequence[str]) -> int:
    """Run the stock ``accelerate launch`` with support for the ``acceleration:`` config section."""
    from .accelerate_integration import run_accelerate_launch

    return run_accelerate_launch(list(argv), prog="fms-accelerate launch")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        return _cmd_launch(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "configs" and args.action == "show" and not args.name:
        parser.error("configs show needs a NAME (see 'fms-accelerate configs')")
    try:
        return int(args.func(args))
    except AccelerationConfigError as exc:  # e.g. two installed plugins claiming one config path
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
