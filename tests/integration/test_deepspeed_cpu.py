"""DeepSpeed ZeRO-2 / ZeRO-3 with the plugin stacks, on CPU, under stock ``accelerate launch``.

DeepSpeed runs on CPU here (its CPU accelerator, gloo): the Accelerate config is ``distributed_type: DEEPSPEED``
with a DeepSpeed JSON file (``gradient_clipping: 0``, as the baseline does not clip; under ZeRO-3
``stage3_param_persistence_threshold: 0``, so every parameter of the tiny model is partitioned) and the stack's
``acceleration:`` section. Each stack (full fine-tuning, LoRA, bitsandbytes QLoRA, each with the fused kernels)
trains 5 steps through the script's own ``Accelerator`` and through the HF Trainer, and must follow the same
stack without DeepSpeed (one process, same section) step for step; the Trainer's save must load in plain
transformers / PEFT and give the trained logits. The MoE experts (``ep_degree: 1``, tiny Mixtral) and padding-free
attention (sdpa, eager) follow the same comparison through the script's ``Accelerator``. See
``scripts/deepspeed_worker.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import ACCELERATE, SCRIPTS, free_port, run
from .tiny_models import tiny_mixtral

pytest.importorskip("deepspeed")

WORKER = SCRIPTS / "deepspeed_worker.py"
TIMEOUT = 420  # the first DeepSpeed start on a machine compiles its shared-memory communication op (~1 min)
FUSED_STACKS = ("lora-foak", "qlora-foak")


def _needs(stack: str) -> None:
    if stack == "qlora-foak":
        pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from tests.plugins.accelerated_peft.helpers import tiny_llama

    folder = tmp_path_factory.mktemp("deepspeed")
    tiny_llama(folder / "llama")
    tiny_mixtral(folder / "mixtral", vocab_size=96)  # the worker's vocabulary
    return folder


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FMS_ACCELERATION", "ACCELERATE_"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(key, None)
    environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    return environ


def _section(stack: str, env: dict[str, str], cwd: Path) -> dict:
    done = run([sys.executable, str(WORKER), str(cwd), stack, "-", "--print-section"], env, cwd, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _report(folder: Path, name: str, done) -> dict:
    path = folder / f"{name}.json"
    assert done.returncode == 0 and path.is_file(), done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def baseline(work, env):
    """The stack without DeepSpeed (one process; the section from the environment, as a launched worker gets it)."""
    cache: dict[tuple[str, str], dict] = {}

    def get(stack: str, client: str) -> dict:
        if (stack, client) not in cache:
            name = f"baseline-{stack}-{client}"
            section = json.dumps(_section(stack, env, work))
            run_env = dict(env, FMS_ACCELERATION_SECTION=section, FMS_TEST_REPORT_NAME=name)
            done = run([sys.executable, str(WORKER), str(work), stack, client, "--baseline"], run_env, work, TIMEOUT)
            cache[stack, client] = _report(work, name, done)
        return cache[stack, client]

    return get


def deepspeed_run(
    work: Path,
    env: dict[str, str],
    stage: int,
    stack: str,
    client: str,
    processes: int = 1,
    *,
    zero: dict | None = None,
    extra: dict | None = None,
    tag: str = "",
) -> dict:
    """``accelerate launch`` of the worker with a DeepSpeed config of ``stage`` and the stack's section; ``zero`` adds
    ``zero_optimization`` keys (e.g. offload), ``extra`` top-level keys, ``tag`` names the run apart."""
    name = f"zero{stage}-{stack}-{client}-{processes}{tag}"
    ds_config = {
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,  # the trainer's save writes whole weights
            **(zero or {}),
        },
        "gradient_clipping": 0.0,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": False},
        **(extra or {}),
    }
    (work / f"{name}-ds.json").write_text(json.dumps(ds_config), encoding="utf-8")
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": str(work / f"{name}-ds.json"), "zero3_init_flag": False},
        "num_machines": 1,
        "num_processes": processes,
        "machine_rank": 0,
        "acceleration": _section(stack, env, work),
    }
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    cmd = [
        ACCELERATE, "launch", "--config_file", str(work / f"{name}.yaml"), "--main_process_port", str(free_port()),
        str(WORKER), str(work), stack, client,
    ]  # fmt: skip
    done = run(cmd, dict(env, FMS_TEST_REPORT_NAME=name), work, TIMEOUT)
    report = _report(work, name, done)
    report["saved"] = str(work / f"{name}-saved")
    return report


def check_saved(report: dict, work: Path) -> None:
    """The trainer's save under DeepSpeed loads in plain transformers (+ PEFT for an adapter, on a 4-bit model
    quantized by transformers' own BitsAndBytesConfig for QLoRA) and computes the trained model's logits."""
    from transformers import AutoModelForCausalLM

    saved = Path(report["saved"])
    g = torch.Generator().manual_seed(1)  # the worker's first batch
    base = torch.randint(0, 96, (8, 16), generator=g)
    rows = base[torch.randint(0, 8, (4,), generator=g)][:2]
    if report["stack"] == "full-foak":
        assert (saved / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    else:
        from peft import PeftModel

        assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
        quantization = {}
        if report["stack"] == "qlora-foak":
            from transformers import BitsAndBytesConfig

            quantization["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
                bnb_4bit_quant_storage=torch.float32,
            )
        base_dir = work / ("mixtral" if report["stack"].startswith("moe") else "llama")
        base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **quantization)
        model = PeftModel.from_pretrained(base_model, saved)
    model.train()  # as the worker computed them (no dropout in the tiny Llama)
    with torch.no_grad():
        logits = model(input_ids=rows).logits
    torch.testing.assert_close(logits, torch.tensor(report["logits"]), atol=1e-4, rtol=0)


def check_run(report: dict, reference: dict, stage: int, processes: int) -> None:
    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world"] == processes
    assert reference["distributed_type"] == "DistributedType.NO" and reference["ds_params"] == 0
    # the same stack, the same kernels, with and without DeepSpeed
    assert report["plugins"] == reference["plugins"] and report["plugins"]
    assert report["patch_counts"] == reference["patch_counts"]
    assert len(report["losses"]) == 5 and len(set(report["losses"])) == 5  # it trained
    assert report["losses"] == pytest.approx(reference["losses"], abs=2e-5 if processes == 1 else 1e-4)
    if stage == 3:
        # every parameter is partitioned between steps: the kernels only ever saw what DeepSpeed gathered
        assert report["ds_params"] == report["params"] == report["partitioned"]
        # a 16/32-bit model is even loaded partitioned (deepspeed.zero.Init: all 21 weights of the tiny Llama)
        # before the kernels are patched into it; a 4-bit one is partitioned when the engine is built
        assert report["loaded_partitioned"] == (0 if report["stack"] == "qlora-foak" else 21)
    else:
        assert report["ds_params"] == 0 and report["external_params"] == 0
    if stage == 3 and report["stack"] in FUSED_STACKS:
        # the fused kernels read the weights inside attention and MLP modules: registered before the engine was
        # built, and nothing else had to be gathered on the fly (DeepSpeed would have registered it by itself)
        assert report["gathered_scopes"] == ["LlamaAttention", "LlamaMLP"]
        assert report["gathered_count"] == 4 and report["registered_external"] > 0
        assert report["external_params"] == report["registered_external"]
        assert "its inner parameters gathered at its forward/backward (DeepSpeed ZeRO-3)" in report["patch_targets"]
    else:
        assert report["gathered_scopes"] == []


@pytest.mark.parametrize(
    ("stage", "stack", "client"),
    [
        pytest.param(3, "qlora-foak", "accelerator", marks=pytest.mark.extended),  # the trainer row covers it
        pytest.param(3, "lora-foak", "accelerator", marks=pytest.mark.extended),  # two-process lora-foak row covers it
        (3, "full-foak", "trainer"),
        (3, "qlora-foak", "trainer"),
        # stage 2: the two-process qlora-foak trainer row covers it
        pytest.param(2, "qlora-foak", "accelerator", marks=pytest.mark.extended),
        pytest.param(2, "lora-foak", "accelerator", marks=pytest.mark.extended),
    ],
    ids=lambda v: str(v),
)
def test_stack_under_deepspeed_matches_the_stack_without_it(work, env, baseline, stage, stack, client):
    _needs(stack)
    report = deepspeed_run(work, env, stage, stack, client)
    check_run(report, baseline(stack, client), stage, 1)
    if stack == "qlora-foak":
        assert report["patch_counts"]["fused_lora"] == 8 and report["patch_counts"]["fused_dequant"] == 6
    if client == "trainer":
        check_saved(report, work)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "stack", "client"),
    [
        pytest.param(3, "qlora-foak", "accelerator", marks=pytest.mark.extended),  # stage 3's trainer row covers it
        (3, "lora-foak", "trainer"),
        (2, "qlora-foak", "trainer"),
    ],
    ids=lambda v: str(v),
)
def test_two_gloo_processes_match_one_process_without_deepspeed(work, env, baseline, stage, stack, client):
    """Two CPU processes (gloo): each trains on half of every batch; DeepSpeed averages the gradients."""
    _needs(stack)
    report = deepspeed_run(work, env, stage, stack, client, processes=2)
    check_run(report, baseline(stack, client), stage, 2)
    if client == "trainer":
        check_saved(report, work)


def test_launcher_refuses_a_plugin_deepspeed_cannot_serve_before_any_worker_starts(work, env):
    """The launcher checks the section against the DeepSpeed settings of the same file (exit 2, no traceback)."""
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"zero_stage": 3},
        "num_machines": 1,
        "num_processes": 1,
        "machine_rank": 0,
        "acceleration": {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4", "load_staging": "cpu"}}}},
    }
    path = work / "refused.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    marker = work / "worker-started"
    script = work / "mark.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")
    done = run([ACCELERATE, "launch", "--config_file", str(path), str(script)], env, work, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "acceleration.peft.quantization.bitsandbytes.load_staging" in done.stderr
    assert "load_staging: cpu stages the 4-bit model in host memory" in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists()


def check_plain_run(report: dict, reference: dict, stage: int) -> None:
    """A stack without fused kernels (nothing for the framework to register under ZeRO-3): the same losses as
    without DeepSpeed; under ZeRO-3 every parameter partitioned between steps (loaded so by zero.Init) and gathered
    by DeepSpeed's own module hooks only (no parameter it had to register on the fly)."""
    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world"] == 1
    assert reference["distributed_type"] == "DistributedType.NO" and reference["ds_params"] == 0
    assert report["plugins"] == reference["plugins"] and report["plugins"]
    assert len(report["losses"]) == 5 and len(set(report["losses"])) == 5  # it trained
    assert report["losses"] == pytest.approx(reference["losses"], abs=2e-5)
    assert report["gathered_scopes"] == [] and report["external_params"] == 0
    if stage == 3:
        assert report["ds_params"] == report["params"] == report["partitioned"] == report["loaded_partitioned"]
    else:
        assert report["ds_params"] == 0


