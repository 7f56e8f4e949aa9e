"""The policy host: a faust-streaming app that feeds events to a policy and publishes its decisions.

    agentrt worker --policy cachesage [--snapshot-url sqlite:///runs/policy-state.db]

One app (and so one consumer group, ``agentrt-policy-<name>``) per policy: a
new policy attaches as its own consumer of the same topics, leaving the
others untouched. The app reads the framework and engine topics (created
beforehand, co-partitioned by agent key), hands every valid event to the
policy, acts on the events that change what should be cached (a step
ending, a tool call, a handoff, a block removed) and on a timer, and
publishes decisions to the decisions topic keyed by agent.

State: the policy's learned state is written to a compacted changelog topic
(keyed by workload) after each batch and before the batch's offsets are
committed, so a restarted worker recovers it from the changelog and resumes
right after it; it is also snapshotted to SQL (SQLAlchemy) every 30 s and at
shutdown, the fallback when the changelog is gone (e.g. the in-memory dev
broker restarted).
Malformed messages go to the dead-letter topic with their reason; events the
policy cannot use are counted by the policy.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import faust
from sqlalchemy import Column, Engine, Float, MetaData, String, Table, Text, create_engine, select

from streams import events as ev
from streams.admin import admin_client, latest_values
from streams.config import StreamsConfig
from streams.consumer import dead_letter_headers
from streams.events import EventValidationError
from streams.serde import decode, encode
from streams.stats import LatencyReservoir
from streams.topics import Topics

from . import faust_tuning
from .policy import Policy

log = logging.getLogger(__name__)

ACT_ON = (ev.AgentStepEnd, ev.ToolCallStart, ev.Handoff, ev.KvBlocksRemoved, ev.KvAllBlocksCleared)

_snapshots_meta = MetaData()
snapshots_table = Table(
    "agentrt_policy_snapshots", _snapshots_meta,
    Column("policy", String(128), primary_key=True),
    Column("workload", String(255), primary_key=True),
    Column("saved_at", Float, nullable=False),
    Column("state", Text, nullable=False),
)


class SqlSnapshots:
    """Per-(policy, workload) state snapshots in any SQLAlchemy database."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, future=True)
        _snapshots_meta.create_all(self.engine)

    def save(self, policy: str, states: dict[str, Any]) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            for workload, state in states.items():
                conn.execute(snapshots_table.delete().where((snapshots_table.c.policy == policy)
                                                            & (snapshots_table.c.workload == workload)))
                conn.execute(snapshots_table.insert().values(policy=policy, workload=workload, saved_at=now,
                                                             state=json.dumps(state)))

    def load(self, policy: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(snapshots_table.c.workload, snapshots_table.c.state)
                                .where(snapshots_table.c.policy == policy)).all()
        return {workload: json.loads(state) for workload, state in rows}


@dataclass
class WorkerCounters:
    events: int = 0
    dead_letters: int = 0
    decisions: int = 0
    acts: int = 0
    batches: int = 0
    first_event_at: float = 0.0  # wall clock, for throughput
    last_event_at: float = 0.0
    observe_s: float = 0.0  # where the handler's time goes
    save_s: float = 0.0
    act_s: float = 0.0
    send_s: float = 0.0


def group_id(policy_name: str, topic_prefix: str = "agentrt") -> str:
    """The policy's consumer group (and faust app id): one per policy and topic prefix."""
    return f"{topic_prefix}-policy-{policy_name}"


def _learned_summary(policy: Policy, states: dict[str, Any] | None = None) -> dict[str, int]:
    states = policy.to_state() if states is None else states
    return {w: int(s.get("model", {}).get("observed", 0)) if isinstance(s, dict) else 0 for w, s in states.items()}


