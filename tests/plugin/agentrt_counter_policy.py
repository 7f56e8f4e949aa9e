"""A third-party policy, installed only through its entry point (see test_policy_worker.py)."""
from __future__ import annotations

from collections import Counter

from policy_workers.policy import Policy
from streams import events as ev


class CallCounter(Policy):
    """Scores each agent by how often it was called: the simplest agent-aware policy."""

    name = "callcounter"

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, Counter] = {}

    def observe(self, event):
        if isinstance(event, ev.AgentStepStart):
            self.calls.setdefault(event.workload, Counter())[event.agent] += 1

    def score(self, workload, now):
        calls = self.calls.get(workload, Counter())
        total = sum(calls.values()) or 1
        return {agent: n / total for agent, n in calls.items()}

    def predict(self, workload, now):
        return []

    def act(self, workload, now):
        return [ev.EvictionScore(workload=workload, agent=agent, time=now, policy=self.name,
                                 decision_id=f"{self.name}-{workload}-{agent}-{round(score, 3)}",
                                 expires_at=now + 30, score=score)
                for agent, score in self.score(workload, now).items()]

    def workloads(self):
        return sorted(self.calls)
