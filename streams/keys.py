"""Agent identity as the Kafka message key, and the partition it maps to.

The key is the compact JSON array ``["<workload>","<agent>"]``: readable in any
Kafka tool, unambiguous whatever characters the names hold. Every producer of
ours partitions with Kafka's default murmur2 partitioner (the Java client's,
aiokafka's and faust's), so one key lands on the same partition number on
every topic of the same partition count, and a stream worker can join the
framework and engine topics by agent.
"""
from __future__ import annotations

import json


class KeyError_(ValueError):
    """A message key that is not an agent key."""


def encode_key(workload: str, agent: str) -> bytes:
    return json.dumps([workload, agent], ensure_ascii=False, separators=(",", ":")).encode()


def decode_key(raw: bytes | None) -> tuple[str, str]:
    if raw is None:
        raise KeyError_("message has no key; expected [workload, agent]")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyError_(f"key is not JSON: {exc}") from None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise KeyError_(f"key must be a JSON array [workload, agent], got {raw[:80]!r}")
    return value[0], value[1]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (as in the Java client's ``Utils.murmur2``), as a signed 32-bit int."""
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    length4 = length // 4
    for i in range(length4):
        i4 = i * 4
        k = (data[i4] & 0xFF) + ((data[i4 + 1] & 0xFF) << 8) + ((data[i4 + 2] & 0xFF) << 16) + ((data[i4 + 3] & 0xFF) << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    extra = length % 4
    index = length & ~3
    if extra == 3:
        h ^= (data[index + 2] & 0xFF) << 16
    if extra >= 2:
        h ^= (data[index + 1] & 0xFF) << 8
    if extra >= 1:
        h ^= data[index] & 0xFF
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, num_partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a non-null key."""
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions
