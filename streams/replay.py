"""Replay a topic range into SQL for offline analysis.

Reads by partition assignment (no consumer group, so it neither waits for a
group join nor moves anyone's committed offsets) from the beginning, a time
or an offset, up to the log end seen when the replay started.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy import Engine

from .admin import log_end_offsets, require_broker
from .config import librdkafka_logger
from .consumer import DLQ_REASON
from .events import EventValidationError
from .serde import decode
from .sqlstore import event_row, store_dead_letters, store_events


@dataclass
class ReplayResult:
    topic: str
    events: int = 0
    dead_letters: int = 0
    seconds: float = 0.0


def _start_offsets(consumer: Consumer, topic: str, partitions: list[int], from_time_ms: int | None,
                   from_offset: int | None, timeout_s: float) -> list[TopicPartition]:
    if from_time_ms is not None:
        found = consumer.offsets_for_times([TopicPartition(topic, p, from_time_ms) for p in partitions], timeout=timeout_s)
        return [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING) for tp in found]
    if from_offset is not None:
        return [TopicPartition(topic, p, from_offset) for p in partitions]
    return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]


def replay_topic(bootstrap: str, topic: str, engine: Engine, *, from_time_ms: int | None = None,
                 from_offset: int | None = None, batch_size: int = 2000, timeout_s: float = 10.0) -> ReplayResult:
    """Copy ``topic`` into the SQL tables; malformed messages land in the dead-letter table with their reason."""
    admin = require_broker(bootstrap, timeout_s)
    metadata = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise ValueError(f"topic {topic!r} does not exist")
    partitions = sorted(metadata.partitions)
    ends = log_end_offsets(bootstrap, [TopicPartition(topic, p) for p in partitions], timeout_s)
    result = ReplayResult(topic)
    started = time.monotonic()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "agentrt-replay", "enable.auto.commit": False,
                         "logger": librdkafka_logger()})
    try:
        starts = _start_offsets(consumer, topic, partitions, from_time_ms, from_offset, timeout_s)
        remaining = {tp.partition for tp in starts if ends[(topic, tp.partition)] > max(tp.offset, 0)}
        consumer.assign(starts)
        rows, dead = [], []
        idle_deadline = time.monotonic() + timeout_s
        while remaining:
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() > idle_deadline:
                    raise TimeoutError(f"replay of {topic} stalled with partitions {sorted(remaining)} unfinished")
                continue
            idle_deadline = time.monotonic() + timeout_s
            if msg.error():
                continue
            partition, offset = msg.partition(), msg.offset()
            if offset >= ends[(topic, partition)]:
                remaining.discard(partition)
                continue
            try:
                event = decode(msg.key(), msg.value())
                rows.append(event_row(topic, partition, offset, msg.timestamp()[1], event.to_wire()))
            except EventValidationError as exc:
                # On the dead-letter topic itself, keep the reason it was dead-lettered for.
                reason = dict(msg.headers() or []).get(DLQ_REASON, b"").decode() or exc.reason
                dead.append({"topic": topic, "partition": partition, "offset": offset, "reason": reason,
                             "key": msg.key(), "value": msg.value()})
            if offset + 1 >= ends[(topic, partition)]:
                remaining.discard(partition)
            if len(rows) >= batch_size:
                store_events(engine, rows)
                result.events += len(rows)
                rows = []
        store_events(engine, rows)
        store_dead_letters(engine, dead)
        result.events += len(rows)
        result.dead_letters += len(dead)
    finally:
        consumer.close()
    result.seconds = time.monotonic() - started
    return result
