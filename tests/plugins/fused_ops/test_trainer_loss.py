"""fast_loss in real trainers: TRL's SFTTrainer (its fused LM head) and HF's Trainer (num_items_in_batch with
gradient accumulation), through the framework API, the kernels in Triton (interpreter mode on CPU).

Each accelerated run is compared with the same run without the plugin: logged loss trajectory, TRL's entropy and
mean_token_accuracy metrics; the loss kernels must have run (call counters) wherever the patch table lists them.
Runs are in float32 (``bf16=False``) so the trajectories can be compared tightly; one SFT run keeps SFTConfig's
default bf16 autocast with a tolerance for bf16 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fms_acceleration_accelerate.model_specs import ModelStructureError

from .tiny_models import make_framework

trl = pytest.importorskip("trl")

WORDS = "the a lora shard kernel token layer norm fast slow big small".split()
VOCAB = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
MODES = ["cross_entropy", "fused_linear"]
TRL_METRICS = ("loss", "entropy", "mean_token_accuracy")
TRAJECTORY_TOL = 1e-5  # relative (float32 runs; the kernels sum in another order than the unpatched loss)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama saved with save_pretrained (untied head: the head's gradient is checked too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # per-token losses far from log(vocab): micro-batch means differ from the token mean
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _texts(n: int = 16) -> list[list[str]]:
    return [[WORDS[(i * 3 + j) % len(WORDS)] for j in range(4 + i % 5)] for i in range(n)]


def _sft_dataset():
    """Prompt/completion pairs: SFTTrainer scores only the completion, so every batch masks some labels."""
    from datasets import Dataset

    texts = _texts()
    return Dataset.from_dict(
        {"prompt": [" ".join(t[:2]) for t in texts], "completion": [" " + " ".join(t[2:]) for t in texts]}
    )


def _hf_dataset():
    """Token ids padded to one length with label -100 on the padding: micro-batches hold different numbers of
    scored tokens, so the token-count normalisation (num_items_in_batch) differs from a mean per micro-batch."""
    from datasets import Dataset

    length = 10
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for text in _texts():
        ids = [VOCAB[w] for w in text][:length]
        pad = length - len(ids)
        rows["input_ids"].append(ids + [0] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append(ids + [-100] * pad)
    return Dataset.from_dict(rows)


@dataclass
class Run:
    history: list[dict[str, float]]
    calls: dict[str, int] | None
    table: list[tuple[str, str, str, int]] | None
    model: Any
    framework: Any


def _metrics(state) -> list[dict[str, float]]:
    keys = ("loss", "entropy", "mean_token_accuracy")
    return [{k: h[k] for k in keys if k in h} for h in state.log_history if "loss" in h]


def _load(model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _finish(trainer, framework, model) -> Run:
    trainer.train()
    if framework is None:
        return Run(_metrics(trainer.state), None, None, model, None)
    plugin = framework.plugins[0]
    return Run(_metrics(trainer.state), plugin.loss_kernel_calls(), framework.patches.summary_rows(), model, framework)


def _run_sft(model_dir, tmp_path, mode, *, steps=4, bf16=False, lora=False, patch_after_trainer=False) -> Run:
    from trl import SFTConfig, SFTTrainer

    model = _load(model_dir)
    framework = make_framework({"fast_loss": mode}) if mode else None
    if framework is not None and not patch_after_trainer:
        model, _ = framework.augmentation(model, None, ())
    args = SFTConfig(
        output_dir=str(tmp_path / f"sft-{mode}"),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.5,
        optim="sgd",
        seed=0,
        bf16=bf16,
        use_cpu=True,
        max_length=16,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=_sft_dataset(), processing_class=_tokenizer(), peft_config=peft_config
    )
    if framework is not None:
        if patch_after_trainer:  # as when the kernels are patched at Accelerator.prepare, inside train()
            framework.augmentation(trainer.model, None, ())
        framework.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator)
    return _finish(trainer, framework, model)


def _run_hf(model_dir, tmp_path, mode, *, steps=3, spy: list | None = None) -> Run:
    from transformers import Trainer, TrainingArguments

    model = _load(model_dir)
    framework = make_framework({"fast_loss": mode}) if mode else None
    if framework is not None:
        model, _ = framework.augmentation(model, None, ())
    args = TrainingArguments(
        output_dir=str(tmp_path / f"hf-{mode}"),
        max_steps=steps,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=0.5,
        optim="sgd",
        seed=0,
        use_cpu=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_hf_dataset())
    if spy is not None:  # records the micro-batches and num_items_in_batch of the run (behaviour unchanged)
        compute_loss = trainer.compute_loss

        def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
            spy.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
            return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        trainer.compute_loss = recording
    if framework is not None:
        framework.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator)
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch to the model
    return _finish(trainer, framework, model)


def _assert_trajectories_close(baseline: Run, accelerated: Run, tol: float, metrics=("loss",)) -> None:
    assert len(baseline.history) == len(accelerated.history) > 0
    for step, (want, got) in enumerate(zip(baseline.history, accelerated.history)):
        for key in metrics:
            assert abs(want[key] - got[key]) <= tol * max(1.0, abs(want[key])), (
                f"step {step} {key}: unpatched {want[key]:.7f} vs accelerated {got[key]:.7f}"
            )
    assert accelerated.history[-1]["loss"] < accelerated.history[0]["loss"]  # it trains


def _assert_loss_kernels_ran(run: Run, micro_batches: int) -> None:
    """Every loss patch in the table ran its kernel once per micro-batch; the table has no other loss row."""
    assert run.calls, "no loss patch in the table"
    assert all(count == micro_batches for count in run.calls.values()), run.calls
    loss_rows = {target for _plugin, target, replacement, _n in run.table if "entropy" in replacement}
    loss_rows |= {
        t for _p, t, _r, _n in run.table if t.endswith(("loss_function", "lm_head.forward", "CausalLM.forward"))
    }
    assert loss_rows == set(run.calls), (loss_rows, run.calls)


# ------------------------------------------------------------------------------------------------ TRL


@pytest.mark.parametrize("mode", MODES)
def test_sft_trainer_runs_the_loss_kernels(mode, model_dir, tmp_path, triton_interpreter):
    """TRL's fused LM head (fused_lm_head=True) is served by the kernels: loss, entropy and token accuracy as
    TRL's own head computes them, and the loss_function patch (which TRL never calls) is not in the table."""
    baseline = _run_sft(model_dir, tmp_path, None)
    accelerated = _run_sft(model_dir, tmp_path, mode)
    _assert_trajectories_close(baseline, accelerated, tol=TRAJECTORY_TOL, metrics=TRL_METRICS)
    _assert_loss_kernels_ran(accelerated, micro_batches=4 * 2)
    assert not any(target.endswith("loss_function") for _p, target, _r, _n in accelerated.table)
    assert accelerated.framework.plugins[0].fast_loss.trl_head is not None
    # both modes run the chunked kernel under TRL's head, which never builds the full logits itself
    assert any("fused_linear_cross_entropy_per_token" in r for _p, _t, r, _n in accelerated.table), accelerated.table
    assert any(t.endswith("lm_head.forward") for _p, t, _r, _n in accelerated.table), accelerated.table
    accelerated.framework.revert()
    if mode == "fused_linear":
        # TRL's head had wrapped the forward patched at augmentation and went with it: reverting leaves the
        # model's own forward, as before the plugin patched it
        assert "forward" not in vars(accelerated.model)
    else:  # TRL's head wrapped the model's own forward: reverting gives it back
        assert vars(accelerated.model)["forward"].__func__.__globals__["__name__"] == "trl.trainer.utils"
    assert "_loss_function" not in vars(accelerated.model)


