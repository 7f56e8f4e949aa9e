"""Where the broker is and how topics are laid out, from flags or the environment."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
BOOTSTRAP_ENV_VARS = ("AGENTRT_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS")


def bootstrap_servers(flag: str | None = None) -> str:
    """The bootstrap servers: the flag, else $AGENTRT_BOOTSTRAP_SERVERS, else $KAFKA_BOOTSTRAP_SERVERS, else 127.0.0.1:9092."""
    if flag:
        return flag
    for name in BOOTSTRAP_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return DEFAULT_BOOTSTRAP


@dataclass(frozen=True)
class StreamsConfig:
    """Connection and layout settings shared by every producer and consumer."""

    bootstrap_servers: str = DEFAULT_BOOTSTRAP
    partitions: int = 8
    replication_factor: int = 1
    topic_prefix: str = "agentrt"

    @classmethod
    def from_env(cls, bootstrap: str | None = None) -> "StreamsConfig":
        return cls(
            bootstrap_servers=bootstrap_servers(bootstrap),
            partitions=int(os.environ.get("AGENTRT_PARTITIONS", "8")),
            replication_factor=int(os.environ.get("AGENTRT_REPLICATION_FACTOR", "1")),
            topic_prefix=os.environ.get("AGENTRT_TOPIC_PREFIX", "agentrt"),
        )


class _RateLimit(logging.Filter):
    """At most one record per (logger message prefix) every ``interval_s``: a dead broker makes
    librdkafka report every reconnect attempt, which must not flood an engine's log."""

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:60]
        now = record.created
        if now - self._last.get(key, 0.0) < self.interval_s:
            return False
        self._last[key] = now
        return True


_LIBRDKAFKA = logging.getLogger("agentrt.librdkafka")
_LIBRDKAFKA.addFilter(_RateLimit())


def librdkafka_logger() -> logging.Logger:
    """The logger librdkafka's own messages (connection retries...) go to: rate-limited; the CLI quiets it."""
    return _LIBRDKAFKA
