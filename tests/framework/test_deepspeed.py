"""The framework's DeepSpeed path without launching: where the run's DeepSpeed settings are read, what the
contributions mean under DeepSpeed (refusals, ZeRO-3 external parameters), and the early refusals of the
plugins (launcher / ``fms-accelerate check`` / before loading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fms_acceleration_accelerate import AccelerationFramework, cli
from fms_acceleration_accelerate.distributed import (
    DeepSpeedSettings,
    PrepareContribution,
    RunContext,
    merge_contributions,
    plan_deepspeed,
    register_zero3_external_parameters,
)
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.launch_environment import (
    run_context_from_accelerate_settings,
    run_context_from_environment,
)
from fms_acceleration_accelerate.patching import PatchRecorder

ZERO3 = RunContext(distributed_type="DEEPSPEED", zero_stage=3)


def _settings(**deepspeed) -> dict:
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": deepspeed,
        "num_machines": 1,
        "num_processes": 4,
    }


class Block(nn.Module):
    """An 'attention' whose fused forward would read its projections' weights, inside a 'layer'."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))  # the block's own parameter
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4, bias=False)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Block()
        self.inner = Block()  # a second scope nested in the first below
        self.attn.nested = self.inner
        self.norm = nn.LayerNorm(4)


def _merged(**fields) -> object:
    return merge_contributions([("kernels", PrepareContribution(**fields))])


# ----------------------------------------------------------------------------------------- the run's settings
def test_settings_from_an_inline_accelerate_config():
    context = run_context_from_accelerate_settings(
        {
            **_settings(zero_stage=3, offload_param_device="cpu", offload_optimizer_device="nvme"),
            "mixed_precision": "bf16",
        }
    )
    assert context is not None and context.is_deepspeed and context.zero_stage == 3
    assert context.mixed_precision == "bf16" and context.world_size == 4 and context.source == "launcher"
    assert context.deepspeed == DeepSpeedSettings(offload_param="cpu", offload_optimizer="nvme")
    assert context.describe().startswith("DeepSpeed ZeRO-3 (offload: params cpu, optimizer nvme), bf16, 4 processes")
    assert run_context_from_accelerate_settings({"distributed_type": "FSDP"}) is None
    assert run_context_from_accelerate_settings(_settings()).zero_stage == 2  # Accelerate's default


def test_settings_from_a_deepspeed_json_file(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "bf16": {"enabled": True}}),
        encoding="utf-8",
    )
    context = run_context_from_accelerate_settings(_settings(deepspeed_config_file=str(ds)))
    assert context.zero_stage == 3 and context.mixed_precision == "bf16"
    assert context.deepspeed == DeepSpeedSettings(offload_param="cpu", config_file=str(ds))
    # "auto" leaves the choice to Accelerate's mixed_precision
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": "auto"}}), encoding="utf-8")
    auto = run_context_from_accelerate_settings({**_settings(deepspeed_config_file=str(ds)), "mixed_precision": "fp16"})
    assert auto.zero_stage == 2 and auto.mixed_precision == "fp16"
    # the worker side reads the same file from the launcher's variables
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds),
        "ACCELERATE_MIXED_PRECISION": "fp16",
        "WORLD_SIZE": "2",
    }
    worker = run_context_from_environment(environ=env)
    assert worker.zero_stage == 2 and worker.mixed_precision == "fp16" and worker.deepspeed.config_file == str(ds)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the DeepSpeed config file"), ("{", "is not valid JSON"), ("[1]", "not a JSON object")],
)
def test_a_bad_deepspeed_file_is_an_error_that_names_it(tmp_path, content, message):
    ds = tmp_path / "ds.json"
    if content is not None:
        ds.write_text(content, encoding="utf-8")
    with pytest.raises(AccelerationConfigError, match=message) as info:
        run_context_from_accelerate_settings(_settings(deepspeed_config_file=str(ds)), origin="cfg.yaml")
    assert str(ds) in str(info.value) and "deepspeed_config.deepspeed_config_file of cfg.yaml" in str(info.value)