def test_sft_trainer_lora_fused_linear(model_dir, tmp_path, triton_interpreter):
    """SFTTrainer adds LoRA (peft_config) and puts its head on the base model: the frozen lm_head's per-token
    path (no weight gradient) and the PEFT-wrapped model."""
    baseline = _run_sft(model_dir, tmp_path, None, lora=True, steps=3)
    accelerated = _run_sft(model_dir, tmp_path, "fused_linear", lora=True, steps=3)
    _assert_trajectories_close(baseline, accelerated, tol=TRAJECTORY_TOL, metrics=TRL_METRICS)
    _assert_loss_kernels_ran(accelerated, micro_batches=3 * 2)


@pytest.mark.parametrize("mode", MODES)
def test_sft_trainer_kernels_patched_after_trls_head(mode, model_dir, tmp_path, triton_interpreter):
    """Kernels patched after SFTTrainer put its head on the model (as at Accelerator.prepare inside train()):
    the plugin serves the head directly; reverting gives TRL's head back."""
    baseline = _run_sft(model_dir, tmp_path, None, steps=2)
    accelerated = _run_sft(model_dir, tmp_path, mode, steps=2, patch_after_trainer=True)
    _assert_trajectories_close(baseline, accelerated, tol=TRAJECTORY_TOL, metrics=TRL_METRICS)
    _assert_loss_kernels_ran(accelerated, micro_batches=2 * 2)
    accelerated.framework.revert()
    restored = vars(accelerated.model)["forward"]
    assert restored.__func__.__globals__["__name__"] == "trl.trainer.utils"


def test_sft_trainer_bf16_autocast_fused_linear(model_dir, tmp_path, triton_interpreter):
    """SFTConfig's default bf16 autocast: the head runs in bf16 in both runs, rounded differently (TRL keeps the
    hidden-state gradient in float32, the kernels in bf16 as HF's own lm_head does): close, not equal."""
    baseline = _run_sft(model_dir, tmp_path, None, steps=2, bf16=True)
    accelerated = _run_sft(model_dir, tmp_path, "fused_linear", steps=2, bf16=True)
    _assert_trajectories_close(baseline, accelerated, tol=1e-2, metrics=("loss", "entropy"))
    _assert_loss_kernels_ran(accelerated, micro_batches=2 * 2)


