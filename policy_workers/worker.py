"""The policy host: a faust-streaming app that feeds events to a policy and publishes its decisions.

    agentrt worker --policy cachesage [--snapshot-url sqlite:///runs/policy-state.db]

One app (and so one consumer group, ``agentrt-policy-<name>``) per policy: a
new policy attaches as its own consumer of the same topics, leaving the
others untouched. The app reads the framework and engine topics (created
beforehand, co-partitioned by agent key), hands every valid event to the
policy, acts on the events that change what should be cached (a step
ending, a tool call, a handoff, a block removed) and on a timer, and
publishes decisions to the decisions topic keyed by agent.

Scale-out: start the same command again. Two stages share the group's
partitions: ``route`` reads the agent-keyed topics and forwards each message,
unchanged, to the group's ``-by-workload`` topic on the partition of its
workload; ``feed`` reads that topic. A policy learns per workload (CacheSage's
transition matrix spans a workload's agents), so every event of a workload
must reach one process: the workload is the unit of scale-out, the partition
the unit of assignment. After a rebalance a process drops the workloads it
lost and loads the ones it gained from the state changelog.

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
import functools
import json
import logging
import math
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
from streams.keys import KeyError_, decode_key, partition_for
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
    routed: int = 0  # forwarded to the by-workload topic (by any process's feed)
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


def by_workload_topic(policy_name: str, topic_prefix: str = "agentrt") -> str:
    """The group's repartition topic: the source events, partitioned by workload."""
    return f"{group_id(policy_name, topic_prefix)}-by-workload"


def consumed_topics(policy_name: str, topic_prefix: str = "agentrt", single: bool = False) -> list[str]:
    """Every topic the policy's group reads: its lag over these says whether it is caught up."""
    topics = Topics.for_prefix(topic_prefix)
    return [topics.framework, topics.engine] + ([] if single else [by_workload_topic(policy_name, topic_prefix)])


@functools.lru_cache(maxsize=65536)  # route asks once per event; workloads are few, murmur2 is pure Python
def workload_partition(workload: str, partitions: int) -> int:
    """The ``-by-workload`` partition that carries every event of ``workload``."""
    return partition_for(workload.encode(), partitions)


