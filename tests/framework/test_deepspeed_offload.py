"""DeepSpeed ZeRO-Offload settings without launching: what the run's settings say about the optimizer DeepSpeed
steps, the refusals of settings this machine cannot serve (named key and fix, before any model is loaded: when the
config is read and when the ``Accelerator`` is created), and what ``fms-accelerate check`` says offload does to each
plugin. The training runs with offload (loss parity) are in tests/integration/test_deepspeed_cpu.py."""

from __future__ import annotations

import json

import pytest

from fms_acceleration_accelerate import AccelerationFramework, cli
from fms_acceleration_accelerate.deepspeed_offload import OffloadOps, check_offload, describe_offload
from fms_acceleration_accelerate.distributed import DeepSpeedSettings, RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.launch_environment import run_context_from_accelerate_settings
from tests.integration.conftest import free_port


def _run(stage: int = 3, **settings) -> RunContext:
    return RunContext(distributed_type="DEEPSPEED", zero_stage=stage, deepspeed=DeepSpeedSettings(**settings))


class Probe:
    """Answers what the test says the machine can build (instead of asking DeepSpeed), and records the questions."""

    def __init__(self, cpu_adam: bool = True, async_io: bool = True) -> None:
        self.ops = OffloadOps(cpu_adam, async_io, "c++ not found", "no libaio here")
        self.asked: list[tuple[bool, bool]] = []

    def __call__(self, need_cpu_adam: bool, need_async_io: bool) -> OffloadOps:
        self.asked.append((need_cpu_adam, need_async_io))
        return self.ops


def test_no_offload_asks_nothing():
    probe = Probe(cpu_adam=False, async_io=False)
    check_offload(_run(), probe)
    check_offload(_run(offload_param="none", offload_optimizer="none"), probe)
    check_offload(RunContext(), probe)  # not DeepSpeed
    assert probe.asked == []


def test_nvme_without_deepspeeds_async_io_op_is_refused_with_the_fix():
    with pytest.raises(AccelerationConfigError, match="no libaio here") as info:
        check_offload(_run(offload_param="nvme"), Probe(async_io=False))
    message = str(info.value)
    assert "offload_param_device" in message and "zero_optimization.offload_param.device" in message
    assert "apt-get install libaio-dev" in message and "offload to cpu" in message
    # named as the DeepSpeed JSON file writes it, when the settings came from one
    with pytest.raises(AccelerationConfigError) as info:
        check_offload(_run(offload_optimizer="nvme", config_file="ds.json"), Probe(async_io=False))
    assert "zero_optimization.offload_optimizer.device in the DeepSpeed config ds.json is nvme" in str(info.value)
    check_offload(_run(offload_param="nvme"), Probe(async_io=True))
    # ZeRO-2 keeps nvme-offloaded optimizer states in host memory: no async_io op needed
    check_offload(_run(2, offload_optimizer="nvme", force_cpu_optimizer=False), Probe(async_io=False))


def test_optimizer_offload_needs_deepspeeds_cpu_adam_unless_the_scripts_optimizer_is_kept():
    probe = Probe(cpu_adam=False)
    with pytest.raises(AccelerationConfigError, match="DeepSpeedCPUAdam") as info:
        check_offload(_run(2, offload_optimizer="cpu"), probe)
    assert '"zero_force_ds_cpu_optimizer": false' in str(info.value) and "pip install ninja" in str(info.value)
    assert probe.asked == [(True, False)]
    kept = Probe(cpu_adam=False)
    check_offload(_run(2, offload_optimizer="cpu", force_cpu_optimizer=False), kept)
    assert kept.asked == []  # nothing to build: the script's optimizer steps


def test_an_unknown_offload_device_is_refused():
    with pytest.raises(AccelerationConfigError, match="'disk', which DeepSpeed does not offload to"):
        check_offload(_run(offload_param="disk"), Probe())


def test_the_probe_asks_the_installed_deepspeed():
    pytest.importorskip("deepspeed")
    from fms_acceleration_accelerate.deepspeed_offload import probe_offload_ops

    ops = probe_offload_ops(True, False)  # the async_io probe compiles a test program: not asked here
    assert isinstance(ops.cpu_adam, bool) and ops.async_io is True


def test_zero_force_ds_cpu_optimizer_is_read_from_the_deepspeed_file(tmp_path):
    ds = tmp_path / "ds.json"
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    ds.write_text(json.dumps(config), encoding="utf-8")
    settings = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": str(ds)}}
    assert run_context_from_accelerate_settings(settings).deepspeed.force_cpu_optimizer is None
    ds.write_text(json.dumps({**config, "zero_force_ds_cpu_optimizer": False}), encoding="utf-8")
    context = run_context_from_accelerate_settings(settings)
    assert context.deepspeed == DeepSpeedSettings(
        offload_optimizer="cpu", config_file=str(ds), force_cpu_optimizer=False
    )
    assert "the script's torch optimizer steps on the host copies" in describe_offload(context, "-")[0]


