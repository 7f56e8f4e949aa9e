"""The runtime layer inside real vLLM (CPU): events out, decisions in, fail-open.

Scenario from ../shared/notes/vllm-integration.md: each agent has a 256-token
prefix (8 blocks) plus a 20-token suffix; the KV cache holds 39 blocks, so
the planner, five workers, then the planner again evicts the planner's prefix
under stock LRU.
"""
from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from streams import events as ev
from streams.producer import EventProducer
from streams.serde import decode
from streams.topics import Topics
from tests.engine.conftest import NUM_BLOCKS, PREFIX_TOKENS, SUFFIX_TOKENS, wait_for

WORKERS = [f"worker-{i}" for i in range(1, 6)]


def _prompt(agent: str, call: int) -> list[int]:
    seed = sum(map(ord, agent))
    prefix = [(seed * 97 + i * 31) % 4000 + 1 for i in range(PREFIX_TOKENS)]
    return prefix + [(seed * 13 + call * 7 + i) % 4000 + 1 for i in range(SUFFIX_TOKENS)]


def _call(llm, agent: str, call: int = 0, max_tokens: int = 4, session: str = "s1") -> tuple[int, list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args={"agentrt.workload": "w", "agentrt.agent": agent, "agentrt.session": session})
    out = llm.generate([TokensPrompt(prompt_token_ids=_prompt(agent, call))], params, use_tqdm=False)[0]
    return out.num_cached_tokens, list(out.outputs[0].token_ids)


def _planner_then_workers_then_planner(llm) -> int:
    _call(llm, "planner", 0)
    for worker in WORKERS:
        _call(llm, worker, 0)
    return _call(llm, "planner", 1)[0]


def _publish(config, *decisions: ev.Decision) -> None:
    with EventProducer(config, Topics.for_prefix(config.topic_prefix)) as producer:
        for decision in decisions:
            producer.publish(decision)
        producer.flush()


def _decision(cls, agent: str, did: str, **fields) -> ev.Decision:
    now = time.time()
    return cls(workload="w", agent=agent, time=now, policy="test", decision_id=did, expires_at=now + 60, **fields)


def _delivered(scheduler, n: int) -> None:
    wait_for(lambda: scheduler.feed.counters["received"] >= n, what=f"{n} decisions to reach the engine")


def test_stock_lru_evicts_the_planner_prefix(fresh):
    llm, _ = fresh
    assert _planner_then_workers_then_planner(llm) == 0


def test_a_higher_eviction_score_keeps_the_planner_prefix(fresh, engine_config):
    llm, scheduler = fresh
    before = scheduler.feed.counters["received"]
    _publish(engine_config, _decision(ev.EvictionScore, "planner", f"score-{time.time()}", score=0.95))
    _delivered(scheduler, before + 1)
    assert _planner_then_workers_then_planner(llm) == PREFIX_TOKENS


def test_a_low_score_for_the_workers_keeps_the_planner_prefix_too(fresh, engine_config):
    llm, scheduler = fresh
    before = scheduler.feed.counters["received"]
    _publish(engine_config, *[_decision(ev.EvictionScore, w, f"low-{w}-{time.time()}", score=0.05) for w in WORKERS])
    _delivered(scheduler, before + len(WORKERS))
    assert _planner_then_workers_then_planner(llm) == PREFIX_TOKENS


def test_a_pin_keeps_the_prefix_and_expires_on_time(fresh, engine_config):
    llm, scheduler = fresh
    _call(llm, "planner", 0)
    before = scheduler.feed.counters["received"]
    _publish(engine_config, _decision(ev.Pin, "planner", f"pin-{time.time()}", ttl_s=3.0))
    _delivered(scheduler, before + 1)
    for worker in WORKERS:
        _call(llm, worker, 0)
        assert scheduler.pinned_blocks == PREFIX_TOKENS // 32
    assert _call(llm, "planner", 1)[0] == PREFIX_TOKENS
    time.sleep(3.2)
    _call(llm, "worker-1", 1)  # a step after the TTL releases the pin
    assert scheduler.pinned_blocks == 0
    for worker in WORKERS:
        _call(llm, worker, 2)
    assert _call(llm, "planner", 2)[0] == 0  # unprotected again, LRU evicts it


