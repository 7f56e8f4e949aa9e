"""The event model every side shares, keyed by agent identity.

Every event carries the agent key (workload, agent) plus optional session, step
and request coordinates. On the wire an event is one flat JSON object whose
attribute names follow the OpenTelemetry GenAI semantic conventions where one
exists (``gen_ai.agent.id``, ``gen_ai.conversation.id``, ``gen_ai.usage.*``...)
and the ``agentrt.`` namespace otherwise. ``type`` and ``schema_version`` sit
beside them, as in CloudEvents.

Versioning: ``schema_version`` is ``"MAJOR.MINOR"``. A reader accepts its own
major only; within it, a newer minor may add optional attributes, which an
older reader ignores, while an attribute unknown to a same-or-older minor is an
error (a typo, not an extension).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 2  # 1.1: kv_blocks_stored.start_index; 1.2: kv_blocks_stored.prefetch
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"


class EventValidationError(ValueError):
    """A wire record that is not a valid event; ``reason`` says precisely why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_ID_PREFIX = uuid.uuid4().hex[:16]  # random per process
_ID_COUNTER = itertools.count()


def new_event_id() -> str:
    """Unique event id: a random per-process prefix and a counter (uuid4 per event costs ~30 µs)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


# Python attribute -> wire attribute. OpenTelemetry GenAI names where they exist.
WIRE_NAMES: dict[str, str] = {
    "workload": "gen_ai.workflow.name",
    "agent": "gen_ai.agent.id",
    "session": "gen_ai.conversation.id",
    "step": "agentrt.step",
    "request": "agentrt.request.id",
    "model": "gen_ai.request.model",
    "prefix_fingerprint": "agentrt.prefix.fingerprint",
    "prefix_tokens": "agentrt.prefix.tokens",
    "prompt_tokens": "gen_ai.usage.input_tokens",
    "cached_tokens": "gen_ai.usage.cache_read.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "status": "agentrt.status",
    "to_agent": "agentrt.handoff.to_agent",
    "previous_agent": "agentrt.step.previous_agent",
    "tool_name": "gen_ai.tool.name",
    "tool_call_id": "gen_ai.tool.call.id",
    "duration_s": "agentrt.duration_s",
    "priority": "agentrt.request.priority",
    "queue_time_s": "agentrt.request.queue_time_s",
    "ttft_s": "agentrt.request.ttft_s",
    "e2e_s": "agentrt.request.e2e_s",
    "finish_reason": "agentrt.request.finish_reason",
    "block_hashes": "agentrt.kv.block_hashes",
    "parent_block_hash": "agentrt.kv.parent_block_hash",
    "start_index": "agentrt.kv.start_index",
    "prefetch": "agentrt.kv.prefetch",
    "block_size": "agentrt.kv.block_size",
    "medium": "agentrt.kv.medium",
    "policy": "agentrt.policy.name",
    "decision_id": "agentrt.decision.id",
    "expires_at": "agentrt.decision.expires_at",
    "score": "agentrt.decision.score",
    "ttl_s": "agentrt.decision.ttl_s",
    "probability": "agentrt.decision.probability",
    "expected_at": "agentrt.decision.expected_at",
    "prefix_token_ids": "agentrt.prefix.token_ids",
}
PYTHON_NAMES = {wire: py for py, wire in WIRE_NAMES.items()}

EVENT_TYPES: dict[str, type["Event"]] = {}


def register(cls: type) -> type:
    """Make an event class known to readers by its ``type_name`` (applied above @dataclass)."""
    if not cls.type_name or cls.type_name in EVENT_TYPES:
        raise ValueError(f"event type {cls.type_name!r} is empty or registered twice")
    EVENT_TYPES[cls.type_name] = cls
    return cls


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event: the agent key and where in the run it happened."""

    category: ClassVar[str] = ""
    type_name: ClassVar[str] = ""

    workload: str
    agent: str
    time: float
    session: str | None = None
    step: int | None = None
    request: str | None = None
    event_id: str = field(default_factory=new_event_id)

    @property
    def key(self) -> tuple[str, str]:
        """The partitioning key: agent identity within its workload."""
        return (self.workload, self.agent)

    def to_wire(self) -> dict[str, Any]:
        """The flat, JSON-ready attribute mapping (None-valued attributes left out)."""
        wire: dict[str, Any] = {"type": self.type_name, "schema_version": SCHEMA_VERSION}
        for name in _field_names(type(self)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
            wire[WIRE_NAMES.get(name, name)] = value
        return wire

    @classmethod
    def from_wire(cls, record: Mapping[str, Any]) -> "Event":
        """Validate a decoded wire mapping and build its event (any registered type)."""
        return from_wire(record)


# --- framework events: what the agent framework knows -----------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameworkEvent(Event):
    category: ClassVar[str] = "framework"


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStart(FrameworkEvent):
    type_name: ClassVar[str] = "session_start"


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnd(FrameworkEvent):
    type_name: ClassVar[str] = "session_end"
    status: str | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class AgentStepStart(FrameworkEvent):
    """An agent is about to call the LLM; its prompt prefix is fingerprinted.

    ``previous_agent`` is the agent of the session's previous step: with it a
    consumer learns the transition from this one event, whatever order the
    session's other agents' events (on other partitions) arrive in.
    """

    type_name: ClassVar[str] = "agent_step_start"
    prefix_fingerprint: str
    prefix_tokens: int
    prompt_tokens: int | None = None
    model: str | None = None
    previous_agent: str | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class AgentStepEnd(FrameworkEvent):
    type_name: ClassVar[str] = "agent_step_end"
    output_tokens: int | None = None
    duration_s: float | None = None
    status: str | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Handoff(FrameworkEvent):
    """Control passes from ``agent`` to ``to_agent`` (keyed by the giver)."""

    type_name: ClassVar[str] = "handoff"
    to_agent: str


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallStart(FrameworkEvent):
    type_name: ClassVar[str] = "tool_call_start"
    tool_name: str
    tool_call_id: str | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallEnd(FrameworkEvent):
    type_name: ClassVar[str] = "tool_call_end"
    tool_name: str
    tool_call_id: str | None = None
    duration_s: float | None = None
    status: str | None = None


# --- engine events: what the serving engine sees ----------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineEvent(Event):
    category: ClassVar[str] = "engine"


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestQueued(EngineEvent):
    type_name: ClassVar[str] = "request_queued"
    prompt_tokens: int
    priority: int | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestScheduled(EngineEvent):
    type_name: ClassVar[str] = "request_scheduled"
    prompt_tokens: int
    cached_tokens: int
    queue_time_s: float


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestFirstToken(EngineEvent):
    type_name: ClassVar[str] = "request_first_token"
    ttft_s: float


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestFinished(EngineEvent):
    type_name: ClassVar[str] = "request_finished"
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    queue_time_s: float
    ttft_s: float
    e2e_s: float
    finish_reason: str | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KvBlocksStored(EngineEvent):
    """Blocks became cached (or, on a request's first store, its whole chain: hits included).

    ``agent`` is empty when the engine could not attribute them. ``start_index``
    is the chain position of ``block_hashes[0]`` (0: the chain from its first block).
    ``prefetch``: a policy's prefetch request computed them for ``agent`` (no prompt
    of the agent read them: not a step of the agent's).
    """

    type_name: ClassVar[str] = "kv_blocks_stored"
    block_hashes: tuple[str, ...]
    block_size: int
    parent_block_hash: str | None = None
    medium: str | None = None
    start_index: int = 0
    prefetch: bool | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KvBlocksRemoved(EngineEvent):
    type_name: ClassVar[str] = "kv_blocks_removed"
    block_hashes: tuple[str, ...]
    medium: str | None = None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KvAllBlocksCleared(EngineEvent):
    """The engine dropped its whole prefix cache (e.g. reset_prefix_cache)."""

    type_name: ClassVar[str] = "kv_all_blocks_cleared"
    medium: str | None = None


# --- decision events: what a policy asks the engine to do --------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision(Event):
    """An act decision. Idempotent by ``decision_id``; ignored after ``expires_at``.

    ``block_hashes`` narrows a decision to those cached blocks; empty means every
    cached block the engine attributes to the agent.
    """

    category: ClassVar[str] = "decision"
    policy: str
    decision_id: str
    expires_at: float
    block_hashes: tuple[str, ...] = ()


# The bins an engine orders free cached blocks by (``EvictionScore``). Finer bins rank by score more exactly
# and leave less to LRU within a bin; they cost more decisions (a score is re-sent when its bin changes).
# 64 against 20: the simulator's mean share of the LRU->Belady gap rose on four workloads of five
# (BENCHMARKS.md, "Session 23").
SCORE_LEVELS = 64


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class EvictionScore(Decision):
    """Among free cached blocks, lower scores are evicted first (LRU breaks ties).

    An engine orders blocks by ``SCORE_LEVELS`` equal bins of the score, so a
    policy gains nothing from a finer score and should re-send a block's
    score only when its bin changes."""

    type_name: ClassVar[str] = "eviction_score"
    score: float


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Pin(Decision):
    """Keep the blocks unevictable for ``ttl_s`` seconds (subject to the pin cap)."""

    type_name: ClassVar[str] = "pin"
    ttl_s: float


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Unpin(Decision):
    type_name: ClassVar[str] = "unpin"


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Prefetch(Decision):
    """Bring the agent's prefix into the cache before its predicted call."""

    type_name: ClassVar[str] = "prefetch"
    probability: float
    expected_at: float | None = None
    prefix_tokens: int | None = None
    prefix_token_ids: tuple[int, ...] | None = None


# --- validation ---------------------------------------------------------------

_COMMON_REQUIRED_WIRE = ("type", "schema_version")


_SPECS: dict[type, tuple[tuple[str, ...], dict[str, tuple[Any, bool]]]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    return _field_specs(cls)[0]


def _field_specs(cls: type) -> tuple[tuple[str, ...], dict[str, tuple[Any, bool]]]:
    """(field names in order, name -> (annotation, required)); computed once per class."""
    cached = _SPECS.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    names = []
    specs: dict[str, tuple[Any, bool]] = {}
    for f in dataclasses.fields(cls):
        names.append(f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        specs[f.name] = (hints[f.name], required)
    _SPECS[cls] = (tuple(names), specs)
    return _SPECS[cls]


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise with a precise reason."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check(value, options[0], where)
    if annotation is str:
        if not isinstance(value, str):
            raise EventValidationError(f"attribute {where!r}: expected a string, got {_describe(value)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise EventValidationError(f"attribute {where!r}: expected true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EventValidationError(f"attribute {where!r}: expected an integer, got {_describe(value)}")
        if value < 0:
            raise EventValidationError(f"attribute {where!r}: must be >= 0, got {value}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EventValidationError(f"attribute {where!r}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise EventValidationError(f"attribute {where!r}: must be finite, got {value}")
        return float(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise EventValidationError(f"attribute {where!r}: expected a list, got {_describe(value)}")
        item_type = typing.get_args(annotation)[0]
        if item_type is str and all(type(item) is str for item in value):  # fast path: KV events hold many hashes
            return tuple(value)
        return tuple(_check(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
    raise TypeError(f"unsupported annotation {annotation!r}")  # a bug in this module, not bad input


def _check_semantics(event: Event) -> None:
    if not event.workload:
        raise EventValidationError(f"attribute {WIRE_NAMES['workload']!r}: must not be empty")
    if not event.agent and not isinstance(event, (KvBlocksStored, KvBlocksRemoved, KvAllBlocksCleared)):
        raise EventValidationError(f"attribute {WIRE_NAMES['agent']!r}: must not be empty")
    if event.time <= 0:
        raise EventValidationError(f"attribute 'time': must be a positive unix time, got {event.time}")
    if isinstance(event, Pin) and event.ttl_s <= 0:
        raise EventValidationError(f"attribute {WIRE_NAMES['ttl_s']!r}: must be > 0, got {event.ttl_s}")
    if isinstance(event, Prefetch) and not 0.0 <= event.probability <= 1.0:
        raise EventValidationError(
            f"attribute {WIRE_NAMES['probability']!r}: must be within [0, 1], got {event.probability}"
        )
    if isinstance(event, KvBlocksStored) and event.block_size <= 0:
        raise EventValidationError(f"attribute {WIRE_NAMES['block_size']!r}: must be > 0")


def _parse_version(value: Any) -> tuple[int, int]:
    if not isinstance(value, str):
        raise EventValidationError(f"attribute 'schema_version': expected 'MAJOR.MINOR', got {_describe(value)}")
    major, _, minor = value.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise EventValidationError(f"attribute 'schema_version': expected 'MAJOR.MINOR', got {value!r}")
    return int(major), int(minor)


def from_wire(record: Mapping[str, Any]) -> Event:
    """Validate one decoded wire record and return its event.

    Raises :class:`EventValidationError` naming the first offending attribute.
    """
    if not isinstance(record, Mapping):
        raise EventValidationError(f"expected a JSON object, got {type(record).__name__}")
    for name in _COMMON_REQUIRED_WIRE:
        if name not in record:
            raise EventValidationError(f"missing attribute {name!r}")
    major, minor = _parse_version(record["schema_version"])
    if major != SCHEMA_MAJOR:
        raise EventValidationError(
            f"unsupported schema_version {record['schema_version']!r}: this reader understands major {SCHEMA_MAJOR}"
        )
    type_name = record["type"]
    cls = EVENT_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise EventValidationError(f"unknown event type {_describe(type_name)}")
    names, specs = _field_specs(cls)
    kwargs: dict[str, Any] = {}
    for wire_name, value in record.items():
        if wire_name in _COMMON_REQUIRED_WIRE:
            continue
        py_name = PYTHON_NAMES.get(wire_name, wire_name)
        spec = specs.get(py_name)
        if spec is None:
            if minor > SCHEMA_MINOR:
                continue  # an attribute added by a newer minor version: safe to ignore
            raise EventValidationError(f"unknown attribute {wire_name!r} for event type {type_name!r}")
        kwargs[py_name] = _check(value, spec[0], wire_name)
    for py_name in names:
        annotation, required = specs[py_name]
        if required and kwargs.get(py_name) is None:
            raise EventValidationError(f"missing attribute {WIRE_NAMES.get(py_name, py_name)!r} for {type_name!r}")
    event = cls(**kwargs)
    _check_semantics(event)
    return event


def validate(event: Event) -> Event:
    """Check an event built in Python the way a reader would check it off the wire."""
    return from_wire(event.to_wire())


