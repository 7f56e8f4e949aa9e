"""LangChain / LangGraph: a callback handler that publishes agent events (``pip install agentrt[langchain]``).

    handler = AgentRuntimeCallbackHandler(AgentEventEmitter(producer, workload="support"))
    graph.invoke(inputs, config={"callbacks": [handler], "configurable": {"thread_id": "t-42"}})

No framework code changes: LangGraph puts the running node in the callback
metadata (``langgraph_node``), which becomes the agent; the conversation is
the ``thread_id`` (or ``session_id``, or the handler's ``default_session``).
``metadata={"agentrt.agent": ..., "agentrt.session": ...}`` overrides both.
Chat model calls become agent steps, tools become tool calls.

The engine learns whose request it serves from the request itself: bind
``vllm_extra_body(...)`` to the chat model a node uses (``ChatOpenAI`` pointed
at vLLM's OpenAI-compatible server), e.g.
``llm.bind(extra_body=vllm_extra_body("support", "planner", session))``.
"""
from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from ..sdk import AgentEventEmitter, StepTracker, vllm_extra_body

__all__ = ["AgentRuntimeCallbackHandler", "vllm_extra_body"]


def _text(message: BaseMessage) -> str:
    content = message.content if isinstance(message.content, str) else repr(message.content)
    return f"{message.type}\0{getattr(message, 'name', '') or ''}\0{content}"


class AgentRuntimeCallbackHandler(BaseCallbackHandler):
    """Publishes agent steps, handoffs and tool calls from LangChain / LangGraph callbacks."""

    raise_error = False  # a publishing problem must never break the user's chain

    def __init__(self, emitter: AgentEventEmitter, default_session: str = "default",
                 default_agent: str = "agent") -> None:
        self.tracker = StepTracker(emitter)
        self.default_session, self.default_agent = default_session, default_agent
        self._runs: dict[UUID, tuple[str, str, int, float]] = {}  # run -> session, agent, step, started
        self._tools: dict[UUID, tuple[str, str, str, float]] = {}  # run -> session, agent, tool, started

    def _identity(self, metadata: dict[str, Any] | None, tags: list[str] | None) -> tuple[str, str]:
        metadata = metadata or {}
        agent = (metadata.get("agentrt.agent") or metadata.get("langgraph_node")
                 or next((t.split(":", 1)[1] for t in tags or [] if t.startswith("agent:")), None)
                 or self.default_agent)
        session = (metadata.get("agentrt.session") or metadata.get("thread_id") or metadata.get("session_id")
                   or self.default_session)
        return str(agent), str(session)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        agent, session = self._identity(metadata, tags)
        texts = [_text(m) for m in (messages[0] if messages else [])]
        model = (metadata or {}).get("ls_model_name")
        step = self.tracker.begin(session, agent, texts, request=str(run_id), model=model)
        self._runs[run_id] = (session, agent, step, time.monotonic())

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        agent, session = self._identity(metadata, tags)
        step = self.tracker.begin(session, agent, list(prompts[:1]), request=str(run_id))
        self._runs[run_id] = (session, agent, step, time.monotonic())

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None,
                   **kwargs: Any) -> None:
        found = self._runs.pop(run_id, None)
        if found is None:
            return
        session, agent, step, started = found
        usage = (response.llm_output or {}).get("token_usage") or {}
        output_tokens = usage.get("completion_tokens")
        if output_tokens is None:
            metadata = getattr(getattr(response.generations[0][0], "message", None), "usage_metadata", None) \
                if response.generations and response.generations[0] else None
            output_tokens = metadata.get("output_tokens") if metadata else None
        self.tracker.end(session, agent, step, output_tokens=output_tokens,
                         duration_s=time.monotonic() - started, request=str(run_id))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        found = self._runs.pop(run_id, None)
        if found is not None:
            session, agent, step, started = found
            self.tracker.end(session, agent, step, duration_s=time.monotonic() - started, request=str(run_id))

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, tags: list[str] | None = None,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        agent, session = self._identity(metadata, tags)
        tool = str((serialized or {}).get("name") or kwargs.get("name") or "tool")
        self._tools[run_id] = (session, agent, tool, time.monotonic())
        self.tracker.emitter.tool_call_start(session, agent, tool, tool_call_id=str(run_id))

    def on_tool_end(self, output: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        found = self._tools.pop(run_id, None)
        if found is not None:
            session, agent, tool, started = found
            self.tracker.emitter.tool_call_end(session, agent, tool, tool_call_id=str(run_id),
                                               duration_s=time.monotonic() - started)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.on_tool_end(None, run_id=run_id)

    def end_session(self, session: str, status: str | None = "completed") -> None:
        """Call when a conversation is over (LangChain has no such callback)."""
        self.tracker.finish(session, status)
