"""What a prefetch of a given confidence serves, learned from the predictions' outcomes (pure, no I/O).

A prefetch computes the blocks of the predicted agent's prompt that are not
resident; it pays off when the session's next prompt reads them. The policy's
probability that the agent calls next is not that: the next call may keep less
of the prompt, come from another agent, or never come. So every prediction a
prefetch could be made for is scored when the session's next prompt arrives
(or the session ends), whether or not the prefetch was issued: the fraction of
its would-be computed blocks that prompt read. Grouped by the prediction's
probability, those fractions say what a prefetch at that probability would
serve if its blocks were still cached when read. Of the prefetches that ran,
how much of what the next prompt read was still resident then (the rest was
evicted again before the call) is learned apart, over all of them, and scales
every bin. A prefetch never lowers the prefill computed: what it serves it
moves off a request's critical path (TTFT), what nobody reads it adds. At 1/2
it moves as much as it wastes.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


class PrefetchCalibration:
    """Per probability bin: decayed sum of read fractions and decayed count of predictions; and over the
    prefetches that ran, decayed sums of the blocks read still resident and of the blocks read."""

    def __init__(self, bins: int = 10, strength: float = 2.0, decay: float = 0.99) -> None:
        self.bins, self.strength, self.decay = bins, strength, decay
        self.sums = np.zeros((bins, 2))  # [bin, 0]: read fractions, [bin, 1]: predictions
        self.kept = np.zeros(2)  # [0]: blocks read and still resident, [1]: blocks read (prefetches that ran)

    def _bin(self, probability: float) -> int:
        return min(max(int(probability * self.bins), 0), self.bins - 1)

    def observe(self, probability: float, served: float) -> None:
        """A prediction made with ``probability`` would have served this fraction of what it computed."""
        row = self.sums[self._bin(probability)]
        row *= self.decay
        row += (min(max(served, 0.0), 1.0), 1.0)

    def observe_kept(self, resident: int, read: int) -> None:
        """A prefetch that ran: of its blocks the next prompt read, ``resident`` were still cached."""
        if read > 0:
            self.kept *= self.decay
            self.kept += (min(max(resident, 0), read), read)

    def kept_share(self) -> float:
        """Share of a prefetch's blocks still cached when read, shrunk toward all (``strength`` blocks)."""
        resident, read = self.kept
        return (float(resident) + self.strength) / (float(read) + self.strength)

    def served(self, probability: float) -> float:
        """Expected served fraction of a prefetch made with ``probability``: its bin's outcomes, shrunk
        toward the probability itself (trusted until outcomes say otherwise), times the kept share."""
        total, count = self.sums[self._bin(probability)]
        return (float(total) + self.strength * probability) / (float(count) + self.strength) * self.kept_share()

    def to_state(self) -> dict[str, list]:
        return {"read": self.sums.tolist(), "kept": self.kept.tolist()}

    def load_state(self, state: Any) -> None:
        if not isinstance(state, Mapping):
            return  # another layout (session 14's first, a bare table) is relearned
        sums, kept = np.asarray(state.get("read", ()), dtype=float), np.asarray(state.get("kept", ()), dtype=float)
        if sums.shape == self.sums.shape and kept.shape == self.kept.shape:  # another layout is ignored
            self.sums, self.kept = sums, kept

    def nbytes(self) -> int:
        return self.sums.nbytes + self.kept.nbytes


def served_fraction(computed: Sequence[str], read: set[str]) -> float:
    """The share of the blocks a prefetch would compute that the next prompt read."""
    return sum(h in read for h in computed) / len(computed) if computed else 0.0
