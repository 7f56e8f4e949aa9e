"""Event backbone benchmark: publish throughput and produce->consume latency.

    agentrt bench streams [--events 200000] [--rate 1000] [--seconds 10] [--repeats 3]

Starts its own embedded broker (or uses --bootstrap-servers). Throughput:
one process publishes a realistic mix (agent step start, request finished,
KV blocks stored with 16 hashes, handoff; 300-900 bytes each) as fast as it
can; reported both as the rate publish() accepts events and the rate the
broker acknowledges them. Latency: a paced producer at --rate events/s and a
consumer in a separate process; latency = consume wall time - event time.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
import uuid

from streams import events as ev
from streams.admin import admin_client
from streams.broker import EmbeddedBroker
from streams.config import StreamsConfig
from streams.producer import EventProducer
from streams.serde import encode
from streams.topics import Topics, ensure_topics

from .report import spread


def realistic_events(n: int, now: float) -> list[ev.Event]:
    out: list[ev.Event] = []
    hashes = tuple(uuid.uuid4().hex for _ in range(16))
    for i in range(n):
        agent, session = f"agent-{i % 64}", f"session-{i % 500}"
        kind = i % 4
        if kind == 0:
            out.append(ev.AgentStepStart(workload="bench", agent=agent, time=now, session=session, step=i,
                                         prefix_fingerprint="9f86d081884c7d65", prefix_tokens=2048, prompt_tokens=2300,
                                         model="llama-150m"))
        elif kind == 1:
            out.append(ev.RequestFinished(workload="bench", agent=agent, time=now, session=session, step=i,
                                          request=f"req-{i}", prompt_tokens=2300, cached_tokens=2048, output_tokens=120,
                                          queue_time_s=0.01, ttft_s=0.08, e2e_s=1.2, finish_reason="stop"))
        elif kind == 2:
            out.append(ev.KvBlocksStored(workload="bench", agent=agent, time=now, session=session, step=i,
                                         request=f"req-{i}", block_hashes=hashes, block_size=32, medium="GPU"))
        else:
            out.append(ev.Handoff(workload="bench", agent=agent, time=now, session=session, step=i, to_agent="agent-0"))
    return out


def measure_throughput(config: StreamsConfig, topics: Topics, n: int) -> dict[str, float]:
    batch = realistic_events(n, time.time())
    sizes = [len(encode(e)[1]) for e in batch[:400]]
    with EventProducer(config, topics) as producer:
        producer.publish(batch[0])
        producer.flush()  # connection and producer id set up outside the timing
        began = time.perf_counter()
        for event in batch:
            producer.publish(event)
        accepted = time.perf_counter() - began
        producer.flush(60)
        delivered = time.perf_counter() - began
        counters = producer.counters.snapshot()
    return {"publish_eps": n / accepted, "delivered_eps": n / delivered, "mean_bytes": statistics.mean(sizes),
            "dropped": counters["dropped_queue_full"], "failed": counters["failed_delivery"]}


def _consume_latencies(bootstrap: str, topic: str, partitions: int, expected: int, ready, out) -> None:
    from confluent_kafka import OFFSET_END, Consumer, TopicPartition

    from streams.serde import decode

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-latency", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in range(partitions)])
    for _ in range(20):  # let the assignment resolve its start offsets before the producer starts
        consumer.poll(0.05)
    ready.set()
    latencies: list[float] = []
    deadline = time.monotonic() + expected / 100 + 60
    while len(latencies) < expected and time.monotonic() < deadline:
        msg = consumer.poll(0.1)
        if msg is None or msg.error():
            continue
        event = decode(msg.key(), msg.value())
        if event.session != "warmup":
            latencies.append(time.time() - event.time)
    consumer.close()
    out.put(latencies)


def measure_latency(config: StreamsConfig, topics: Topics, rate: float, seconds: float) -> dict[str, float]:
    n = int(rate * seconds)
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_consume_latencies,
                         args=(config.bootstrap_servers, topics.framework, config.partitions, n, ready, out))
    reader.start()
    ready.wait(60)
    time.sleep(0.5)
    template = realistic_events(4, 0)[0]
    with EventProducer(config, topics) as producer:
        # Connections and the idempotent producer id are set up before timing starts.
        for p in range(64):
            producer.publish(ev.Handoff(workload="bench", agent=f"agent-{p}", time=time.time(), session="warmup",
                                        to_agent="agent-0"))
        producer.flush()
        began = time.perf_counter()
        for i in range(n):
            target = began + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            producer.publish(ev.AgentStepStart(workload="bench", agent=f"agent-{i % 64}", time=time.time(),
                                               session=template.session, step=i,
                                               prefix_fingerprint=template.prefix_fingerprint,
                                               prefix_tokens=template.prefix_tokens,
                                               prompt_tokens=template.prompt_tokens))
        producer.flush()
    latencies = sorted(out.get(timeout=120))
    reader.join()
    ms = [x * 1000 for x in latencies]
    return {"received": len(ms), "sent": n, "p50_ms": ms[len(ms) // 2], "p99_ms": ms[int(len(ms) * 0.99) - 1],
            "max_ms": ms[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentrt bench streams", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap-servers")
    args = parser.parse_args(argv)

    runs_tp, runs_lat = [], []
    for repeat in range(args.repeats):
        # A fresh embedded broker per repeat: its memory store slows down as it fills, so
        # repeats on one broker would not be alike. Latency is measured before the burst.
        broker = None if args.bootstrap_servers else EmbeddedBroker().start()
        bootstrap = args.bootstrap_servers or broker.bootstrap
        try:
            config = StreamsConfig(bootstrap, partitions=8, topic_prefix=f"bench{uuid.uuid4().hex[:6]}")
            topics = Topics.for_prefix(config.topic_prefix)
            ensure_topics(admin_client(bootstrap), config, topics)
            lat = measure_latency(config, topics, args.rate, args.seconds)
            tp = measure_throughput(config, topics, args.events)
            runs_tp.append(tp), runs_lat.append(lat)
            print(f"repeat {repeat + 1}: publish {tp['publish_eps']:,.0f} ev/s, delivered {tp['delivered_eps']:,.0f} ev/s "
                  f"({tp['mean_bytes']:.0f} B/event, dropped {tp['dropped']}, failed {tp['failed']}); "
                  f"latency at {args.rate:g} ev/s: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
                  f"max {lat['max_ms']:.1f} ms ({lat['received']}/{lat['sent']} received)", flush=True)
        finally:
            if broker:
                broker.stop()
    print(f"\npublish throughput, events/s ({args.events:,} events x {args.repeats}): "
              f"{spread([r['publish_eps'] for r in runs_tp])}")
    print(f"delivered throughput, events/s: {spread([r['delivered_eps'] for r in runs_tp])}")
    print(f"p50 latency ms at {args.rate:g} ev/s: {spread([r['p50_ms'] for r in runs_lat])}")
    print(f"p99 latency ms at {args.rate:g} ev/s: {spread([r['p99_ms'] for r in runs_lat])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