def test_blocks_rescored_together_lose_their_chain_tail_first(fresh):
    """A decision moves a whole prefix to one level in one go; vLLM evicts the oldest of a level first, so
    the tail must go in first or the surviving blocks are unreachable (hits need an unbroken head)."""
    llm, scheduler = fresh
    _call(llm, "planner", 0)
    scheduler.apply_decisions([(_decision(ev.EvictionScore, "planner", f"low-{time.time()}", score=0.05), time.time())])
    evictions = scheduler.agentrt_counters["evictions"]
    # Two 17-block prompts need 36 blocks with their outputs: 31 are empty, the rest come from the
    # planner's 8 (lowest level: evicted before anything else cached).
    _other_prompts(llm, blocks=17, count=2)
    evicted = scheduler.agentrt_counters["evictions"] - evictions
    assert 0 < evicted < PREFIX_TOKENS // 32
    assert _call(llm, "planner", 1)[0] == PREFIX_TOKENS - evicted * 32


def _planner_head_lowest_rest_high(llm, scheduler) -> list[str]:
    """The planner's and worker-1's prefixes cached, the planner's first block scored lowest and the rest of
    its chain high; returns the planner's block hashes, head first."""
    _call(llm, "planner", 0)
    _call(llm, "worker-1", 0)
    planner = sorted(scheduler._agent_hashes[("w", "planner")], key=scheduler._depths.get)
    now = time.time()
    scheduler.apply_decisions([
        (_decision(ev.EvictionScore, "planner", f"head-{now}", score=0.01, block_hashes=(planner[0],)), now),
        (_decision(ev.EvictionScore, "planner", f"rest-{now}", score=0.9, block_hashes=tuple(planner[1:])), now)])
    return planner


def test_blocks_after_an_evicted_block_are_evicted_before_reachable_ones(fresh):
    """The planner's first block goes (scored lowest) while the rest of its chain is scored high: those
    7 blocks can never be hit again, so they go before the worker's reachable prefix (neutral)."""
    llm, scheduler = fresh
    planner = _planner_head_lowest_rest_high(llm, scheduler)
    demoted = scheduler.agentrt_counters["orphaned_blocks_demoted"]  # counted since the engine started
    # 23 blocks are empty: a 23-block prompt fits, its first output token evicts one block (the head).
    _other_prompts(llm, blocks=23, count=1)
    assert scheduler.agentrt_counters["orphaned_blocks_demoted"] - demoted == len(planner) - 1
    _call(llm, "worker-2", 0)  # 9 blocks, 1 empty: 8 evicted, the unreachable 7 first
    assert _call(llm, "worker-1", 1)[0] == PREFIX_TOKENS - 32  # stock order would have taken all 8
    assert _call(llm, "planner", 1)[0] == 0
    # Chain links are kept for attributed blocks only: evicted ones are unlinked (no growth without bound).
    linked = set(scheduler._children) | {c for cs in scheduler._children.values() for c in cs}
    assert linked and linked <= set(scheduler._owners)


def test_blocks_evicted_for_their_own_recomputation_are_reported_gone_before_they_are_stored_again(fresh):
    """The unreachable tail of a chain whose head went is evicted first, here by the allocation of the call
    that computes that chain again: a policy reading the events in order must end up with every block of
    the chain resident, as it is (the evictions reported after the new blocks would read as gone)."""
    llm, scheduler = fresh
    events: list[ev.Event] = []
    scheduler.observers.append(events.append)
    try:
        planner = _planner_head_lowest_rest_high(llm, scheduler)
        _other_prompts(llm, blocks=23, count=1)  # evicts the planner's head: its 7 other blocks are unreachable
        again = len(events)
        assert _call(llm, "planner", 1)[0] == 0  # no head, no hit: the whole prefix is computed again
    finally:
        scheduler.observers.remove(events.append)
    removed_in_call = {h for e in events[again:] if isinstance(e, ev.KvBlocksRemoved) for h in e.block_hashes}
    assert removed_in_call & set(planner[1:])  # the case: its own tail made room for it
    resident: set[str] = set()
    for event in events:
        if isinstance(event, ev.KvBlocksStored):
            resident.update(event.block_hashes)
        elif isinstance(event, ev.KvBlocksRemoved):
            resident.difference_update(event.block_hashes)
    assert set(planner) <= resident
    assert all(scheduler._cached_block(h) is not None for h in planner)


