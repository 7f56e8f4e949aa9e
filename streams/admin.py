"""Cluster operations a user runs by hand: reach the broker, list topics, measure lag.

Works against any Kafka-protocol broker. One quirk shapes it: the embedded
Tansu 0.6 answers ListOffsets(latest) with the last *batch's* base offset + 1,
not the log end; a Fetch response's high watermark is right on both Tansu
and Apache Kafka, so log-end offsets are read from a fetch (see log_end_offsets).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

from confluent_kafka import OFFSET_INVALID, Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from .config import librdkafka_logger

log = logging.getLogger(__name__)


class BrokerUnreachable(RuntimeError):
    """No Kafka-protocol broker answered at the configured bootstrap servers."""


def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "logger": librdkafka_logger()})


def require_broker(bootstrap: str, timeout_s: float = 5.0) -> AdminClient:
    """An admin client on a broker that answered, or :class:`BrokerUnreachable` within ``timeout_s``."""
    admin = admin_client(bootstrap)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnreachable(
            f"no Kafka broker answered at bootstrap servers {bootstrap!r} within {timeout_s:g}s ({exc.args[0].str()}). "
            "Start the embedded one with `agentrt broker start`, or point --bootstrap-servers / "
            "AGENTRT_BOOTSTRAP_SERVERS at your cluster."
        ) from None
    return admin


def list_topics(admin: AdminClient, timeout_s: float = 5.0) -> dict[str, int]:
    """topic -> partition count, internal topics (leading '_') left out."""
    metadata = admin.list_topics(timeout=timeout_s)
    return {name: len(t.partitions) for name, t in sorted(metadata.topics.items()) if not name.startswith("_")}


def log_end_offsets(bootstrap: str, partitions: Iterable[TopicPartition], timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """(topic, partition) -> log-end offset (the next offset to be written).

    Fetches from just before the offset ListOffsets reports and reads the
    fetch response's high watermark, which is correct on Tansu and Kafka alike.
    """
    wanted = [(tp.topic, tp.partition) for tp in partitions]
    if not wanted:
        return {}
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "agentrt-offsets-probe",
        "enable.auto.commit": False,
        "fetch.max.bytes": 1024 * 1024,
        "logger": librdkafka_logger(),
    })
    try:
        listed = {}
        for topic, partition in wanted:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
            listed[(topic, partition)] = max(high, 0)
        consumer.assign([TopicPartition(t, p, max(listed[(t, p)] - 1, 0)) for t, p in wanted])
        ends: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(wanted) and time.monotonic() < deadline:
            consumer.poll(0.05)
            for topic, partition in wanted:
                if (topic, partition) in ends:
                    continue
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
                if high >= 0 and high != OFFSET_INVALID:
                    ends[(topic, partition)] = max(high, listed[(topic, partition)])
        for key in wanted:  # an idle partition may send no fetch response in time
            ends.setdefault(key, listed[key])
        return ends
    finally:
        consumer.close()


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    log_end: int

    @property
    def lag(self) -> int:
        """Messages the group has yet to read (committed = next offset to read)."""
        return self.log_end - (self.committed or 0)


def list_groups(admin: AdminClient, timeout_s: float = 5.0) -> list[str]:
    result = admin.list_consumer_groups(request_timeout=timeout_s).result()
    return sorted(g.group_id for g in result.valid)


def group_lag(bootstrap: str, group: str, topics: Iterable[str] | None = None, timeout_s: float = 10.0) -> list[PartitionLag]:
    """Lag per topic-partition for one consumer group.

    With ``topics`` given every partition of them is reported, including those
    the group never committed on (full backlog); otherwise the partitions the
    group has committed offsets for.
    """
    admin = require_broker(bootstrap, timeout_s)
    committed: dict[tuple[str, int], int | None] = {}
    if topics:
        metadata = admin.list_topics(timeout=timeout_s).topics
        for topic in topics:
            if topic not in metadata:
                raise ValueError(f"topic {topic!r} does not exist")
            for partition in metadata[topic].partitions:
                committed[(topic, partition)] = None
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in committed] or None)]
    for future in admin.list_consumer_group_offsets(request, request_timeout=timeout_s).values():
        for tp in future.result().topic_partitions:
            if topics and (tp.topic, tp.partition) not in committed:
                continue
            committed[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
    ends = log_end_offsets(bootstrap, [TopicPartition(t, p) for t, p in committed], timeout_s)
    return [PartitionLag(group, t, p, committed[(t, p)], ends[(t, p)]) for t, p in sorted(committed)]


def latest_values(bootstrap: str, topic: str, timeout_s: float = 15.0) -> dict[bytes, bytes]:
    """The last value of every key in ``topic`` (a compacted view), read up to the true log end.

    For changelog recovery on brokers whose ListOffsets is off (see the module
    note): readers that stop at the listed offset miss the tail of the last batch.
    """
    admin = require_broker(bootstrap, timeout_s)
    metadata = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return {}
    ends = log_end_offsets(bootstrap, [TopicPartition(topic, p) for p in metadata.partitions], timeout_s)
    remaining = {p for (_, p), end in ends.items() if end > 0}
    values: dict[bytes, bytes] = {}
    if not remaining:
        return values
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "agentrt-latest-values",
                         "enable.auto.commit": False, "logger": librdkafka_logger()})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in remaining])
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            if msg.value() is None:
                values.pop(msg.key(), None)  # a tombstone
            else:
                values[msg.key()] = msg.value()
            if msg.offset() + 1 >= ends[(topic, msg.partition())]:
                remaining.discard(msg.partition())
        if remaining:
            raise TimeoutError(f"reading {topic} stalled with partitions {sorted(remaining)} unfinished")
    finally:
        consumer.close()
    return values
