"""What a prefetch of a given confidence serves, learned from the predictions' outcomes (pure, no I/O).

A prefetch computes the blocks of the predicted agent's prompt that are not
resident; it pays off when the session's next prompt reads them. The policy's
probability that the agent calls next is not that: the next call may keep less
of the prompt, come from another agent, or never come. So every prediction a
prefetch could be made for is scored when the session's next prompt arrives
(or the session ends), whether or not the prefetch was issued: the fraction of
its would-be computed blocks that prompt read. Grouped by the prediction's
probability, those fractions say what a prefetch at that probability serves.
A prefetch never lowers the prefill computed: what it serves it moves off a
request's critical path (TTFT), what nobody reads it adds. At 1/2 it moves as
much as it wastes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class PrefetchCalibration:
    """Per probability bin: decayed sum of served fractions and decayed count of predictions."""

    def __init__(self, bins: int = 10, strength: float = 2.0, decay: float = 0.99) -> None:
        self.bins, self.strength, self.decay = bins, strength, decay
        self.sums = np.zeros((bins, 2))  # [bin, 0]: served fractions, [bin, 1]: predictions

    def _bin(self, probability: float) -> int:
        return min(max(int(probability * self.bins), 0), self.bins - 1)

    def observe(self, probability: float, served: float) -> None:
        """A prediction made with ``probability`` would have served this fraction of what it computed."""
        row = self.sums[self._bin(probability)]
        row *= self.decay
        row += (min(max(served, 0.0), 1.0), 1.0)

    def served(self, probability: float) -> float:
        """Expected served fraction of a prefetch made with ``probability``: its bin's outcomes, shrunk
        toward the probability itself (trusted until outcomes say otherwise)."""
        total, count = self.sums[self._bin(probability)]
        return (float(total) + self.strength * probability) / (float(count) + self.strength)

    def to_state(self) -> list[list[float]]:
        return self.sums.tolist()

    def load_state(self, state: Any) -> None:
        sums = np.asarray(state, dtype=float)
        if sums.shape == self.sums.shape:
            self.sums = sums

    def nbytes(self) -> int:
        return self.sums.nbytes


def served_fraction(computed: Sequence[str], read: set[str]) -> float:
    """The share of the blocks a prefetch would compute that the next prompt read."""
    return sum(h in read for h in computed) / len(computed) if computed else 0.0
