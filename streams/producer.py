"""A producer that never blocks or raises into the caller's hot path.

Events are queued in librdkafka's bounded local queue and sent in batches by
its I/O thread; a background thread serves delivery reports. A full queue
drops the event and counts it; an unreachable broker makes deliveries fail
after ``message_timeout_ms`` and counts them. Nothing here waits on the network
except :meth:`EventProducer.flush` and :meth:`EventProducer.close`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from .config import StreamsConfig, librdkafka_logger
from .events import Event
from .serde import encode
from .topics import Topics

log = logging.getLogger(__name__)


@dataclass
class ProducerCounters:
    queued: int = 0
    delivered: int = 0
    dropped_queue_full: int = 0
    failed_delivery: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: getattr(self, k) for k in ("queued", "delivered", "dropped_queue_full", "failed_delivery")}


def producer_settings(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings for event traffic: idempotent, batched, Java-compatible partitioning."""
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,  # acks=all, no duplicates or reordering on retry
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
        "queue.buffering.max.kbytes": 256 * 1024,
        "message.timeout.ms": 30_000,
        # murmur2 like the Java client, aiokafka and faust: one key, one partition, every topic.
        "partitioner": "murmur2_random",
        "logger": librdkafka_logger(),
    }
    settings.update(overrides)
    return settings


class EventProducer:
    """Publishes events to their topic, keyed by agent. Thread-safe; never blocks in :meth:`publish`."""

    def __init__(self, config: StreamsConfig, topics: Topics | None = None, **settings: Any) -> None:
        self.topics = topics or Topics.for_prefix(config.topic_prefix)
        self.counters = ProducerCounters()
        self._producer = Producer(producer_settings(config.bootstrap_servers, **settings))
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._serve_delivery_reports, name="agentrt-producer-poll", daemon=True)
        self._poller.start()

    def publish(self, event: Event, topic: str | None = None) -> bool:
        """Queue one event; False (and counted) if the local queue is full."""
        key, value = encode(event)
        return self.publish_raw(topic or self.topics.for_event(event), key, value)

    def publish_raw(self, topic: str, key: bytes | None, value: bytes | None,
                    headers: list[tuple[str, bytes]] | None = None) -> bool:
        try:
            self._producer.produce(topic, value, key, headers=headers, on_delivery=self._on_delivery)
        except BufferError:
            self.counters.add("dropped_queue_full")
            return False
        self.counters.add("queued")
        return True

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.counters.add("delivered")
        else:
            self.counters.add("failed_delivery")
            log.debug("delivery to %s failed: %s", msg.topic(), err)

    def _serve_delivery_reports(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait for queued events to be delivered; returns how many are still queued."""
        return self._producer.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> int:
        remaining = self.flush(timeout_s)
        self._closed.set()
        self._poller.join(timeout=1.0)
        return remaining

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