@pytest.mark.extended  # the MoE LoRA row under ZeRO-3 (trainer) covers the plugin's gathering of partitioned stacks
@pytest.mark.parametrize("stage", [2, 3])
def test_moe_experts_under_deepspeed_match_the_stack_without_it(work, env, baseline, stage):
    """scattermoe with ep_degree 1 on a tiny Mixtral: the experts forward reads the 3-D expert stacks inside the
    experts module's own call, so under ZeRO-3 DeepSpeed's hooks of that module gather them (partitioned between
    steps, nothing registered on the fly), and the losses follow the run without DeepSpeed."""
    report = deepspeed_run(work, env, stage, "moe", "accelerator")
    reference = baseline("moe", "accelerator")
    check_plain_run(report, reference, stage)
    assert report["plugins"] == ["scattermoe"]
    assert report["experts_implementation"].startswith("fms_scattermoe_")
    assert reference["experts_implementation"].startswith("fms_scattermoe_")
    # every training forward ran the plugin's experts: 2 layers x 5 steps x 16 tokens x 4 rows x top-2
    assert report["routed_tokens"] == reference["routed_tokens"] == 2 * 5 * 16 * 4 * 2
    if stage == 3:
        assert report["partitioned_3d"] == 4  # gate_up_proj and down_proj of both layers' experts


