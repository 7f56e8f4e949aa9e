"""The main job on the embedded default (for now, the event backbone end to end).

Start the embedded broker if none answers, create the topics, publish a real
trace's agent events, read part of them as a consumer group, show the lag that
leaves, dead-letter a malformed message, and replay the topic into SQL.
"""
from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

from framework_emitter.replayer import publish, trace_events
from framework_emitter.traces import TraceProblem, read_trace, sessions
from streams import broker, sqlstore
from streams.admin import BrokerUnreachable, group_lag, require_broker
from streams.config import DEFAULT_BOOTSTRAP, StreamsConfig
from streams.consumer import EventConsumer
from streams.keys import encode_key
from streams.producer import EventProducer
from streams.replay import replay_topic
from streams.topics import Topics, ensure_topics


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _ensure_broker(config: StreamsConfig) -> bool:
    """True if this call started the embedded broker."""
    try:
        require_broker(config.bootstrap_servers, timeout_s=2)
        print(f"using the broker at {config.bootstrap_servers}")
        return False
    except BrokerUnreachable:
        if config.bootstrap_servers != DEFAULT_BOOTSTRAP:
            raise
    port = int(DEFAULT_BOOTSTRAP.rsplit(":", 1)[1])
    print(broker.start(port).describe())
    return True


def run_demo(args: argparse.Namespace) -> int:
    config = StreamsConfig.from_env(args.bootstrap_servers)
    topics = Topics.for_prefix(config.topic_prefix)
    _step("broker")
    started = _ensure_broker(config)
    try:
        _step("topics")
        for name, outcome in ensure_topics(require_broker(config.bootstrap_servers), config).items():
            print(f"{name}\t{outcome}")

        _step(f"publish the first {args.sessions} sessions of the real trace {args.trace!r}")
        problems: list[TraceProblem] = []
        grouped = sessions(read_trace(args.trace, problems))
        chosen = dict(list(grouped.items())[: args.sessions])
        with EventProducer(config, topics) as producer:
            began = time.perf_counter()
            published = publish(producer, trace_events(args.trace, chosen))
            producer.flush()
            seconds = time.perf_counter() - began
            # One malformed message, to show dead-letter routing.
            producer.publish_raw(topics.framework, encode_key(args.trace, "nobody"), b'{"type":"handoff"}')
            producer.flush()
            counters = producer.counters.snapshot()
        calls = sum(len(c) for c in chosen.values())
        print(f"{len(chosen)} sessions, {calls} LLM calls -> {published.events} framework events "
              f"in {seconds:.2f}s; delivered {counters['delivered']}, dropped {counters['dropped_queue_full']}, "
              f"failed {counters['failed_delivery']}; trace lines skipped: {len(problems)}")

        group = f"agentrt-demo-{uuid.uuid4().hex[:6]}"
        half = published.events // 2
        _step(f"consumer group {group} reads {half} of them, then stops")
        agents_seen: dict[str, int] = {}
        with EventConsumer(config, [topics.framework], group_id=group) as consumer:
            for n, (_, event) in enumerate(consumer.events(timeout_s=0.5, idle_limit_s=15), start=1):
                agents_seen[event.agent] = agents_seen.get(event.agent, 0) + 1
                if n >= half:
                    break
            consumer.commit()
            print(f"read {sum(agents_seen.values())} events from {len(agents_seen)} agents; "
                  f"dead-lettered {consumer.dead_letters.routed} "
                  f"({consumer.last_reason or 'none seen yet: it sits in the unread half'})")

        _step(f"lag of {group} (agentrt lag --group {group})")
        rows = group_lag(config.bootstrap_servers, group, [topics.framework])
        for row in rows:
            print(f"  {row.topic} [{row.partition}] committed={row.committed} log_end={row.log_end} lag={row.lag}")
        print(f"  total lag: {sum(r.lag for r in rows)}")

        _step(f"replay {topics.framework} into {args.db}")
        if args.db.startswith("sqlite:///"):
            Path(args.db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlstore.connect(args.db)
        result = replay_topic(config.bootstrap_servers, topics.framework, engine)
        print(f"{result.events} events, {result.dead_letters} dead letters, {result.seconds:.2f}s")
        for workload, agent, type_name, n in sqlstore.summary(engine, [topics.framework])[:12]:
            print(f"  {n:>6}  {workload:12} {agent:28} {type_name}")
    finally:
        if started:
            broker.stop()
            print("\nembedded broker stopped")
    return 0
