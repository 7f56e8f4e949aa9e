"""Publishing a real trace's agent events through the SDK (no engine involved)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from .sdk import AgentEventEmitter, prefix_fingerprint
from .traces import TraceCall


@dataclass
class PublishedTrace:
    sessions: int = 0
    calls: int = 0
    events: int = 0
    dropped: int = 0


def publish_framework_events(emitter: AgentEventEmitter, sessions: dict[str, list[TraceCall]],
                             start: float | None = None) -> PublishedTrace:
    """Emit each session's lifecycle, steps and handoffs as the framework would have.

    Event times follow the trace's ``t`` offsets from ``start`` where the trace
    has times; otherwise calls are spaced one second apart. The prefix of a
    step is its prompt without the last segment (the new message).
    """
    start = start or time.time()
    out = PublishedTrace()

    def sent(ok: bool) -> None:
        out.events += 1
        out.dropped += not ok

    for session, calls in sessions.items():
        out.sessions += 1
        first = calls[0]
        sent(emitter.session_start(session, first.agent, at=start))
        previous: TraceCall | None = None
        at = start
        for call in calls:
            at = start + (call.t if call.t is not None else float(call.seq))
            if previous is not None and previous.agent != call.agent:
                sent(emitter.handoff(session, previous.agent, call.agent, step=call.seq, at=at))
            prefix = call.segments[:-1] or call.segments
            sent(emitter.step_start(session, call.agent, call.seq, prefix_fingerprint(s for s, _ in prefix),
                                    sum(n for _, n in prefix), prompt_tokens=call.prompt_tokens,
                                    previous_agent=previous.agent if previous else None, at=at))
            sent(emitter.step_end(session, call.agent, call.seq, output_tokens=call.output_tokens, at=at + 0.5))
            previous = call
            out.calls += 1
        sent(emitter.session_end(session, calls[-1].agent, status="completed", at=at + 1.0))
    return out
