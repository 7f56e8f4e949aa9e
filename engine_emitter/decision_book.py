"""What the engine has been told to do: eviction scores and pins, with expiry (pure, no vLLM).

Decisions are idempotent by id, ignored once expired, and apply either to the
block hashes they name or, with none named, to every block attributed to the
agent. Lookups are dictionary hits, so asking for a block's score costs O(1).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from streams import events as ev

AgentKey = tuple[str, str]  # (workload, agent)


@dataclass
class _Scored:
    score: float
    expires_at: float


class DecisionBook:
    def __init__(self, remembered_ids: int = 100_000) -> None:
        self.block_scores: dict[str, _Scored] = {}
        self.agent_scores: dict[AgentKey, _Scored] = {}
        self.block_pins: dict[str, float] = {}  # hash -> pinned until
        self.agent_pins: dict[AgentKey, float] = {}
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self._remembered_ids = remembered_ids
        self.counters: Counter[str] = Counter()

    @property
    def steering(self) -> bool:
        """Any eviction score in force: without one the engine keeps stock LRU order untouched."""
        return bool(self.block_scores or self.agent_scores)

    def apply(self, decision: ev.Decision, now: float) -> bool:
        """Record one decision; False (and counted) if expired, a duplicate or of an unknown kind."""
        if decision.expires_at <= now:
            self.counters["expired"] += 1
            return False
        if decision.decision_id in self._seen_ids:
            self.counters["duplicate"] += 1
            return False
        self._seen_ids[decision.decision_id] = None
        if len(self._seen_ids) > self._remembered_ids:
            self._seen_ids.popitem(last=False)
        key = (decision.workload, decision.agent)
        if isinstance(decision, ev.EvictionScore):
            scored = _Scored(decision.score, decision.expires_at)
            if decision.block_hashes:
                for h in decision.block_hashes:
                    self.block_scores[h] = scored
            else:
                self.agent_scores[key] = scored
        elif isinstance(decision, ev.Pin):
            until = min(now + decision.ttl_s, decision.expires_at + decision.ttl_s)
            if decision.block_hashes:
                for h in decision.block_hashes:
                    self.block_pins[h] = max(self.block_pins.get(h, 0.0), until)
            else:
                self.agent_pins[key] = max(self.agent_pins.get(key, 0.0), until)
        elif isinstance(decision, ev.Prefetch):
            pass  # nothing to remember: the engine acts on it once (see AgentRuntimeScheduler)
        elif isinstance(decision, ev.Unpin):
            if decision.block_hashes:
                for h in decision.block_hashes:
                    self.block_pins.pop(h, None)
            else:
                self.agent_pins.pop(key, None)
        else:
            self.counters[f"unsupported:{decision.type_name}"] += 1
            return False
        self.counters[f"applied:{decision.type_name}"] += 1
        return True

    def score(self, block_hash: str, agent: AgentKey | None, now: float) -> float | None:
        """The block's current eviction score (block-level beats agent-level), or None."""
        for scored in (self.block_scores.get(block_hash), self.agent_scores.get(agent) if agent else None):
            if scored is not None and scored.expires_at > now:
                return scored.score
        return None

    def pinned_until(self, block_hash: str, agent: AgentKey | None, now: float) -> float | None:
        until = self.block_pins.get(block_hash, 0.0)
        if agent is not None:
            until = max(until, self.agent_pins.get(agent, 0.0))
        return until if until > now else None

    def expire(self, now: float) -> None:
        """Forget what has expired (keeps lookups small)."""
        for table in (self.block_scores, self.agent_scores):
            for k in [k for k, s in table.items() if s.expires_at <= now]:
                del table[k]
        for table in (self.block_pins, self.agent_pins):
            for k in [k for k, t in table.items() if t <= now]:
                del table[k]

    def clear(self) -> None:
        """Forget every decision and every id seen: a new run's decisions (a replayed workload's pins and
        prefetches carry the same ids as the last run's) apply again."""
        self.block_scores.clear(), self.agent_scores.clear(), self.block_pins.clear(), self.agent_pins.clear()
        self._seen_ids.clear()
