"""The SDK a framework calls to publish agent events and tag its LLM requests.

Publishing never blocks or raises into the framework (see streams.producer):
a dead broker costs events, counted, not agent latency.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable

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
