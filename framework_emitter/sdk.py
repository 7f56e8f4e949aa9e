"""The SDK a framework calls to publish agent events and tag its LLM requests.

Publishing never blocks or raises into the framework (see streams.producer):
a dead broker costs events, counted, not agent latency.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from streams import events as ev
from streams.producer import EventProducer


def prefix_fingerprint(segment_ids: Iterable[str]) -> str:
    """A stable fingerprint of a prompt prefix given as its segment ids, in order."""
    digest = hashlib.blake2b(digest_size=8)
    for seg in segment_ids:
        digest.update(seg.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class AgentEventEmitter:
    """Publishes one workload's framework events, keyed by agent."""

    def __init__(self, producer: EventProducer, workload: str, clock=time.time) -> None:
        self.producer = producer
        self.workload = workload
        self.clock = clock

    def _publish(self, cls: type[ev.FrameworkEvent], agent: str, at: float | None, **fields: Any) -> bool:
        return self.producer.publish(cls(workload=self.workload, agent=agent, time=at or self.clock(), **fields))

    def session_start(self, session: str, agent: str, at: float | None = None) -> bool:
        return self._publish(ev.SessionStart, agent, at, session=session)

    def session_end(self, session: str, agent: str, status: str | None = None, at: float | None = None) -> bool:
        return self._publish(ev.SessionEnd, agent, at, session=session, status=status)

    def step_start(self, session: str, agent: str, step: int, prefix_fingerprint: str, prefix_tokens: int,
                   prompt_tokens: int | None = None, request: str | None = None, model: str | None = None,
                   previous_agent: str | None = None, at: float | None = None) -> bool:
        """An agent's step begins. Pass ``previous_agent`` (who ran the session's previous step)
        whenever the framework knows it: policies then learn transitions without relying on
        the order events of different agents arrive in."""
        return self._publish(ev.AgentStepStart, agent, at, session=session, step=step, request=request,
                             prefix_fingerprint=prefix_fingerprint, prefix_tokens=prefix_tokens,
                             prompt_tokens=prompt_tokens, model=model, previous_agent=previous_agent)

    def step_end(self, session: str, agent: str, step: int, output_tokens: int | None = None,
                 duration_s: float | None = None, request: str | None = None, at: float | None = None) -> bool:
        return self._publish(ev.AgentStepEnd, agent, at, session=session, step=step, request=request,
                             output_tokens=output_tokens, duration_s=duration_s)

    def handoff(self, session: str, from_agent: str, to_agent: str, step: int | None = None,
                at: float | None = None) -> bool:
        return self._publish(ev.Handoff, from_agent, at, session=session, step=step, to_agent=to_agent)

    def tool_call_start(self, session: str, agent: str, tool_name: str, tool_call_id: str | None = None,
                        step: int | None = None, at: float | None = None) -> bool:
        return self._publish(ev.ToolCallStart, agent, at, session=session, step=step, tool_name=tool_name,
                             tool_call_id=tool_call_id)

    def tool_call_end(self, session: str, agent: str, tool_name: str, tool_call_id: str | None = None,
                      duration_s: float | None = None, step: int | None = None, at: float | None = None) -> bool:
        return self._publish(ev.ToolCallEnd, agent, at, session=session, step=step, tool_name=tool_name,
                             tool_call_id=tool_call_id, duration_s=duration_s)

    def request_tags(self, session: str, agent: str, step: int | None = None) -> dict[str, Any]:
        """What to attach to an LLM request so the engine side knows whose it is.

        For vLLM: pass as ``SamplingParams(extra_args=...)`` offline, or as
        ``vllm_xargs`` to the OpenAI-compatible server. Never ``cache_salt``:
        it would stop agents from sharing cached prefixes.
        """
        tags: dict[str, Any] = {"agentrt.workload": self.workload, "agentrt.agent": agent, "agentrt.session": session}
        if step is not None:
            tags["agentrt.step"] = step
        return tags


def vllm_extra_body(workload: str, agent: str, session: str | None = None) -> dict[str, Any]:
    """The request body extra for vLLM's OpenAI-compatible server that names the agent (never ``cache_salt``)."""
    tags: dict[str, Any] = {"agentrt.workload": workload, "agentrt.agent": agent}
    if session:
        tags["agentrt.session"] = session
    return {"vllm_xargs": tags}


class CallbackSink:
    """A producer stand-in that hands each event to a function (an in-process policy, a test)."""

    def __init__(self, handle: Callable[[ev.Event], None], producer: Any = None) -> None:
        self._handle, self._producer = handle, producer

    def publish(self, event: ev.Event) -> bool:
        self._handle(event)
        return self._producer.publish(event) if self._producer is not None else True


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (the traces' rule: ceil(utf8 bytes / 4) + 4 per message)."""
    return -(-len(text.encode()) // 4) + 4


@dataclass
class _SessionState:
    step: int = -1
    agent: str | None = None
    open_steps: int = 0


class StepTracker:
    """Turns a framework's "an LLM call starts/ends for agent A in session S" into step events.

    Numbers steps per session, sends the previous agent with each step (so
    policies learn transitions whatever order events arrive in), and a handoff
    when the agent changes. Framework adapters call this; thread-safe.
    """

    def __init__(self, emitter: AgentEventEmitter) -> None:
        self.emitter = emitter
        self._sessions: dict[str, _SessionState] = {}
        self._lock = threading.Lock()

    def begin(self, session: str, agent: str, messages: list[str], request: str | None = None,
              model: str | None = None) -> int:
        """An agent's LLM call starts with these messages (rendered text, in order); returns its step."""
        with self._lock:
            state = self._sessions.get(session)
            if state is None:
                state = self._sessions[session] = _SessionState()
                self.emitter.session_start(session, agent)
            previous = state.agent
            state.step += 1
            state.agent = agent
            state.open_steps += 1
            step = state.step
        if previous is not None and previous != agent:
            self.emitter.handoff(session, previous, agent, step=step)
        prefix = messages[:-1] or messages
        self.emitter.step_start(session, agent, step, prefix_fingerprint(_digest(m) for m in prefix),
                                sum(estimate_tokens(m) for m in prefix),
                                prompt_tokens=sum(estimate_tokens(m) for m in messages), request=request, model=model,
                                previous_agent=previous)
        return step

    def end(self, session: str, agent: str, step: int, output_tokens: int | None = None,
            duration_s: float | None = None, request: str | None = None) -> None:
        with self._lock:
            state = self._sessions.get(session)
            if state is not None:
                state.open_steps = max(state.open_steps - 1, 0)
        self.emitter.step_end(session, agent, step, output_tokens=output_tokens, duration_s=duration_s,
                              request=request)

    def finish(self, session: str, status: str | None = "completed") -> None:
        """The session is over (policies drop what only it would reuse)."""
        with self._lock:
            state = self._sessions.pop(session, None)
        if state is not None and state.agent is not None:
            self.emitter.session_end(session, state.agent, status=status)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
