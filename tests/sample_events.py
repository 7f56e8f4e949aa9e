"""One valid instance of every event type, for round-trip tests."""
from __future__ import annotations

import time

from streams import events as ev


def every_event_type(workload: str = "chatdev", agent: str = "Programmer") -> list[ev.Event]:
    now = time.time()
    common = dict(workload=workload, agent=agent, time=now, session="chatdev-c9d7fe2423", step=4, request="req-1")
    decision = dict(policy="cachesage", decision_id="d-1", expires_at=now + 30, block_hashes=("ab12", "cd34"))
    samples = [
        ev.SessionStart(**common),
        ev.SessionEnd(**common, status="completed"),
        ev.AgentStepStart(**common, prefix_fingerprint="f00d", prefix_tokens=2255, prompt_tokens=2505, model="llama",
                           previous_agent="Code Reviewer"),
        ev.AgentStepEnd(**common, output_tokens=4, duration_s=1.5, status="ok"),
        ev.Handoff(**common, to_agent="Code Reviewer"),
        ev.ToolCallStart(**common, tool_name="python", tool_call_id="call-1"),
        ev.ToolCallEnd(**common, tool_name="python", tool_call_id="call-1", duration_s=0.2, status="ok"),
        ev.RequestQueued(**common, prompt_tokens=2505, priority=0),
        ev.RequestScheduled(**common, prompt_tokens=2505, cached_tokens=2240, queue_time_s=0.01),
        ev.RequestFirstToken(**common, ttft_s=0.12),
        ev.RequestFinished(**common, prompt_tokens=2505, cached_tokens=2240, output_tokens=4, queue_time_s=0.01,
                           ttft_s=0.12, e2e_s=0.3, finish_reason="stop"),
        ev.KvBlocksStored(**common, block_hashes=("ab12", "cd34"), block_size=32, parent_block_hash="0f", medium="GPU"),
        ev.KvBlocksStored(**common, block_hashes=("cd34",), block_size=32, start_index=1, prefetch=True),
        ev.KvBlocksRemoved(**common, block_hashes=("ab12",), medium="GPU"),
        ev.KvAllBlocksCleared(**common),
        ev.EvictionScore(**common, **decision, score=0.8),
        ev.Pin(**common, **decision, ttl_s=5.0),
        ev.Unpin(**common, **decision),
        ev.Prefetch(**common, **decision, probability=0.7, expected_at=now + 2, prefix_tokens=64,
                    prefix_token_ids=(1, 2, 3)),
    ]
    assert {type(e).type_name for e in samples} == set(ev.EVENT_TYPES), "a new event type needs a sample here"
    return samples
