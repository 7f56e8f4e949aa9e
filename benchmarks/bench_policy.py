"""Policy worker benchmark: events/s one worker sustains, decision latency, learned state size.

    agentrt bench policy [--trace tau_airline] [--sessions 100] [--rate 1000] [--repeats 3]

Events: the real trace's framework events plus the KV blocks an engine would
report (every full 32-token prompt block, chained as vLLM hashes them), 16
sessions interleaved. Each phase starts a fresh embedded broker (or uses
--bootstrap-servers) and a real ``agentrt worker`` process.
- Throughput: the whole stream is published first; one worker drains the
  backlog; events / (last - first event handled) from the worker's own clock.
- Policy alone: the same events decoded from bytes and fed to CacheSage in
  batches of 100 in this process (observe, state snapshot, act), no Kafka:
  what the policy costs, apart from the host.
- Both worker modes, side by side in each repeat: the default (a route
  stage repartitions events by workload, so processes can be added) and
  --single (one process, no hop).
- Latency: the worker is up first; the stream is published at --rate events/s;
  latency = decision sent - Kafka timestamp of the event that triggered it
  (step end, tool call, handoff, blocks removed), measured by the worker.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from framework_emitter.replayer import trace_events
from framework_emitter.traces import read_trace, sessions
from policy_workers.worker import consumed_topics, group_id
from streams.admin import admin_client, group_lag
from streams.broker import EmbeddedBroker
from streams.config import StreamsConfig
from streams.producer import EventProducer
from streams.topics import Topics, ensure_topics

from .report import spread


def _events(trace: str, n_sessions: int) -> list:
    chosen = dict(list(sessions(read_trace(trace)).items())[:n_sessions])
    return list(trace_events(trace, chosen, concurrency=16, kv_block_size=32))


def _start_worker(config: StreamsConfig, workdir: Path, single: bool) -> subprocess.Popen:
    env = {**os.environ, "AGENTRT_BOOTSTRAP_SERVERS": config.bootstrap_servers,
           "AGENTRT_TOPIC_PREFIX": config.topic_prefix, "AGENTRT_PARTITIONS": str(config.partitions)}
    return subprocess.Popen([sys.executable, "-m", "agentrt.cli", "worker", "--policy", "cachesage",
                             "--snapshot-url", f"sqlite:///{workdir / 'state.db'}",
                             "--stats-file", str(workdir / "stats.json"), *(["--single"] if single else [])],
                            stdout=open(workdir / "worker.log", "ab"), stderr=subprocess.STDOUT, env=env)


def _wait_caught_up(config: StreamsConfig, topics: Topics, expected: int, single: bool,
                    timeout_s: float = 600) -> None:
    group = group_id("cachesage", config.topic_prefix)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            rows = group_lag(config.bootstrap_servers, group, consumed_topics("cachesage", config.topic_prefix, single))
        except ValueError:  # the worker has not created its by-workload topic yet
            rows = []
        source = [r for r in rows if r.topic in (topics.framework, topics.engine)]
        if sum(r.committed or 0 for r in source) >= expected and rows and sum(r.lag for r in rows) == 0:
            return
        time.sleep(0.5)
    raise TimeoutError("the worker did not catch up")


def _stop(worker: subprocess.Popen, workdir: Path) -> dict:
    worker.send_signal(signal.SIGINT)
    worker.wait(60)
    return json.loads((workdir / "stats.json").read_text())


def _phase(bootstrap: str | None, events: list, rate: float | None, single: bool) -> dict:
    broker = None if bootstrap else EmbeddedBroker().start()
    try:
        config = StreamsConfig(bootstrap or broker.bootstrap, partitions=8,
                               topic_prefix=f"benchpol{uuid.uuid4().hex[:6]}")
        topics = Topics.for_prefix(config.topic_prefix)
        ensure_topics(admin_client(config.bootstrap_servers), config, topics)
        with tempfile.TemporaryDirectory() as tmp, EventProducer(config, topics) as producer:
            workdir = Path(tmp)
            if rate is None:  # backlog first, then the worker
                for event in events:
                    producer.publish(event)
                producer.flush()
                worker = _start_worker(config, workdir, single)
            else:  # worker first (joined and idle), then paced traffic
                worker = _start_worker(config, workdir, single)
                producer.publish(events[0])
                producer.flush()
                _wait_caught_up(config, topics, 1, single)
                began = time.perf_counter()
                for i, event in enumerate(events[1:], start=1):
                    delay = began + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    producer.publish(event)
                producer.flush()
            try:
                _wait_caught_up(config, topics, len(events), single)
            finally:
                stats = _stop(worker, workdir)
        return stats
    finally:
        if broker:
            broker.stop()


def _in_process(events: list) -> float:
    from policy_workers.cachesage import CacheSage
    from streams.serde import decode, encode

    wire = [encode(e) for e in events]
    sage = CacheSage()
    began = time.perf_counter()
    for i in range(0, len(wire), 100):
        for key, value in wire[i:i + 100]:
            sage.observe(decode(key, value))
        sage.to_state([events[0].workload])
        sage.act(events[0].workload, events[min(i + 99, len(events) - 1)].time)
    return len(events) / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentrt bench policy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="tau_airline")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s in the latency phase")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap-servers")
    args = parser.parse_args(argv)

    events = _events(args.trace, args.sessions)
    kv = sum(1 for e in events if e.type_name == "kv_blocks_stored")
    print(f"{args.trace}: first {args.sessions} sessions -> {len(events)} events ({kv} kv_blocks_stored)", flush=True)
    modes = {"scale-out (by-workload hop)": False, "--single (no hop)": True}
    throughput = {m: [] for m in modes}
    p50 = {m: [] for m in modes}
    p99 = {m: [] for m in modes}
    state, alone = [], []
    for repeat in range(args.repeats):
        alone.append(_in_process(events))
        print(f"repeat {repeat + 1}: policy alone {alone[-1]:,.0f} events/s", flush=True)
        for mode, single in modes.items():
            backlog = _phase(args.bootstrap_servers, events, None, single)
            eps = backlog["events"] / max(backlog["last_event_at"] - backlog["first_event_at"], 1e-9)
            paced = _phase(args.bootstrap_servers, events, args.rate, single)
            latency = paced["decision_latency"]
            throughput[mode].append(eps), p50[mode].append(latency["p50_ms"]), p99[mode].append(latency["p99_ms"])
            state.append(max(paced["learned_bytes"].values()))
            print(f"  {mode}: worker {eps:,.0f} events/s ({backlog['events']} events, {backlog['batches']} batches, "
                  f"{backlog['decisions']} decisions); at {args.rate:g} events/s decision latency p50 "
                  f"{latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms, max {latency['max_ms']:.1f} ms "
                  f"({latency['n']} decisions); learned state {state[-1]:,} bytes; skipped {paced['skipped']}",
                  flush=True)
    print(f"\nevents/s, policy alone (no Kafka): {spread(alone)}")
    for mode in modes:
        print(f"{mode}: events/s, one worker: {spread(throughput[mode])}")
        print(f"{mode}: decision latency p50 ms at {args.rate:g} events/s: {spread(p50[mode])}")
        print(f"{mode}: decision latency p99 ms at {args.rate:g} events/s: {spread(p99[mode])}")
    ratios = [s / r for s, r in zip(throughput["--single (no hop)"], throughput["scale-out (by-workload hop)"])]
    print(f"events/s without the hop / with it, per repeat: {spread(ratios)}")
    print(f"learned state bytes per workload: {spread(state)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