def ensure_state_topic(config: StreamsConfig, name: str) -> None:
    """The policy's state changelog: one partition (one total order), compacted."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    admin = admin_client(config.bootstrap_servers)
    if name in admin.list_topics(timeout=10).topics:
        return
    topic = NewTopic(name, 1, config.replication_factor, config={"cleanup.policy": "compact"})
    for future in admin.create_topics([topic]).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != 36:  # created meanwhile by another worker
                raise


def build_app(policy: Policy, config: StreamsConfig, snapshot_url: str | None = None, *,
              act_interval_s: float = 1.0, batch_max: int = 500, batch_within_s: float = 0.01,
              stats_file: str | None = None) -> faust.App:
    """The faust app hosting ``policy`` (not started).

    Events are handled in batches (up to ``batch_max``, or what arrived within
    ``batch_within_s``): observe each, write the touched workloads' learned
    state to the changelog-backed table, act once per workload that saw a
    triggering event, and only then ack the batch. Committed offsets never run
    ahead of the saved state, so a killed worker resumes exactly where its
    state stops (a replayed duplicate step is recognised and skipped).
    """
    faust_tuning.install()
    topics = Topics.for_prefix(config.topic_prefix)
    app = faust.App(
        group_id(policy.name, config.topic_prefix),
        broker=f"kafka://{config.bootstrap_servers}",
        store="memory://",
        topic_partitions=config.partitions,
        topic_replication_factor=config.replication_factor,
        topic_allow_declare=True,  # the changelog topic; sources exist already
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        web_enabled=False,
    )
    source = app.topic(topics.framework, topics.engine, key_serializer="raw", value_serializer="raw",
                       partitions=config.partitions)
    decisions = app.topic(topics.decisions, key_serializer="raw", value_serializer="raw",
                          partitions=config.partitions)
    dead_letters = app.topic(topics.dead_letters, key_serializer="raw", value_serializer="raw")
    # Learned state goes to a changelog topic of our own (one partition, compacted, latest value
    # per workload), written before each batch is acked and read back to its true end on start.
    # Not a faust Table: after a crash-restart, faust's table recovery left source partitions
    # paused and consumption stalled on the embedded broker (3 of 4 runs; docs/policy_workers.md).
    state_topic_name = f"{group_id(policy.name, config.topic_prefix)}-state"
    ensure_state_topic(config, state_topic_name)
    state_topic = app.topic(state_topic_name, key_serializer="raw", value_serializer="raw", partitions=1)
    snapshots = SqlSnapshots(snapshot_url) if snapshot_url else None
    counters = WorkerCounters()
    latency = LatencyReservoir()
    restored = {"done": False}
    app.agentrt_counters = counters  # type: ignore[attr-defined]
    app.agentrt_policy = policy  # type: ignore[attr-defined]

    def read_changelog() -> dict[str, Any]:
        # To its true end: readers stopping at the offset ListOffsets reports miss the tail
        # of the last batch on the embedded broker (docs/streams.md).
        raw = latest_values(config.bootstrap_servers, state_topic_name)
        return {k.decode(): json.loads(v) for k, v in raw.items() if k is not None}

    async def restore_once() -> None:
        # Once, before the first batch: the changelog wins; SQL fills in workloads it lacks.
        if restored["done"]:
            return
        restored["done"] = True
        states = dict(snapshots.load(policy.name)) if snapshots else {}
        changelog = await asyncio.get_running_loop().run_in_executor(None, read_changelog)
        states.update({w: st for w, st in changelog.items() if st is not None})
        if states:
            policy.load_state(states)
        log.warning("restored %s state (transitions observed per workload): %s", policy.name,
                    json.dumps(_learned_summary(policy, states), sort_keys=True))

    async def publish_decisions(workload: str, triggered_at: float | None = None) -> None:
        counters.acts += 1
        began = time.perf_counter()
        decided = policy.act(workload, time.time())
        acted = time.perf_counter()
        for decision in decided:
            key, value = encode(decision)
            # Buffered, not awaited one by one; faust flushes its producer before committing offsets.
            decisions.send_soon(key=key, value=value)
            counters.decisions += 1
            if triggered_at is not None:
                latency.add(time.time() - triggered_at)
        counters.act_s += acted - began
        counters.send_s += time.perf_counter() - acted

    @app.agent(source)
    async def feed(stream):  # noqa: ANN001 - faust's stream type
        async for batch in stream.take_events(batch_max, within=batch_within_s):
            await restore_once()
            counters.batches += 1
            counters.first_event_at = counters.first_event_at or time.time()
            began = time.perf_counter()
            touched: set[str] = set()
            triggered: dict[str, float] = {}  # workload -> Kafka timestamp of its latest triggering event
            for event_msg in batch:
                message = event_msg.message
                try:
                    event = decode(event_msg.key, event_msg.value)
                    policy.observe(event)
                except Exception as exc:  # the batch is acked regardless: park what failed, with why
                    reason = exc.reason if isinstance(exc, EventValidationError) else f"policy error: {exc!r}"
                    if not isinstance(exc, EventValidationError):
                        log.exception("policy %s failed on an event; dead-lettered", policy.name)
                    counters.dead_letters += 1
                    headers = dead_letter_headers(message.headers, reason, message.topic, message.partition,
                                                  message.offset)
                    await dead_letters.send(key=event_msg.key, value=event_msg.value, headers=headers)
                    continue
                counters.events += 1
                touched.add(event.workload)
                if isinstance(event, ACT_ON):
                    triggered[event.workload] = max(triggered.get(event.workload, 0.0), message.timestamp or 0.0)
            observed = time.perf_counter()
            for workload, state in policy.to_state(touched).items():
                # Buffered; faust flushes its producer before it commits the batch's offsets.
                state_topic.send_soon(key=workload.encode(), value=json.dumps(state).encode())
            counters.observe_s += observed - began
            counters.save_s += time.perf_counter() - observed
            for workload, at in triggered.items():
                await publish_decisions(workload, at or None)
            counters.last_event_at = time.time()

    @app.timer(interval=act_interval_s)
    async def tick() -> None:
        for workload in policy.workloads():
            await publish_decisions(workload)

    @app.timer(interval=30.0)
    async def snapshot() -> None:
        if snapshots:
            snapshots.save(policy.name, policy.to_state())

    @app.on_before_shutdown.connect
    async def _on_shutdown(sender, **kwargs) -> None:  # noqa: ANN001
        if snapshots:
            snapshots.save(policy.name, policy.to_state())
        stats = {"policy": policy.name, **counters.__dict__, "skipped": dict(policy.skipped),
                 "decision_latency": latency.percentiles(),
                 "learned_bytes": {w: getattr(policy, "learned_nbytes", lambda _: 0)(w) for w in policy.workloads()}}
        if stats_file:
            with open(stats_file, "w") as out:
                json.dump(stats, out)
        log.warning("saved %s state (transitions observed per workload): %s", policy.name,
                    json.dumps(_learned_summary(policy), sort_keys=True))
        log.warning("policy worker %s stopped: %s", policy.name, json.dumps(stats))

    return app


def run_worker(policy: Policy, config: StreamsConfig, snapshot_url: str | None = None, loglevel: str = "warning",
               **kwargs: Any) -> None:
    """Run the host until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    app = build_app(policy, config, snapshot_url, **kwargs)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
