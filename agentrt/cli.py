"""``agentrt``: the one command for the runtime layer's operations."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from typing import Sequence

from streams import broker
from streams.admin import BrokerUnreachable, group_lag, list_groups, list_topics, require_broker
from streams.config import StreamsConfig, librdkafka_logger


def _config(args: argparse.Namespace) -> StreamsConfig:
    return StreamsConfig.from_env(args.bootstrap_servers)


def cmd_broker(args: argparse.Namespace) -> int:
    if args.action == "start":
        status = broker.start(args.port)
        print(status.describe())
    elif args.action == "stop":
        print("embedded broker stopped" if broker.stop() else "embedded broker was not running")
    else:
        status = broker.status()
        print(status.describe())
        return 0 if status.running else 1
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from streams.topics import ensure_topics

    config = _config(args)
    admin = require_broker(config.bootstrap_servers)
    if args.action == "create":
        if args.partitions:
            config = StreamsConfig(config.bootstrap_servers, args.partitions, config.replication_factor,
                                   config.topic_prefix)
        for name, outcome in ensure_topics(admin, config).items():
            print(f"{name}\t{outcome}")
    else:
        for name, partitions in list_topics(admin).items():
            print(f"{name}\t{partitions} partitions")
    return 0


def _parse_time(text: str) -> int:
    """ISO-8601 (naive = UTC) or '-<seconds>' ago, as epoch milliseconds."""
    if text.startswith("-"):
        return int((dt.datetime.now(dt.timezone.utc).timestamp() - float(text[1:])) * 1000)
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp() * 1000)


def cmd_tail(args: argparse.Namespace) -> int:
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    from streams.events import EventValidationError
    from streams.serde import decode

    config = _config(args)
    admin = require_broker(config.bootstrap_servers)
    metadata = admin.list_topics(args.topic, timeout=5).topics.get(args.topic)
    if metadata is None or metadata.error is not None:
        print(f"error: topic {args.topic!r} does not exist", file=sys.stderr)
        return 2
    consumer = Consumer({"bootstrap.servers": config.bootstrap_servers, "group.id": "agentrt-tail",
                         "enable.auto.commit": False, "logger": librdkafka_logger()})
    start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
    partitions = [TopicPartition(args.topic, p, start) for p in metadata.partitions]
    if args.since:
        partitions = consumer.offsets_for_times(
            [TopicPartition(args.topic, p, _parse_time(args.since)) for p in metadata.partitions], timeout=5)
    consumer.assign(partitions)
    shown = 0
    try:
        idle = 0.0
        while args.max is None or shown < args.max:
            msg = consumer.poll(0.5)
            if msg is None:
                idle += 0.5
                if args.idle_exit is not None and idle >= args.idle_exit:
                    break
                continue
            idle = 0.0
            if msg.error():
                continue
            try:
                event = decode(msg.key(), msg.value())
            except EventValidationError as exc:
                if not (args.agent or args.workload or args.type):
                    print(json.dumps({"partition": msg.partition(), "offset": msg.offset(), "invalid": exc.reason}))
                    shown += 1
                continue
            if args.agent and event.agent != args.agent or args.workload and event.workload != args.workload \
                    or args.type and event.type_name != args.type:
                continue
            print(json.dumps({"partition": msg.partition(), "offset": msg.offset(), **event.to_wire()},
                             ensure_ascii=False), flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def cmd_lag(args: argparse.Namespace) -> int:
    config = _config(args)
    admin = require_broker(config.bootstrap_servers)
    groups = [args.group] if args.group else [g for g in list_groups(admin) if not g.startswith("agentrt-offsets")]
    rows = [row for g in groups for row in group_lag(config.bootstrap_servers, g, args.topic or None)]
    if args.json:
        print(json.dumps([{**row.__dict__, "lag": row.lag} for row in rows]))
        return 0
    print(f"{'GROUP':32} {'TOPIC':34} {'PART':>4} {'COMMITTED':>10} {'LOG-END':>10} {'LAG':>8}")
    for row in rows:
        committed = "-" if row.committed is None else str(row.committed)
        print(f"{row.group:32} {row.topic:34} {row.partition:>4} {committed:>10} {row.log_end:>10} {row.lag:>8}")
    if not rows:
        print("(no committed offsets)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from streams import sqlstore
    from streams.replay import replay_topic

    config = _config(args)
    engine = sqlstore.connect(args.to)
    from_time = _parse_time(args.since) if args.since else None
    result = replay_topic(config.bootstrap_servers, args.topic, engine, from_time_ms=from_time,
                          from_offset=args.from_offset)
    print(f"replayed {result.events} events ({result.dead_letters} dead letters) from {args.topic} "
          f"into {engine.url.render_as_string(hide_password=True)} in {result.seconds:.2f}s")
    if args.summary:
        for workload, agent, type_name, n in sqlstore.summary(engine, [args.topic])[: args.summary]:
            print(f"  {n:>7}  {workload:18} {agent:32} {type_name}")
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    """A real trace into a running vLLM OpenAI server; framework events to Kafka through the SDK."""
    from evaluation.bench import COLUMNS, metrics, replay_order
    from evaluation.server_replay import ServerError, replay_server
    from framework_emitter.sdk import AgentEventEmitter
    from streams.producer import EventProducer
    from streams.topics import Topics

    _, order = replay_order(args.workload, args.calls, args.sessions)
    print(f"{args.workload}: {len(order)} calls of {len({c.session for c in order})} sessions to {args.server} "
          f"({args.max_in_flight} in flight)", flush=True)

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} calls", end="" if done < total else "\n", file=sys.stderr, flush=True)

    producer = None
    if not args.no_events:
        config = _config(args)
        require_broker(config.bootstrap_servers)
        producer = EventProducer(config, Topics.for_prefix(config.topic_prefix))
    try:
        emitter = AgentEventEmitter(producer, args.workload) if producer is not None else None
        result = replay_server(args.server, args.model, order, workload=args.workload, vocab_size=args.vocab_size,
                               max_prompt_tokens=args.max_prompt_tokens, emitter=emitter,
                               max_output_tokens=args.max_output_tokens, max_in_flight=args.max_in_flight,
                               time_scale=args.time_scale, progress=progress)
    except ServerError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    finally:
        if producer is not None:
            producer.close()
    figures = metrics(result)
    print(" | ".join(f"{label} {fmt.format(figures[key])}" for label, key, fmt in COLUMNS))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_worker(args: argparse.Namespace) -> int:
    from policy_workers.policy import discover_policies, load_policy
    from policy_workers.worker import group_id, run_worker

    config = _config(args)
    if args.list:
        for name, cls in sorted(discover_policies().items()):
            print(f"{name}\t{cls.__module__}:{cls.__qualname__}\tconsumer group {group_id(name, config.topic_prefix)}")
        return 0
    require_broker(config.bootstrap_servers)
    policy = load_policy(args.policy)
    print(f"policy worker {policy.name}: consumer group {group_id(policy.name, config.topic_prefix)} on {config.bootstrap_servers}",
          flush=True)
    run_worker(policy, config, args.snapshot_url, loglevel="info" if args.verbose else "warning",
               stats_file=args.stats_file, single=args.single)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "policy":
        from benchmarks.bench_policy import main as bench_main
    else:
        from benchmarks.bench_streams import main as bench_main
    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentrt", description=__doc__)
    parser.add_argument("--bootstrap-servers", "-b", help="Kafka bootstrap servers "
                        "(default: $AGENTRT_BOOTSTRAP_SERVERS, $KAFKA_BOOTSTRAP_SERVERS, 127.0.0.1:9092)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show librdkafka's own log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="start, check or stop the embedded broker (Tansu, memory storage)")
    p.add_argument("action", choices=("start", "status", "stop"))
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("topics", help="list topics, or create the pipeline's topics")
    p.add_argument("action", choices=("list", "create"), nargs="?", default="list")
    p.add_argument("--partitions", type=int, help="partition count for created topics ($AGENTRT_PARTITIONS, 8)")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("tail", help="print a topic's events, decoded, as JSON lines")
    p.add_argument("topic")
    p.add_argument("--agent"), p.add_argument("--workload"), p.add_argument("--type", help="event type, e.g. handoff")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--since", help="ISO time or -SECONDS (start there instead of the end)")
    p.add_argument("--max", type=int, help="stop after this many events")
    p.add_argument("--idle-exit", type=float, help="stop after this many seconds without a message")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("lag", help="consumer-group lag per topic-partition")
    p.add_argument("--group", "-g", help="one group (default: every group)")
    p.add_argument("--topic", "-t", action="append", help="report every partition of this topic (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lag)

    p = sub.add_parser("replay", help="replay a topic into SQL for offline analysis")
    p.add_argument("topic")
    p.add_argument("--to", default="sqlite:///agentrt-events.db", help="SQLAlchemy URL (default: %(default)s)")
    p.add_argument("--since", help="ISO time or -SECONDS (default: from the beginning)")
    p.add_argument("--from-offset", type=int)
    p.add_argument("--summary", type=int, nargs="?", const=20, help="print the top N (workload, agent, type) counts")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--trace", default="chatdev")
    p.add_argument("--sessions", type=int, default=20, help="first N sessions of the trace")
    p.add_argument("--db", default="sqlite:///runs/demo.db")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("drive", help="replay a real trace into a running vLLM OpenAI server, agent identity "
                       "attached, framework events to Kafka")
    p.add_argument("workload", help="a trace in ../shared/traces (e.g. chatdev) or a JSONL path")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the server's base URL (default: %(default)s)")
    p.add_argument("--model", required=True, help="the model name the server serves")
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this (default: %(default)s)")
    p.add_argument("--calls", type=int, default=120, help="first whole sessions up to this many calls")
    p.add_argument("--sessions", type=int, default=10_000, help="at most this many sessions")
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=4032, help="longer prompts are truncated (warned)")
    p.add_argument("--max-output-tokens", type=int, default=8)
    p.add_argument("--time-scale", type=float, default=0.0, help="tool gaps x this (0: back to back)")
    p.add_argument("--no-events", action="store_true", help="send requests only (no broker needed)")
    p.set_defaults(func=cmd_drive)

    p = sub.add_parser("worker", help="run a policy worker (its own consumer group) until interrupted")
    p.add_argument("--policy", default="cachesage", help="entry-point name in agentrt.policies, or module:Class")
    p.add_argument("--snapshot-url", default="sqlite:///agentrt-policy-state.db",
                   help="SQLAlchemy URL for state snapshots (default: %(default)s)")
    p.add_argument("--stats-file", help="write counters and decision latency as JSON here at shutdown")
    p.add_argument("--single", action="store_true",
                   help="the policy's only process: no by-workload hop (faster); stops if another process joins")
    p.add_argument("--list", action="store_true", help="list installed policies")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("bench", help="benchmarks: `agentrt bench streams|policy [--help]` (see BENCHMARKS.md)")
    p.add_argument("which", choices=("streams", "policy"))
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = [a for a in extra if a != "--"]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        librdkafka_logger().setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except (BrokerUnreachable, broker.BrokerError, ValueError, TimeoutError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
