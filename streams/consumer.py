"""Consuming events: decode, validate, and route what fails to the dead-letter topic.

A malformed or wrong-version message never stops a consumer: it is copied
byte for byte (key, value, headers) to the dead-letter topic with its reason
and source coordinates in headers, counted, and skipped.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from .config import StreamsConfig, librdkafka_logger
from .events import Event, EventValidationError
from .producer import EventProducer
from .serde import decode
from .topics import Topics

DLQ_REASON = "agentrt.dlq.reason"
DLQ_SOURCE_TOPIC = "agentrt.dlq.source_topic"
DLQ_SOURCE_PARTITION = "agentrt.dlq.source_partition"
DLQ_SOURCE_OFFSET = "agentrt.dlq.source_offset"


def consumer_settings(bootstrap: str, group_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id or f"agentrt-reader-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
        # Keep the store-after-processing semantics: offsets are stored only for
        # messages handed to the caller (or dead-lettered), then auto-committed.
        "enable.auto.offset.store": False,
        # A group's first join waits about half the session timeout on the embedded broker.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "logger": librdkafka_logger(),
    }
    settings.update(overrides)
    return settings


@dataclass
class DeadLetterCounters:
    routed: int = 0
    routing_failed: int = 0


def dead_letter_headers(original: list | None, reason: str, topic: str, partition: int,
                        offset: int) -> list[tuple[str, bytes]]:
    """The original headers plus why and where a dead-lettered message came from."""
    return list(original or []) + [
        (DLQ_REASON, reason.encode()),
        (DLQ_SOURCE_TOPIC, topic.encode()),
        (DLQ_SOURCE_PARTITION, str(partition).encode()),
        (DLQ_SOURCE_OFFSET, str(offset).encode()),
    ]


def dead_letter(producer: EventProducer, dlq_topic: str, msg: Message, reason: str) -> bool:
    """Copy ``msg`` unchanged to ``dlq_topic`` with why and where it came from."""
    headers = dead_letter_headers(msg.headers(), reason, msg.topic() or "", msg.partition(), msg.offset())
    return producer.publish_raw(dlq_topic, msg.key(), msg.value(), headers=headers)


class EventConsumer:
    """Reads events from topics as a consumer group; bad messages go to the DLQ.

    Iterate :meth:`events` to get ``(message, event)`` pairs. A message's offset
    is stored for commit only when the caller asks for the next one (or
    commits), so a crash re-delivers the event in hand: at-least-once.
    """

    def __init__(self, config: StreamsConfig, topics: list[str], group_id: str | None = None,
                 producer: EventProducer | None = None, **settings: Any) -> None:
        self.names = Topics.for_prefix(config.topic_prefix)
        self._consumer = Consumer(consumer_settings(config.bootstrap_servers, group_id, **settings))
        self._consumer.subscribe(topics)
        self._own_producer = producer is None
        self._producer = producer or EventProducer(config, self.names)
        self.dead_letters = DeadLetterCounters()
        self.consumed = 0
        self.last_reason: str | None = None
        self._in_hand: Message | None = None

    @property
    def consumer(self) -> Consumer:
        return self._consumer

    def poll(self, timeout_s: float = 1.0) -> tuple[Message, Event] | None:
        """The next valid event within ``timeout_s``, or None. Invalid ones are dead-lettered on the way."""
        self._release_in_hand()
        msg = self._consumer.poll(timeout_s)
        while msg is not None:
            if msg.error():
                msg = self._consumer.poll(0)
                continue
            self.consumed += 1
            try:
                event = decode(msg.key(), msg.value())
            except EventValidationError as exc:
                self.last_reason = exc.reason
                if dead_letter(self._producer, self.names.dead_letters, msg, exc.reason):
                    self.dead_letters.routed += 1
                else:
                    self.dead_letters.routing_failed += 1
                self._consumer.store_offsets(message=msg)
                msg = self._consumer.poll(0)
                continue
            self._in_hand = msg
            return msg, event
        return None

    def _release_in_hand(self) -> None:
        # The caller asked for more, so it is done with the event it holds.
        if self._in_hand is not None:
            self._consumer.store_offsets(message=self._in_hand)
            self._in_hand = None

    def events(self, timeout_s: float = 1.0, idle_limit_s: float | None = None) -> Iterator[tuple[Message, Event]]:
        """Yield events; stop after ``idle_limit_s`` with nothing new (never, if None)."""
        idle_since = time.monotonic()
        while True:
            item = self.poll(timeout_s)
            if item is not None:
                idle_since = time.monotonic()
                yield item
            elif idle_limit_s is not None and time.monotonic() - idle_since >= idle_limit_s:
                return

    def commit(self) -> None:
        """Commit what was consumed so far, the event in hand included."""
        self._release_in_hand()
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:  # nothing to commit is fine
                raise

    def close(self) -> None:
        self.commit()
        self._consumer.close()
        if self._own_producer:
            self._producer.close()
        else:
            self._producer.flush()

    def __enter__(self) -> "EventConsumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
