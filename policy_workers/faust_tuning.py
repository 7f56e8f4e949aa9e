"""The one place where the policy host adjusts faust-streaming's Kafka consumer.

faust 0.15.3 builds its aiokafka consumer with ``fetch_max_wait_ms=1500``
hard-coded. A broker that does not answer a waiting fetch as soon as data
arrives (the embedded Tansu, measured: decision latency p50 746 ms, which is
half of 1.5 s) then delays every event by up to 1.5 s. The host lowers it to
``AGENTRT_FETCH_MAX_WAIT_MS`` (10 ms by default): on Apache Kafka that only
means more frequent fetch requests when idle.

It relies on two private names, pinned with faust-streaming==0.15.3 and
checked by tests/test_policy_worker.py::test_faust_consumer_seam_is_where_we_expect_it.
"""
from __future__ import annotations

import os

from faust.transport.drivers import aiokafka as faust_aiokafka

_ORIGINAL = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def fetch_max_wait_ms() -> int:
    return int(os.environ.get("AGENTRT_FETCH_MAX_WAIT_MS", "10"))


def _create_worker_consumer(self, transport):  # noqa: ANN001, ANN202 - faust's signature
    consumer = _ORIGINAL(self, transport)
    consumer._fetch_max_wait_ms = fetch_max_wait_ms()  # read by aiokafka when its fetcher starts
    return consumer


def install() -> None:
    """Apply the lower fetch wait to every faust app in this process (idempotent)."""
    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