# ----------------------------------------------------------------------------------------- the plan
def test_zero3_gathers_the_inner_parameters_of_the_outermost_fused_scopes():
    model = nn.Sequential(Layer(), Layer())
    plan = plan_deepspeed(model, _merged(fused_scopes=(Block,)), ZERO3)
    assert [s.name for s in plan.gathered_scopes] == ["0.attn", "1.attn"]  # "inner" is inside "attn"
    scope = plan.gathered_scopes[0]
    own = {id(p) for p in scope.module.parameters(recurse=False)}
    assert {id(p) for p in scope.parameters} == {id(p) for p in scope.module.parameters()} - own
    # q.weight, q.bias, k.weight, and the nested block's scale, q.weight, q.bias, k.weight
    assert len(scope.parameters) == 7 and scope.plugin == "kernels"
    assert "2 fused scopes (Block) gather their 14 inner parameters" in plan.describe()[0]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_below_zero3_fused_scopes_need_nothing(stage):
    context = RunContext(distributed_type="DEEPSPEED", zero_stage=stage)
    plan = plan_deepspeed(nn.Sequential(Layer()), _merged(fused_scopes=(Block,)), context)
    assert plan.gathered_scopes == () and "need nothing" in plan.notes[0]


def test_registering_external_parameters_is_recorded_and_reverted():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.partition_parameters import _init_external_params

    model = nn.Sequential(Layer())
    for module in model.modules():
        _init_external_params(module)  # what DeepSpeed's engine does for every module
    plan = plan_deepspeed(model, _merged(fused_scopes=(Block,)), ZERO3)
    recorder = PatchRecorder()
    assert register_zero3_external_parameters(plan, recorder) == 7
    attn = model[0].attn
    assert [p for _, p in attn.ds_external_parameters()] == list(plan.gathered_scopes[0].parameters)
    assert recorder.records[0].target == "0.attn (ZeRO-3 external parameters)"
    assert recorder.revert() == 1
    assert list(attn.ds_external_parameters()) == [] and not hasattr(attn, "_fms_acceleration_zero3_external")


def test_deepspeed_refusals_name_the_plugin_and_the_fix():
    model = nn.Sequential(Layer())
    with pytest.raises(AccelerationConfigError, match="ZeRO-3 cannot do") as info:
        plan_deepspeed(model, _merged(ignored_modules=(Block,)), ZERO3)
    assert "zero_stage: 2" in str(info.value)
    plan_deepspeed(model, _merged(ignored_modules=(Block,)), RunContext(distributed_type="DEEPSPEED", zero_stage=2))

    bf16 = RunContext(distributed_type="DEEPSPEED", zero_stage=3, mixed_precision="bf16")
    packed = _merged(keep_dtype_params=(lambda name, p: name.endswith("norm.weight"),))
    with pytest.raises(AccelerationConfigError, match="casts every floating parameter to bfloat16") as info:
        plan_deepspeed(model, packed, bf16)
    assert "0.norm.weight" in str(info.value) and "plugin kernels" in str(info.value)
    plan_deepspeed(model.to(torch.bfloat16), packed, bf16)  # already the compute dtype: nothing to cast

    with pytest.raises(AccelerationConfigError, match="ask for reduce_dtype float32"):
        plan_deepspeed(model, _merged(reduce_dtype=torch.float32), bf16)
    plan_deepspeed(model, _merged(trainable_dtype=torch.float32), bf16)  # DeepSpeed's fp32 master weights
    with pytest.raises(AccelerationConfigError, match="cannot run under DeepSpeed: kernels: no"):
        plan_deepspeed(model, _merged(refuse_deepspeed_reason="no"), ZERO3)