def test_describe_offload_says_what_happens_per_stage():
    assert describe_offload(_run(), "x") == []
    lines = describe_offload(_run(offload_param="cpu", offload_optimizer="nvme"), "fetched back")
    assert lines[0] == "DeepSpeed offload_param cpu: fetched back"
    assert lines[1].startswith("DeepSpeed offload_optimizer nvme: fp32 master weights and optimizer states")
    assert "live in files under nvme_path" in lines[1]
    assert (
        "live in host memory (nvme files are ZeRO-3 only)" in describe_offload(_run(2, offload_optimizer="nvme"), "")[0]
    )
    assert "DeepSpeedCPUAdam" in lines[1]
    assert describe_offload(_run(2, offload_param="cpu"), "x") == [
        "DeepSpeed offload_param cpu: ignored under ZeRO-2 (ZeRO-3 only)"
    ]


def _accelerate_config(tmp_path, section: dict, **deepspeed) -> str:
    import yaml

    document = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"zero_stage": 3, **deepspeed},
        "num_machines": 1,
        "num_processes": 1,
        "acceleration": section,
    }
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return str(path)


STACK = {
    "peft": {
        "quantization": {
            "bitsandbytes": {"quant_type": "nf4"},
            "fused_ops_and_kernels": {"base_layer": "bitsandbytes", "fused_lora": True, "fast_loss": True},
        }
    },
    "training": {
        "moe": {"scattermoe": {"ep_degree": 1}},
        "attention": {"padding_free": {"attention_backend": "sdpa"}},
    },
}


def test_check_says_what_offload_does_with_each_plugin(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("deepspeed")
    # the script's optimizer kept: nothing for this machine to build, so the check asks DeepSpeed nothing either
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 3,
                    "offload_param": {"device": "cpu"},
                    "offload_optimizer": {"device": "cpu"},
                },
                "zero_force_ds_cpu_optimizer": False,
            }
        ),
        encoding="utf-8",
    )
    path = _accelerate_config(tmp_path, STACK, deepspeed_config_file=str(ds))
    assert cli.main(["check", path]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "DeepSpeed ZeRO-3 (offload: params cpu, optimizer cpu)" in out
    per_plugin = out.split("\nactivate ")[1:]
    assert len(per_plugin) == 4  # bitsandbytes, fused kernels, scattermoe, padding_free
    for block in per_plugin:
        assert "DeepSpeed offload_param cpu: " in block, block
        assert "DeepSpeed offload_optimizer cpu: " in block and "zero_force_ds_cpu_optimizer: false" in block
    assert "packed 4-bit storage's partitions are moved there as the raw bytes they are" in out
    assert "the expert stacks and LoRA factors are fetched from there" in out


def test_an_offload_setting_deepspeed_cannot_serve_is_refused_when_the_config_is_read(tmp_path, capsys):
    path = _accelerate_config(tmp_path, STACK, offload_param_device="disk")
    with pytest.raises(AccelerationConfigError, match="does not offload to"):
        AccelerationFramework(path)
    assert cli.main(["check", path]) == 2
    assert "offload_param_device" in capsys.readouterr().err


def test_an_offload_setting_deepspeed_cannot_serve_is_refused_when_the_accelerator_is_created(monkeypatch):
    """Through ``AccelerationKwargs``: the Accelerator's DeepSpeed plugin asks for nvme, which a machine without
    DeepSpeed's async_io op cannot serve (this machine's answer is replaced by one that says so)."""
    pytest.importorskip("deepspeed")
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from fms_acceleration_accelerate import AccelerationKwargs, deepspeed_offload

    no_aio = Probe(async_io=False)
    monkeypatch.setattr(deepspeed_offload, "probe_offload_ops", no_aio)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin(zero_stage=3, offload_param_device="nvme", offload_param_nvme_path="/tmp")
    section = {"training": {"attention": {"padding_free": {"attention_backend": "sdpa"}}}}
    import torch.distributed as dist

    started = dist.is_initialized()
    try:
        with pytest.raises(AccelerationConfigError, match=r"offload_param_device .* is nvme, but no libaio here"):
            Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[AccelerationKwargs(section)])
    finally:
        if dist.is_initialized() and not started:  # DeepSpeed's one-process group: none left for later tests
            dist.destroy_process_group()
    assert no_aio.asked == [(False, True)]
