"""Framework adapters driven by the real frameworks (no LLM: their own fake models stand in for one)."""
from __future__ import annotations

import asyncio

import pytest

from framework_emitter.sdk import AgentEventEmitter, CallbackSink, vllm_extra_body
from policy_workers.cachesage import CacheSage
from streams import events as ev


def _recorder():
    events: list[ev.Event] = []
    return events, AgentEventEmitter(CallbackSink(events.append), workload="w")


def _steps(events):
    return [(e.agent, e.step, e.previous_agent) for e in events if isinstance(e, ev.AgentStepStart)]


def test_langgraph_nodes_become_agents_and_tools_become_tool_calls():
    lc = pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.tools import tool

    from framework_emitter.adapters.langchain import AgentRuntimeCallbackHandler

    events, emitter = _recorder()
    handler = AgentRuntimeCallbackHandler(emitter)
    llm = FakeListChatModel(responses=["plan", "code", "plan again"])

    @tool
    def run_tests(path: str) -> str:
        """Run the test suite."""
        return "ok"

    # What LangGraph passes down: the node in metadata, the thread in the config.
    for node in ("planner", "coder", "planner"):
        config = {"callbacks": [handler], "metadata": {"langgraph_node": node, "thread_id": "t1"}}
        llm.invoke(f"you are the {node}", config=config)
        if node == "coder":
            run_tests.invoke({"path": "tests/"}, config=config)
    handler.end_session("t1")

    assert _steps(events) == [("planner", 0, None), ("coder", 1, "planner"), ("planner", 2, "coder")]
    assert [type(e).__name__ for e in events].count("Handoff") == 2
    tool_events = [e for e in events if isinstance(e, (ev.ToolCallStart, ev.ToolCallEnd))]
    assert [(type(e).__name__, e.agent, e.tool_name) for e in tool_events] == [
        ("ToolCallStart", "coder", "run_tests"), ("ToolCallEnd", "coder", "run_tests")]
    ends = [e for e in events if isinstance(e, ev.AgentStepEnd)]
    assert [e.step for e in ends] == [0, 1, 2] and all(e.session == "t1" for e in events)
    assert isinstance(events[0], ev.SessionStart) and isinstance(events[-1], ev.SessionEnd)
    for event in events:
        ev.validate(event)
    # A policy consumes them as they are.
    sage = CacheSage()
    for event in events:
        sage.observe(event)
    assert sage.workload("w").model.row("planner")[sage.workload("w").model.index["coder"]] > 0.5


def test_openai_agents_run_hooks_publish_steps_tools_and_handoffs():
    pytest.importorskip("agents")
    from agents import Agent, ModelResponse, Runner, Usage, function_tool, set_tracing_disabled
    from agents.models.interface import Model
    from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

    from framework_emitter.adapters.openai_agents import AgentRuntimeHooks

    set_tracing_disabled(True)

    def message(text: str) -> ResponseOutputMessage:
        return ResponseOutputMessage(id="m", type="message", role="assistant", status="completed",
                                     content=[ResponseOutputText(type="output_text", text=text, annotations=[])])

    def call(name: str, arguments: str = "{}") -> ResponseFunctionToolCall:
        return ResponseFunctionToolCall(id="c", call_id=f"call-{name}", type="function_call", name=name,
                                        arguments=arguments)

    class Scripted(Model):
        """The framework's model interface, answering from a script instead of an LLM."""

        def __init__(self, script):
            self.script = list(script)

        async def get_response(self, *args, **kwargs):
            return ModelResponse(output=[self.script.pop(0)], usage=Usage(requests=1, output_tokens=7),
                                 response_id=None)

        def stream_response(self, *args, **kwargs):
            raise NotImplementedError

    @function_tool
    def lookup_order(order_id: str) -> str:
        """Find an order."""
        return "shipped"

    support = Agent(name="support", instructions="help", tools=[lookup_order],
                    model=Scripted([call("lookup_order", '{"order_id": "7"}'), message("it shipped")]))
    triage = Agent(name="triage", instructions="route", handoffs=[support],
                   model=Scripted([call("transfer_to_support")]))
    events, emitter = _recorder()
    hooks = AgentRuntimeHooks(emitter, session="conv-1")
    result = asyncio.run(Runner.run(triage, "where is my order?", hooks=hooks))
    hooks.end_session()

    assert result.final_output == "it shipped"
    assert _steps(events) == [("triage", 0, None), ("support", 1, "triage"), ("support", 2, "support")]
    handoffs = [(e.agent, e.to_agent) for e in events if isinstance(e, ev.Handoff)]
    assert ("triage", "support") in handoffs
    assert [(type(e).__name__, e.tool_name) for e in events if isinstance(e, (ev.ToolCallStart, ev.ToolCallEnd))] \
        == [("ToolCallStart", "lookup_order"), ("ToolCallEnd", "lookup_order")]
    assert all(e.output_tokens == 7 for e in events if isinstance(e, ev.AgentStepEnd))
    assert isinstance(events[-1], ev.SessionEnd) and all(e.session == "conv-1" for e in events)
    for event in events:
        ev.validate(event)


def test_requests_name_their_agent_for_the_engine_never_through_cache_salt():
    body = vllm_extra_body("w", "planner", "s1")
    assert body == {"vllm_xargs": {"agentrt.workload": "w", "agentrt.agent": "planner", "agentrt.session": "s1"}}
    assert "cache_salt" not in body
