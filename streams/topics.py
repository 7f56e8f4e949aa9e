"""The topics of the pipeline, created explicitly with a fixed partition count.

Framework, engine and decision topics share the key (agent identity), the
partitioner and the partition count, so each agent's events sit on the same
partition number everywhere and a worker can join them locally.
"""
from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from .config import StreamsConfig
from .events import Decision, EngineEvent, Event, FrameworkEvent


@dataclass(frozen=True)
class Topics:
    """Topic names: lowercase, dot-separated ``<prefix>.<domain>.<entity>.v<major>``."""

    framework: str
    engine: str
    decisions: str
    dead_letters: str

    @classmethod
    def for_prefix(cls, prefix: str = "agentrt") -> "Topics":
        return cls(
            framework=f"{prefix}.framework.events.v1",
            engine=f"{prefix}.engine.events.v1",
            decisions=f"{prefix}.decisions.v1",
            dead_letters=f"{prefix}.events.dlq",
        )

    @property
    def keyed(self) -> tuple[str, str, str]:
        """The co-partitioned topics keyed by agent."""
        return (self.framework, self.engine, self.decisions)

    def all(self) -> tuple[str, ...]:
        return (*self.keyed, self.dead_letters)

    def for_event(self, event: Event) -> str:
        if isinstance(event, FrameworkEvent):
            return self.framework
        if isinstance(event, EngineEvent):
            return self.engine
        if isinstance(event, Decision):
            return self.decisions
        raise TypeError(f"no topic for {type(event).__name__}")


def ensure_topics(admin: AdminClient, config: StreamsConfig, topics: Topics | None = None,
                  timeout_s: float = 10.0) -> dict[str, str]:
    """Create the pipeline's topics if missing; returns topic -> 'created' | 'exists'.

    An existing keyed topic with a different partition count is an error: the
    agent join would silently break.
    """
    topics = topics or Topics.for_prefix(config.topic_prefix)
    existing = admin.list_topics(timeout=timeout_s).topics
    outcome: dict[str, str] = {}
    missing = []
    for name in topics.all():
        if name in existing:
            count = len(existing[name].partitions)
            if name in topics.keyed and count != config.partitions:
                raise RuntimeError(
                    f"topic {name} has {count} partitions, expected {config.partitions}: "
                    "keyed topics must share one partition count to be joinable by agent"
                )
            outcome[name] = "exists"
        else:
            missing.append(NewTopic(name, config.partitions, config.replication_factor))
    if missing:
        for name, future in admin.create_topics(missing, request_timeout=timeout_s).items():
            try:
                future.result()
                outcome[name] = "created"
            except KafkaException as exc:
                if exc.args[0].code() == 36:  # TOPIC_ALREADY_EXISTS: a concurrent creator won
                    outcome[name] = "exists"
                else:
                    raise
    return outcome
