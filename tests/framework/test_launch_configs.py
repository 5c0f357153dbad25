"""launch_configs/: generated from templates (no diff on regeneration), valid for Accelerate, all pass check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from fms_acceleration_accelerate import AccelerationFramework, cli

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_CONFIGS = ROOT / "launch_configs"


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_launch_configs", ROOT / "scripts/generate_launch_configs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _shipped_files() -> list[Path]:
    return sorted(p for p in LAUNCH_CONFIGS.glob("*.yaml") if p.name != gen.CONTENTS)


def _contents() -> list[dict]:
    return yaml.safe_load((LAUNCH_CONFIGS / gen.CONTENTS).read_text(encoding="utf-8"))["framework_configs"]


# ------------------------------------------------------------------------------------------ the shipped files
def test_regenerating_yields_no_diff(capsys):
    assert gen.main(["--check"]) == 0, capsys.readouterr().err


def test_generation_is_deterministic(tmp_path):
    first, second = gen.generate(ROOT), gen.generate(ROOT)
    assert first == second
    assert gen.main(["--output-dir", str(tmp_path)]) == 0
    assert {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.yaml")} == first


def test_contents_lists_every_shipped_file_and_cli_finds_them():
    items = _contents()
    assert sorted(item["filename"] for item in items) == [p.name for p in _shipped_files()]
    assert len({item["shortname"] for item in items}) == len(items)
    shipped = cli.shipped_configs()  # through the installed package data
    assert sorted(shipped) == sorted(item["shortname"] for item in items)
    for item in items:
        assert shipped[item["shortname"]]["path"].read_text(encoding="utf-8") == (
            LAUNCH_CONFIGS / item["filename"]
        ).read_text(encoding="utf-8")


def test_expected_configurations_are_shipped():
    names = {p.name for p in _shipped_files()}
    for required in (
        "accelerated-peft-bnb-nf4-sample-configuration.yaml",
        "accelerated-peft-bnb-nf4-foak-sample-configuration.yaml",
        "foak-fast-kernels-sample-configuration.yaml",
    ):
        assert required in names
    kinds = {item["filename"]: item["kind"] for item in _contents()}
    accelerate = [yaml.safe_load((LAUNCH_CONFIGS / f).read_text()) for f, k in kinds.items() if k == "accelerate"]
    shapes = {
        (c["distributed_type"], (c.get("fsdp_config") or {}).get("fsdp_version"), c["num_machines"], c["use_cpu"])
        for c in accelerate
    }
    assert ("NO", None, 1, False) in shapes  # single GPU
    assert ("FSDP", 1, 1, False) in shapes
    assert ("FSDP", 2, 1, False) in shapes
    assert ("FSDP", 2, 2, False) in shapes  # two machines
    assert ("NO", None, 1, True) in shapes  # CPU
    assert ("MULTI_GPU", None, 1, False) in shapes  # 2 CPU processes through torchrun
    stages = {c["deepspeed_config"]["zero_stage"] for c in accelerate if c["distributed_type"] == "DEEPSPEED"}
    assert stages == {2, 3}


@pytest.mark.parametrize("path", sorted(LAUNCH_CONFIGS.glob("accelerate-deepspeed-*.yaml")), ids=lambda p: p.name)
def test_shipped_deepspeed_configs_say_what_deepspeed_does_with_each_plugin(path, capsys):
    """``fms-accelerate check`` on a DeepSpeed config names the run and, per plugin, what happens under DeepSpeed."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    stage = config["deepspeed_config"]["zero_stage"]
    assert cli.main(["check", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"run (from the Accelerate settings): DeepSpeed ZeRO-{stage}, bf16, 8 processes" in out
    framework = AccelerationFramework(str(path))
    for plugin in framework.plugins:
        lines = plugin.describe_run(framework.configured_run)
        assert lines and all(f"    {line}" in out for line in lines), plugin.plugin_name()
    if config["acceleration"].get("peft", {}).get("quantization", {}).get("fused_ops_and_kernels"):
        assert ("external parameters" in out) is (stage == 3)


@pytest.mark.parametrize("path", _shipped_files(), ids=lambda p: p.name)
def test_every_shipped_file_passes_check(path, capsys):
    assert cli.main(["check", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok: configuration is valid")


@pytest.mark.parametrize("path", _shipped_files(), ids=lambda p: p.name)
def test_shipped_files_keep_template_comments(path):
    text = path.read_text(encoding="utf-8")
    item = next(i for i in _contents() if i["filename"] == path.name)
    for template in item["templates"]:
        comments = [
            line.strip()
            for line in (ROOT / template).read_text(encoding="utf-8").splitlines()
            if line.strip().startswith("#")
        ]
        assert comments, f"{template} has no comments to keep"
        for comment in comments:
            assert comment in text, f"{comment!r} of {template} lost in {path.name}"


def _accelerate_files() -> list[Path]:
    return [LAUNCH_CONFIGS / i["filename"] for i in _contents() if i["kind"] == "accelerate"]


@pytest.mark.parametrize("path", _accelerate_files(), ids=lambda p: p.name)
def test_accelerate_configs_are_valid_for_accelerate(path, tmp_path, monkeypatch):
    """Accelerate's own loader, launcher validation and FSDP plugin accept the file (minus our section)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    body = document.pop("acceleration")
    assert isinstance(body, dict) and body
    assert AccelerationFramework({"acceleration": body}).plugins
    stripped = tmp_path / "accelerate.yaml"
    stripped.write_text(yaml.safe_dump(document), encoding="utf-8")
    ClusterConfig.from_yaml_file(str(stripped))  # raises on unknown keys

    parser = launch_command_parser()
    launch_options = {action.dest for action in parser._actions}
    for key in document.get("fsdp_config") or {}:
        assert key in launch_options, f"fsdp_config.{key} is not an accelerate launch option"
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(stripped), "train.py"]))
    assert args.num_processes == document["num_processes"]
    if document["distributed_type"] == "FSDP":
        for key, value in prepare_multi_gpu_env(args).items():
            if key.startswith(("FSDP_", "ACCELERATE_")):
                monkeypatch.setenv(key, value)
        if document["fsdp_config"]["fsdp_version"] == 1:
            # FSDP1 + sync_module_states asks for the current CUDA device, which this CPU test has not got
            monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
            monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == document["fsdp_config"]["fsdp_version"]


# ------------------------------------------------------------------------------------------ the generator
def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def small_plan(tmp_path, monkeypatch):
    _write(
        tmp_path,
        "t/a.yaml",
        "# about peft\npeft:\n  quantization:\n    # about a\n    a:\n      kind: x   # x or y\n"
        "      items:\n      - one\n      - two: 2\n        three: 3\n      # a trailing note\n",
    )
    _write(
        tmp_path,
        "t/b.yaml",
        "plugins:\n  # about peft (b)\n  peft:\n    quantization:\n      b:\n        text: |\n          line 1\n"
        "            line 2\n        flag: true\n",
    )
    monkeypatch.setattr(
        gen,
        "TEMPLATES",
        {"a": gen.Template("t/a.yaml", overrides=(("peft.quantization.a.kind", "y"),)), "b": gen.Template("t/b.yaml")},
    )
    monkeypatch.setattr(
        gen,
        "OUTPUTS",
        (gen.Output("ab", ("a", "b"), "a and b"), gen.Output("acc-ab", ("a", "b"), "acc", accelerate_base="cpu")),
    )
    return tmp_path


def test_generator_merges_templates_keeping_comments(small_plan):
    files = gen.generate(small_plan)
    text = files["ab-sample-configuration.yaml"]
    assert yaml.safe_load(text) == {
        "plugins": {
            "peft": {
                "quantization": {
                    "a": {"kind": "y", "items": ["one", {"two": 2, "three": 3}]},
                    "b": {"text": "line 1\n  line 2\n", "flag": True},
                }
            }
        }
    }
    for comment in ("# about peft", "# about a", "kind: y   # x or y", "# a trailing note"):
        assert comment in text
    assert "# about peft (b)" not in text  # a shared key keeps the first template's comment
    assert text.index("# a trailing note") < text.index("      b:")  # trailing comment stays inside 'a'
    acc = yaml.safe_load(files["acc-ab.yaml"])
    assert acc["use_cpu"] is True and acc["acceleration"] == yaml.safe_load(text)["plugins"]
    contents = yaml.safe_load(files["CONTENTS.yaml"])["framework_configs"]
    assert [c["filename"] for c in contents] == ["ab-sample-configuration.yaml", "acc-ab.yaml"]


def test_generator_check_mode_detects_drift(small_plan, capsys):
    out = small_plan / "launch_configs"
    assert gen.main(["--root", str(small_plan), "--check"]) == 1  # nothing generated yet
    assert gen.main(["--root", str(small_plan)]) == 0
    assert gen.main(["--root", str(small_plan), "--check"]) == 0
    (out / "acc-ab.yaml").write_text("edited\n", encoding="utf-8")
    (out / "stale.yaml").write_text("x: 1\n", encoding="utf-8")
    capsys.readouterr()
    assert gen.main(["--root", str(small_plan), "--check"]) == 1
    err = capsys.readouterr().err
    assert "acc-ab.yaml: out of date" in err and "stale.yaml: not generated by this script" in err
    assert gen.main(["--root", str(small_plan)]) == 0
    assert not (out / "stale.yaml").exists()
    assert gen.main(["--root", str(small_plan), "--check"]) == 0


@pytest.mark.parametrize(
    ("b_text", "message"),
    [
        ("peft:\n  quantization:\n    a:\n      kind: z\n", "two templates set 'peft.quantization.a.kind' differently"),
        ("peft:\n\tquantization: {}\n", "tab in indentation"),
        ("peft:\n  ? complex\n", "not a 'key: value' line"),
        ("peft: 1\npeft: 2\n", "duplicate key 'peft'"),
    ],
)
def test_generator_refuses_what_it_cannot_merge(small_plan, b_text, message, capsys):
    _write(small_plan, "t/b.yaml", b_text)
    assert gen.main(["--root", str(small_plan)]) == 1
    assert message in capsys.readouterr().err


def test_generator_reports_missing_template_and_bad_override(small_plan, monkeypatch, capsys):
    (small_plan / "t/b.yaml").unlink()
    assert gen.main(["--root", str(small_plan)]) == 1
    assert "template t/b.yaml (for 'b') does not exist" in capsys.readouterr().err
    monkeypatch.setitem(gen.TEMPLATES, "a", gen.Template("t/a.yaml", overrides=(("peft.quantization.a.kinds", 1),)))
    with pytest.raises(gen.TemplateError, match="no key 'kinds' there"):
        gen.build_body(("a",), small_plan)


def test_shipped_fsdp_configs_avoid_combinations_the_prepare_hooks_refuse():
    """Found on 2 H100s: FSDP2 + fsdp_cpu_ram_efficient_loading is refused once plugins shard their own units,
    and FSDP1 + mixed precision + fused LoRA would put packed storage in an fp32-upcast flat parameter."""
    for path in LAUNCH_CONFIGS.glob("accelerate-*.yaml"):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        fsdp = config.get("fsdp_config") or {}
        if config.get("distributed_type") != "FSDP":
            continue
        if fsdp.get("fsdp_version") == 2:
            # off exactly where a plugin shards its own units (refused otherwise); on elsewhere: rank 0 alone reads
            # the checkpoint, and no GPU ever holds the whole (fp32-upcast) model during prepare
            framework = AccelerationFramework({"plugins": config["acceleration"]})
            self_sharding = any(p.contributes_under_fsdp2() for p in framework.plugins)
            assert framework.plugins, path.name
            assert fsdp["fsdp_cpu_ram_efficient_loading"] is not self_sharding, path.name
        bnb = config["acceleration"].get("peft", {}).get("quantization", {}).get("bitsandbytes")
        if fsdp.get("fsdp_version") == 1 and bnb is not None:
            assert config["mixed_precision"] == "no" and bnb["fp32_lora_params"] is False, path.name


def test_padding_free_rounds_rows_up_exactly_where_fused_lora_runs():
    """The shipped configs that put padding-free next to the fused LoRA kernels round each flattened row up to a
    multiple of 128 tokens (measured faster with those kernels on one H100); the others leave rows as they are."""
    seen = {True: 0, False: 0}
    for path in _shipped_files():
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        framework = AccelerationFramework({"plugins": config.get("acceleration", config.get("plugins"))})
        names = {p.name for p in framework.plugins}
        if "padding_free" not in names:
            continue
        fused_lora = "fused_ops_and_kernels" in names and framework.plugin("fused_ops_and_kernels").config.fused_lora
        assert framework.plugin("padding_free").config.bucket == (128 if fused_lora else 1), path.name
        seen[bool(fused_lora)] += 1
    assert seen[True] >= 3 and seen[False] >= 3, seen
