"""What a user runs by hand: lag, replay into SQL, the CLI's broker and failure messages."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from streams import events as ev
from streams import sqlstore
from streams.admin import group_lag
from streams.broker import free_port
from streams.consumer import EventConsumer
from streams.keys import encode_key
from streams.producer import EventProducer
from streams.replay import replay_topic


def _publish_steps(config, topics, n: int, agents: int = 6) -> list[ev.Event]:
    sent = [ev.AgentStepStart(workload="lagtest", agent=f"agent-{i % agents}", time=time.time(), session="s",
                              step=i, prefix_fingerprint="f", prefix_tokens=10) for i in range(n)]
    with EventProducer(config, topics) as producer:
        for event in sent:
            producer.publish(event)
        assert producer.flush() == 0
    return sent


def test_lag_reports_a_known_backlog_per_partition(config, topics):
    total, read = 300, 120
    _publish_steps(config, topics, total)
    group = f"{config.topic_prefix}-lag"
    with EventConsumer(config, [topics.framework], group_id=group) as consumer:
        for n, _ in enumerate(consumer.events(timeout_s=0.5, idle_limit_s=10), start=1):
            if n == read:
                break
        consumer.commit()
    rows = group_lag(config.bootstrap_servers, group, [topics.framework])
    assert len(rows) == config.partitions
    assert sum(r.log_end for r in rows) == total
    assert sum(r.lag for r in rows) == total - read
    for row in rows:
        assert row.lag == row.log_end - (row.committed or 0) >= 0


def _replay_and_check(config, topics, url: str) -> None:
    sent = _publish_steps(config, topics, 50)
    with EventProducer(config, topics) as producer:
        producer.publish_raw(topics.framework, encode_key("lagtest", "x"), b'{"type":"pin"}')
        producer.flush()
    engine = sqlstore.connect(url)
    first = replay_topic(config.bootstrap_servers, topics.framework, engine)
    assert (first.events, first.dead_letters) == (50, 1)
    again = replay_topic(config.bootstrap_servers, topics.framework, engine)  # idempotent
    assert again.events == 50
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sqlstore.events_table)).scalar() == 50
        steps = sorted(conn.execute(select(sqlstore.events_table.c.step)).scalars())
        reason = conn.execute(select(sqlstore.dead_letters_table.c.reason)).scalar()
    assert steps == [e.step for e in sent]
    assert "missing attribute 'schema_version'" in reason
    counts = {(a, t): n for _, a, t, n in sqlstore.summary(engine, [topics.framework])}
    assert counts[("agent-0", "agent_step_start")] == 9
    engine.dispose()


def test_replay_into_sqlite(config, topics, tmp_path):
    _replay_and_check(config, topics, f"sqlite:///{tmp_path / 'events.db'}")


@pytest.mark.postgres
def test_replay_into_postgresql(config, topics, postgres_url):
    _replay_and_check(config, topics, postgres_url)


def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentrt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_commands_fail_fast_naming_the_bootstrap_servers():
    began = time.monotonic()
    result = _cli("--bootstrap-servers", "127.0.0.1:1", "topics", "list")
    assert result.returncode == 2
    assert "127.0.0.1:1" in result.stderr and "agentrt broker start" in result.stderr
    assert time.monotonic() - began < 15


def test_cli_broker_lifecycle_topics_tail_lag_and_replay(tmp_path):
    port = free_port()
    env = {"AGENTRT_HOME": str(tmp_path), "AGENTRT_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "AGENTRT_TOPIC_PREFIX": "cli", "AGENTRT_PARTITIONS": "2"}
    assert _cli("broker", "status", env=env).returncode == 1
    started = _cli("broker", "start", "--port", str(port), env=env)
    assert started.returncode == 0, started.stderr
    try:
        assert "running" in _cli("broker", "status", env=env).stdout
        created = _cli("topics", "create", env=env)
        assert "cli.framework.events.v1\tcreated" in created.stdout
        assert "cli.events.dlq\t2 partitions" in _cli("topics", "list", env=env).stdout
        from streams.config import StreamsConfig
        from streams.topics import Topics

        config = StreamsConfig(f"127.0.0.1:{port}", 2, topic_prefix="cli")
        _publish_steps(config, Topics.for_prefix("cli"), 12)
        tail = _cli("tail", "cli.framework.events.v1", "--from-beginning", "--agent", "agent-2", "--idle-exit", "3", env=env)
        lines = tail.stdout.strip().splitlines()
        assert len(lines) == 2 and all('"gen_ai.agent.id": "agent-2"' in line for line in lines)
        replay = _cli("replay", "cli.framework.events.v1", "--to", f"sqlite:///{tmp_path / 'r.db'}", "--summary", env=env)
        assert "replayed 12 events" in replay.stdout
        lag = _cli("lag", "--group", "nobody-yet", "--topic", "cli.framework.events.v1", env=env)
        assert lag.returncode == 0 and lag.stdout.count("cli.framework.events.v1") == 2
    finally:
        assert "stopped" in _cli("broker", "stop", env=env).stdout
    assert _cli("broker", "status", env=env).returncode == 1