def test_cpu_deepspeed_with_several_processes_needs_a_backend(monkeypatch):
    from fms_acceleration_accelerate.accelerate_integration import _check_deepspeed_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = RunContext(distributed_type="DEEPSPEED", zero_stage=2, world_size=1)
    with pytest.raises(AccelerationConfigError, match="counts 1") as info:
        _check_deepspeed_process_group(alone)
    assert "InitProcessGroupKwargs(backend='gloo')" in str(info.value) and "ddp_backend='gloo'" in str(info.value)
    _check_deepspeed_process_group(RunContext(distributed_type="DEEPSPEED", zero_stage=2, world_size=2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    _check_deepspeed_process_group(alone)


# ----------------------------------------------------------------------------------------- the plugins
def _accelerate_config(tmp_path: Path, section: dict, **deepspeed) -> Path:
    import yaml

    path = tmp_path / "accelerate.yaml"
    document = {**_settings(**(deepspeed or {"zero_stage": 3})), "mixed_precision": "bf16", "acceleration": section}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


BNB = {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}}
FOAK = {
    "peft": {
        "quantization": {
            "bitsandbytes": {"quant_type": "nf4"},
            "fused_ops_and_kernels": {"base_layer": "bitsandbytes", "fused_lora": True, "fast_loss": True},
        }
    }
}


def test_check_says_what_deepspeed_does_with_each_plugin(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    assert cli.main(["check", str(_accelerate_config(tmp_path, FOAK))]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "run (from the Accelerate settings): DeepSpeed ZeRO-3, bf16, 4 processes" in out
    assert "DeepSpeed bf16: load the model in bfloat16" in out
    assert "ZeRO-3: the packed 4-bit storage is partitioned and gathered like any other parameter" in out
    assert "fp32_lora_params: DeepSpeed keeps fp32 master weights of the adapters" in out
    assert "registered as that module's external parameters" in out
    assert cli.main(["check", str(_accelerate_config(tmp_path, FOAK, zero_stage=2))]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-2: 4-bit weights stay whole on every rank" in out and "parameters stay whole on every rank" in out


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4", "load_staging": "cpu"}}}},
            "load_staging: cpu stages the 4-bit model",
        ),
        ({"peft": {"quantization": {"auto_gptq": {}}}}, "GPTQ-LoRA is not supported under DeepSpeed"),
        (
            {"training": {"moe": {"scattermoe": {"ep_degree": 2}}}},
            "not supported with DeepSpeed: ZeRO would partition and gather the experts",
        ),
    ],
)
def test_plugins_refuse_deepspeed_settings_when_the_config_is_read(tmp_path, capsys, section, message):
    pytest.importorskip("bitsandbytes")
    path = _accelerate_config(tmp_path, section)
    with pytest.raises(AccelerationConfigError, match=message):
        AccelerationFramework(str(path))
    assert cli.main(["check", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_bitsandbytes_refuses_a_training_dtype_deepspeed_would_cast_before_loading(tmp_path, monkeypatch):
    """Under ``accelerate launch`` with DeepSpeed bf16 a model requested in float32 is refused before any weight
    is read (the packed storage would be float32, which DeepSpeed casts to bfloat16)."""
    pytest.importorskip("bitsandbytes")
    from fms_acceleration_accelerate_peft.loader import check_deepspeed_dtype

    from tests.plugins.accelerated_peft.helpers import tiny_llama

    bf16 = RunContext(distributed_type="DEEPSPEED", zero_stage=3, mixed_precision="bf16")
    with pytest.raises(AccelerationConfigError, match="DeepSpeed runs in bf16 and casts every floating parameter"):
        check_deepspeed_dtype(bf16, torch.float32)
    check_deepspeed_dtype(bf16, torch.bfloat16)
    check_deepspeed_dtype(RunContext(distributed_type="DEEPSPEED", zero_stage=3), torch.float32)

    model_dir = tiny_llama(tmp_path / "llama")
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # no Accelerator: the launcher's variables tell
    for key, value in {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }.items():
        monkeypatch.setenv(key, value)
    framework = AccelerationFramework(BNB)
    loads = []
    monkeypatch.setattr(
        "fms_acceleration_accelerate_peft.loader._from_pretrained", lambda *a, **k: loads.append(a) or None
    )
    with pytest.raises(AccelerationConfigError, match="would load in float32"):
        framework.model_loader(str(model_dir), dtype=torch.float32)
    assert loads == []
    staged = AccelerationFramework(
        {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4", "load_staging": "cpu"}}}}
    )
    with pytest.raises(AccelerationConfigError, match="load_staging: cpu stages"):  # check_run_settings, before loading
        staged.model_loader(str(model_dir), dtype=torch.bfloat16)
    assert loads == []
