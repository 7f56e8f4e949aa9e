"""Turning a real trace into the event stream its run would have produced (no engine involved)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from streams import events as ev
from streams.producer import EventProducer

from .prefix_blocks import block_hashes
from .sdk import prefix_fingerprint
from .traces import TraceCall


def interleave(sessions: dict[str, list[TraceCall]], concurrency: int) -> Iterator[TraceCall]:
    """Calls of up to ``concurrency`` sessions at a time, round robin, new sessions in file order."""
    waiting = list(sessions.values())[::-1]
    active: list[list[TraceCall]] = []
    while waiting or active:
        while waiting and len(active) < concurrency:
            active.append(list(waiting.pop()))
        for calls in list(active):
            yield calls.pop(0)
            if not calls:
                active.remove(calls)


def trace_events(workload: str, sessions: dict[str, list[TraceCall]], *, start: float | None = None,
                 concurrency: int = 1, kv_block_size: int | None = None, announce: bool = True) -> Iterator[ev.Event]:
    """The framework events of each call (and, with ``kv_block_size``, the KV blocks an engine reports).

    Per call: session start (first call), agent step start with the previous
    agent and the prefix (the prompt without its last segment) fingerprinted, KV
    blocks stored (every full prompt block, as vLLM's ``kv_cache_report_mode=full``
    reports them), agent step end, then a handoff naming the session's next agent
    (``announce``: a framework routes a step's outcome when the step ends; to the
    same agent when it goes on) or the session end after its last call. Without
    ``announce`` the handoff comes with the next call, and only where the agent
    changes. Times follow the trace's ``t`` from ``start`` (one second a call
    where the trace has no times).
    """
    start = time.time() if start is None else start
    previous: dict[str, TraceCall] = {}
    remaining = {s: len(calls) for s, calls in sessions.items()}
    for call in interleave(sessions, concurrency):
        session = call.session
        at = start + (call.t if call.t is not None else float(call.seq))
        common = dict(workload=workload, agent=call.agent, session=session)
        before = previous.get(session)
        if before is None:
            yield ev.SessionStart(**common, time=at)
        elif before.agent != call.agent and not announce:
            yield ev.Handoff(workload=workload, agent=before.agent, session=session, time=at, step=call.seq,
                             to_agent=call.agent)
        prefix = call.segments[:-1] or call.segments
        yield ev.AgentStepStart(**common, time=at, step=call.seq,
                                prefix_fingerprint=prefix_fingerprint(s for s, _ in prefix),
                                prefix_tokens=sum(n for _, n in prefix), prompt_tokens=call.prompt_tokens,
                                previous_agent=before.agent if before else None)
        if kv_block_size:
            hashes = block_hashes(call.segments, kv_block_size)
            if hashes:
                yield ev.KvBlocksStored(**common, time=at + 0.1, step=call.seq, request=f"{session}-{call.seq}",
                                        block_hashes=tuple(hashes), block_size=kv_block_size)
        yield ev.AgentStepEnd(**common, time=at + 0.5, step=call.seq, output_tokens=call.output_tokens)
        previous[session] = call
        remaining[session] -= 1
        if not remaining[session]:
            yield ev.SessionEnd(**common, time=at + 1.0, status="completed")
        elif announce:
            nxt = sessions[session][-remaining[session]]
            yield ev.Handoff(workload=workload, agent=call.agent, session=session, time=at + 0.5, step=nxt.seq,
                             to_agent=nxt.agent)


@dataclass
class Published:
    events: int = 0
    dropped: int = 0


def publish(producer: EventProducer, events: Iterator[ev.Event]) -> Published:
    out = Published()
    for event in events:
        out.events += 1
        out.dropped += not producer.publish(event)
    return out