@pytest.mark.parametrize(
    ("stage", "backend"),
    [(2, "sdpa"), (3, "sdpa"), pytest.param(3, "eager", marks=pytest.mark.extended)],  # (3, sdpa) covers stage 3
    ids=lambda v: str(v),
)
def test_padding_free_under_deepspeed_matches_the_stack_without_it(work, env, baseline, stage, backend):
    """Padding-free attention on right-padded batches of examples of different lengths: the plugin's collator
    flattens each batch into one row of real tokens also when DeepSpeed's engine trains, and the losses follow the
    run without DeepSpeed."""
    stack = f"padding-free-{backend}"
    report = deepspeed_run(work, env, stage, stack, "accelerator")
    reference = baseline(stack, "accelerator")
    check_plain_run(report, reference, stage)
    assert report["plugins"] == ["padding_free"] and report["backend"] == reference["backend"] == backend
    assert report["attn_implementation"].startswith(f"fms_padding_free_{backend}_")
    shapes = report["batch_shapes"]
    assert shapes == reference["batch_shapes"] and len(shapes) == 5
    assert all(rows == 1 and 4 * 5 <= tokens < 4 * 16 for rows, tokens in shapes)  # flattened, pads removed


@pytest.mark.slow  # a baseline and a DeepSpeed run of the tiny Mixtral: ~70 s on 2 shared cores
@pytest.mark.parametrize(
    ("stage", "client"),
    [pytest.param(2, "accelerator", marks=pytest.mark.extended), (3, "trainer")],
    ids=lambda v: str(v),
)
def test_lora_on_experts_under_deepspeed_matches_the_stack_without_it(work, env, baseline, stage, client):
    """LoRA on attention and on the experts' 3-D stacks (PEFT ``target_parameters``), computed from the adapters'
    factors in the expert kernels: the same losses as without DeepSpeed, every experts forward on the factor route
    (under ZeRO-3 too, where the base stacks and the factors are partitioned between steps: the MoE plugin has each
    adapted experts module gather them at its forward and backward); under ZeRO-3 the HF Trainer's saved adapter
    loads in plain PEFT on the base model and gives the trained logits."""
    report = deepspeed_run(work, env, stage, "moe-lora", client)
    reference = baseline("moe-lora", client)
    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world"] == 1
    assert reference["distributed_type"] == "DistributedType.NO" and reference["ds_params"] == 0
    assert report["plugins"] == reference["plugins"] == ["scattermoe"]
    assert len(report["losses"]) == 5 and len(set(report["losses"])) == 5  # it trained
    assert report["losses"] == pytest.approx(reference["losses"], abs=2e-5)
    # every training forward of both MoE layers took the factor route, in both runs
    assert report["factored_calls"] == reference["factored_calls"] == 2 * 5
    assert report["routed_tokens"] == reference["routed_tokens"] > 0
    if stage == 3:
        assert report["ds_params"] == report["params"] == report["partitioned"]
        assert report["gathered_scopes"] == ["ParamWrapper"] and report["gathered_count"] == 2
        assert report["registered_external"] == 2 * 6  # per layer: 2 base stacks, A and B of 2 adapters
        # DeepSpeed registered nothing on the fly inside the MoE blocks (it does, one parameter each, for PEFT's
        # LoRA on the attention projections, whose forward reads lora_A's weight (its dtype) outside lora_A's call)
        extra = report["unregistered_external"]
        assert all(".self_attn." in entry for entry in extra), extra
    else:
        assert report["ds_params"] == 0 and report["gathered_scopes"] == [] and report["external_params"] == 0
    if client == "trainer":
        check_saved(report, work)


