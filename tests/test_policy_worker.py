"""The faust policy host against the real embedded broker."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from framework_emitter.replayer import publish, trace_events
from framework_emitter.traces import read_trace, sessions
from streams import events as ev
from policy_workers.worker import consumed_topics
from streams.admin import group_lag
from streams.keys import encode_key
from streams.producer import EventProducer
from streams.serde import decode

PLUGIN_DIR = Path(__file__).parent / "plugin"


def _worker(config, policy: str, snapshot: Path, log: Path, extra_path: Path | None = None,
            single: bool = False) -> subprocess.Popen:
    env = {**os.environ, "AGENTRT_BOOTSTRAP_SERVERS": config.bootstrap_servers,
           "AGENTRT_TOPIC_PREFIX": config.topic_prefix, "AGENTRT_PARTITIONS": str(config.partitions)}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "agentrt.cli", "worker", "--policy", policy,
                             "--snapshot-url", f"sqlite:///{snapshot}", *(["--single"] if single else [])],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _trace_sessions(n_sessions: int, skip: int = 0) -> dict:
    return dict(list(sessions(read_trace("chatdev")).items())[skip: skip + n_sessions])


def _publish_trace(config, topics, chosen: dict, pace_s: float = 0.0) -> None:
    """The sessions' framework events, the KV events an engine would report, and one malformed message."""
    with EventProducer(config, topics) as producer:
        for session, calls in chosen.items():
            publish(producer, trace_events("chatdev", {session: calls}, kv_block_size=32))
            producer.flush()
            time.sleep(pace_s)
        producer.publish_raw(topics.engine, encode_key("chatdev", "x"), b"{broken")
        producer.flush()


def _decisions(config, topics, until, timeout_s: float = 60.0) -> list[tuple[bytes, ev.Event]]:
    consumer = Consumer({"bootstrap.servers": config.bootstrap_servers, "group.id": "check", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topics.decisions, p, 0) for p in range(config.partitions)])
    got, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(got):
        msg = consumer.poll(0.3)
        if msg is not None and not msg.error():
            got.append((msg.key(), decode(msg.key(), msg.value())))
    consumer.close()
    return got


def _wait_until_caught_up(config, topics, group: str, timeout_s: float = 180.0) -> None:
    # A worker restarted after a crash rejoins its group only once the broker has dropped the
    # dead member: about a minute on the embedded broker (measured), hence the long wait.
    deadline, rows = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        try:
            rows = group_lag(config.bootstrap_servers, group, consumed_topics(group.rsplit("-policy-", 1)[1],
                                                                              config.topic_prefix))
        except ValueError:  # the worker has not created its by-workload topic yet
            rows = []
        if rows and sum(r.lag for r in rows) == 0:
            return
        time.sleep(1.0)
    raise AssertionError(f"{group} did not catch up: {rows}")


def _logged_state(log: Path, verb: str) -> dict:
    import json

    found = re.findall(rf"{verb} cachesage state \(transitions observed per workload\): (\{{.*\}})", log.read_text())
    return json.loads(found[-1]) if found else {}


def test_events_in_decisions_out_and_a_killed_worker_loses_no_learned_state(config, topics, tmp_path):
    import threading

    snapshot, log = tmp_path / "state.db", tmp_path / "worker.log"
    group = f"{config.topic_prefix}-policy-cachesage"
    first, rest = _trace_sessions(3), _trace_sessions(9, skip=3)
    expected_transitions = sum(len(calls) - 1 for calls in (*first.values(), *rest.values()))

    worker = _worker(config, "cachesage", snapshot, log)
    try:
        _publish_trace(config, topics, first)
        _wait_until_caught_up(config, topics, group)
        got = _decisions(config, topics, lambda got: any(isinstance(d, ev.Pin) for _, d in got)
                         and any(isinstance(d, ev.EvictionScore) for _, d in got))
        # Kill it hard while the rest of the trace streams in.
        publisher = threading.Thread(target=_publish_trace, args=(config, topics, rest, 0.4))
        publisher.start()
        time.sleep(1.5)
        worker.kill()
        worker.wait()
        publisher.join()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert got, log.read_text()[-3000:]
    for key, decision in got:
        assert key == encode_key(decision.workload, decision.agent)  # keyed by agent
        assert decision.policy == "cachesage" and decision.expires_at > decision.time

    snapshot.unlink(missing_ok=True)  # recovery must come from the table's changelog alone
    worker = _worker(config, "cachesage", snapshot, log)
    try:
        _wait_until_caught_up(config, topics, group)
    finally:
        _stop(worker)
    restored, saved = _logged_state(log, "restored"), _logged_state(log, "saved")
    assert 0 < restored.get("chatdev", 0) < expected_transitions, (restored, expected_transitions)
    assert saved == {"chatdev": expected_transitions}, log.read_text()[-3000:]
    # Both malformed messages (one per publish) reached the DLQ, at least once each.
    consumer = Consumer({"bootstrap.servers": config.bootstrap_servers, "group.id": "dlq", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topics.dead_letters, p, 0) for p in range(config.partitions)])
    dead, deadline = [], time.monotonic() + 10
    while len(dead) < 2 and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            dead.append(msg.value())
    consumer.close()
    assert dead.count(b"{broken") >= 2


