"""EXP3, the adversarial multi-armed bandit that learns the data mixture.

Each category is an arm with a weight ``w_i``. The sampling distribution mixes the normalised weights with a
uniform share ``gamma`` that keeps every arm explored::

    p_i = (1 - gamma) * w_i / sum_j w_j + gamma / K

After a reward ``r_i`` observed for arm ``i`` (averaged over the ``n_i`` examples it covered), the weight grows
with the importance-weighted estimate ``r_i / p_i`` (dividing by ``p_i`` keeps the estimate unbiased: an arm that is
rarely drawn gets a larger step when it is)::

    w_i <- w_i * exp(eta * (r_i / p_i) / K)

Arms without an observation keep their weight. With full information (every arm observed, e.g. one validation
loss per category) the estimate is ``r_i`` itself, without the division.

Weights are kept as logarithms, shifted so that the largest is 0: rewards such as a training loss are not
bounded by 1, and ``exp`` of their running sum would overflow after a few hundred updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class Exp3:
    """The EXP3 bandit over ``num_arms`` arms.

    Args:
        num_arms: number of arms (categories), at least 1.
        gamma: exploration share in ``[0, 1]``: each arm is drawn with probability at least ``gamma / K``.
        eta: learning rate of the weight update (> 0).
        initial_weights: positive starting weights (default: all 1, the uniform mixture).
    """

    def __init__(
        self, num_arms: int, *, gamma: float = 0.1, eta: float = 0.1, initial_weights: Sequence[float] | None = None
    ) -> None:
        if num_arms < 1:
            raise ValueError(f"EXP3 needs at least one arm, got {num_arms}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if not eta > 0.0:
            raise ValueError(f"eta must be positive, got {eta!r}")
        self.num_arms = num_arms
        self.gamma = float(gamma)
        self.eta = float(eta)
        if initial_weights is None:
            initial_weights = [1.0] * num_arms
        if len(initial_weights) != num_arms:
            raise ValueError(f"{len(initial_weights)} initial weights for {num_arms} arms")
        if any(not (w > 0 and math.isfinite(w)) for w in initial_weights):
            raise ValueError(f"initial weights must be positive and finite, got {list(initial_weights)}")
        self._log_weights = [math.log(w) for w in initial_weights]
        self._normalise()
        self.updates = 0

    # ---------------------------------------------------------------------------------------------- state
    @property
    def weights(self) -> list[float]:
        """The weights, scaled so that the largest is 1 (only their ratios matter)."""
        return [math.exp(lw) for lw in self._log_weights]

    def probabilities(self) -> list[float]:
        """The sampling distribution ``p`` (sums to 1)."""
        weights = self.weights
        total = sum(weights)
        k = self.num_arms
        return [(1.0 - self.gamma) * w / total + self.gamma / k for w in weights]

    def _normalise(self) -> None:
        top = max(self._log_weights)
        self._log_weights = [lw - top for lw in self._log_weights]

    # ---------------------------------------------------------------------------------------------- update
    def update(self, rewards: Mapping[int, float], *, full_information: bool = False) -> list[float]:
        """Apply one round of rewards; return the new probabilities.

        Args:
            rewards: ``{arm: reward}`` for the arms observed this round (the reward averaged over the examples
                the arm covered). Arms not listed are unchanged.
            full_information: every listed reward was observed regardless of which arm was drawn (no importance
                weighting).
        """
        probabilities = self.probabilities()
        for arm, reward in rewards.items():
            if not 0 <= arm < self.num_arms:
                raise IndexError(f"arm {arm} out of range for {self.num_arms} arms")
            reward = float(reward)
            if not math.isfinite(reward):
                raise ValueError(f"reward for arm {arm} is not finite: {reward!r}")
            estimate = reward if full_information else reward / probabilities[arm]
            self._log_weights[arm] += self.eta * estimate / self.num_arms
        self._normalise()
        self.updates += 1
        return self.probabilities()

    def draw(self, uniform: float) -> int:
        """The arm for a uniform number ``uniform`` in ``[0, 1)`` (inverse of the cumulative distribution)."""
        cumulative = 0.0
        probabilities = self.probabilities()
        for arm, p in enumerate(probabilities):
            cumulative += p
            if uniform < cumulative:
                return arm
        return self.num_arms - 1  # rounding: the cumulative sum may end a hair below 1

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_arms": self.num_arms,
            "gamma": self.gamma,
            "eta": self.eta,
            "log_weights": list(self._log_weights),
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["num_arms"] != self.num_arms:
            raise ValueError(f"checkpoint has {state['num_arms']} arms, this bandit has {self.num_arms}")
        self.gamma = float(state["gamma"])
        self.eta = float(state["eta"])
        self._log_weights = [float(v) for v in state["log_weights"]]
        self.updates = int(state["updates"])


__all__ = ["Exp3"]
