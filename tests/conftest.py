"""Shared fixtures: one real embedded broker per test session, fresh names per test."""
from __future__ import annotations

import importlib.util
import os
import uuid

import pytest

from streams.broker import EmbeddedBroker
from streams.config import StreamsConfig
from streams.topics import Topics, ensure_topics
from streams.admin import admin_client

# tests/engine needs vLLM, which lives in its own environment (.venv-engine; see the Makefile).
collect_ignore = [] if importlib.util.find_spec("vllm") else ["engine"]

POSTGRES_ADMIN_URL = os.environ.get("AGENTRT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> EmbeddedBroker:
    """The real embedded Kafka-protocol broker (Tansu), on a free port."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker


@pytest.fixture
def config(kafka) -> StreamsConfig:
    """Topics under a fresh prefix, so no test sees another's messages."""
    return StreamsConfig(bootstrap_servers=kafka.bootstrap, partitions=4,
                         topic_prefix=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
def topics(config) -> Topics:
    names = Topics.for_prefix(config.topic_prefix)
    ensure_topics(admin_client(config.bootstrap_servers), config, names)
    return names


@pytest.fixture
def postgres_url():
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"agentrt_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
