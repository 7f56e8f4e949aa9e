"""Reading the shared real traces."""
from __future__ import annotations

from framework_emitter.traces import WORKLOADS, TraceProblem, read_trace, sessions, trace_path


def test_all_five_shared_traces_parse_cleanly():
    for workload in WORKLOADS:
        problems: list[TraceProblem] = []
        calls = list(read_trace(workload, problems))
        assert calls and not problems, (workload, problems[:3])
        assert {c.workload for c in calls} == {workload}
        grouped = sessions(calls)
        assert all([c.seq for c in s] == sorted(c.seq for c in s) for s in grouped.values())


def test_a_bad_line_is_reported_with_file_and_line_and_the_rest_goes_on(tmp_path):
    source = trace_path("crewai").read_text().splitlines()[:3]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join([source[0], "{truncated", source[1], '{"workload": "x"}', source[2]]) + "\n")
    problems: list[TraceProblem] = []
    calls = list(read_trace(str(path), problems))
    assert len(calls) == 3
    assert [(p.line, p.path) for p in problems] == [(2, str(path)), (4, str(path))]
    assert "missing field 'segments'" in str(problems[1])


def test_prompt_blocks_are_shared_exactly_as_far_as_prompts_are():
    from framework_emitter.prefix_blocks import block_hashes

    a = block_hashes([("sys", 70), ("task", 40), ("msg1", 30)], block_size=32)
    b = block_hashes([("sys", 70), ("task", 40), ("msg2", 30)], block_size=32)
    c = block_hashes([("sys2", 70), ("task", 40), ("msg1", 30)], block_size=32)
    assert len(a) == 140 // 32 == 4
    assert a[:3] == b[:3] and a[3] != b[3]  # tokens 0..95 are shared; block 3 holds msg1 vs msg2
    assert not set(a) & set(c)  # a different system prompt changes every block after it
    assert block_hashes([("x", 31)]) == []  # only full blocks


def test_prompt_token_ids_share_exactly_the_trace_prefixes():
    from framework_emitter.token_ids import prompt_token_ids

    a = prompt_token_ids([("sys", 50), ("m1", 10)], vocab_size=1000)
    b = prompt_token_ids([("sys", 50), ("m2", 10)], vocab_size=1000)
    assert len(a) == 60 and a[:50] == b[:50] and a[50:] != b[50:]
    assert all(1 <= t < 1000 for t in a)
    assert prompt_token_ids([("sys", 50), ("m1", 10)], 1000, max_tokens=55) == a[:55]


def test_the_replay_names_each_sessions_next_agent_when_a_step_ends():
    """A framework routes a step's outcome when the step ends: after each call but a session's last, a
    handoff names the agent of the session's next call (the same agent when it goes on); the last ends it."""
    from framework_emitter.replayer import trace_events
    from streams import events as ev

    chosen = dict(list(sessions(read_trace("tau_airline")).items())[:3])
    events = list(trace_events("tau_airline", chosen, start=0.0, concurrency=3))
    for name, calls in chosen.items():
        mine = [e for e in events if e.session == name and isinstance(e, (ev.AgentStepEnd, ev.Handoff,
                                                                             ev.SessionEnd))]
        assert [type(e) for e in mine] == [ev.AgentStepEnd, ev.Handoff] * (len(calls) - 1) + [ev.AgentStepEnd,
                                                                                             ev.SessionEnd]
        handoffs = [e for e in mine if isinstance(e, ev.Handoff)]
        assert [(e.agent, e.to_agent) for e in handoffs] == [(a.agent, b.agent) for a, b in zip(calls, calls[1:])]
    # Without announcing, a handoff comes with the next call, and only where the agent changes.
    late = [e for e in trace_events("tau_airline", chosen, start=0.0, concurrency=3, announce=False)
            if isinstance(e, ev.Handoff)]
    assert late and all(e.agent != e.to_agent for e in late)
