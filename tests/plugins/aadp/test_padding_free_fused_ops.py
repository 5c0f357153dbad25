"""Padding-free together with the fused kernels and quantized bases.

The kernels see the flattened row: RoPE reads cos/sin gathered from ``position_ids`` that restart per example, the
loss kernels (cross-entropy, fused linear cross-entropy) see each example's first label ignored, fused LoRA and the
4-bit dequant are per token. Each stack trained on the flattened batch must match the same stack on the padded batch
(the loss and every LoRA gradient). The 4-bit stack (bitsandbytes nf4 loaded by its plugin, fused LoRA over it) runs
the kernels' pure-torch references; the 16-bit stack runs the Triton kernels in Triton's interpreter where there is
no GPU.

Both plugins patch a forward near the top of the model: the padding-free plugin wraps the decoder stack's forward to
read the batch's example boundaries once per forward, and ``fast_loss: fused_linear`` replaces the causal LM's forward
by one that runs the decoder stack and the fused loss head itself. With the shipped configurations (and with the
plugins run in the other order) the patch table lists both, every attention layer gets the one set of boundaries
computed per forward (counted: on a GPU each computation reads the examples' count and longest length back to the
host), and logits, loss and LoRA gradients equal those of padding-free alone and of the padded batch.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fms_acceleration_accelerate_aadp import PaddingFreePlugin
from fms_acceleration_accelerate_aadp import attention as pf_attention
from fms_acceleration_accelerate_aadp import segments as pf_segments
from fms_acceleration_accelerate_aadp.collate import flatten_batch
from fms_acceleration_accelerate_foak import FusedOpsAndKernelsPlugin

from fms_acceleration_accelerate import AccelerationFramework
from fms_acceleration_accelerate.registry import PluginRegistry

from .padding_free_helpers import padded_batch, save_tiny

# Import the kernel modules now, while TRITON_INTERPRET still has the root conftest's value: @triton.jit decides
# between the interpreter and the GPU launcher when a kernel is defined, not when it runs.
for _name in ("rms_norm", "rope", "glu", "cross_entropy", "fused_linear_cross_entropy", "nf4", "dequant", "lora"):
    importlib.import_module(f"fms_acceleration_accelerate_kernels.{_name}")

KERNELS = {"fused_lora": True, "fast_rms_layernorm": True, "fast_rope_embeddings": True}
LENGTHS = (9, 4, 7)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _framework(body: dict[str, Any], padding_free: bool) -> AccelerationFramework:
    plugins = [FusedOpsAndKernelsPlugin, PaddingFreePlugin]
    if "peft" in body and "bitsandbytes" in body["peft"]["quantization"]:
        from fms_acceleration_accelerate_peft.plugin import BitsAndBytesAccelerationPlugin

        plugins.append(BitsAndBytesAccelerationPlugin)
    training = dict(body.get("training", {}))
    section = training.pop("attention", {}).get("padding_free", {})  # a shipped configuration's own section
    if padding_free:
        training["attention"] = {"padding_free": section}
    body = {**body, "training": training} if training else {k: v for k, v in body.items() if k != "training"}
    return AccelerationFramework({"plugins": body}, registry=PluginRegistry(plugins))


class _BoundaryReads:
    """Counts the computations of a batch's example boundaries (``segments_of_batch``, wherever it is called from)
    and records the boundaries the forward hands each attention layer (``None``: the layer gets none and derives
    them itself)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.computed = 0
        self.handed: list[Any] = []
        self._attentions = [
            m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")
        ]
        assert self._attentions, "no attention module found"
        self._patch = pytest.MonkeyPatch()
        self._hooks: list[Any] = []

    def __enter__(self) -> _BoundaryReads:
        original = pf_segments.segments_of_batch

        def counting(**kwargs: Any) -> Any:
            self.computed += 1
            return original(**kwargs)

        for module in (pf_segments, pf_attention):
            self._patch.setattr(module, "segments_of_batch", counting)
        self._hooks = [m.register_forward_pre_hook(self._seen, with_kwargs=True) for m in self._attentions]
        return self

    def _seen(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.handed.append(kwargs.get(pf_attention.SEGMENTS_KWARG))

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._patch.undo()

    def reset(self) -> None:
        self.computed = 0
        self.handed.clear()

    def assert_once_per(self, forwards: int) -> None:
        """One computation per forward of the decoder stack, and every attention call handed one."""
        assert forwards > 0 and self.computed == forwards, f"{self.computed} computations in {forwards} forwards"
        assert self.handed and all(s is not None for s in self.handed), "an attention layer was handed no boundaries"

    def assert_once_per_forward(self) -> None:
        """One computation in the forward (and its backward), handed to every attention call (recomputed layers
        included)."""
        assert self.computed == 1, f"example boundaries computed {self.computed} times in one forward"
        assert len(self.handed) >= len(self._attentions), self.handed
        assert self.handed[0] is not None, "the attention layers were handed no boundaries"
        assert all(s is self.handed[0] for s in self.handed), "the attention layers got different boundaries"


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _run(folder, body: dict[str, Any], padding_free: bool) -> tuple[float, dict[str, torch.Tensor], list[str]]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    framework = _framework(body, padding_free)
    with framework:
        torch.manual_seed(7)  # LoRA A initialisation
        if framework.requires_custom_loading:
            model = framework.model_loader(str(folder), dtype=torch.float32)
            model, _ = framework.augmentation(model, None, (_lora(),))
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            model = get_peft_model(model, _lora())
            model, _ = framework.augmentation(model, None, ())
        model.train()
        batch = padded_batch(LENGTHS)
        if padding_free:
            batch, _ = flatten_batch(batch)
        with _BoundaryReads(model) as reads:
            loss = model(**batch).loss
            loss.backward()
        if padding_free:
            reads.assert_once_per_forward()
        else:
            assert reads.computed == 0
        replacements = sorted({r.replacement for r in framework.patches.records})
        return loss.item(), _lora_grads(model), replacements


def _compare(folder, body):
    padded_loss, padded_grads, _ = _run(folder, body, padding_free=False)
    loss, grads, replacements = _run(folder, body, padding_free=True)
    assert any(r.startswith("padding-free attention") for r in replacements)
    assert loss == pytest.approx(padded_loss, rel=1e-4, abs=1e-5)
    assert grads.keys() == padded_grads.keys() and len(grads) >= 8
    for name, grad in padded_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=2e-3, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    return replacements


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    # 4-bit blocks of 64 must divide every input size
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama64", hidden_size=64, intermediate_size=128)


@pytest.mark.parametrize("fast_loss", [True, "fused_linear"])
def test_qlora_fused_stack_on_flattened_batches(llama64, fast_loss, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' references (the Triton path is covered below)
    body = {
        "peft": {
            "quantization": {
                "bitsandbytes": {"quant_type": "nf4"},
                "fused_ops_and_kernels": {"base_layer": "bitsandbytes", "fast_loss": fast_loss, **KERNELS},
            }
        }
    }
    replacements = _compare(llama64, body)
    assert any("lora_qkv [bnb_4bit]" in r for r in replacements), replacements


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU stand-in for the GPU kernels")
def test_lora_fused_stack_in_the_triton_interpreter(llama64, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    body = {"training": {"fused_ops_and_kernels": {"fast_loss": "fused_linear", **KERNELS}}}
    replacements = _compare(llama64, body)
    assert any("apply_rotary_pos_emb" in r for r in replacements), replacements
    assert any("lora_qkv" in r for r in replacements), replacements


# ------------------------------------------------------------------------------------------------------------------
# the shipped configurations: both plugins' forward patches compose, in either order

ROOT = Path(__file__).resolve().parents[3]


def _sample_body(name: str) -> dict[str, Any]:
    """The ``plugins`` body of the shipped ``launch_configs/<name>-sample-configuration.yaml``."""
    return yaml.safe_load((ROOT / "launch_configs" / f"{name}-sample-configuration.yaml").read_text())["plugins"]


class _PaddingFreeAfterKernels(PaddingFreePlugin):
    """The padding-free plugin ordered after the fused-ops plugin, so that it patches the model second."""

    order = FusedOpsAndKernelsPlugin.order + 1


@dataclass
class _Step:
    loss: float
    grads: dict[str, torch.Tensor]
    logits: torch.Tensor  # (real tokens, vocab), from a forward without labels
    rows: set[tuple[str, str, str]]  # the patch table: (plugin, target, replacement)
    loss_kernel_calls: dict[str, int]


def _lora_step(folder, body: dict[str, Any] | None, plugins: list[type], flatten: bool) -> _Step:
    """One training forward + backward (LoRA, gradient checkpointing) and one forward without labels, under a
    framework of ``plugins`` with ``body`` (none: plain transformers + PEFT)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    framework = AccelerationFramework({"plugins": body}, registry=PluginRegistry(plugins)) if body else None
    with framework if framework is not None else contextlib.nullcontext():
        torch.manual_seed(7)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        model = get_peft_model(model, _lora())
        if framework is not None:
            model, _ = framework.augmentation(model, None, ())
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        padded = padded_batch(LENGTHS)
        batch = flatten_batch(padded)[0] if flatten else padded
        padding_free = framework is not None and "padding_free" in framework.active_plugin_names
        with _BoundaryReads(model) as reads:
            loss = model(**batch).loss
            loss.backward()  # recomputes the checkpointed layers
            if padding_free:
                reads.assert_once_per_forward()
            reads.reset()
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            if padding_free:
                reads.assert_once_per_forward()
            else:
                assert reads.computed == 0
        logits = logits[0] if flatten else logits[padded["attention_mask"].bool()]
        rows: set[tuple[str, str, str]] = set()
        calls: dict[str, int] = {}
        if framework is not None:
            rows = {(p, t, r) for p, t, r, _ in framework.patches.summary_rows()}
            if "fused_ops_and_kernels" in framework.active_plugin_names:
                calls = framework.plugin("fused_ops_and_kernels").loss_kernel_calls()
        step = _Step(loss.item(), _lora_grads(model), logits, rows, calls)
    causal = model.get_base_model()
    assert "forward" not in vars(causal) and "forward" not in vars(causal.model)  # reverted
    assert causal.config._attn_implementation == "eager"
    return step


def _assert_same_training(step: _Step, reference: _Step, logits_tol: float = 1e-4) -> None:
    assert step.loss == pytest.approx(reference.loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(step.logits, reference.logits, rtol=logits_tol, atol=logits_tol)
    assert step.grads.keys() == reference.grads.keys() and len(step.grads) >= 8
    for name, grad in reference.grads.items():
        torch.testing.assert_close(step.grads[name], grad, rtol=2e-3, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU stand-in for the GPU kernels")
@pytest.mark.parametrize(
    "padding_free_plugin", [PaddingFreePlugin, _PaddingFreeAfterKernels], ids=["padding_free_first", "fused_ops_first"]
)
def test_shipped_fused_lora_config_reads_boundaries_once(llama64, padding_free_plugin, monkeypatch):
    """``foak-fast-lora-padding-free``: ``fast_loss: fused_linear`` replaces the causal LM's forward by one that calls
    the decoder stack itself; the boundaries must still be read once per forward and handed to every layer."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    body = _sample_body("foak-fast-lora-padding-free")
    assert body["training"]["fused_ops_and_kernels"]["fast_loss"] == "fused_linear"
    both = _lora_step(llama64, body, [FusedOpsAndKernelsPlugin, padding_free_plugin], flatten=True)
    alone = _lora_step(llama64, {"training": {"attention": body["training"]["attention"]}}, [PaddingFreePlugin], True)
    padded = _lora_step(llama64, None, [], flatten=False)

    boundaries = ("padding_free", "base_model.model.model.forward", "example boundaries read once per forward")
    fused_loss = ("fused_ops_and_kernels", "base_model.model.forward", "kernels.fused_linear_cross_entropy (training with labels)")  # fmt: skip
    assert boundaries in both.rows and fused_loss in both.rows, sorted(both.rows)
    assert boundaries in alone.rows
    assert both.loss_kernel_calls["base_model.model.forward"] == 1  # the training forward ran the fused loss
    _assert_same_training(both, alone)
    _assert_same_training(both, padded)


@pytest.mark.parametrize("fast_loss", ["as shipped", "fused_linear"])
def test_shipped_qlora_fused_config_reads_boundaries_once(llama64, fast_loss, monkeypatch):
    """``accelerated-peft-bnb-nf4-foak-padding-free`` (``fast_loss: true``: the loss function is patched, not the
    forward), and the same with ``fast_loss: fused_linear``: boundaries once per forward (counted in ``_run``), loss and
    LoRA gradients equal to the padded batch's."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' references
    body = _sample_body("accelerated-peft-bnb-nf4-foak-padding-free")
    kernels = body["peft"]["quantization"]["fused_ops_and_kernels"]
    assert kernels["fast_loss"] is True
    if fast_loss != "as shipped":
        kernels["fast_loss"] = fast_loss
    replacements = _compare(llama64, body)
    assert any("lora_qkv [bnb_4bit]" in r for r in replacements), replacements
    assert "example boundaries read once per forward" in replacements


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU stand-in for the GPU kernels")
def test_trl_fused_head_reads_boundaries_once(llama64, tmp_path, monkeypatch):
    """TRL's ``SFTTrainer`` gives the causal LM a fused LM head that runs the decoder stack itself, and under
    ``fast_loss`` the fused-ops plugin serves that head with its own forward (adopted after the trainer was built):
    with padding-free alone and with the shipped ``foak-fast-lora-padding-free`` body, every training forward reads
    the boundaries once, and the losses equal TRL's padded run."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from .padding_free_helpers import instruction_examples, tiny_tokenizer

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    data = Dataset.from_list([{"input_ids": e["input_ids"]} for e in instruction_examples(count=6)])

    def train(body: dict[str, Any] | None) -> tuple[list[float], set[tuple[str, str, str]]]:
        framework = None
        if body is not None:
            framework = AccelerationFramework(
                {"plugins": body}, registry=PluginRegistry([FusedOpsAndKernelsPlugin, PaddingFreePlugin])
            )
        with framework if framework is not None else contextlib.nullcontext():
            torch.manual_seed(7)
            model = AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.float32, attn_implementation="eager")
            model = get_peft_model(model, _lora())
            if framework is not None:
                model, _ = framework.augmentation(model, None, ())
            args = SFTConfig(
                output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=3, learning_rate=0.05,
                optim="sgd", lr_scheduler_type="constant", logging_steps=1, use_cpu=True, report_to=[],
                save_strategy="no", disable_tqdm=True, seed=0, bf16=False, max_length=None,
                padding_free=framework is not None,
            )  # fmt: skip
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
            if framework is not None:
                for callback in framework.get_callbacks_and_ready_for_train(trainer.model, trainer.accelerator):
                    trainer.add_callback(callback)
            backbone = trainer.model.get_base_model().model
            forwards: list[int] = []
            hook = backbone.register_forward_pre_hook(lambda *a: forwards.append(1))
            with _BoundaryReads(trainer.model) as reads:
                trainer.train()
            hook.remove()
            if framework is not None:
                reads.assert_once_per(len(forwards))
                rows = {(p, t, r) for p, t, r, _ in framework.patches.summary_rows()}
            else:
                assert reads.computed == 0
                rows = set()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 2
        return losses, rows

    padded, _ = train(None)
    body = _sample_body("foak-fast-lora-padding-free")
    alone, _ = train({"training": {"attention": body["training"]["attention"]}})
    both, rows = train(body)
    assert ("padding_free", "base_model.model.model.forward", "example boundaries read once per forward") in rows
    assert any(p == "fused_ops_and_kernels" and t == "base_model.model.forward" and "TRL fused_lm_head=True" in r
               for p, t, r in rows), sorted(rows)  # fmt: skip
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(padded), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(both), torch.tensor(padded), rtol=1e-4, atol=1e-5)
