"""The four-primitive policy interface: observe, score, predict, act.

A policy is pure state and logic: it never touches Kafka, SQL or a clock of
its own (``now`` is passed in), so it is tested directly, replayed offline,
driven by the cache simulator and hosted by the stream worker alike.
Agent identity (workload, agent) is the coordinate every primitive speaks.

Third-party policies register under the entry-point group
``agentrt.policies`` (``name = "package.module:PolicyClass"``) and run as
their own consumer group with ``agentrt worker --policy name``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Iterable, Mapping

from streams.events import Decision, Event

ENTRY_POINT_GROUP = "agentrt.policies"


@dataclass(frozen=True, slots=True)
class Prediction:
    """What a policy expects next: ``agent`` is called in ``session`` with ``probability``,
    about ``expected_in_s`` seconds from now."""

    workload: str
    session: str
    agent: str
    probability: float
    expected_in_s: float | None = None


class Policy(ABC):
    """Base of every agent-aware policy."""

    name: ClassVar[str] = "policy"

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()  # events the policy could not use, by reason

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    @abstractmethod
    def observe(self, event: Event) -> None:
        """Update state from one framework or engine event. Never raises on unusable events:
        count them with :meth:`skip`."""

    @abstractmethod
    def score(self, workload: str, now: float) -> Mapping[str, float]:
        """The value of each resource the policy scores (e.g. cached block hash -> reuse probability)."""

    @abstractmethod
    def predict(self, workload: str, now: float) -> list[Prediction]:
        """What happens next in the workload's active sessions."""

    @abstractmethod
    def act(self, workload: str, now: float) -> list[Decision]:
        """The decisions to publish now (idempotent ids, with expiry)."""

    def workloads(self) -> list[str]:
        """Workloads the policy has state for."""
        return []

    def to_state(self, workloads: Iterable[str] | None = None) -> dict[str, Any]:
        """A JSON-ready snapshot of learned state by workload (all, or just ``workloads``)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`to_state` returned (workloads not mentioned are left as they are)."""

    def forget(self, workloads: Iterable[str]) -> None:
        """Drop what the policy holds for ``workloads``: another worker process took them over.

        The host no longer feeds or acts on them either way; a policy overrides this to free
        the memory (and so that a later hand-back reloads fresh state)."""


def discover_policies() -> dict[str, type[Policy]]:
    """Policies installed under the ``agentrt.policies`` entry-point group, by name."""
    found: dict[str, type[Policy]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise TypeError(f"entry point {ep.name!r} ({ep.value}) is not a Policy subclass")
        found[ep.name] = cls
    return found


def load_policy(name: str, **kwargs: Any) -> Policy:
    """Instantiate a registered policy by entry-point name (or ``module:Class``)."""
    policies = discover_policies()
    if name in policies:
        return policies[name](**kwargs)
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if isinstance(cls, type) and issubclass(cls, Policy):
            return cls(**kwargs)
    raise LookupError(f"no policy named {name!r}; installed: {sorted(policies) or 'none'}")
