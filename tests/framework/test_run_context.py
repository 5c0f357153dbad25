"""The run context: one typed, immutable description of how the run is wrapped, built from the Accelerator or,
before one exists, from the launcher's environment and the training arguments."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from fms_acceleration_accelerate.distributed import FsdpSettings, PrepareContext, RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.launch_environment import (
    detect_client,
    refine_with_training_arguments,
    run_context_from_environment,
)


@pytest.fixture
def no_accelerator(monkeypatch):
    """No Accelerator in this process (Accelerate's shared state empty)."""
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})


def test_run_context_is_typed_and_immutable():
    context = RunContext(distributed_type="FSDP", fsdp_version=2, device="cpu", mixed_precision="bf16", world_size=4)
    assert PrepareContext is RunContext  # the former name
    assert context.device == torch.device("cpu") and context.is_fsdp and not context.is_deepspeed
    assert context.compute_dtype is torch.bfloat16
    assert context.ep_size == 1 and context.zero_stage is None and context.fsdp == FsdpSettings()
    assert context.source == "default" and context.client is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.world_size = 2  # type: ignore[misc]
    assert context.describe() == "FSDP2, bf16, 4 processes on cpu (from defaults: nothing told)"
    told = dataclasses.replace(context, source="launcher", client="trl.SFTTrainer", ep_size=2)
    assert (
        told.describe()
        == "FSDP2, bf16, 4 processes, EP 2 on cpu (from the launcher's environment; client trl.SFTTrainer)"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fsdp_version": 3}, "fsdp_version must be 1, 2 or None"),
        ({"world_size": 0}, "world_size must be a positive int"),
        ({"ep_size": 0}, "ep_size must be a positive int"),
        ({"mixed_precision": "bf17"}, "mixed_precision must be one of no, fp16, bf16, fp8"),
        ({"zero_stage": 4}, "zero_stage must be 0 to 3 or None"),
    ],
)
def test_run_context_refuses_impossible_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunContext(**kwargs)


def _launcher_env(tmp_path, body: str) -> dict[str, str]:
    """The variables stock ``accelerate launch`` exports for an Accelerate config, plus torchrun's per worker."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = tmp_path / "accelerate.yaml"
    config.write_text(body)
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = dict(prepare_multi_gpu_env(args))
    env.update(WORLD_SIZE=str(args.num_processes), LOCAL_RANK="1", RANK="1")
    return env


FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
  fsdp_activation_checkpointing: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
mixed_precision: bf16
num_machines: 1
num_processes: 4
machine_rank: 0
use_cpu: false
"""


def test_from_the_variables_stock_accelerate_launch_exports(tmp_path, no_accelerator):
    context = run_context_from_environment(environ=_launcher_env(tmp_path, FSDP2_CONFIG))
    assert (context.distributed_type, context.fsdp_version, context.mixed_precision) == ("FSDP", 2, "bf16")
    assert context.world_size == 4 and context.source == "launcher"
    assert context.fsdp == FsdpSettings(
        use_orig_params=True, cpu_ram_efficient_loading=False, activation_checkpointing=True
    )
    want = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert context.device == want


def test_from_the_launcher_environment_deepspeed_and_nothing(no_accelerator):
    deepspeed = run_context_from_environment(
        environ={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "2"}
    )
    assert deepspeed.is_deepspeed and deepspeed.zero_stage == 3 and not deepspeed.is_fsdp
    plain = run_context_from_environment(environ={})
    assert plain == RunContext(device=plain.device)  # the defaults: one process, no FSDP, no mixed precision
    assert plain.source == "default"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "3"}, "FSDP_VERSION is '3'; expected one of 1, 2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two'; expected a positive integer"),
        ({"ACCELERATE_MIXED_PRECISION": "fp12"}, "ACCELERATE_MIXED_PRECISION is 'fp12'"),
    ],
)
def test_a_launcher_variable_accelerate_would_refuse_is_a_clear_error(env, message, no_accelerator):
    with pytest.raises(AccelerationConfigError, match=message):
        run_context_from_environment(environ=env)


def test_an_accelerator_already_in_the_process_wins_over_the_environment(monkeypatch):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    fsdp_plugin = SimpleNamespace(fsdp_version=2, use_orig_params=False, cpu_ram_efficient_loading=True)
    state = {
        "distributed_type": DistributedType.FSDP,
        "fsdp_plugin": fsdp_plugin,
        "_mixed_precision": "bf16",
        "num_processes": 8,
        "device": torch.device("cpu"),
    }
    monkeypatch.setattr(AcceleratorState, "_shared_state", state)
    context = run_context_from_environment(environ={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert (context.fsdp_version, context.world_size, context.mixed_precision) == (2, 8, "bf16")
    assert context.fsdp.cpu_ram_efficient_loading is True and context.source == "accelerator"


def test_training_arguments_refine_what_no_accelerator_told(no_accelerator):
    plain = run_context_from_environment(environ={})
    args = SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 1})
    refined = refine_with_training_arguments(plain, args)
    assert (refined.fsdp_version, refined.source) == (1, "training_arguments")
    assert refine_with_training_arguments(plain, SimpleNamespace(fsdp=True, fsdp_config=None)).fsdp_version == 2
    assert refine_with_training_arguments(plain, SimpleNamespace(fsdp=[])) is plain
    assert refine_with_training_arguments(plain, None) is plain
    told = dataclasses.replace(plain, source="accelerator")
    assert refine_with_training_arguments(told, args) is told  # an Accelerator's word is final
    with pytest.raises(AccelerationConfigError, match="fsdp_config version is 3"):
        refine_with_training_arguments(plain, SimpleNamespace(fsdp=True, fsdp_config={"version": 3}))


def test_client_is_the_trainer_on_the_call_stack():
    from transformers import Trainer

    class MyTrainer(Trainer):
        def probe(self) -> str | None:
            return detect_client("nobody")

    trainer = object.__new__(MyTrainer)  # a method of a Trainer instance is running; nothing else is needed
    assert trainer.probe() == f"{__name__.split('.')[0]}.MyTrainer"
    assert detect_client("framework-api") == "framework-api"
