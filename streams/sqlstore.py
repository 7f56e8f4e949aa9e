"""SQL tables for offline analysis of replayed topics (any SQLAlchemy URL).

Rows are keyed by (topic, partition, offset), so replaying the same range
again inserts nothing twice.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

from sqlalchemy import (BigInteger, Column, Engine, Float, Integer, LargeBinary, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, func, select)
from sqlalchemy.dialects import postgresql, sqlite

DEFAULT_URL = "sqlite:///agentrt-events.db"

metadata = MetaData()

events_table = Table(
    "agentrt_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("kafka_timestamp_ms", BigInteger),
    Column("type", String(64), nullable=False, index=True),
    Column("schema_version", String(16), nullable=False),
    Column("workload", String(255), nullable=False, index=True),
    Column("agent", String(255), nullable=False, index=True),
    Column("session", String(255), index=True),
    Column("step", Integer),
    Column("request", String(255)),
    Column("event_time", Float, nullable=False),
    Column("event_id", String(64)),
    Column("attributes", Text, nullable=False),  # the whole wire record, JSON
    UniqueConstraint("topic", "partition", "offset", name="uq_agentrt_events_position"),
)

dead_letters_table = Table(
    "agentrt_dead_letters", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("key", LargeBinary),
    Column("value", LargeBinary),
    UniqueConstraint("topic", "partition", "offset", name="uq_agentrt_dead_letters_position"),
)


def connect(url: str = DEFAULT_URL) -> Engine:
    """An engine with the tables created."""
    engine = create_engine(url, future=True)
    metadata.create_all(engine)
    return engine


def _insert_ignoring_duplicates(engine: Engine, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    dialect = engine.dialect.name
    with engine.begin() as conn:
        if dialect == "sqlite":
            conn.execute(sqlite.insert(table).on_conflict_do_nothing(), rows)
        elif dialect == "postgresql":
            conn.execute(postgresql.insert(table).on_conflict_do_nothing(), rows)
        else:  # portable path: skip positions already stored
            positions = {(r["topic"], r["partition"], r["offset"]) for r in rows}
            stored = set(conn.execute(select(table.c.topic, table.c.partition, table.c.offset)))
            fresh = [r for r in rows if (r["topic"], r["partition"], r["offset"]) not in stored & positions]
            if fresh:
                conn.execute(table.insert(), fresh)


def event_row(topic: str, partition: int, offset: int, timestamp_ms: int | None, wire: dict[str, Any]) -> dict[str, Any]:
    """A table row from a validated wire record."""
    return {
        "topic": topic, "partition": partition, "offset": offset, "kafka_timestamp_ms": timestamp_ms,
        "type": wire["type"], "schema_version": wire["schema_version"],
        "workload": wire["gen_ai.workflow.name"], "agent": wire["gen_ai.agent.id"],
        "session": wire.get("gen_ai.conversation.id"), "step": wire.get("agentrt.step"),
        "request": wire.get("agentrt.request.id"), "event_time": wire["time"], "event_id": wire.get("event_id"),
        "attributes": json.dumps(wire, separators=(",", ":")),
    }


def store_events(engine: Engine, rows: Sequence[dict[str, Any]]) -> None:
    _insert_ignoring_duplicates(engine, events_table, rows)


def store_dead_letters(engine: Engine, rows: Sequence[dict[str, Any]]) -> None:
    _insert_ignoring_duplicates(engine, dead_letters_table, rows)


def summary(engine: Engine, topics: Iterable[str] | None = None) -> list[tuple[str, str, str, int]]:
    """(workload, agent, type, count) for the stored events, most frequent first."""
    t = events_table
    query = select(t.c.workload, t.c.agent, t.c.type, func.count().label("n")).group_by(t.c.workload, t.c.agent, t.c.type)
    if topics:
        query = query.where(t.c.topic.in_(list(topics)))
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(func.count().desc(), t.c.workload, t.c.agent, t.c.type)).all()
    return [(w, a, ty, int(n)) for w, a, ty, n in rows]
