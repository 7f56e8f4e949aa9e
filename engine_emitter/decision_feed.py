"""Decisions from the stream into the engine process, never blocking an engine step.

A daemon thread consumes the decisions topic (all partitions, from the end:
what was decided before the engine started has expired anyway) into an
in-memory queue that the scheduler drains at a step boundary. A dead broker
only means an empty queue: the engine then behaves exactly as stock vLLM.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import Counter

from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from streams import events as ev
from streams.config import StreamsConfig, librdkafka_logger
from streams.events import EventValidationError
from streams.serde import decode

log = logging.getLogger(__name__)


class DecisionFeed:
    def __init__(self, config: StreamsConfig, topic: str, max_queued: int = 100_000) -> None:
        self._config, self._topic = config, topic
        self._queue: queue.Queue[tuple[ev.Decision, float]] = queue.Queue(maxsize=max_queued)
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once partitions are assigned (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="agentrt-decision-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        consumer = Consumer({"bootstrap.servers": self._config.bootstrap_servers,
                             "group.id": "agentrt-engine-decisions", "enable.auto.commit": False,
                             "fetch.wait.max.ms": 10, "logger": librdkafka_logger()})
        try:
            while not self._stop.is_set() and not self.ready.is_set():
                try:
                    metadata = consumer.list_topics(self._topic, timeout=2.0).topics.get(self._topic)
                except Exception:  # broker not there (yet): stay stock, retry
                    metadata = None
                if metadata is not None and metadata.error is None and metadata.partitions:
                    consumer.assign([TopicPartition(self._topic, p, OFFSET_END) for p in metadata.partitions])
                    consumer.poll(0.1)
                    self.ready.set()
                else:
                    self._stop.wait(1.0)
            while not self._stop.is_set():
                msg = consumer.poll(0.05)
                if msg is None or msg.error():
                    continue
                try:
                    decision = decode(msg.key(), msg.value())
                except EventValidationError:
                    self.counters["malformed"] += 1
                    continue
                if not isinstance(decision, ev.Decision):
                    self.counters["not_a_decision"] += 1
                    continue
                try:
                    self._queue.put_nowait((decision, time.time()))
                    self.counters["received"] += 1
                except queue.Full:
                    self.counters["dropped_queue_full"] += 1
        finally:
            consumer.close()

    def drain(self) -> list[tuple[ev.Decision, float]]:
        """Everything received so far, with the time it arrived; never waits."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