def ensure_worker_topic(config: StreamsConfig, name: str, partitions: int = 1, compact: bool = True) -> None:
    """One of the group's own topics: the state changelog (one partition, one total order,
    compacted) or the by-workload stream (the source topics' partition count)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    admin = admin_client(config.bootstrap_servers)
    if name in admin.list_topics(timeout=10).topics:
        return
    topic = NewTopic(name, partitions, config.replication_factor,
                     config={"cleanup.policy": "compact" if compact else "delete"})
    for future in admin.create_topics([topic]).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != 36:  # created meanwhile by another worker
                raise


def build_app(policy: Policy, config: StreamsConfig, snapshot_url: str | None = None, *,
              act_interval_s: float = 1.0, batch_max: int = 500, batch_within_s: float = 0.01,
              stats_file: str | None = None, single: bool = False, min_act_interval_s: float = 0.05) -> faust.App:
    """The faust app hosting ``policy`` (not started).

    Events are handled in batches (up to ``batch_max``, or what arrived within
    ``batch_within_s``): observe each, write the touched workloads' learned
    state to the changelog-backed table, act once per workload that saw a
    triggering event, and only then ack the batch. Committed offsets never run
    ahead of the saved state, so a killed worker resumes exactly where its
    state stops (a replayed duplicate step is recognised and skipped).

    A workload is acted on at most every ``min_act_interval_s``: under load
    batches come every few milliseconds, and one act per batch spent most of
    the worker's time re-scoring nearly the same cache; a triggered act that
    is too early waits for the next batch or the next short tick.

    ``single``: this process is the policy's only one; it reads the source
    topics directly, without the by-workload hop, and stops with an error if
    another process joins its group.
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
    by_workload_name = by_workload_topic(policy.name, config.topic_prefix)
    if not single:
        ensure_worker_topic(config, by_workload_name, config.partitions, compact=False)
    by_workload = app.topic(by_workload_name, key_serializer="raw", value_serializer="raw",
                            partitions=config.partitions)
    decisions = app.topic(topics.decisions, key_serializer="raw", value_serializer="raw",
                          partitions=config.partitions)
    dead_letters = app.topic(topics.dead_letters, key_serializer="raw", value_serializer="raw")
    # Learned state goes to a changelog topic of our own (one partition, compacted, latest value
    # per workload), written before each batch is acked and read back to its true end on start.
    # Not a faust Table: after a crash-restart, faust's table recovery left source partitions
    # paused and consumption stalled on the embedded broker (3 of 4 runs; docs/policy_workers.md).
    state_topic_name = f"{group_id(policy.name, config.topic_prefix)}-state"
    ensure_worker_topic(config, state_topic_name)
    state_topic = app.topic(state_topic_name, key_serializer="raw", value_serializer="raw", partitions=1)
    snapshots = SqlSnapshots(snapshot_url) if snapshot_url else None
    counters = WorkerCounters()
    latency = LatencyReservoir()
    owned: set[int] = set()  # this process's partitions of the by-workload topic
    loaded: set[int] = set()  # ... whose workloads' state this process holds (loaded or kept)
    changelog_read: dict[str, dict[str, Any]] = {}  # one read per rebalance, shared by the loads
    app.agentrt_counters = counters  # type: ignore[attr-defined]
    app.agentrt_policy = policy  # type: ignore[attr-defined]

    def partition_of(workload: str) -> int:
        # single: every workload in one slot, owned while this process holds every source partition.
        return 0 if single else workload_partition(workload, config.partitions)

    def read_changelog() -> dict[str, Any]:
        # To its true end: readers stopping at the offset ListOffsets reports miss the tail
        # of the last batch on the embedded broker (docs/streams.md).
        raw = latest_values(config.bootstrap_servers, state_topic_name)
        return {k.decode(): json.loads(v) for k, v in raw.items() if k is not None}

    @app.on_partitions_assigned.connect
    async def _on_assigned(sender, assigned, **kwargs) -> None:  # noqa: ANN001 - faust's signal
        # A partition this process kept through the rebalance was read by no one else: its
        # workloads stay in memory (with the block index the changelog does not hold). One it
        # gained is loaded from the changelog before its first event or act; faust may deliver
        # that event before this signal, hence the check per event rather than here.
        owned.clear()
        if single:
            sources = (topics.framework, topics.engine)
            held = {(tp.topic, tp.partition) for tp in assigned if tp.topic in sources}
            everything = {(t, p) for t in sources for p in range(config.partitions)}
            if held and held != everything:
                message = (f"a --single worker shares its group {app.conf.id} with another process: workloads "
                           "would be split across processes; stopping. Scale out without --single.")
                log.error(message)
                raise RuntimeError(message)  # faust crashes the app: the worker exits
            if held:
                owned.add(0)
        else:
            owned.update(tp.partition for tp in assigned if tp.topic == by_workload_name)
        loaded.intersection_update(owned)
        changelog_read.clear()
        lost = [w for w in policy.workloads() if partition_of(w) not in loaded]
        policy.forget(lost)
        log.warning("assigned partitions %s of %s%s", sorted(owned), by_workload_name,
                    f"; handed over workloads {sorted(lost)}" if lost else "")

    async def load_partition(partition: int) -> None:
        """Before a gained partition's first event or act: its workloads' state from the
        changelog (SQL fills in workloads it lacks). The changelog is at least as new as the
        offsets consumption restarts from (a re-read step is recognised and skipped)."""
        if not changelog_read:
            states = dict(snapshots.load(policy.name)) if snapshots else {}
            changelog = await asyncio.get_running_loop().run_in_executor(None, read_changelog)
            states.update({w: st for w, st in changelog.items() if st is not None})
            changelog_read["states"] = states
        here = {w: st for w, st in changelog_read["states"].items() if partition_of(w) == partition}
        policy.forget([w for w in policy.workloads() if partition_of(w) == partition])
        if here:
            policy.load_state(here)
            log.warning("restored %s state (transitions observed per workload): %s", policy.name,
                        json.dumps(_learned_summary(policy, here), sort_keys=True))
        loaded.add(partition)

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

    last_act: dict[str, float] = {}
    pending: dict[str, float] = {}  # workload -> Kafka timestamp of the trigger it has not acted on yet

    async def act_when_due() -> None:
        now = time.monotonic()
        for workload, at in list(pending.items()):
            if now - last_act.get(workload, -math.inf) >= min_act_interval_s:
                del pending[workload]
                last_act[workload] = now
                await publish_decisions(workload, at or None)

    async def dead_letter(event_msg: Any, reason: str) -> None:
        message = event_msg.message
        counters.dead_letters += 1
        headers = dead_letter_headers(message.headers, reason, message.topic, message.partition, message.offset)
        await dead_letters.send(key=event_msg.key, value=event_msg.value, headers=headers)

    async def route(stream):  # noqa: ANN001 - faust's stream type
        # The message goes on unchanged (agent key, headers, Kafka timestamp for the latency
        # figure); only its partition changes, to its workload's.
        async for batch in stream.take_events(batch_max, within=batch_within_s):
            for event_msg in batch:
                message = event_msg.message
                try:
                    workload, _ = decode_key(event_msg.key)
                except KeyError_ as exc:
                    await dead_letter(event_msg, str(exc))
                    continue
                counters.routed += 1
                by_workload.send_soon(key=event_msg.key, value=event_msg.value, headers=message.headers,
                                      partition=workload_partition(workload, config.partitions),
                                      timestamp=message.timestamp)

    async def feed(stream):  # noqa: ANN001 - faust's stream type
        async for batch in stream.take_events(batch_max, within=batch_within_s):
            counters.batches += 1
            counters.first_event_at = counters.first_event_at or time.time()
            began = time.perf_counter()
            touched: set[str] = set()
            triggered: dict[str, float] = {}  # workload -> Kafka timestamp of its latest triggering event
            for event_msg in batch:
                message = event_msg.message
                slot = 0 if single else message.partition
                if slot not in loaded:
                    await load_partition(slot)
                try:
                    event = decode(event_msg.key, event_msg.value)
                    policy.observe(event)
                except Exception as exc:  # the batch is acked regardless: park what failed, with why
                    reason = exc.reason if isinstance(exc, EventValidationError) else f"policy error: {exc!r}"
                    if not isinstance(exc, EventValidationError):
                        log.exception("policy %s failed on an event; dead-lettered", policy.name)
                    await dead_letter(event_msg, reason)
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
                pending.setdefault(workload, at)
            await act_when_due()
            counters.last_event_at = time.time()

    if single:  # one process owns every workload: no repartition hop
        app.agent(source, name="feed")(feed)
    else:
        app.agent(source, name="route")(route)
        app.agent(by_workload, name="feed")(feed)

    @app.timer(interval=act_interval_s)
    async def tick() -> None:
        for partition in sorted(owned - loaded):
            await load_partition(partition)
        for workload in policy.workloads():
            if partition_of(workload) in loaded:
                last_act[workload] = time.monotonic()
                await publish_decisions(workload, pending.pop(workload, None))

    if min_act_interval_s > 0:
        app.timer(interval=min_act_interval_s, name="act_when_due")(act_when_due)

    @app.timer(interval=30.0)
    async def snapshot() -> None:
        if snapshots:
            snapshots.save(policy.name, policy.to_state())

    @app.on_before_shutdown.connect
    async def _on_shutdown(sender, **kwargs) -> None:  # noqa: ANN001
        if snapshots:
            snapshots.save(policy.name, policy.to_state())
        stats = {"policy": policy.name, **counters.__dict__, "workloads": policy.workloads(), "skipped": dict(policy.skipped),
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