def test_a_policy_installed_through_an_entry_point_runs_as_its_own_consumer_group(config, topics, tmp_path):
    dist = tmp_path / "agentrt_counter_policy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: agentrt-counter-policy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[agentrt.policies]\ncallcounter = agentrt_counter_policy:CallCounter\n")
    (tmp_path / "agentrt_counter_policy.py").write_text((PLUGIN_DIR / "agentrt_counter_policy.py").read_text())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    listed = subprocess.run([sys.executable, "-m", "agentrt.cli", "worker", "--list"], capture_output=True,
                            text=True, env=env)
    assert "callcounter\tagentrt_counter_policy:CallCounter" in listed.stdout, listed.stderr

    workers = [_worker(config, "cachesage", tmp_path / "a.db", tmp_path / "a.log"),
               _worker(config, "callcounter", tmp_path / "b.db", tmp_path / "b.log", extra_path=tmp_path)]
    try:
        _publish_trace(config, topics, _trace_sessions(2))
        got = _decisions(config, topics, lambda got: {d.policy for _, d in got} >= {"cachesage", "callcounter"})
        for name in ("cachesage", "callcounter"):  # each group consumed the same topics independently
            _wait_until_caught_up(config, topics, f"{config.topic_prefix}-policy-{name}")
    finally:
        for worker in workers:
            _stop(worker)
    assert {d.policy for _, d in got} >= {"cachesage", "callcounter"}, (tmp_path / "b.log").read_text()[-2000:]
    for name in ("cachesage", "callcounter"):
        rows = group_lag(config.bootstrap_servers, f"{config.topic_prefix}-policy-{name}", [topics.framework])
        assert sum(r.committed or 0 for r in rows) == sum(r.log_end for r in rows) > 0


def test_faust_consumer_seam_is_where_we_expect_it():
    """Fails when a faust or aiokafka upgrade moves what policy_workers/faust_tuning.py relies on."""
    import inspect

    import aiokafka
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from policy_workers import faust_tuning

    assert "fetch_max_wait_ms=1500" in inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)
    import asyncio

    async def build():
        return aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1500)

    assert asyncio.run(build())._fetch_max_wait_ms == 1500
    assert "self._fetch_max_wait_ms" in inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    faust_tuning.install()
    faust_tuning.install()
    assert faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer is faust_tuning._create_worker_consumer


def _stopped_stats(log: Path) -> dict:
    import json

    found = re.findall(r"policy worker cachesage stopped: (\{.*\})", log.read_text())
    return json.loads(found[-1]) if found else {}


def test_two_worker_processes_split_the_workloads_and_one_takes_over_when_the_other_stops(config, topics, tmp_path):
    """Scale-out by partitions: every event of a workload reaches one process, and a hand-over keeps its state."""
    names = ["ag2_captainagent", "chatdev", "crewai", "tau_airline"]
    chosen = {name: dict(list(sessions(read_trace(name)).items())[:2]) for name in names}
    later = {name: dict(list(sessions(read_trace(name)).items())[2:4]) for name in names}
    expected = {name: sum(len(calls) - 1 for calls in (*chosen[name].values(), *later[name].values()))
                for name in names}
    group = f"{config.topic_prefix}-policy-cachesage"

    def publish_all(which: dict) -> None:
        with EventProducer(config, topics) as producer:
            for name, picked in which.items():
                publish(producer, trace_events(name, picked, kv_block_size=32))
            producer.flush()

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = _worker(config, "cachesage", tmp_path / "a.db", logs[0])
    b = _worker(config, "cachesage", tmp_path / "b.db", logs[1])
    try:
        publish_all(chosen)
        _wait_until_caught_up(config, topics, group)
        got = _decisions(config, topics, lambda got: {d.workload for _, d in got} >= set(names))
        _stop(a)  # b takes a's partitions and loads a's workloads from the state changelog
        publish_all(later)
        _wait_until_caught_up(config, topics, group)
    finally:
        _stop(b)
        if a.poll() is None:
            a.kill()
    assert {d.workload for _, d in got} >= set(names), logs[1].read_text()[-2000:]
    held_a, held_b = _stopped_stats(logs[0]).get("workloads"), None
    assert held_a and set(held_a) < set(names), logs[0].read_text()[-2000:]
    # b held the rest while a ran: the two processes never learned the same workload.
    assert re.search(r"assigned partitions \[\d, \d\]", logs[1].read_text()), logs[1].read_text()[-2000:]
    held_b = _stopped_stats(logs[1])["workloads"]
    assert sorted(held_b) == names, logs[1].read_text()[-2000:]
    # Every transition of every workload, the ones learned by a included, is in b's final state.
    assert _logged_state(logs[1], "saved") == expected, (logs[0].read_text()[-1500:], logs[1].read_text()[-2500:])
    assert "handed over workloads" not in logs[1].read_text()  # b only ever gained


def test_a_single_worker_reads_the_sources_directly_and_refuses_to_share_its_group(config, topics, tmp_path):
    first = _worker(config, "cachesage", tmp_path / "a.db", tmp_path / "a.log", single=True)
    try:
        _publish_trace(config, topics, _trace_sessions(2))
        got = _decisions(config, topics, lambda got: any(isinstance(d, ev.EvictionScore) for _, d in got))
        assert got, (tmp_path / "a.log").read_text()[-2000:]
        second = _worker(config, "cachesage", tmp_path / "b.db", tmp_path / "b.log", single=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and first.poll() is None and second.poll() is None:
                time.sleep(0.5)
        finally:
            _stop(second)
    finally:
        _stop(first)
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert "shares its group" in logs and "stopping" in logs, logs[-3000:]
    from streams.admin import admin_client, list_topics

    assert first.returncode != 0 or second.returncode != 0  # a process that saw another join crashed out
    assert f"{config.topic_prefix}-policy-cachesage-by-workload" not in list_topics(admin_client(config.bootstrap_servers))
