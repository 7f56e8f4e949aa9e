"""CacheSage on the step clock (policy_workers.work_clock), tested directly (no Kafka, no engine)."""
from __future__ import annotations

import dataclasses

import pytest

from evaluation.simulator import distinct_blocks, run_cachesage
from framework_emitter.traces import read_trace, sessions
from framework_emitter.replayer import interleave
from policy_workers.cachesage import CacheSage
from policy_workers.work_clock import StepClock, WallClock, make_clock
from streams import events as ev


def _step(sage: CacheSage, session: str, agent: str, step: int, wall: float, blocks: tuple[str, ...] = ()) -> None:
    sage.observe(ev.AgentStepStart(workload="w", agent=agent, time=wall, session=session, step=step,
                                   prefix_fingerprint="f", prefix_tokens=32 * len(blocks)))
    if blocks:
        sage.observe(ev.KvBlocksStored(workload="w", agent=agent, time=wall + 0.1, session=session,
                                       request=f"{session}-{step}", block_hashes=blocks, block_size=32))
    sage.observe(ev.AgentStepEnd(workload="w", agent=agent, time=wall + 0.5, session=session, step=step,
                                 duration_s=0.5))


def test_events_are_timed_by_their_place_in_the_workloads_steps():
    clock = StepClock()
    start = ev.AgentStepStart(workload="w", agent="a", time=50.0, session="s", step=0, prefix_fingerprint="f",
                               prefix_tokens=0)
    assert clock.event_time(start) == 1.0
    clock.step_started()
    stored = ev.KvBlocksStored(workload="w", agent="a", time=50.2, request="r", block_hashes=("x",),
                               block_size=32)
    end = ev.AgentStepEnd(workload="w", agent="a", time=51.0, session="s", step=0)
    assert (clock.event_time(stored), clock.event_time(end), clock.now(51.1)) == (1.25, 1.5, 1.6)
    assert clock.seconds(30.0) == 30.0 * clock.default_step_s  # no rate measured yet
    for k in range(1, 5):
        clock.event_time(dataclasses.replace(start, time=50.0 + 2.0 * k, step=k))
        clock.step_started()
    assert clock.steps == 5 and clock.seconds(30.0) == pytest.approx(60.0)  # 2 s per step
    assert WallClock().event_time(end) == 51.0 and WallClock().seconds(30.0) == 30.0
    with pytest.raises(ValueError, match="sundial"):
        make_clock("sundial")
    with pytest.raises(ValueError, match="sundial"):
        CacheSage(clock="sundial")


def test_without_the_frameworks_step_starts_a_requests_first_store_starts_a_step():
    clock = StepClock()
    for k in range(3):
        first = ev.KvBlocksStored(workload="w", agent="a", session="s", time=10.0 + k, request=f"r{k}",
                                  block_hashes=("x", "y"), block_size=32)
        assert clock.event_time(first) == k + 1.25
        more = dataclasses.replace(first, block_hashes=("z",), start_index=2)  # the same request's output
        assert clock.event_time(more) == k + 1.25
    fetched = dataclasses.replace(first, request="prefetch", prefetch=True)  # the policy's own: no step
    assert clock.event_time(fetched) == 3.25 and clock.seconds(2.0) == pytest.approx(2.0)  # 1 s per step

    framed = StepClock()  # once the framework's step starts come, they alone count
    start = ev.AgentStepStart(workload="w", agent="a", time=1.0, session="s", step=0, prefix_fingerprint="f",
                              prefix_tokens=0)
    framed.event_time(start)
    framed.step_started()
    assert framed.event_time(dataclasses.replace(first, time=1.1)) == 1.25 and framed.steps == 1


def test_a_duplicate_step_start_does_not_advance_the_clock():
    sage = CacheSage()
    _step(sage, "s", "a", 0, 10.0)
    _step(sage, "s", "a", 0, 11.0)  # re-read after a restart
    assert sage.workload("w").clock.steps == 1 and sage.skipped["duplicate_step"] == 1


def _recorded_run(calls, capacity: int) -> list:  # noqa: ANN001
    """What the simulator fed CacheSage and when it asked it to act: ("event", e) and ("act", workload, now)."""
    log: list = []

    class Recording(CacheSage):
        def observe(self, event: ev.Event) -> None:
            log.append(("event", event))
            super().observe(event)

        def act(self, workload: str, now: float) -> list[ev.Decision]:
            log.append(("act", workload, now))
            return super().act(workload, now)

    run_cachesage(calls, capacity, "chatdev", policy=Recording(), generated=8)
    return log


