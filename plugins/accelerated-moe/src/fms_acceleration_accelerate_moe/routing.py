"""Routing as the model specs describe it, and the routing statistics the plugin keeps.

* :func:`route` computes a router's top-k weights and expert ids from the spec's data alone
  (:class:`~fms_acceleration_accelerate.model_specs.MoESpec`: routing kind, router bias, top-k normalisation): the
  tests check it against every architecture's own router, which pins down that the spec says what the model does.
* :class:`RoutingStats` counts the tokens routed to each expert of each MoE layer. Counts stay on the device and
  are added with one in-place op per layer and step (no host sync); they are read (one copy to the host) only
  when asked, e.g. by :class:`~.callbacks.RoutingStatsCallback` at the trainer's logging steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fms_acceleration_accelerate.model_specs import MoESpec


def route(
    hidden: torch.Tensor, router: torch.nn.Module, spec: MoESpec, config: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router's decision computed from the spec: ``(router_logits (T, E), top_k_weights (T, k), top_k_index (T,
    k))``, the weights in fp32.

    Args:
        hidden: (T, H) token hidden states.
        router: the router module (its ``weight`` (E, H), and ``bias`` (E,) when ``spec.router_bias``).
        spec: the architecture's MoE spec.
        config: the model config (k, and the top-k normalisation flag when the spec names one).
    """
    bias = router.bias if spec.router_bias else None
    logits = F.linear(hidden, router.weight, bias)
    k = spec.top_k(config)
    scores = logits.float()
    if spec.routing == "softmax_topk":
        weights, index = torch.topk(torch.softmax(scores, dim=-1), k, dim=-1)
    elif spec.routing == "topk_softmax":
        top, index = torch.topk(scores, k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:  # sigmoid_topk
        weights, index = torch.topk(torch.sigmoid(scores), k, dim=-1)
    if spec.normalizes_top_k(config):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights, index


@dataclass(frozen=True)
class LoadSummary:
    """Load balance of one window of routing counts.

    Attributes:
        tokens: routing slots counted (tokens x k, summed over the MoE layers).
        max_over_mean: over the layers, the largest ``max_e(count_e) / mean_e(count_e)`` (1.0: perfectly balanced).
        min_over_mean: over the layers, the smallest ``min_e(count_e) / mean_e(count_e)`` (0.0: an idle expert).
        idle_experts: experts that got no token, summed over the layers.
    """

    tokens: int
    max_over_mean: float
    min_over_mean: float
    idle_experts: int

    def as_logs(self, prefix: str = "moe/") -> dict[str, float]:
        return {
            f"{prefix}load_max_over_mean": round(self.max_over_mean, 4),
            f"{prefix}load_min_over_mean": round(self.min_over_mean, 4),
            f"{prefix}idle_experts": float(self.idle_experts),
        }


class RoutingStats:
    """Tokens routed to each expert of each MoE layer, counted on the device.

    The plugin's experts forward calls :meth:`add` in training forwards (not in evaluation, not in the forward
    that activation checkpointing recomputes during backward, not under ``torch.compile``). Nothing here syncs
    with the host except :meth:`totals` / :meth:`take_window`.

    Attributes:
        last_window: the counts of the window :meth:`take_window` returned last (layer -> (E,) CPU int64 tensor),
            e.g. for a callback that runs after the plugin's own logging callback.
    """

    def __init__(self) -> None:
        self._counts: dict[str, torch.Tensor] = {}
        self._taken: dict[str, torch.Tensor] = {}
        self.last_window: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, layer: str, tokens_per_expert: torch.Tensor) -> None:
        """Add one forward's counts (an (E,) integer tensor, on any device) to ``layer``'s."""
        counts = self._counts.get(layer)
        if counts is None or counts.shape != tokens_per_expert.shape or counts.device != tokens_per_expert.device:
            previous = counts
            counts = torch.zeros(tokens_per_expert.shape, dtype=torch.int64, device=tokens_per_expert.device)
            if previous is not None and previous.shape == counts.shape:
                counts += previous.to(counts.device)
            self._counts[layer] = counts
        counts.add_(tokens_per_expert)

    def totals(self) -> dict[str, torch.Tensor]:
        """Counts since the start (or the last :meth:`reset`), per layer, as CPU int64 tensors (one host sync)."""
        if not self._counts:
            return {}
        layers = list(self._counts)
        devices = {c.device for c in self._counts.values()}
        if len(devices) == 1 and len({c.numel() for c in self._counts.values()}) == 1:
            stacked = torch.stack([self._counts[name] for name in layers]).cpu()  # one copy for every layer
            return {name: stacked[i] for i, name in enumerate(layers)}
        return {name: self._counts[name].cpu() for name in layers}

    def take_window(self) -> dict[str, torch.Tensor]:
        """Counts since the previous call, per layer (CPU int64 tensors; one host sync); also kept as
        :attr:`last_window`."""
        totals = self.totals()
        window = {}
        for name, total in totals.items():
            before = self._taken.get(name)
            window[name] = total - before if before is not None and before.shape == total.shape else total.clone()
        self._taken = totals
        self.last_window = window
        return window

    def reset(self) -> None:
        self._counts.clear()
        self._taken.clear()
        self.last_window = {}

    @staticmethod
    def summarize(counts: Mapping[str, torch.Tensor]) -> LoadSummary | None:
        """The load balance of ``counts`` (layer -> (E,) counts); ``None`` when nothing was routed."""
        rows = [c.double() for c in counts.values() if c.numel() and int(c.sum()) > 0]
        if not rows:
            return None
        ratios_max, ratios_min = [], []
        for row in rows:
            mean = row.mean()
            ratios_max.append(float(row.max() / mean))
            ratios_min.append(float(row.min() / mean))
        return LoadSummary(
            tokens=int(sum(int(r.sum()) for r in rows)),
            max_over_mean=max(ratios_max),
            min_over_mean=min(ratios_min),
            idle_experts=int(sum(int((r == 0).sum()) for r in rows)),
        )


__all__ = ["LoadSummary", "RoutingStats", "route"]