def _other_prompts(llm, blocks: int, count: int) -> None:
    """``count`` prompts of ``blocks`` full blocks each from another agent, at once, 4 output tokens each."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    others = [TokensPrompt(prompt_token_ids=[(k * 131 + i * 7) % 4000 + 1 for i in range(blocks * 32)])
              for k in range(1, count + 1)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                            extra_args={"agentrt.workload": "w", "agentrt.agent": "other", "agentrt.session": "s2"})
    llm.generate(others, params, use_tqdm=False)


def test_the_pin_cap_holds_and_allocation_never_starves(fresh, engine_config):
    from vllm.v1.core.kv_cache_utils import get_block_hash

    llm, scheduler = fresh
    agents = ["planner", "worker-1", "worker-2"]  # 3 x 8 blocks = 24 > the cap of 19
    for agent in agents:
        _call(llm, agent, 0)
    before = scheduler.feed.counters["received"]
    _publish(engine_config, *[_decision(ev.Pin, a, f"cap-{a}-{time.time()}", ttl_s=30.0) for a in agents])
    _delivered(scheduler, before + len(agents))
    _call(llm, "worker-3", 0)  # a step applies the pins; and it still gets blocks
    cap = int(scheduler.pin_cap_fraction * (NUM_BLOCKS - 1))
    assert scheduler.pinned_blocks == cap
    assert scheduler.agentrt_counters["pins_refused_cap"] > 0
    depths: dict[str, list[int]] = {}  # what the cap cut short is pinned from its head: a prefix, a hit
    for block, _ in scheduler._pinned.values():
        hx = get_block_hash(block.block_hash).hex()
        depths.setdefault(scheduler._owners[hx].agent, []).append(scheduler._depths[hx])
    assert sorted(map(len, depths.values())) == [cap - 16, 8, 8]
    assert all(sorted(d) == list(range(len(d))) for d in depths.values()), depths
    for worker in WORKERS:  # requests needing 9 blocks each keep being served
        assert len(_call(llm, worker, 1)[1]) == 4
    scheduler.free_queue.check()


def test_a_pin_never_takes_the_room_a_waiting_call_needs(fresh, engine_config):
    """Pins arriving with a long call queued are refused beyond what the call leaves: none is applied
    only to be yielded, and nothing is preempted for want of a block."""
    llm, scheduler = fresh
    agents = ["planner", "worker-1", "worker-2"]  # 24 cached blocks, all free
    for agent in agents:
        _call(llm, agent, 0)
    counts = dict(scheduler.agentrt_counters)
    before = scheduler.feed.counters["received"]
    _publish(engine_config, *[_decision(ev.Pin, a, f"room-{a}-{time.time()}", ttl_s=30.0) for a in agents])
    _delivered(scheduler, before + len(agents))
    _other_prompts(llm, blocks=25, count=1)  # queued when the pins apply: 26 of the 39 blocks with its output
    delta = {k: scheduler.agentrt_counters[k] - counts.get(k, 0)
             for k in ("pins_applied", "pins_refused_room", "pins_yielded", "requests_preempted")}
    assert delta == {"pins_applied": 13, "pins_refused_room": 11, "pins_yielded": 0, "requests_preempted": 0}
    assert scheduler.pinned_blocks == 13
    scheduler.free_queue.check()


def test_pins_yield_to_a_call_they_leave_no_room_for(fresh, engine_config):
    """A prompt longer than the unpinned pool is served now, not when the pins end: the soonest-ending
    pins are released until it fits, the others are kept."""
    llm, scheduler = fresh
    agents = ["planner", "worker-1", "worker-2"]
    for agent in agents:
        _call(llm, agent, 0)
    before = scheduler.feed.counters["received"]
    _publish(engine_config, *[_decision(ev.Pin, a, f"yield-{a}-{time.time()}", ttl_s=30.0) for a in agents])
    _delivered(scheduler, before + len(agents))
    _call(llm, "worker-3", 0)  # a step applies the pins
    cap = int(scheduler.pin_cap_fraction * (NUM_BLOCKS - 1))
    assert scheduler.pinned_blocks == cap  # 19 pinned, 20 blocks left for a request
    yielded = scheduler.agentrt_counters["pins_yielded"]
    began = time.monotonic()
    _other_prompts(llm, blocks=25, count=1)  # 26 blocks with its first output token
    assert time.monotonic() - began < 15  # the pins hold for 30 s
    assert 6 <= scheduler.agentrt_counters["pins_yielded"] - yielded < cap
    assert 0 < scheduler.pinned_blocks <= cap - 6
    scheduler.free_queue.check()


def test_engine_events_arrive_keyed_and_attributed_by_agent(fresh, engine_config):
    llm, _ = fresh
    topics = Topics.for_prefix(engine_config.topic_prefix)
    consumer = Consumer({"bootstrap.servers": engine_config.bootstrap_servers, "group.id": "t",
                         "enable.auto.commit": False})
    ends = [consumer.get_watermark_offsets(TopicPartition(topics.engine, p), timeout=5)[1]
            for p in range(engine_config.partitions)]
    _call(llm, "planner", 0)
    cached, _ = _call(llm, "planner", 1)
    consumer.assign([TopicPartition(topics.engine, p, max(end - 1, 0)) for p, end in enumerate(ends)])
    seen: list[ev.Event] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and sum(isinstance(e, ev.RequestFinished) for e in seen) < 2:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            event = decode(msg.key(), msg.value())
            if event.agent == "planner" and event.time > time.time() - 60:
                seen.append(event)
    consumer.close()
    finished = [e for e in seen if isinstance(e, ev.RequestFinished)][-2:]
    assert len(finished) == 2, seen
    first, second = finished
    assert (first.prompt_tokens, first.output_tokens) == (PREFIX_TOKENS + SUFFIX_TOKENS, 4)
    assert first.cached_tokens == 0 and second.cached_tokens == cached == PREFIX_TOKENS
    assert second.ttft_s > 0 and second.e2e_s >= second.ttft_s and second.session == "s1"
    kinds = {type(e).__name__ for e in seen}
    assert {"RequestQueued", "RequestScheduled", "RequestFirstToken", "KvBlocksStored"} <= kinds
    stored = [e for e in seen if isinstance(e, ev.KvBlocksStored)]
    assert stored[0].block_size == 32 and len(stored[0].block_hashes) == (PREFIX_TOKENS + SUFFIX_TOKENS) // 32


def test_counters_are_exported_as_prometheus_metrics(fresh):
    import os
    import urllib.request

    llm, scheduler = fresh
    _planner_then_workers_then_planner(llm)
    port = os.environ["AGENTRT_METRICS_PORT"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "agentrt_engine_pinned_blocks" in text
    evicted = sum(scheduler.free_queue.evicted_by_level)
    assert evicted > 0 and 'agentrt_engine_evictions_total{level="' in text
    assert f'agentrt_engine_events_total{{kind="evictions"}} {float(scheduler.agentrt_counters["evictions"])}' in text


def test_version_guard_the_vllm_internals_we_rely_on():
    """Fails when vLLM moves the seams engine_emitter/ is built on (docs/engine_emitter.md)."""
    import inspect

    import vllm
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert vllm.__version__ == "0.32.0"
    assert "self.free_block_queue.popleft_n(num_blocks)" in inspect.getsource(BlockPool.get_new_blocks)
    assert "self._maybe_evict_cached_block(block)" in inspect.getsource(BlockPool.get_new_blocks)
    free_src = inspect.getsource(BlockPool.free_blocks)
    assert "free_block_queue.append_n" in free_src and "free_block_queue.prepend_n" in free_src
    assert "self.free_block_queue.remove(block)" in inspect.getsource(BlockPool.touch)
    params = list(inspect.signature(BlockPool.cache_full_blocks).parameters)
    assert params[:5] == ["self", "request", "blocks", "num_cached_blocks", "num_full_blocks"]
    for name in ("popleft", "popleft_n", "remove", "append", "append_n", "prepend_n", "get_all_free_blocks"):
        assert hasattr(FreeKVCacheBlockQueue, name), name
    for name in ("schedule", "update_from_output", "add_request", "shutdown"):
        assert hasattr(Scheduler, name), name
    assert "prefill_stats" in inspect.getsource(Request.__init__)
    # The room a pin or a prefetch must leave (_spare_blocks), and the preemption count.
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    assert "self.req_to_blocks" in inspect.getsource(SingleTypeKVCacheManager.__init__)
    assert "self.max_tokens" in inspect.getsource(Request.__init__)
    assert hasattr(FCFSRequestQueue, "peek_request") and hasattr(Scheduler, "_preempt_request")
    assert "self._preempt_request(" in inspect.getsource(Scheduler.schedule)
    # Duplicate copies of a block's content (AgentRuntimeScheduler._copies) and the prefix-cache reset hook.
    from vllm.v1.core.block_pool import BlockHashToBlockMap

    assert "self._cache" in inspect.getsource(BlockHashToBlockMap.__init__)
    assert "self.cached_block_hash_to_block = BlockHashToBlockMap()" in inspect.getsource(BlockPool.reset_prefix_cache)
    assert "block_hashes" in inspect.getsource(Request.__init__)
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # AsyncAgentRuntimeScheduler's other base

    assert AsyncScheduler.__mro__[1] is Scheduler


def test_prefetch_restores_an_evicted_prefix_before_the_call(fresh, engine_config):
    llm, scheduler = fresh
    _call(llm, "planner", 0)
    for worker in WORKERS:
        _call(llm, worker, 0)  # stock LRU has evicted the planner's prefix by now
    issued = scheduler.agentrt_counters["prefetches_issued"]
    computed = scheduler.agentrt_counters["prefetch_computed_tokens"]
    before = scheduler.feed.counters["received"]
    _publish(engine_config, _decision(ev.Prefetch, "planner", f"pf-{time.time()}", session="s1", probability=0.9))
    _delivered(scheduler, before + 1)
    stored: list[ev.KvBlocksStored] = []
    first_tokens: list[ev.RequestFirstToken] = []
    scheduler.observers.append(lambda e: stored.append(e) if isinstance(e, ev.KvBlocksStored) else
                               first_tokens.append(e) if isinstance(e, ev.RequestFirstToken) else None)
    try:
        _call(llm, "reviewer", 0)  # any step applies it; the prefetch runs beside this request
    finally:
        scheduler.observers.pop()
    assert scheduler.agentrt_counters["prefetches_issued"] == issued + 1
    # Its blocks are reported as a prefetch's for the planner, not as a prompt of the planner's.
    assert [e.prefetch for e in stored if e.agent == "planner"] == [True]
    # It waited for the reviewer's prefill: it ran in the reviewer's decode, not before its first token.
    reviewer_first = next(e.time for e in first_tokens if e.agent == "reviewer")
    assert next(e.time for e in stored if e.agent == "planner") >= reviewer_first
    assert not [e for e in stored if e.agent == "reviewer" and e.prefetch]
    source, _ = scheduler._prefixes[("w", "planner", "s1")]
    assert not source.request_id.startswith("agentrt-prefetch-")
    # Its cost is the tokens it computed: the evicted prefix, none of the reviewer's.
    assert 0 < scheduler.agentrt_counters["prefetch_computed_tokens"] - computed <= PREFIX_TOKENS
    assert _call(llm, "planner", 1)[0] == PREFIX_TOKENS
    # A prefix already resident is not prefetched again.
    before = scheduler.feed.counters["received"]
    _publish(engine_config, _decision(ev.Prefetch, "planner", f"pf2-{time.time()}", session="s1", probability=0.9))
    _delivered(scheduler, before + 1)
    _call(llm, "reviewer", 1)
    assert scheduler.agentrt_counters["prefetches_issued"] == issued + 1
    assert scheduler.agentrt_counters["prefetch_already_resident"] >= 1


def test_a_held_prefetch_gives_way_to_its_sessions_call(fresh):
    """A prefetch is held while requests wait; the call it was for, arriving first, computes its own prefix."""
    llm, scheduler = fresh
    _call(llm, "planner", 0, session="s2")
    for worker in WORKERS:
        _call(llm, worker, 0)  # the planner's prefix is evicted
    issued = scheduler.agentrt_counters["prefetches_issued"]
    superseded = scheduler.agentrt_counters["prefetches_superseded"]
    scheduler.apply_decisions([(_decision(ev.Prefetch, "planner", f"pf3-{time.time()}", session="s2",
                                          probability=0.9), time.time())])
    assert scheduler.has_unfinished_requests()  # held: an idle engine would step to run it
    assert _call(llm, "planner", 1, session="s2")[0] == 0  # the call came first: nothing was prefetched
    assert scheduler.agentrt_counters["prefetches_superseded"] == superseded + 1
    assert scheduler.agentrt_counters["prefetches_issued"] == issued
    assert not scheduler.has_unfinished_requests()
    for worker in WORKERS:
        _call(llm, worker, 1)  # evicted again
    scheduler.prefetch_max_running = 0  # no request may run beside a prefetch
    try:
        scheduler.apply_decisions([(_decision(ev.Prefetch, "planner", f"pf4-{time.time()}", session="s2",
                                              probability=0.9), time.time())])
        _call(llm, "reviewer", 0)  # another session's call runs: the prefetch stays held
        assert scheduler.agentrt_counters["prefetches_issued"] == issued
        assert scheduler.cancel_prefetches() == 1
    finally:
        scheduler.prefetch_max_running = 1
    assert not scheduler.has_unfinished_requests()


def test_a_prefetch_the_pool_cannot_hold_beside_the_running_call_is_dropped(fresh):
    """Queued, it would wait ahead of the next call and then evict what the running call frees."""
    llm, scheduler = fresh
    _call(llm, "planner", 0, session="s3")
    for worker in WORKERS:
        _call(llm, worker, 0)  # the planner's prefix (8 blocks) is evicted
    issued = scheduler.agentrt_counters["prefetches_issued"]
    refused = scheduler.agentrt_counters["prefetches_refused_room"]
    preempted = scheduler.agentrt_counters["requests_preempted"]
    scheduler.apply_decisions([(_decision(ev.Prefetch, "planner", f"pf5-{time.time()}", session="s3",
                                          probability=0.9), time.time())])
    _other_prompts(llm, blocks=31, count=1)  # 32 of the 39 blocks with its output: 7 left for the prefix
    assert scheduler.agentrt_counters["prefetches_refused_room"] == refused + 1
    assert scheduler.agentrt_counters["prefetches_issued"] == issued
    assert scheduler.agentrt_counters["requests_preempted"] == preempted
    assert not scheduler.has_unfinished_requests()  # dropped, not held


def test_with_the_broker_gone_the_engine_keeps_serving_identical_tokens(engine, engine_broker):
    """Last on purpose: it stops this session's engine broker."""
    llm, scheduler = engine
    llm.reset_prefix_cache()
    scheduler.book.clear()
    cold = _call(llm, "reviewer", 0, max_tokens=8)[1]
    engine_broker.stop()
    began = time.monotonic()
    cached, after = _call(llm, "reviewer", 0, max_tokens=8)
    assert after == cold and cached == PREFIX_TOKENS
    llm.reset_prefix_cache()
    assert _call(llm, "reviewer", 0, max_tokens=8)[1] == cold
    assert time.monotonic() - began < 10
