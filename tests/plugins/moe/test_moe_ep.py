"""Expert parallelism (``ep_degree`` > 1).

Multi-process (``torchrun``, gloo on CPU, stock ``Accelerator(cpu=True)`` which wraps the model in DDP, or the
real ``Accelerator.prepare`` FSDP2 path through a seam; see ``ep_worker.py``): a tiny Mixtral (4 experts, top-2) trained with expert parallelism for 3 AdamW steps, each rank on
its share of every batch, against the same model trained in one process on the whole batches with transformers'
eager experts. Checked: each rank holds E / ep_degree experts (the right ones), DDP ignores them, the losses and the
first step's gradients are the one-process run's, and the checkpoint ``plugin.save_pretrained`` writes loads in plain
transformers with all experts and the logits of both runs.

Why the tolerances: both runs compute the same float32 sums in a different order (the batch is split over ranks, DDP
averages per-rank means, the all-to-all regroups the rows of each expert), so they differ by rounding only: a few
ulps of the sums, ~2e-7 relative in the measured gradients and ~1e-7 absolute on logits of size ~0.5. AdamW
normalises each coordinate by its own gradient history, so the rare coordinate whose gradient is itself at the
rounding level could move differently, but after 3 steps at lr 1e-3 the losses agree to ~1e-7. The bounds below
(1e-5 relative on gradients and losses, 1e-5 absolute on logits) leave ~50x margin over rounding and are far below
what any real mistake gives: a wrong expert-gradient scale is off by 2x (relative error 0.5 or 1), experts reduced
across the EP group mix other experts' gradients (relative error ~1), a token sent to the wrong expert changes the
loss in the third digit.

Single process: the run settings and the process-group checks, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fms_acceleration_accelerate.distributed import RunContext
from fms_acceleration_accelerate.errors import AccelerationConfigError

from .moe_helpers import load, make_framework

WORKER = Path(__file__).with_name("ep_worker.py")
GRAD_RTOL = LOSS_RTOL = 1e-5
LOGITS_ATOL = 1e-5


def _free_port() -> int:
    from tests.integration.conftest import free_port

    return free_port()


def _run_workers(
    model_dir: Path, out_dir: Path, nproc: int, ep_degree: int, wrap: str, timeout: int = 240
) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FMS_ACCELERATION", "ACCELERATE_"))}
    if wrap == "trainer":  # the section reaches the trainer's own Accelerator as under accelerate launch
        env["FMS_ACCELERATION_SECTION"] = json.dumps({"training": {"moe": {"scattermoe": {"ep_degree": ep_degree}}}})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="0", PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(model_dir),
        str(out_dir),
        str(ep_degree),
        wrap,
    ]
    result = subprocess.run(cmd, env=env, cwd=out_dir, capture_output=True, text=True, timeout=timeout)
    reports = []
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report:\n{result.stderr[-4000:]}"
        report = json.loads(path.read_text())
        assert "error" not in report, report["error"]
        reports.append(report)
    assert result.returncode == 0, result.stderr[-4000:]
    return reports


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "ep_degree", "wrap"),
    [(2, 2, "ddp"), (4, 2, "ddp"), (2, 2, "fsdp2")],
    ids=["world2-ep2-ddp", "world4-ep2-ddp-replicated", "world2-ep2-fsdp2"],
)
def test_expert_parallel_training_matches_one_process(nproc, ep_degree, wrap, saved_models, tmp_path):
    model_dir = saved_models("mixtral")  # 4 experts, top-2, 2 MoE layers
    reports = _run_workers(model_dir, tmp_path, nproc, ep_degree, wrap)
    experts, local = 4, 4 // ep_degree
    expert_names = [f"model.layers.{i}.mlp.experts.{n}" for i in range(2) for n in ("down_proj", "gate_up_proj")]
    for rank, report in enumerate(reports):
        assert report["world"] == nproc
        # DDP, or FSDP2 sharding the 17 dense parameters and leaving the experts plain tensors
        assert report["wrapper"] == ("DistributedDataParallel" if wrap == "ddp" else "FSDPMixtralForCausalLM")
        assert report["dense_dtensors"] == (0 if wrap == "ddp" else 17)
        assert not report["experts_are_dtensors"]
        # each rank holds its EP-group rank's experts, every layer; DDP leaves them alone
        assert report["local_experts"] == [local, local]
        assert report["first_experts"] == [(rank % ep_degree) * local]
        assert report["ddp_ignored"] == sorted(expert_names)
        # the first step's gradients: the dense ones after DDP's average, the expert ones after the all-to-all
        # backward and the hook (1 / world, summed over the replicas), against the one-process gradients
        assert len(report["grads_dense"]) == 17 and len(report["grads_expert"]) == 4
        for name, rel, _abs in report["grads_dense"] + report["grads_expert"]:
            assert rel < GRAD_RTOL, f"rank {rank} {name}: gradient off by {rel:.2e} (relative)"
        assert report["losses"] == pytest.approx(report["ref_losses"], rel=LOSS_RTOL)
        assert report["losses"][-1] != report["losses"][0]  # it trained
        assert report["ep_vs_ref_logits"] < LOGITS_ATOL
        # the saved checkpoint: all experts, loaded by plain from_pretrained, the logits of both runs
        assert report["reload_experts"] == [experts, experts]
        assert report["reload_vs_ep_logits"] < 1e-6
        assert report["reload_vs_ref_logits"] < LOGITS_ATOL
        assert report["slices_exact"]


@pytest.mark.slow
def test_dispatch_sends_each_token_once_per_destination_rank(saved_models, tmp_path):
    """Top-k = the number of experts (4 experts, every token routed to all of them) on 2 ranks: each token has 2
    slots on each rank, and its hidden row crosses the wire once per rank (T rows per destination, not T x k / ep),
    both ways, forward and backward. Then every token routed to two experts of rank 0 only: rank 1 receives nothing
    and still takes part in every exchange. Both times the layer's output and the gradients of the hidden states,
    the routing weights and the local experts are those of the unsharded layer with transformers' eager experts."""
    reports = _run_workers(saved_models("mixtral", num_experts_per_tok=4), tmp_path, 2, 2, "dispatch")
    for rank, report in enumerate(reports):
        tokens, k, ep, hidden = report["tokens"], report["k"], report["world"], report["hidden_size"]
        assert (k, report["experts"], ep) == (4, 4, 2)
        for label, sent_rows, sent_slots in (
            ("all", [tokens] * ep, [tokens * k // ep] * ep),
            ("first_rank", [tokens, 0], [2 * tokens, 0]),
        ):
            calls = report[label]["calls"]
            # forward: the counts, the slots' (row index, local id), the rows, the weights, the combined rows back;
            # backward: the combined rows' gradient, then the rows' and the weights' gradients
            assert len(calls) == 8, calls
            counts, meta, rows, weights, back, grad_back, grad_rows, grad_weights = calls
            assert counts["shape"] == [ep, 2] and counts["dtype"] == "torch.int64" and counts["splits"] == []
            # the hidden rows: one per (token, destination), not one per slot (that would be 2 x)
            for call in (rows, grad_back):  # this rank's tokens out, their gradients out
                assert call["splits"] == sent_rows, f"rank {rank} {label}: rows sent per destination {call['splits']}"
            serves = label == "all" or rank == 0  # this rank's experts got slots (from every rank)
            for call in (back, grad_rows):  # what this rank received, sent back to each source
                want = [tokens if serves else 0] * ep
                assert call["splits"] == want, f"rank {rank} {label}: rows sent back {call['splits']}"
            for call in (rows, back, grad_back, grad_rows):
                assert call["shape"] == [sum(call["splits"]), hidden] and call["dtype"] == "torch.float32"
            # per slot: the metadata out, the weights out, their gradients back from what this rank received
            assert meta["shape"] == [sum(sent_slots), 2] and meta["splits"] == sent_slots
            assert weights["shape"] == [sum(sent_slots)] and weights["splits"] == sent_slots
            assert grad_weights["splits"] == [(sent_slots[0] if serves else 0)] * ep
            compared = report[label]["compared"]
            assert sorted(compared) == ["grad_down_proj", "grad_gate_up_proj", "grad_hidden", "grad_weights", "out"]
            for key, (rel, diff, scale) in compared.items():
                if label == "first_rank" and rank == 1 and key in ("grad_down_proj", "grad_gate_up_proj"):
                    # rank 1's experts got no token: their gradient is an exact zero, as the reference's
                    assert scale == 0 and diff == 0, f"rank {rank} {label} {key}: {diff}"
                    continue
                assert scale > 0, f"rank {rank} {label} {key}: the reference is zero"
                assert rel < GRAD_RTOL, f"rank {rank} {label} {key}: off by {rel:.2e} (relative)"


@pytest.mark.slow
def test_hf_trainer_saves_every_expert_under_expert_parallelism(saved_models, tmp_path):
    """The HF Trainer writes its weights on the main process from its state dict, which under expert parallelism
    holds that process's experts only; the plugin patches the trainer at prepare so its checkpoints (save_steps)
    and save_model gather every expert first. Both load in plain transformers with the trained model's logits."""
    reports = _run_workers(saved_models("mixtral"), tmp_path, 2, 2, "trainer")
    for rank, report in enumerate(reports):
        assert report["world"] == 2
        assert report["local_experts"] == [2, 2]  # the trainer's model is expert-parallel
        assert len(report["losses"]) == 2
        for label in ("checkpoint", "final"):
            assert report[f"{label}_files"] == ["model.safetensors"]
            # saved in the model's own format (Mixtral: a key per expert): 2 layers x 4 experts, not one rank's 2
            assert report[f"{label}_file_experts"] == 8, f"{label}: the file holds one rank's experts"
            assert f"{label}_reload_error" not in report, report[f"{label}_reload_error"]
            assert report[f"{label}_experts"] == [4, 4]
            assert report[f"{label}_vs_ep_logits"] < 1e-6, f"rank {rank} {label}"
        assert report["trainer_patched"] == ["_load_optimizer_and_scheduler", "_save", "save_model"]


@pytest.mark.slow
def test_framework_api_with_a_stock_trainer_shards_the_experts(saved_models, tmp_path):
    """The framework API with a stock HF Trainer (fms-hf-tuning's way): the script's AccelerationFramework augments
    the model and hands the trainer its callbacks with ``get_callbacks_and_ready_for_train(trainer.model,
    trainer.accelerator)``; no section reaches the trainer's Accelerator, whose prepare runs no framework hook. The
    experts are sharded all the same (ep_degree is not silently ignored), the run trains as the one whose section
    reaches the trainer's Accelerator (same losses), and the trainer's saves hold every expert."""
    (api_dir := tmp_path / "api").mkdir()
    (section_dir := tmp_path / "section").mkdir()
    reports = _run_workers(saved_models("mixtral"), api_dir, 2, 2, "framework-api")
    attached = _run_workers(saved_models("mixtral"), section_dir, 2, 2, "trainer")
    for rank, report in enumerate(reports):
        assert report["world"] == 2
        assert not report["accelerator_has_framework"]  # the path under test: prepare runs no framework hook
        assert attached[rank]["accelerator_has_framework"]
        assert report["local_experts"] == [2, 2], f"rank {rank}: ep_degree 2 was ignored"
        assert len(report["losses"]) == 2 and report["losses"][0] != report["losses"][1]
        assert report["losses"] == pytest.approx(attached[rank]["losses"], rel=LOSS_RTOL)
        for label in ("checkpoint", "final"):
            assert report[f"{label}_files"] == ["model.safetensors"]
            assert report[f"{label}_file_experts"] == 8, f"{label}: the file holds one rank's experts"
            assert f"{label}_reload_error" not in report, report[f"{label}_reload_error"]
            assert report[f"{label}_experts"] == [4, 4]
            assert report[f"{label}_vs_ep_logits"] < 1e-6, f"rank {rank} {label}"
        assert report["trainer_patched"] == ["_load_optimizer_and_scheduler", "_save", "save_model"]


# ------------------------------------------------------------------------------------------ single process
PATH = "training.moe.scattermoe"


def _plugin(ep_degree: int):
    return make_framework({"ep_degree": ep_degree}).plugins[0]


@pytest.mark.parametrize(
    "context",
    [
        RunContext(world_size=4, distributed_type="MULTI_GPU"),
        RunContext(world_size=2, distributed_type="MULTI_CPU"),
        RunContext(world_size=4, fsdp_version=2, distributed_type="FSDP"),
    ],
)
def test_expert_parallel_is_accepted_where_it_works(context):
    _plugin(2).check_run_settings(context)


@pytest.mark.parametrize(
    ("context", "words"),
    [
        (RunContext(world_size=3), ["ep_degree 2 does not divide the world size 3", "1, 3"]),
        (RunContext(world_size=1), ["ep_degree 2 does not divide the world size 1"]),
        (RunContext(world_size=4, fsdp_version=1, distributed_type="FSDP"), ["not supported with FSDP1"]),
        (RunContext(world_size=4, distributed_type="DEEPSPEED", zero_stage=3), ["not supported with DeepSpeed"]),
    ],
)
def test_expert_parallel_refuses_runs_it_cannot_serve(context, words):
    with pytest.raises(AccelerationConfigError) as excinfo:
        _plugin(2).check_run_settings(context)
    assert excinfo.value.path == f"{PATH}.ep_degree"
    for word in words:
        assert word in str(excinfo.value)


def test_expert_count_is_checked_when_patching(saved_models, reference_kernels):
    model = load(saved_models("mixtral", num_local_experts=6))  # 6 experts, ep_degree 4 fits a world of 4 only
    with pytest.raises(AccelerationConfigError, match=r"ep_degree 4 does not divide the 6 experts"):
        _plugin(4).patch_model(model, RunContext(world_size=4))
    assert len(_plugin(4).patches.records) == 0


def test_sharding_needs_a_process_group(saved_models, reference_kernels):
    import torch.distributed as dist

    assert not dist.is_initialized()
    model = load(saved_models("mixtral"))
    framework = make_framework({"ep_degree": 2})
    with pytest.raises(AccelerationConfigError, match=r"needs an initialised torch\.distributed process group"):
        framework.plugins[0].shard_experts(model, RunContext(world_size=2, distributed_type="MULTI_CPU"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4  # nothing sliced
    framework.revert()


def test_shard_at_prepare_patches_only_an_accelerator_without_a_framework():
    """The framework API given a trainer's Accelerator (no framework attached): its prepare is patched, recorded and
    reverted with the framework; an Accelerator that runs a framework is left to prepare_contribution."""
    from accelerate import Accelerator

    from fms_acceleration_accelerate.accelerate_integration import attach_framework

    framework = make_framework({"ep_degree": 2})
    plugin = framework.plugins[0]
    framework.bind_run_context(RunContext(world_size=2, distributed_type="MULTI_CPU"))
    accelerator = Accelerator(cpu=True)
    assert plugin.shard_at_prepare(accelerator)
    assert "prepare" in vars(accelerator)
    assert not plugin.shard_at_prepare(accelerator)  # once per Accelerator
    framework.revert()
    assert "prepare" not in vars(accelerator)

    attach_framework(accelerator, make_framework({"ep_degree": 2}))
    assert not plugin.shard_at_prepare(accelerator)
    assert "prepare" not in vars(accelerator)


def test_shard_at_prepare_refuses_fsdp_without_the_framework_in_prepare():
    """Under FSDP, Accelerate's own fully_shard would shard the experts: refused, naming the ways that work."""
    from accelerate import Accelerator

    framework = make_framework({"ep_degree": 2})
    framework.bind_run_context(RunContext(world_size=2, fsdp_version=2, distributed_type="FSDP"))
    accelerator = Accelerator(cpu=True)
    with pytest.raises(AccelerationConfigError, match="runs no acceleration framework") as excinfo:
        framework.plugins[0].shard_at_prepare(accelerator)
    assert excinfo.value.path == f"{PATH}.ep_degree"
    for word in ("accelerate launch", "AccelerationKwargs", "ep_degree: 1"):
        assert word in str(excinfo.value)
    assert "prepare" not in vars(accelerator)


def test_shard_experts_without_expert_parallelism_is_refused(saved_models):
    with pytest.raises(AccelerationConfigError, match="shard_experts needs expert parallelism"):
        _plugin(1).shard_experts(load(saved_models("mixtral")))
