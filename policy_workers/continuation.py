"""Whether something that has happened ``n`` times happens again (pure numpy, no I/O).

CacheSage uses it twice: whether an agent that has made ``n`` calls in its
session makes another (its turns), and whether a cached block ``n`` sessions
have used gets another session (its spread; outcomes counted as stopped can
be revived when a late session comes). The rest of this note is the first.

Within a session an agent has its turns and is done: in a group chat the
proposer speaks first and rarely again, a verifier speaks a few times near the
end. Blocks kept for an agent that will not run again in its session are
worth nothing, so CacheSage weighs what it keeps by this probability.

Learned online from decided outcomes only: after its ``n``-th call an agent
either called again in the session (continued) or the session ended first
(stopped); one whose session is still running counts for neither yet. Counts
are kept per key (an agent; key 0 pools every agent) and per ``n`` (the last
bin holds every longer run), each key's decaying at its own outcomes so it
tracks drift; half precision holds them (they stay below 1 / (1 - decay)).
An estimate shrinks toward the pooled agents' rate at ``n``, and that toward a
prior the caller supplies (what the transition chain predicts), with
``strength`` pseudo-outcomes each: two observations do not read as certain,
and with none the chain's prediction stands.
"""
from __future__ import annotations

from typing import Any

import numpy as np

POOLED = 0


class Continuation:
    def __init__(self, max_calls: int = 8, strength: float = 2.0, decay: float = 0.99) -> None:
        self.max_calls, self.strength, self.decay = max_calls, strength, decay
        # [key, n, 0]: called again after its n-th call; [key, n, 1]: the session ended there
        self.counts = np.zeros((4, max_calls + 1, 2), dtype=np.float16)

    def _observe(self, n: int, key: int, outcome: int) -> None:
        while key >= self.counts.shape[0]:
            self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
        n = min(max(n, 0), self.max_calls)
        for row in {POOLED, key}:
            self.counts[row] *= self.decay
            self.counts[row, n, outcome] += 1.0

    def observe_continued(self, n: int, key: int) -> None:
        """After its ``n``-th call in a session, the agent (key) called again."""
        self._observe(n, key, 0)

    def observe_stopped(self, n: int, key: int) -> None:
        """The session ended with the agent (key) at ``n`` calls."""
        self._observe(n, key, 1)

    def observe_revived(self, n: int, key: int) -> None:
        """An outcome counted as stopped at ``n`` turned out to continue (a censored stop, corrected)."""
        n = min(max(n, 0), self.max_calls)
        for row in {POOLED, key}:
            self.counts[row, n, 1] = max(float(self.counts[row, n, 1]) - 1.0, 0.0)
            self.counts[row, n, 0] += 1.0

    def p_more(self, n: int, key: int, prior: float, pooled: bool = True) -> float:
        """P(the agent calls again | ``n`` calls so far in the session), shrunk toward the pooled agents' rate
        and that toward ``prior`` (``pooled=False``: the key's straight toward ``prior``)."""
        n = min(max(n, 0), self.max_calls)
        k = self.strength

        def shrunk(row: int, toward: float) -> float:
            continued, stopped = self.counts[row, n].tolist()
            return (continued + k * toward) / (continued + stopped + k)

        toward = shrunk(POOLED, prior) if pooled else prior
        return toward if key == POOLED or key >= self.counts.shape[0] else shrunk(key, toward)

    def nbytes(self, n: int) -> int:
        """Bytes of what is learned about ``n`` agents (and the pooled row)."""
        return (n + 1) * self.counts.shape[1] * self.counts.shape[2] * self.counts.itemsize

    def to_state(self) -> list:
        return self.counts.astype(float).tolist()

    def load_state(self, state: Any) -> None:
        counts = np.asarray(state, dtype=np.float16)
        if counts.ndim != 3 or counts.shape[1:] != self.counts.shape[1:]:
            return  # another layout: relearned
        self.counts = np.zeros((max(4, counts.shape[0]), *counts.shape[1:]), dtype=np.float16)
        self.counts[: counts.shape[0]] = counts