# ZeRO-Offload (CPU: the offloaded partitions and optimizer states live in host memory, which on this CPU-only
# machine is where they already are; the code paths are DeepSpeed's offload ones all the same)
OFFLOAD_CPU = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}


def _extended(*values):
    return pytest.param(*values, marks=[pytest.mark.slow, pytest.mark.extended])


@pytest.mark.parametrize(
    ("stage", "stack", "client", "cpu_adam"),
    [
        (3, "qlora-foak", "accelerator", True),
        _extended(3, "lora-foak", "accelerator", False),
        _extended(3, "full-foak", "trainer", True),
        _extended(2, "qlora-foak", "trainer", False),
        _extended(3, "moe-lora", "accelerator", True),
        _extended(3, "padding-free-sdpa", "accelerator", True),
    ],
    ids=lambda v: str(v),
)
def test_offload_to_cpu_follows_the_stack_without_it(work, env, baseline, stage, stack, client, cpu_adam):
    """ZeRO-Offload of the optimizer (and under ZeRO-3 of the parameters: bitsandbytes' packed storage, the fused
    scopes' gathered weights, the expert stacks and their LoRA factors) to the CPU: the same losses as the stack
    without DeepSpeed, stepped by DeepSpeedCPUAdam (Accelerate's replacement of the script's AdamW, its op compiled
    at the first start) or, with ``zero_force_ds_cpu_optimizer: false``, by the script's own AdamW; the HF Trainer's
    save loads in plain transformers / PEFT."""
    _needs(stack)
    zero = dict(OFFLOAD_CPU) if stage == 3 else {"offload_optimizer": {"device": "cpu"}}
    extra = {} if cpu_adam else {"zero_force_ds_cpu_optimizer": False}
    report = deepspeed_run(work, env, stage, stack, client, zero=zero, extra=extra, tag="-offload")
    reference = baseline(stack, client)
    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["plugins"] == reference["plugins"]
    assert report["optimizer"] == ("DeepSpeedCPUAdam" if cpu_adam else "AdamW")
    assert len(report["losses"]) == 5 and len(set(report["losses"])) == 5  # it trained
    assert report["losses"] == pytest.approx(reference["losses"], abs=2e-5)
    if stage == 3:
        assert report["ds_params"] == report["params"] == report["partitioned"]
    if stack == "moe-lora":
        assert report["factored_calls"] == reference["factored_calls"] == 2 * 5
    if client == "trainer":
        check_saved(report, work)


