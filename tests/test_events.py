"""The event contract: round trips and precise validation errors (no broker needed)."""
from __future__ import annotations

import json

import pytest

from streams import events as ev
from streams.keys import decode_key, encode_key, murmur2, partition_for
from streams.serde import decode, encode
from tests.sample_events import every_event_type


@pytest.mark.parametrize("event", every_event_type(), ids=lambda e: e.type_name)
def test_every_event_type_round_trips_through_bytes(event):
    key, value = encode(event)
    assert decode(key, value) == event


def test_wire_names_follow_opentelemetry_genai_where_they_exist():
    finished = next(e for e in every_event_type() if isinstance(e, ev.RequestFinished))
    wire = finished.to_wire()
    assert wire["gen_ai.agent.id"] == "Programmer"
    assert wire["gen_ai.conversation.id"] == "chatdev-c9d7fe2423"
    assert wire["gen_ai.workflow.name"] == "chatdev"
    assert wire["gen_ai.usage.input_tokens"] == 2505
    assert wire["gen_ai.usage.cache_read.input_tokens"] == 2240
    assert wire["gen_ai.usage.output_tokens"] == 4
    assert wire["type"] == "request_finished" and wire["schema_version"] == ev.SCHEMA_VERSION


def _wire(**changes):
    wire = ev.Handoff(workload="w", agent="a", time=1.7e9, to_agent="b").to_wire()
    for name, value in changes.items():
        if value is None:
            wire.pop(name)
        else:
            wire[name] = value
    return wire


@pytest.mark.parametrize("changes, reason", [
    ({"type": None}, "missing attribute 'type'"),
    ({"type": "teleport"}, "unknown event type 'teleport'"),
    ({"schema_version": "2.0"}, "unsupported schema_version '2.0'"),
    ({"schema_version": 1}, "expected 'MAJOR.MINOR'"),
    ({"agentrt.handoff.to_agent": None}, "missing attribute 'agentrt.handoff.to_agent'"),
    ({"agentrt.handoff.to_agent": 7}, "attribute 'agentrt.handoff.to_agent': expected a string, got 7"),
    ({"agentrt.step": -1}, "attribute 'agentrt.step': must be >= 0, got -1"),
    ({"agentrt.step": True}, "attribute 'agentrt.step': expected an integer"),
    ({"time": "noon"}, "attribute 'time': expected a number"),
    ({"gen_ai.agent.id": ""}, "attribute 'gen_ai.agent.id': must not be empty"),
    ({"gen_ai.agent.nmae": "x"}, "unknown attribute 'gen_ai.agent.nmae'"),
])
def test_validation_names_the_offending_attribute(changes, reason):
    with pytest.raises(ev.EventValidationError) as caught:
        ev.from_wire(_wire(**changes))
    assert reason in caught.value.reason


def test_a_prefetch_flag_is_true_or_false_and_left_out_when_unset():
    stored = ev.KvBlocksStored(workload="w", agent="a", time=1.7e9, block_hashes=("ab",), block_size=32)
    assert "agentrt.kv.prefetch" not in stored.to_wire()
    wire = {**stored.to_wire(), "agentrt.kv.prefetch": True}
    assert ev.from_wire(wire).prefetch is True
    with pytest.raises(ev.EventValidationError) as caught:
        ev.from_wire({**wire, "agentrt.kv.prefetch": 1})
    assert "attribute 'agentrt.kv.prefetch': expected true or false, got 1" in caught.value.reason


def test_a_newer_minor_version_may_add_attributes():
    event = ev.from_wire(_wire(schema_version="1.7", **{"agentrt.future.thing": 3}))
    assert event.to_agent == "b"


def test_decision_semantics_are_checked():
    with pytest.raises(ev.EventValidationError, match="must be > 0"):
        ev.validate(ev.Pin(workload="w", agent="a", time=1.7e9, policy="p", decision_id="d", expires_at=2e9, ttl_s=0))
    with pytest.raises(ev.EventValidationError, match=r"within \[0, 1\]"):
        ev.validate(ev.Prefetch(workload="w", agent="a", time=1.7e9, policy="p", decision_id="d", expires_at=2e9,
                                probability=1.5))


def test_decode_rejects_bad_bytes_and_mismatched_keys():
    event = ev.Handoff(workload="w", agent="a", time=1.7e9, to_agent="b")
    key, value = encode(event)
    with pytest.raises(ev.EventValidationError, match="not JSON"):
        decode(key, b"{nope")
    with pytest.raises(ev.EventValidationError, match="does not match"):
        decode(encode_key("w", "other"), value)
    with pytest.raises(ev.EventValidationError, match="no key"):
        decode(None, value)
    with pytest.raises(ev.EventValidationError, match="expected a JSON object"):
        decode(key, json.dumps([1, 2]).encode())


def test_agent_key_round_trips_any_characters():
    for workload, agent in [("crewai", "Senior Data Researcher"), ("w/x", 'a"b,c'), ("ünï", "ağent")]:
        assert decode_key(encode_key(workload, agent)) == (workload, agent)


def test_murmur2_matches_the_java_client():
    # Vectors from Apache Kafka's UtilsTest.testMurmur2.
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}
    for data, expected in cases.items():
        assert murmur2(data) == expected, data
    assert 0 <= partition_for(b"x", 8) < 8
