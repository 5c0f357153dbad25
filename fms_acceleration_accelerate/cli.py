"""The ``fms-accelerate`` command.

Sub-commands:
    plugins              list installed plugins, their versions and config paths
    configs [show NAME]  list the shipped sample configurations / print one
    check CONFIG         validate a config and say what it will do, without loading any model
    launch ARGS...       ``accelerate launch ARGS...`` that accepts an ``acceleration:`` section in the config
    quantize MODEL OUT   write a GPTQ checkpoint (GPTQ or round-to-nearest) from a local Hugging Face model
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


QUANTIZE_INSTALL_HINT = (
    "'fms-accelerate quantize' needs the accelerated-peft plugin: pip install fms-acceleration-accelerate-peft "
    "(from a source checkout: pip install -e plugins/accelerated-peft)"
)


def _cmd_quantize(args: argparse.Namespace) -> int:
    try:
        from fms_acceleration_accelerate_peft.gptq import quantize as gptq_quantize
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "fms_acceleration_accelerate_peft":
            print(f"error: {QUANTIZE_INSTALL_HINT} ({exc})", file=sys.stderr)
            return 2
        raise
    options = gptq_quantize.QuantizeOptions(
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.desc_act,
        sym=args.sym,
        method=args.method,
        checkpoint_format=args.checkpoint_format,
        true_sequential=args.true_sequential,
        damp_percent=args.damp,
        calibration=args.calibration,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    gptq_quantize.quantize(args.model, args.out, options)
    return 0


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p_q = sub.add_parser(
        "quantize",
        help="write a GPTQ checkpoint from a local Hugging Face causal LM (GPTQ algorithm or round-to-nearest)",
        description="Quantize the linear layers of a local Hugging Face causal LM's decoder layers and write a "
        "standard GPTQ checkpoint (config.json quantization_config, packed int32 qweight/qzeros, fp16 scales, "
        "g_idx), readable by the auto_gptq plugin and other GPTQ loaders.",
    )
    p_q.add_argument("model", help="local Hugging Face model directory (config.json + safetensors)")
    p_q.add_argument("out", help="output directory (new or empty; see --overwrite)")
    p_q.add_argument("--bits", type=int, default=4, help="2, 4 or 8 (default 4)")
    p_q.add_argument(
        "--group-size", type=int, default=128, help="input channels per scale/zero group, or -1 (default 128)"
    )
    p_q.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing activation")
    p_q.add_argument(
        "--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric grid (default) or --no-sym"
    )
    p_q.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="gptq (default) or round-to-nearest")
    p_q.add_argument(
        "--checkpoint-format", choices=["gptq", "gptq_v2"], default="gptq", help="zero-point convention (default gptq)"
    )
    p_q.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize a layer's linears in execution order (default on)",
    )
    p_q.add_argument("--calibration", help=".txt or .jsonl ('text' or 'output' field); default: the shipped text")
    p_q.add_argument("--num-samples", type=int, default=128, help="calibration windows (default 128)")
    p_q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p_q.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass (default 4)")
    p_q.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of its mean diagonal")
    p_q.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p_q.add_argument(
        "--dtype", default="float16", help="dtype of the unquantized tensors: float16 (default), bfloat16, float32"
    )
    p_q.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p_q.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p_q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' offsets")
    p_q.set_defaults(func=_cmd_quantize)


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
    _add_quantize_parser(sub)
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
