"""The shared contract: event schemas, agent keys, topics, serdes, broker lifecycle."""
from .config import StreamsConfig, bootstrap_servers
from .events import (SCHEMA_VERSION, AgentStepEnd, AgentStepStart, Decision, EngineEvent, Event,
                     EventValidationError, EvictionScore, FrameworkEvent, Handoff, KvAllBlocksCleared,
                     KvBlocksRemoved, KvBlocksStored, Pin, Prefetch, RequestFinished, RequestFirstToken,
                     RequestQueued, RequestScheduled, SessionEnd, SessionStart, ToolCallEnd, ToolCallStart, Unpin,
                     from_wire, validate)
from .keys import decode_key, encode_key, partition_for
from .serde import decode, encode
from .topics import Topics, ensure_topics

__all__ = [
    "SCHEMA_VERSION", "AgentStepEnd", "AgentStepStart", "Decision", "EngineEvent", "Event", "EventValidationError",
    "EvictionScore", "FrameworkEvent", "Handoff", "KvAllBlocksCleared", "KvBlocksRemoved", "KvBlocksStored", "Pin",
    "Prefetch", "RequestFinished", "RequestFirstToken", "RequestQueued", "RequestScheduled", "SessionEnd",
    "SessionStart", "StreamsConfig", "ToolCallEnd", "ToolCallStart", "Topics", "Unpin", "bootstrap_servers",
    "decode", "decode_key", "encode", "encode_key", "ensure_topics", "from_wire", "partition_for", "validate",
]