def _needs_async_io() -> None:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("DeepSpeed cannot build its async_io op here (no libaio development files)")


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize(
    ("stage", "stack", "offloaded"),
    [(3, "qlora-foak", ("offload_param", "offload_optimizer")), (3, "lora-foak", ("offload_param",)),
     (2, "lora-foak", ("offload_optimizer",))],
    ids=lambda v: str(v),
)  # fmt: skip
def test_offload_to_nvme_follows_the_stack_without_it(work, env, baseline, stage, stack, offloaded, tmp_path):
    """nvme offload (files under ``nvme_path``, through DeepSpeed's async_io op): the same losses as the stack
    without DeepSpeed; the packed 4-bit storage is swapped to files and back as it is."""
    _needs(stack)
    _needs_async_io()
    zero = {key: {"device": "nvme", "nvme_path": str(tmp_path)} for key in offloaded}
    report = deepspeed_run(work, env, stage, stack, "accelerator", zero=zero, tag="-nvme-" + "-".join(offloaded))
    reference = baseline(stack, "accelerator")
    assert report["losses"] == pytest.approx(reference["losses"], abs=2e-5)
    assert report["optimizer"] == ("DeepSpeedCPUAdam" if "offload_optimizer" in offloaded else "AdamW")
    if stage == 3:  # DeepSpeed's swap folders (the parameters' named after its swap buffers' dtype)
        swapped = {p.name for p in (tmp_path / "zero_stage_3").iterdir()}
        assert any(name.endswith("params") for name in swapped) == ("offload_param" in offloaded), swapped
        assert ("optimizer" in swapped) == ("offload_optimizer" in offloaded), swapped
    else:  # ZeRO-2 keeps nvme-offloaded optimizer states in host memory
        assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.extended
def test_offload_with_two_gloo_processes_follows_one_process_without_deepspeed(work, env, baseline):
    """bitsandbytes QLoRA with the fused kernels, ZeRO-3 with parameters and optimizer offloaded to the CPU, two
    gloo processes: each process's partitions (the packed storage's among them) offloaded and gathered across
    processes, DeepSpeedCPUAdam stepping each process's share."""
    _needs("qlora-foak")
    report = deepspeed_run(work, env, 3, "qlora-foak", "accelerator", 2, zero=dict(OFFLOAD_CPU), tag="-offload")
    check_run(report, baseline("qlora-foak", "accelerator"), 3, 2)
    assert report["optimizer"] == "DeepSpeedCPUAdam"
