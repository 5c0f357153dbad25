"""Options of the fused-ops-and-kernels plugin (sections ``training.fused_ops_and_kernels`` and/or
``peft.quantization.fused_ops_and_kernels``; the option names of upstream fms-acceleration are kept).

Spellings found in upstream fms-acceleration's sample configurations and in configs written by older
fms-hf-tuning releases are accepted, each with a one-line note in the log (see
:meth:`FusedOpsAndKernelsConfig.normalize_section`):

* ``fast_loss: fused_ce_liger`` (upstream's Liger fused linear cross-entropy) is ``fast_loss: fused_linear``;
* ``fast_rsm_layernorm`` (upstream's misspelling) is ``fast_rms_layernorm``;
* ``fused_linear_loss: true`` (earlier upstream Liger configs) is ``fast_loss: fused_linear``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import is_main_process

logger = logging.getLogger("fms_acceleration_accelerate_foak")

LossMode = Literal["none", "cross_entropy", "fused_linear"]

BASE_LAYERS = ("bitsandbytes", "auto_gptq")


@dataclass(frozen=True)
class FusedOpsAndKernelsConfig:
    """Which kernels to patch into the model.

    Every kernel dispatches to Triton on CUDA tensors (and in the Triton interpreter with ``TRITON_INTERPRET=1``)
    and to its pure-torch reference otherwise.
    """

    base_layer: Literal["bitsandbytes", "auto_gptq"] | None = option(
        None,
        help="quantized base layer format the fused LoRA / dequant kernels read: 'bitsandbytes' (nf4/fp4 "
        "Linear4bit, dequantised by our own Triton kernels), 'auto_gptq' (GPTQ checkpoints loaded by the "
        "peft.quantization.auto_gptq plugin, which provides the dequant backend), or null for bf16/fp16/fp32 bases",
    )
    fused_lora: bool = option(
        False,
        help="fused LoRA kernels: q/k/v in one op (lora_qkv), o and other single projections (lora_linear), "
        "SwiGLU MLP in one op (lora_mlp_swiglu); needs PEFT LoRA with lora_dropout=0 and one active adapter",
    )
    fast_loss: bool | Literal["cross_entropy", "fused_linear"] = option(
        False,
        help="true or 'cross_entropy': Triton cross-entropy as the model's loss_function (num_items_in_batch "
        "aware); 'fused_linear': lm_head + cross-entropy fused and chunked in training, so the full logits are "
        "never materialised (outputs.logits is None in training steps); false: HF's loss. Upstream's "
        "'fused_ce_liger' is accepted as 'fused_linear'",
    )
    fast_rms_layernorm: bool = option(False, help="Triton RMSNorm for every RMSNorm module (incl. Gemma's 1+w)")
    fast_rope_embeddings: bool = option(False, help="Triton rotary embedding of q and k (incl. partial rotary)")
    fast_swiglu: bool = option(
        False,
        help="Triton SwiGLU/GeGLU activation in gated MLPs that fused_lora does not replace as a whole",
    )
    fused_dequant: bool = option(
        False,
        help="frozen quantized projections without a LoRA adapter (e.g. the MLP when LoRA targets only "
        "q,k,v,o) run our dequant + matmul, whose backward dequantises again instead of keeping weights",
    )

    lean_recompute: bool = option(
        True,
        help="under non-reentrant activation checkpointing, the recomputed forward of each decoder layer skips "
        "the down projection (and its dequant) of MLPs that fused_lora/fused_dequant compute as one kernel, "
        "whose output checkpointing discards; only for architectures where the MLP output feeds just the "
        "residual sum (Llama, Mistral, Granite, Qwen2/3, Gemma); gradients unchanged. (A plain nn.Linear down "
        "projection needs nothing: PyTorch's checkpoint early stop already skips it.)",
    )

    checkpoint_keep_attention: bool = option(
        False,
        help="under non-reentrant activation checkpointing, keep the attention block's q/k/v/o GEMM outputs and "
        "the SDPA output from the forward (PyTorch selective checkpointing), so the recomputation runs only the "
        "rest of the layer: faster, exact, at a memory cost of those outputs per layer (bf16 Llama 8B shape: "
        "~235 MB per layer per 8192 tokens); not with fused_lora, whose kernels add the adapter term into their "
        "GEMM outputs in place",
    )

    def __post_init__(self) -> None:
        if not any(
            (
                self.fused_lora,
                self.fast_loss,
                self.fast_rms_layernorm,
                self.fast_rope_embeddings,
                self.fast_swiglu,
                self.fused_dequant,
            )
        ):
            raise AccelerationConfigError(
                "no kernel is enabled, so this section would change nothing",
                fix="enable at least one of fused_lora, fast_loss, fast_rms_layernorm, fast_rope_embeddings, "
                "fast_swiglu, fused_dequant (or remove the section)",
            )
        if self.checkpoint_keep_attention and self.fused_lora:
            raise AccelerationConfigError(
                "checkpoint_keep_attention cannot be combined with fused_lora: the fused LoRA kernels add the "
                "adapter term into their GEMM outputs in place, so those outputs cannot be kept for the "
                "recomputation",
                fix="set checkpoint_keep_attention: false, or fused_lora: false",
            )
        if self.fused_dequant and self.base_layer is None:
            raise AccelerationConfigError(
                "fused_dequant: true needs a quantized base layer",
                fix="set base_layer: bitsandbytes (QLoRA) or auto_gptq (GPTQ-LoRA), or remove fused_dequant for bf16 "
                "models",
            )

    @classmethod
    def normalize_section(cls, data: Any, path: str) -> Any:
        """Rewrite upstream fms-acceleration spellings in one section's options to this plugin's (called by the
        framework before the section is parsed; see the module docstring for the spellings).

        Args:
            data: the section as written (a mapping; anything else is returned unchanged and refused by the
                parser with a clear message).
            path: its full dotted key path, for notes and errors.

        Returns:
            A new mapping (``data`` is not changed) with the upstream spellings replaced.

        Raises:
            AccelerationConfigError: an upstream spelling and this plugin's spelling of one option disagree in
                the same section.
        """
        if not isinstance(data, Mapping):
            return data
        options = dict(data)
        notes: list[str] = []
        if "fast_rsm_layernorm" in options:
            value = options.pop("fast_rsm_layernorm")
            if "fast_rms_layernorm" in options and options["fast_rms_layernorm"] != value:
                raise AccelerationConfigError(
                    f"fast_rsm_layernorm: {value!r} (upstream's spelling of fast_rms_layernorm) contradicts "
                    f"fast_rms_layernorm: {options['fast_rms_layernorm']!r}",
                    path=f"{path}.fast_rsm_layernorm",
                    fix="keep only fast_rms_layernorm",
                )
            options.setdefault("fast_rms_layernorm", value)
            notes.append("fast_rsm_layernorm (upstream's spelling) is read as fast_rms_layernorm")
        if "fused_linear_loss" in options:
            value = options.pop("fused_linear_loss")
            if value is True:
                if options.get("fast_loss", False) not in (False, "fused_linear", "fused_ce_liger"):
                    raise AccelerationConfigError(
                        f"fused_linear_loss: true (earlier upstream spelling of fast_loss: fused_linear) contradicts "
                        f"fast_loss: {options['fast_loss']!r}",
                        path=f"{path}.fused_linear_loss",
                        fix="write only fast_loss: fused_linear (fused lm_head + cross-entropy) or fast_loss: true",
                    )
                options["fast_loss"] = "fused_linear"
                notes.append("fused_linear_loss: true (earlier upstream spelling) is read as fast_loss: fused_linear")
            elif value is False:
                notes.append("fused_linear_loss: false (earlier upstream spelling) changes nothing and is ignored")
            else:
                raise AccelerationConfigError(
                    f"expected true or false, got {value!r}",
                    path=f"{path}.fused_linear_loss",
                    fix="write true or false",
                )
        if options.get("fast_loss") == "fused_ce_liger":
            options["fast_loss"] = "fused_linear"
            notes.append(
                "fast_loss: fused_ce_liger (upstream's Liger fused linear cross-entropy) runs this plugin's fused "
                "linear cross-entropy (fast_loss: fused_linear)"
            )
        if notes and is_main_process():
            for note in notes:
                logger.info("%s: %s", path, note)
        return options

    @property
    def loss_mode(self) -> LossMode:
        """``"none"``, ``"cross_entropy"`` or ``"fused_linear"`` (``fast_loss: true`` is ``"cross_entropy"``)."""
        if self.fast_loss is True:
            return "cross_entropy"
        if self.fast_loss is False:
            return "none"
        return self.fast_loss

    def requested_kernels(self) -> tuple[str, ...]:
        """Option names of the kernels this configuration asks for, in patch order."""
        names = []
        if self.fast_rms_layernorm:
            names.append("fast_rms_layernorm")
        if self.fast_rope_embeddings:
            names.append("fast_rope_embeddings")
        if self.fast_swiglu:
            names.append("fast_swiglu")
        if self.loss_mode != "none":
            names.append("fast_loss")
        if self.fused_lora:
            names.append("fused_lora")
        if self.fused_dequant:
            names.append("fused_dequant")
        return tuple(names)
