"""One real vLLM engine (CPU, tiny random Llama, small KV capacity) per test session, with its own broker."""
from __future__ import annotations

import os
import time
import uuid

import pytest

from streams.admin import admin_client
from streams.broker import EmbeddedBroker, free_port
from streams.config import StreamsConfig
from streams.topics import Topics, ensure_topics

NUM_BLOCKS = 40  # 39 usable (vLLM keeps a null block): small enough to create pressure
BLOCK_SIZE = 32
PREFIX_TOKENS = 256  # 8 blocks
SUFFIX_TOKENS = 20


def running_broker(tmp_path_factory, name: str):
    """An embedded broker for a fixture to yield from (stopped when the fixture ends)."""
    broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp(name) / "tansu.log").start()
    try:
        yield broker
    finally:
        broker.stop()


def config_with_topics(broker: EmbeddedBroker, prefix: str) -> StreamsConfig:
    """Streams config on ``broker`` under a fresh topic prefix, its topics created."""
    config = StreamsConfig(broker.bootstrap, partitions=4, topic_prefix=f"{prefix}{uuid.uuid4().hex[:6]}")
    ensure_topics(admin_client(config.bootstrap_servers), config, Topics.for_prefix(config.topic_prefix))
    return config


@pytest.fixture(scope="session")
def engine_broker(tmp_path_factory):
    yield from running_broker(tmp_path_factory, "engine-broker")


@pytest.fixture(scope="session")
def engine_config(engine_broker) -> StreamsConfig:
    return config_with_topics(engine_broker, "eng")


@pytest.fixture(scope="session")
def engine(engine_config, tmp_path_factory):
    """(LLM, scheduler): the offline engine running in this process with AgentRuntimeScheduler."""
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "AGENTRT_BOOTSTRAP_SERVERS": engine_config.bootstrap_servers,
                       "AGENTRT_TOPIC_PREFIX": engine_config.topic_prefix,
                       "AGENTRT_PARTITIONS": str(engine_config.partitions),
                       "AGENTRT_METRICS_PORT": str(free_port())})
    from vllm import LLM

    from engine_emitter.tiny_model import make_random_llama

    model = make_random_llama(tmp_path_factory.mktemp("model"), "tiny")
    llm = LLM(model=str(model), skip_tokenizer_init=True, block_size=BLOCK_SIZE,
              num_gpu_blocks_override=NUM_BLOCKS, enable_prefix_caching=True, max_model_len=1024, max_num_seqs=4,
              dtype="bfloat16", seed=0, scheduler_cls="engine_emitter.scheduler.AgentRuntimeScheduler")
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    assert scheduler.feed is not None and scheduler.feed.ready.wait(30), "decision feed never attached"
    yield llm, scheduler


@pytest.fixture(scope="session")
def stock_engine(engine):
    """A second engine in the process with vLLM's own scheduler, the same model and capacity (a few seconds:
    the first engine paid the one-off start-up)."""
    from vllm import LLM

    llm, _ = engine
    return LLM(model=llm.llm_engine.model_config.model, skip_tokenizer_init=True, block_size=BLOCK_SIZE,
               num_gpu_blocks_override=NUM_BLOCKS, enable_prefix_caching=True, max_model_len=1024, max_num_seqs=4,
               dtype="bfloat16", seed=0)


@pytest.fixture
def fresh(engine):
    """The shared engine with an empty prefix cache and no decisions or pins."""
    llm, scheduler = engine
    scheduler.book.clear()
    scheduler.apply_decisions([])  # releases every pin: the book no longer holds them
    assert llm.reset_prefix_cache()
    return llm, scheduler


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
