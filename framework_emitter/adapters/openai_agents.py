"""OpenAI Agents SDK: run hooks that publish agent events (``pip install agentrt[openai-agents]``).

    hooks = AgentRuntimeHooks(AgentEventEmitter(producer, workload="support"), session="conv-42")
    await Runner.run(triage, "my order is late", hooks=hooks)

No framework code changes: every model call of an agent becomes an agent step
(the agent's ``name`` is its identity), handoffs and tool calls are published
as they happen, and the session is the one given here (one hooks object per
conversation, or ``session_of(context)`` to read it from the run context).

The engine learns whose request it serves from the request itself: give each
agent ``model_settings=ModelSettings(extra_body=vllm_extra_body(...))`` (vLLM's
OpenAI-compatible server behind ``OpenAIChatCompletionsModel``).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from agents import Agent, RunContextWrapper, RunHooks

from ..sdk import AgentEventEmitter, StepTracker, vllm_extra_body

__all__ = ["AgentRuntimeHooks", "vllm_extra_body"]


def _text(item: Any) -> str:
    if isinstance(item, dict):
        return f"{item.get('role', item.get('type', ''))}\0{item.get('content', item.get('output', ''))!s}"
    return repr(item)


class AgentRuntimeHooks(RunHooks):
    """Publishes agent steps, handoffs and tool calls of an Agents SDK run."""

    def __init__(self, emitter: AgentEventEmitter, session: str = "default",
                 session_of: Callable[[RunContextWrapper], str | None] | None = None) -> None:
        self.tracker = StepTracker(emitter)
        self.session, self.session_of = session, session_of
        self._open: dict[tuple[str, str], tuple[int, float]] = {}  # (session, agent) -> step, started

    def _session(self, context: RunContextWrapper) -> str:
        found = self.session_of(context) if self.session_of else None
        return found or self.session

    async def on_llm_start(self, context: RunContextWrapper, agent: Agent, system_prompt: str | None,
                           input_items: list) -> None:
        session = self._session(context)
        messages = ([f"system\0{system_prompt}"] if system_prompt else []) + [_text(i) for i in input_items]
        step = self.tracker.begin(session, agent.name, messages, model=str(agent.model) if agent.model else None)
        self._open[(session, agent.name)] = (step, time.monotonic())

    async def on_llm_end(self, context: RunContextWrapper, agent: Agent, response: Any) -> None:
        session = self._session(context)
        found = self._open.pop((session, agent.name), None)
        if found is None:
            return
        step, started = found
        usage = getattr(response, "usage", None)
        self.tracker.end(session, agent.name, step, output_tokens=getattr(usage, "output_tokens", None) or None,
                         duration_s=time.monotonic() - started, request=getattr(response, "response_id", None))

    async def on_handoff(self, context: RunContextWrapper, from_agent: Agent, to_agent: Agent) -> None:
        self.tracker.emitter.handoff(self._session(context), from_agent.name, to_agent.name)

    async def on_tool_start(self, context: RunContextWrapper, agent: Agent, tool: Any) -> None:
        self.tracker.emitter.tool_call_start(self._session(context), agent.name, getattr(tool, "name", "tool"),
                                             tool_call_id=getattr(context, "tool_call_id", None))

    async def on_tool_end(self, context: RunContextWrapper, agent: Agent, tool: Any, result: object) -> None:
        self.tracker.emitter.tool_call_end(self._session(context), agent.name, getattr(tool, "name", "tool"),
                                           tool_call_id=getattr(context, "tool_call_id", None))

    def end_session(self, session: str | None = None, status: str | None = "completed") -> None:
        """Call when the conversation is over."""
        self.tracker.finish(session or self.session, status)