def _replace_forward_with_unknown_head(model):
    def forward(*args, fused_lm_head=False, **kwargs):  # a fused-head forward that is not TRL's
        raise AssertionError("never called")

    model.forward = forward


@pytest.mark.parametrize(
    "install, expected",
    [
        (lambda m: trl.trainer.utils.add_fused_lm_head(m, outputs=("log_probs", "mean_logits")), "mean_logits"),
        (lambda m: trl.trainer.utils.add_fused_lm_head(m, cast_lm_head_to_fp32=True), "float32"),
        (_replace_forward_with_unknown_head, "not in trl"),
    ],
    ids=["dpo-outputs", "fp32-head", "not-trl"],
)
@pytest.mark.parametrize("patch_after_head", [True, False])
def test_fused_heads_the_kernels_cannot_serve_are_refused(install, expected, patch_after_head):
    from .tiny_models import tiny_model

    model = tiny_model("llama")
    framework = make_framework({"fast_loss": "fused_linear"})
    if patch_after_head:
        install(model)
        with pytest.raises(ModelStructureError, match=expected) as info:
            framework.augmentation(model)
    else:
        framework.augmentation(model)
        install(model)
        with pytest.raises(ModelStructureError, match=expected) as info:
            framework.get_callbacks_and_ready_for_train(model, None)
    assert f"trl {trl.__version__}" in str(info.value) and "fast_loss: false" in str(info.value)


def test_temperature_with_softcapping_is_refused():
    from .tiny_models import tiny_model

    model = tiny_model("gemma2")
    trl.trainer.utils.add_fused_lm_head(model, temperature=0.7)
    with pytest.raises(ModelStructureError, match=r"temperature 0\.7 with logit soft-capping"):
        make_framework({"fast_loss": True}).augmentation(model)


def test_temperature_is_served(triton_interpreter):
    """A TRL head with a sampling temperature (no soft-capping): the same log-probabilities and gradients."""
    from .tiny_models import tiny_batch, tiny_model

    results = []
    for patched in (False, True):
        model = tiny_model("granite", seed=2)  # logits_scaling 2.0: scale and temperature combined
        trl.trainer.utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
        framework = make_framework({"fast_loss": "fused_linear"}) if patched else None
        if framework is not None:
            framework.augmentation(model)
        batch = tiny_batch(seed=5)
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], fused_lm_head=True)
        (-out.log_probs.sum() / out.label_mask.sum()).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    assert got.is_top1 is None and want.is_top1 is None
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------ HF Trainer


@pytest.mark.parametrize("mode", MODES)
def test_hf_trainer_gradient_accumulation_honours_num_items_in_batch(mode, model_dir, tmp_path, triton_interpreter):
    """Gradient accumulation 2: the Trainer passes num_items_in_batch (the scored tokens of both micro-batches);
    the patched loss divides by it as HF's ForCausalLMLoss does, so the trajectory is the unpatched one."""
    spy: list = []
    baseline = _run_hf(model_dir, tmp_path, None)
    accelerated = _run_hf(model_dir, tmp_path, mode, spy=spy)
    _assert_trajectories_close(baseline, accelerated, tol=TRAJECTORY_TOL)
    _assert_loss_kernels_ran(accelerated, micro_batches=3 * 2)

    # the comparison can fail: a mean per micro-batch (num_items_in_batch ignored) logs a first loss ten times
    # the trajectory tolerance away
    (first, n_items), (second, _) = spy[:2]
    scored = [int((inputs["labels"][:, 1:] != -100).sum()) for inputs in (first, second)]
    assert int(n_items) == sum(scored) and scored[0] != scored[1]
    model = _load(model_dir)
    with torch.no_grad():
        per_micro_batch_mean = sum(model(**inputs).loss.item() for inputs in (first, second)) / 2
    first_loss = baseline.history[0]["loss"]
    assert abs(per_micro_batch_mean - first_loss) > 10 * TRAJECTORY_TOL * max(1.0, first_loss)


@pytest.mark.parametrize("mode", MODES)
def test_patched_loss_equals_hf_loss_with_num_items_in_batch(mode, model_dir, triton_interpreter):
    """One micro-batch with the Trainer's num_items_in_batch (a tensor): the kernels' loss and gradients equal
    the unpatched model's (HF's ForCausalLMLoss)."""
    data = _hf_dataset()[:4]
    inputs = {k: torch.tensor(v) for k, v in data.items()}
    n_items = torch.tensor(29)
    results = []
    for patched in (False, True):
        model = _load(model_dir).train()
        framework = make_framework({"fast_loss": mode}) if patched else None
        if framework is not None:
            model, _ = framework.augmentation(model)
        loss = model(**inputs, num_items_in_batch=n_items).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, framework))
    (want, want_grads, _), (got, got_grads, framework) = results
    assert framework.plugins[0].loss_kernel_calls() and all(framework.plugins[0].loss_kernel_calls().values())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-7, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
