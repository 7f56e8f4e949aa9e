"""The event backbone against the real embedded broker."""
from __future__ import annotations

import time

from confluent_kafka import Consumer, TopicPartition

from streams import events as ev
from streams.consumer import DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_SOURCE_TOPIC, EventConsumer
from streams.keys import encode_key, partition_for
from streams.producer import EventProducer
from streams.serde import encode, encode_value
from tests.sample_events import every_event_type


def _read_all(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 15.0):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    messages, deadline = [], time.monotonic() + timeout_s
    while len(messages) < expected and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            messages.append(msg)
    consumer.close()
    return messages


def test_every_event_type_round_trips_through_the_broker(config, topics):
    sent = every_event_type()
    with EventProducer(config, topics) as producer:
        for event in sent:
            assert producer.publish(event)
        assert producer.flush() == 0
        assert producer.counters.snapshot()["delivered"] == len(sent)
    received = {}
    with EventConsumer(config, [topics.framework, topics.engine, topics.decisions], group_id=f"{config.topic_prefix}-rt") as consumer:
        for msg, event in consumer.events(timeout_s=0.5, idle_limit_s=10):
            expected_topic = {"framework": topics.framework, "engine": topics.engine, "decision": topics.decisions}
            assert msg.topic() == expected_topic[event.category]
            received[event.event_id] = event
            if len(received) == len(sent):
                break
    assert received == {e.event_id: e for e in sent}


def test_same_agent_key_lands_on_the_same_partition_on_every_topic(config, topics):
    agents = [f"agent-{i}" for i in range(40)]
    landed: dict[tuple[str, str], int] = {}

    def record(err, msg):
        assert err is None
        landed[(msg.topic(), msg.key().decode())] = msg.partition()

    with EventProducer(config, topics) as producer:
        for agent in agents:
            for event in (ev.AgentStepStart(workload="w", agent=agent, time=time.time(), prefix_fingerprint="f", prefix_tokens=1),
                          ev.RequestQueued(workload="w", agent=agent, time=time.time(), prompt_tokens=1),
                          ev.Unpin(workload="w", agent=agent, time=time.time(), policy="p", decision_id="d", expires_at=2e9)):
                key, value = encode(event)
                producer._producer.produce(topics.for_event(event), value, key, on_delivery=record)
        producer.flush()
    for agent in agents:
        key = encode_key("w", agent).decode()
        partitions = {landed[(t, key)] for t in topics.keyed}
        assert len(partitions) == 1, (agent, partitions)
        # and it is the partition Kafka's default (murmur2) partitioner picks, as faust and Java clients do
        assert partitions == {partition_for(key.encode(), config.partitions)}
    assert len(set(landed.values())) > 1  # keys really spread over partitions


def test_malformed_events_go_to_the_dead_letter_topic_and_the_consumer_goes_on(config, topics):
    good = ev.Handoff(workload="w", agent="a", time=time.time(), to_agent="b")
    bad = [
        (encode_key("w", "a"), b"{not json"),
        (encode_key("w", "a"), b'{"type":"handoff","schema_version":"9.0"}'),
        (b"no-key-json", encode_value(good)),
        (encode_key("w", "a"), b'{"type":"handoff","schema_version":"1.0","gen_ai.workflow.name":"w",'
                               b'"gen_ai.agent.id":"a","time":1700000000.0}'),
    ]
    with EventProducer(config, topics) as producer:
        for key, value in bad:
            producer.publish_raw(topics.framework, key, value)
        producer.publish(good)
        producer.flush()
    with EventConsumer(config, [topics.framework], group_id=f"{config.topic_prefix}-dlq") as consumer:
        got = [event for _, event in consumer.events(timeout_s=0.5, idle_limit_s=8)]
        assert consumer.dead_letters.routed == len(bad)
    assert got == [good]
    dead = _read_all(config.bootstrap_servers, topics.dead_letters, config.partitions, len(bad))
    assert sorted(m.value() for m in dead) == sorted(v for _, v in bad)  # nothing lost, byte for byte
    reasons = {m.value(): dict(m.headers())[DLQ_REASON].decode() for m in dead}
    assert "not JSON" in reasons[b"{not json"]
    assert "unsupported schema_version '9.0'" in reasons[bad[1][1]]
    assert "key is not JSON" in reasons[bad[2][1]]
    assert "missing attribute 'agentrt.handoff.to_agent'" in reasons[bad[3][1]]
    for m in dead:
        headers = dict(m.headers())
        assert headers[DLQ_SOURCE_TOPIC].decode() == topics.framework
        assert int(headers[DLQ_SOURCE_OFFSET]) >= 0


def test_publish_never_blocks_or_raises_when_the_broker_is_gone(config, topics):
    from dataclasses import replace

    dead = replace(config, bootstrap_servers="127.0.0.1:1")
    producer = EventProducer(dead, topics, **{"queue.buffering.max.messages": 100, "message.timeout.ms": 1000})
    event = ev.Handoff(workload="w", agent="a", time=time.time(), to_agent="b")
    began = time.perf_counter()
    results = [producer.publish(event) for _ in range(1000)]
    elapsed = time.perf_counter() - began
    assert elapsed < 1.0, elapsed
    counters = producer.counters.snapshot()
    assert results.count(True) == counters["queued"] == 100
    assert counters["dropped_queue_full"] == 900
    producer.close(timeout_s=3)
    assert producer.counters.snapshot()["failed_delivery"] == 100


def test_the_framework_sdk_publishes_agent_events_keyed_by_agent(config, topics):
    from framework_emitter.sdk import AgentEventEmitter

    with EventProducer(config, topics) as producer:
        sdk = AgentEventEmitter(producer, "crewai")
        assert sdk.session_start("s1", "Researcher")
        assert sdk.step_start("s1", "Researcher", 0, "f00d", 120, prompt_tokens=300)
        assert sdk.tool_call_start("s1", "Researcher", "search", "c1", step=0)
        assert sdk.tool_call_end("s1", "Researcher", "search", "c1", duration_s=0.4, step=0)
        assert sdk.step_end("s1", "Researcher", 0, output_tokens=50)
        assert sdk.handoff("s1", "Researcher", "Writer", step=1)
        assert sdk.step_start("s1", "Writer", 1, "beef", 200, previous_agent="Researcher")
        assert sdk.session_end("s1", "Writer", status="completed")
        producer.flush()
        tags = sdk.request_tags("s1", "Writer", step=1)
    assert tags == {"agentrt.workload": "crewai", "agentrt.agent": "Writer", "agentrt.session": "s1",
                    "agentrt.step": 1}
    with EventConsumer(config, [topics.framework], group_id=f"{config.topic_prefix}-sdk") as consumer:
        got = [(msg.key(), event) for msg, event in consumer.events(timeout_s=0.5, idle_limit_s=6)]
    assert len(got) == 8
    assert all(key == encode_key("crewai", event.agent) for key, event in got)
    types = sorted(event.type_name for _, event in got)
    assert types == sorted(["session_start", "agent_step_start", "tool_call_start", "tool_call_end",
                            "agent_step_end", "handoff", "agent_step_start", "session_end"])
    writer_step = next(e for _, e in got if e.type_name == "agent_step_start" and e.agent == "Writer")
    assert writer_step.previous_agent == "Researcher"
