"""Small, dependency-free instrumentation shared by the engine side and the policy host."""
from __future__ import annotations

import random


class LatencyReservoir:
    """Latencies in seconds: a bounded uniform sample, reported as percentiles in ms."""

    def __init__(self, size: int = 20_000, seed: int = 0) -> None:
        self.size, self.seen, self.sample = size, 0, []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.sample) < self.size:
            self.sample.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.sample[j] = value

    def percentiles(self) -> dict[str, float]:
        if not self.sample:
            return {}
        ordered = sorted(self.sample)

        def at(q: float) -> float:
            return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000

        return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000, "n": self.seen}