def _decided(log: list, clock: str, warp) -> list[tuple]:  # noqa: ANN001
    """The decisions a fresh CacheSage makes on ``log`` with every time warped, less their wall stamps."""
    sage, out = CacheSage(clock=clock), []
    for entry in log:
        if entry[0] == "event":
            event = entry[1]
            sage.observe(dataclasses.replace(event, time=warp(event.time)))
        else:
            for d in sage.act(entry[1], warp(entry[2])):
                out.append((type(d).__name__, d.agent, d.session, d.block_hashes, getattr(d, "score", None)))
    return out


def test_on_the_step_clock_decisions_do_not_move_with_the_machines_speed():
    """The same run on a machine 3.7 times slower, with every call's time jittered: the step clock makes the
    same decisions, where the wall clock does not."""
    import random

    first = dict(list(sessions(read_trace("chatdev")).items())[:6])
    calls = list(interleave(first, 3))[:120]
    log = _recorded_run(calls, int(distinct_blocks(calls) * 0.1))
    rng = random.Random(7)
    offsets: dict[float, float] = {}

    def slower(t: float) -> float:  # monotone: a call's events keep their order
        whole = float(int(t))
        if whole not in offsets:
            offsets[whole] = rng.uniform(0.0, 2.0)
        return 3.7 * (t + sum(v for k, v in offsets.items() if k < whole))

    on_steps = _decided(log, "steps", lambda t: t)
    assert len(on_steps) > 100
    assert _decided(log, "steps", slower) == on_steps
    assert _decided(log, "wall", slower) != _decided(log, "wall", lambda t: t)


def test_decisions_expire_in_wall_seconds_at_the_measured_rate_and_are_refreshed_while_idle():
    sage = CacheSage()
    for k in range(10):  # one step every 2 s
        _step(sage, f"s{k % 3}", "coder", k // 3, 100.0 + 2.0 * k, blocks=(f"b{k}",))
    now = 120.0
    first = [d for d in sage.act("w", now) if isinstance(d, ev.EvictionScore)]
    assert first and [d.expires_at - now for d in first] == pytest.approx([60.0] * len(first))  # 30 steps of 2 s
    assert sage.act("w", now + 10.0) == []  # no work done, far from expiry: nothing to say
    later = now + 31.0  # no work done, but the decisions are half-way to expiry: the engine must keep them
    refreshed = [d for d in sage.act("w", later) if isinstance(d, ev.EvictionScore)]
    assert {d.block_hashes for d in refreshed} == {d.block_hashes for d in first}
    assert [d.expires_at - later for d in refreshed] == pytest.approx([60.0] * len(refreshed))

    slow = CacheSage()
    for k in range(10):  # one step a minute: 30 steps would be half an hour
        _step(slow, f"s{k % 3}", "coder", k // 3, 100.0 + 60.0 * k, blocks=(f"b{k}",))
    decided = slow.act("w", 700.0)
    assert decided and {d.expires_at - 700.0 for d in decided} == {slow.config.max_wall_ttl_s}


def test_idle_time_expires_no_session_and_other_sessions_work_does():
    sage = CacheSage(session_idle_expiry_s=20.0)
    _step(sage, "waiting", "a", 0, 0.0)
    _step(sage, "waiting", "b", 1, 1.0)  # then a tool that runs for a day
    assert [p.session for p in sage.predict("w", 86_400.0)] == ["waiting"]
    for k in range(25):
        _step(sage, "busy", ("a", "b")[k % 2], k, 86_400.0 + k)
    assert [p.session for p in sage.predict("w", 86_425.0)] == ["busy"]


def test_a_state_keeps_its_clock_and_one_from_another_clock_is_retimed():
    walled = CacheSage(clock="wall")
    for k in range(4):
        _step(walled, "s", ("a", "b")[k % 2], k, 1e9 + 10.0 * k)
    on_steps = CacheSage()
    on_steps.load_state(walled.to_state())
    w = on_steps.workload("w")
    assert w.clock.kind == "steps" and w.clock.steps == 0
    assert not w.timing.arrays.any()  # seconds are not steps
    assert w.sessions["s"].last_seen == w.clock.now(0.0)  # not 1e9 steps ahead: it still expires
    assert w.model.index.keys() == {"a", "b"}  # what was learned about the agents stays

    for k in range(4, 7):
        _step(on_steps, "s", ("a", "b")[k % 2], k, 2e9 + k)
    again = CacheSage()
    again.load_state(on_steps.to_state())
    assert again.workload("w").clock.steps == 3
    assert again.workload("w").timing.arrays.any()
