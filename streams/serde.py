"""Events to and from Kafka message bytes."""
from __future__ import annotations

import json
from typing import Any

from .events import Event, EventValidationError, from_wire
from .keys import KeyError_, decode_key, encode_key

CONTENT_TYPE = "application/json"


def encode_value(event: Event) -> bytes:
    return json.dumps(event.to_wire(), ensure_ascii=False, separators=(",", ":")).encode()


def encode(event: Event) -> tuple[bytes, bytes]:
    """(key, value) bytes for one event."""
    return encode_key(event.workload, event.agent), encode_value(event)


def decode(key: bytes | None, value: bytes | None) -> Event:
    """Decode and validate one message; the key must match the event's identity.

    Raises :class:`EventValidationError` with a precise reason.
    """
    if value is None:
        raise EventValidationError("message has no value")
    try:
        record: Any = json.loads(value)
    except UnicodeDecodeError as exc:
        raise EventValidationError(f"value is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise EventValidationError(f"value is not JSON: {exc}") from None
    event = from_wire(record)
    try:
        workload, agent = decode_key(key)
    except KeyError_ as exc:
        raise EventValidationError(str(exc)) from None
    if (workload, agent) != (event.workload, event.agent):
        raise EventValidationError(
            f"key {[workload, agent]} does not match the event's identity {[event.workload, event.agent]}"
        )
    return event
