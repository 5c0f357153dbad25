"""The trainer callback of the routing statistics (imported when a trainer asks for callbacks)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .routing import RoutingStats


class RoutingStatsCallback(TrainerCallback):
    """Adds the routing load balance of the last logging window to the trainer's log (``moe/load_max_over_mean``,
    ``moe/load_min_over_mean``, ``moe/idle_experts``; this process's tokens) at every logging step.

    The values go into the ``logs`` the trainer hands to its callbacks (printed by the progress callback, which runs
    after the callbacks a trainer is given) and into the latest ``state.log_history`` entry; reporting integrations
    that the trainer ran before this callback do not see them.
    """

    def __init__(self, stats: RoutingStats) -> None:
        self.stats = stats

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not len(self.stats) or "loss" not in logs:
            return  # only training-loss logs: evaluation logs have no training window
        summary = self.stats.summarize(self.stats.take_window())
        if summary is None:
            return
        values = summary.as_logs()
        logs.update(values)
        if state.log_history and isinstance(state.log_history[-1], dict):
            state.log_history[-1].update(values)


__all__ = ["RoutingStatsCallback"]
