"""Rewards for the mixture, taken from what each training step already computes (no extra forward pass).

=======================  =====================================================================================
``reward_type``           reward of the examples trained since the previous update
=======================  =====================================================================================
``entropy``              mean Shannon entropy of the next-token distributions over real tokens, divided by
                         ``log(vocab)`` (in [0, 1]); from the LM head's logits of the training forward
``entropy3_varent1``     ``0.75 * entropy + 0.25 * varentropy / log(vocab)^2`` (same logits)
``entropy_last_token``   entropy of each sequence's last real token, divided by ``log(vocab)``
``train_loss``           the training loss (the model's ``loss`` output), averaged over the forwards
``validation_loss``      each category's evaluation loss (``eval_<category>_loss``: give the trainer
                         ``eval_dataset={category: dataset}``); every category is rewarded at each evaluation
``gradnorm``             ``1 / (grad_norm + 1e-4)``, from the trainer's logged ``grad_norm``
``velocity``             how fast the training loss (as ``train_loss``) of each category drawn is falling:
                         ``(previous - loss) / max(previous, loss)``, ``previous`` being that category's loss
                         at the last update that covered it (0 the first time): ``1 - loss / previous`` when
                         the loss falls, its mirror image ``previous / loss - 1`` when it rises (in (-1, 1))
=======================  =====================================================================================

Higher reward means the category is drawn more: a high loss or entropy asks for more examples of a category the
model has not learnt yet; a high gradient norm asks for fewer; ``velocity`` asks for more of what the model is
learning now (a falling loss) and less of what it cannot learn (noise: its loss stays high, so ``train_loss`` and the
entropy rewards would draw it more and more). ``velocity`` is upstream's name; it compares training losses here
(upstream compares losses of extra evaluation forwards). Its attribution is cleanest when each update covers one
category: ``sampling_interval`` a multiple of the examples per update (global batch size x ``update_interval``).

:class:`RewardTracker` keeps, on each process, a running sum and count of the reward (forward hooks that keep a
scalar each), and :meth:`RewardTracker.step` reduces them across processes with one ``all_reduce`` before the
update, so every process updates its bandit with the same number.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fms_acceleration_accelerate.errors import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .dataset import OnlineMixingDataset

REWARD_TYPES = (
    "entropy",
    "entropy3_varent1",
    "entropy_last_token",
    "train_loss",
    "validation_loss",
    "gradnorm",
    "velocity",
)
LOSS_REWARDS = ("train_loss", "velocity")
UNAVAILABLE_REWARDS = ("learnability", "combined")
ENTROPY_REWARDS = ("entropy", "entropy3_varent1", "entropy_last_token")
GRADNORM_EPSILON = 1e-4


def check_reward_type(value: object) -> str:
    """``value`` as a reward type (case-insensitive, upstream's upper-case enum names accepted)."""
    name = str(value).lower().removeprefix("reward.")
    if name in UNAVAILABLE_REWARDS:
        raise ValueError(
            f"reward_type {value!r} is not available: it compares losses of extra evaluation forwards on few-shot "
            "templated evaluation data. Use 'velocity' (how fast each category's training loss falls, no extra "
            f"forward) or one of: {', '.join(REWARD_TYPES)}"
        )
    if name not in REWARD_TYPES:
        raise ValueError(
            f"unknown reward_type {value!r}.{did_you_mean(name, REWARD_TYPES)} Valid: {', '.join(REWARD_TYPES)}"
        )
    return name


def entropy_reward(logits: torch.Tensor, mask: torch.Tensor | None, reward_type: str) -> tuple[float, int]:
    """Sum over the sequences of ``logits`` of their entropy reward, and the number of sequences.

    Args:
        logits: ``[batch, seq, vocab]`` (or ``[batch, vocab]``) next-token logits.
        mask: ``[batch, seq]``, 1 on real tokens (``None``: all real).
        reward_type: one of :data:`ENTROPY_REWARDS`.
    """
    import torch

    with torch.no_grad():
        if logits.dim() == 2:
            logits = logits[:, None, :]
        log_probs = torch.log_softmax(logits.detach().float(), dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(-1)  # [batch, seq]
        scale = math.log(logits.shape[-1])
        if mask is None or mask.shape != entropy.shape:
            mask = torch.ones_like(entropy)
        mask = mask.to(entropy.dtype)
        lengths = mask.sum(-1).clamp(min=1.0)
        if reward_type == "entropy_last_token":
            positions = torch.arange(entropy.shape[1], device=entropy.device)
            last = torch.where(mask > 0, positions, torch.zeros_like(positions)).amax(-1)
            per_sequence = entropy.gather(1, last[:, None]).squeeze(1) / scale
        else:
            per_sequence = (entropy * mask).sum(-1) / lengths / scale
            if reward_type == "entropy3_varent1":
                varentropy = (probs * log_probs.square()).sum(-1) - entropy.square()
                per_varent = (varentropy * mask).sum(-1) / lengths / scale**2
                per_sequence = 0.75 * per_sequence + 0.25 * per_varent
        return float(per_sequence.clamp(0.0, 1.0).sum()), int(per_sequence.shape[0])


def _loss_of(output: Any) -> Any:
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output.get("loss") if hasattr(output, "get") else None
    return getattr(output, "loss", None)


def _batch_size(args: tuple, kwargs: dict) -> int:
    """Examples in a training forward: the rows of ``input_ids``, or for one row the examples flattened into it
    (padding-free layout: ``cu_seq_lens_q`` or ``position_ids`` restarting at 0 at each example)."""
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if value is not None:
            if value.shape[0] == 1:
                return _examples_in_row(kwargs)
            return int(value.shape[0])
    if args and hasattr(args[0], "shape"):
        return int(args[0].shape[0])
    return 0


def _examples_in_row(kwargs: dict) -> int:
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is not None and cu_seq_lens.numel() > 1:
        return int(cu_seq_lens.numel() - 1)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.numel() > 0:
        return max(1, int((position_ids.reshape(-1) == 0).sum()))
    return 1


class RewardTracker:
    """Collects a reward from the training forwards and feeds ``dataset`` every ``update_interval`` steps.

    Usable in any loop: :meth:`attach` to the model, call :meth:`step` after each optimizer step (with the step
    number), :meth:`detach` at the end. The HF Trainer / TRL callback does exactly that.

    The number of examples trained is counted by a forward pre-hook on the model (the batch dimension of
    ``input_ids`` of each training forward), summed across processes with the reward.
    """

    def __init__(self, dataset: OnlineMixingDataset, *, reward_type: str | None = None, update_interval: int = 1):
        if update_interval < 1:
            raise ValueError(f"update_interval must be a positive int, got {update_interval!r}")
        self.dataset = dataset
        self.reward_type = check_reward_type(reward_type or dataset.reward_type)
        self.update_interval = update_interval
        self._handles: list[Any] = []
        self._mask: Any = None
        self._sum = 0.0
        self._count = 0
        self._examples = 0
        self.last_grad_norm: float | None = None

    # ---------------------------------------------------------------------------------------------- hooks
    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (a transformers model, possibly wrapped by PEFT / DDP / FSDP)."""
        self.detach()
        self._handles.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        if self.reward_type in LOSS_REWARDS:
            self._handles.append(model.register_forward_hook(self._after_forward))
        elif self.reward_type in ENTROPY_REWARDS:
            head = _output_embeddings(model)
            if head is None:
                raise ValueError(
                    f"reward_type {self.reward_type!r} reads the logits of the model's LM head, and "
                    f"{type(model).__name__} has none (get_output_embeddings() is None): use reward_type "
                    "'train_loss' or 'gradnorm'"
                )
            self._handles.append(head.register_forward_hook(self._after_head))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        self._examples += _batch_size(args, kwargs)
        self._mask = kwargs.get("attention_mask")

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not module.training:
            return
        loss = _loss_of(output)
        if loss is not None:
            self._sum += float(loss.detach().float())
            self._count += 1

    def _after_head(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not module.training or not hasattr(output, "dim"):
            return
        total, sequences = entropy_reward(output, self._mask, self.reward_type)
        self._sum += total
        self._count += sequences

    def note_grad_norm(self, value: float) -> None:
        """The gradient norm of the last optimizer step (the ``gradnorm`` reward)."""
        if value is not None and math.isfinite(float(value)):
            self.last_grad_norm = float(value)
            if self.reward_type == "gradnorm":
                self._sum += 1.0 / (self.last_grad_norm + GRADNORM_EPSILON)
                self._count += 1

    # ---------------------------------------------------------------------------------------------- update
    def step(self, step: int) -> dict[str, float] | None:
        """After optimizer step ``step``: every ``update_interval`` steps, reduce the reward across processes and
        update the mixture (returns it); else ``None``. Every process must call it at the same steps."""
        if self.reward_type == "validation_loss" or step % self.update_interval != 0:
            return None
        total, count, examples = _all_reduce_sum([self._sum, float(self._count), float(self._examples)])
        self._sum, self._count, self._examples = 0.0, 0, 0
        if examples < 1:
            return None
        if count < 1:
            raise RuntimeError(_no_reward_message(self.reward_type))
        if self.reward_type == "velocity":
            return self.dataset.reward_velocity(total / count, examples=round(examples), step=step)
        return self.dataset.reward(total / count, examples=round(examples), step=step)

    def pending(self) -> tuple[float, int, int]:
        """The reward sum, its count and the examples trained since the last update, summed across processes
        (every process must call it at the same point)."""
        total, count, examples = _all_reduce_sum([self._sum, float(self._count), float(self._examples)])
        return total, round(count), round(examples)

    def restore_pending(self, total: float, count: int, examples: int) -> None:
        """Continue with the reward not yet given at a checkpoint (on one process: the next update sums them)."""
        self._sum, self._count, self._examples = float(total), int(count), int(examples)

    def category_losses(self, metrics: dict[str, float]) -> dict[str, float]:
        """The per-category evaluation losses in ``metrics`` (``eval_<category>_loss``)."""
        found = {}
        for category in self.dataset.categories:
            for key in (f"eval_{category}_loss", f"{category}_loss"):
                if key in metrics:
                    found[category] = float(metrics[key])
                    break
        return found

    def evaluated(self, metrics: dict[str, float], step: int | None) -> dict[str, float] | None:
        """The ``validation_loss`` reward from an evaluation's metrics (``eval_<category>_loss``)."""
        if self.reward_type != "validation_loss":
            return None
        found = self.category_losses(metrics)
        if not found:
            raise ValueError(
                "reward_type 'validation_loss' needs one evaluation loss per category (eval_<category>_loss), and "
                f"the evaluation reported {sorted(metrics)}: give the trainer eval_dataset={{category: dataset}} "
                f"with the categories {self.dataset.categories}, or give the OnlineMixingDataset "
                "eval_dataset_dict={category: dataset} (evaluated at each of the trainer's evaluations)"
            )
        return self.dataset.reward_categories(found, step=step)


def _no_reward_message(reward_type: str) -> str:
    if reward_type in LOSS_REWARDS:
        return (
            f"reward_type {reward_type!r}: the training forwards returned no loss (outputs.loss is None); pass labels to "
            "the model, or use an entropy reward"
        )
    if reward_type == "gradnorm":
        return (
            "reward_type 'gradnorm': no gradient norm was logged since the last update; set max_grad_norm > 0 and "
            "logging_steps to a divisor of update_interval"
        )
    return (
        f"reward_type {reward_type!r}: the LM head produced no logits during training (a fused or chunked loss "
        "skips them); use reward_type 'train_loss', or turn the fused loss off"
    )


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    for candidate in (model, getattr(model, "module", None)):
        getter = getattr(candidate, "get_output_embeddings", None)
        if getter is not None:
            head = getter()
            if head is not None:
                return head
    return None


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


__all__ = ["ENTROPY_REWARDS", "LOSS_REWARDS", "REWARD_TYPES", "RewardTracker", "check_reward_type", "entropy_reward"]
