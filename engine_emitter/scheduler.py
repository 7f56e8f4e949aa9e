"""The vLLM side of the runtime layer, as a ``scheduler_cls`` for stock vLLM 0.32.

Enable it by configuration alone:

    LLM(model, scheduler_cls="engine_emitter.scheduler.AgentRuntimeScheduler", ...)
    vllm serve MODEL --scheduler-cls engine_emitter.scheduler.AgentRuntimeScheduler

It runs inside EngineCore, where vLLM decides eviction (docs/engine_emitter.md):
- engine events out, keyed by agent: request queued / scheduled / first token /
  finished, KV blocks stored (attributed to the request's agent) and removed;
- act decisions in, drained at each step boundary: eviction scores reorder the
  free block queue (lowest score evicted first, LRU within a score level),
  pins hold a block's extra reference until their TTL (capped fraction),
  prefetch recomputes an agent's evicted prefix with a 1-token request
  (the CPU backend has no lower KV tier to load from), held back while a
  request waits or the batch is busy, so it only fills capacity no request
  asks for.

Agent identity comes with each request in ``SamplingParams.extra_args``
(``vllm_xargs`` on the OpenAI server) as ``agentrt.workload`` /
``agentrt.agent`` / ``agentrt.session`` (what ``framework_emitter.sdk``'s
``request_tags`` returns), else the request's ``session_id``. Never
``cache_salt``: that would stop agents sharing prefixes.

Fail-open: without a broker, a worker or decisions, nothing is reordered or
pinned and vLLM behaves exactly as stock; emission never blocks a step.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter, OrderedDict
from typing import Any, Callable, Iterable

from vllm.v1.core.kv_cache_utils import BlockHash, get_block_hash, make_block_hash_with_group_id
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.utils.math_utils import cdiv

from streams import events as ev
from streams.config import StreamsConfig
from streams.producer import EventProducer
from streams.stats import LatencyReservoir
from streams.topics import Topics

from .decision_book import AgentKey, DecisionBook
from .decision_feed import DecisionFeed
from .free_queue import ScoredFreeBlockQueue
from .metrics import serve_metrics

log = logging.getLogger(__name__)

SCORE_LEVELS = ev.SCORE_LEVELS
NEUTRAL_SCORE = 0.5  # blocks no decision speaks of sit between low- and high-value ones
NEUTRAL_LEVEL = 1 + min(int(NEUTRAL_SCORE * SCORE_LEVELS), SCORE_LEVELS - 1)


def request_tags(request: Any) -> dict[str, Any]:
    """The agentrt tags a request carries (its sampling params' ``extra_args``); empty when none."""
    return getattr(request.sampling_params, "extra_args", None) or {}


PREFETCH_TAG = "agentrt.prefetch"


def is_prefetch(request: Any) -> bool:
    """Whether the request is a policy's prefetch (no agent's prompt: its blocks are reported as a prefetch's)."""
    return bool(request_tags(request).get(PREFETCH_TAG))


def request_identity(request: Any, default_workload: str) -> tuple[str, str, str | None]:
    """(workload, agent, session) of a vLLM request; agent '' when the framework sent none."""
    extra = request_tags(request)
    session = extra.get("agentrt.session") or getattr(request, "session_id", None)
    return (str(extra.get("agentrt.workload") or default_workload), str(extra.get("agentrt.agent") or ""),
            None if session is None else str(session))


class _Owner:
    __slots__ = ("workload", "agent", "session")

    def __init__(self, workload: str, agent: str, session: str | None) -> None:
        self.workload, self.agent, self.session = workload, agent, session

    @property
    def key(self) -> AgentKey:
        return (self.workload, self.agent)


class AgentRuntimeScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.agentrt_counters: Counter[str] = Counter()
        self.book = DecisionBook()
        self.pin_cap_fraction = float(os.environ.get("AGENTRT_PIN_CAP_FRACTION", "0.5"))
        # A held prefetch is queued only while at most this many requests run: on a CPU engine a prefetch
        # beside a busy batch slows every request in it (a GPU's decode batches leave compute to spare).
        self.prefetch_max_running = int(os.environ.get("AGENTRT_PREFETCH_MAX_RUNNING", "1"))
        self.default_workload = os.environ.get("AGENTRT_WORKLOAD", "default")
        self._owners: OrderedDict[str, _Owner] = OrderedDict()  # block hash (hex) -> who stored it
        self._depths: dict[str, int] = {}  # block hash (hex) -> its position in its chain, while attributed
        # block hash (hex) -> the blocks that follow it in a chain (a dict: ordered, unlike a set, so orphans
        # reach the free queue in the same order in every run)
        self._children: dict[str, dict[str, None]] = {}
        self._parents: dict[str, str] = {}  # block hash (hex) -> the block before it (to unlink it when it goes)
        self._orphans: set[str] = set()  # cached blocks whose chain lost an earlier block: unreachable
        self._agent_hashes: dict[AgentKey, set[str]] = {}
        self._pinned: dict[int, tuple[Any, float]] = {}  # block_id -> (block, until)
        self._next_unpin = float("inf")  # the earliest pin's end: steps before it need not walk the pins
        self._removed: dict[AgentKey, list[str]] = {}
        self._timing: dict[str, dict[str, float]] = {}
        # (workload, agent, session) -> (request, full blocks) of its latest cached prefix, for prefetch;
        # token ids and hashes are read from the request only when a prefetch needs them.
        self._prefixes: OrderedDict[tuple[str, str, str | None], tuple[Any, int]] = OrderedDict()
        # (workload, session) -> (prefetch request, its chain, expires at): held until no request waits and
        # the batch is not busy, so a prefetch never delays a request's prefill; a request of the same
        # session supersedes it.
        self._held_prefetches: OrderedDict[tuple[str, str | None], tuple[Any, list[str], float]] = OrderedDict()
        self._now = time.time()  # one clock read per step
        self._block_hasher: Any = None  # vLLM's, taken from the first request (prefetches need it)
        self._reported: dict[str, int] = {}  # request id -> leading blocks of its chain already reported stored
        # In-process listeners of every event the engine emits (a co-located policy, an evaluation):
        # called on the engine thread, so they must be quick; an exception only detaches nothing and is counted.
        self.observers: list[Callable[[ev.Event], None]] = []
        self._last_expiry = 0.0
        self._last_log = time.time()
        self.decision_latency = LatencyReservoir()  # decision made (its time) -> applied here
        self._block_size = self.cache_config.block_size

        pool = self.kv_cache_manager.block_pool
        self.block_pool = pool
        self.free_queue = ScoredFreeBlockQueue(pool.free_block_queue, SCORE_LEVELS, self._level_of)
        pool.free_block_queue = self.free_queue
        self._wrap_block_pool(pool)

        config = StreamsConfig.from_env()
        self.topics = Topics.for_prefix(config.topic_prefix)
        self.producer: EventProducer | None = None
        self.feed: DecisionFeed | None = None
        if os.environ.get("AGENTRT_ENGINE_STREAMS", "1") != "0":
            try:
                self.producer = EventProducer(config, self.topics)
                self.feed = DecisionFeed(config, self.topics.decisions)
            except Exception:  # never let the runtime layer stop the engine
                log.exception("agentrt: streams unavailable; running as stock vLLM")
        if os.environ.get("AGENTRT_METRICS_PORT"):
            serve_metrics(self, int(os.environ["AGENTRT_METRICS_PORT"]))
        log.info("agentrt scheduler on %s (pin cap %.0f%%)", config.bootstrap_servers, self.pin_cap_fraction * 100)

    # --- block pool hooks ---------------------------------------------------------

    def _wrap_block_pool(self, pool: Any) -> None:
        cache_full_blocks = pool.cache_full_blocks
        maybe_evict = pool._maybe_evict_cached_block

        def cache_full_blocks_hook(request, blocks, num_cached_blocks, num_full_blocks, *args, **kwargs):  # noqa: ANN001
            cache_full_blocks(request, blocks, num_cached_blocks, num_full_blocks, *args, **kwargs)
            self._on_blocks_cached(request, blocks, num_cached_blocks, num_full_blocks)
            self._demote_redundant(blocks[num_cached_blocks:num_full_blocks])

        def evict_hook(block):  # noqa: ANN001
            block_hash = block.block_hash
            evicted = maybe_evict(block)
            if evicted and block_hash is not None and not self._copies(block_hash):
                self._on_block_evicted(get_block_hash(block_hash).hex())
            return evicted

        reset_prefix_cache = pool.reset_prefix_cache

        def reset_hook(*args, **kwargs):  # noqa: ANN001
            done = reset_prefix_cache(*args, **kwargs)
            if done:  # content gone: free blocks back to the empty level, attribution forgotten
                self.free_queue.relevel_all()
                workloads = {self.default_workload} | {workload for workload, _ in self._agent_hashes}
                self._owners.clear()
                self._depths.clear()
                self._children.clear()
                self._parents.clear()
                self._orphans.clear()
                self._agent_hashes.clear()
                self.cancel_prefetches()
                for workload in sorted(workloads):
                    self._emit(ev.KvAllBlocksCleared(workload=workload, agent="engine", time=time.time()))
            return done

        pool.cache_full_blocks = cache_full_blocks_hook
        pool._maybe_evict_cached_block = evict_hook
        pool.reset_prefix_cache = reset_hook

    def _on_blocks_cached(self, request: Any, blocks: list[Any], num_cached_blocks: int, num_full_blocks: int) -> None:
        workload, agent, session = request_identity(request, self.default_workload)
        owner = _Owner(workload, agent, session)
        hashes = []
        parent = None
        if 0 < num_cached_blocks <= len(blocks) and blocks[num_cached_blocks - 1].block_hash is not None:
            parent = get_block_hash(blocks[num_cached_blocks - 1].block_hash).hex()
        for position, block in enumerate(blocks[num_cached_blocks:num_full_blocks], start=num_cached_blocks):
            if block.block_hash is None or block.is_null:
                parent = None
                continue
            hx = get_block_hash(block.block_hash).hex()
            if parent is not None:
                self._children.setdefault(parent, {})[hx] = None
                self._parents[hx] = parent
            parent = hx
            self._orphans.discard(hx)
            previous = self._owners.pop(hx, None)
            if previous is not None:
                self._agent_hashes.get(previous.key, set()).discard(hx)
            self._owners[hx] = owner
            self._depths[hx] = position
            self._agent_hashes.setdefault(owner.key, set()).add(hx)
            hashes.append(hx)
        # A request's first report is its whole chain, cache hits included ("full" reporting): a policy
        # needs every block a call uses, not only those it computed, to know which blocks agents reuse.
        start = num_cached_blocks
        if request.request_id not in self._reported:
            start = 0
            hashes = [get_block_hash(b.block_hash).hex() for b in blocks[:num_cached_blocks]
                      if b.block_hash is not None and not b.is_null] + hashes
        self._reported[request.request_id] = start + len(hashes)
        limit = 16 * self.block_pool.num_gpu_blocks  # attribution memory, beyond what is resident
        while len(self._owners) > limit:
            hx, old = self._owners.popitem(last=False)
            self._depths.pop(hx, None)
            self._unlink(hx)
            self._children.pop(hx, None)
            self._agent_hashes.get(old.key, set()).discard(hx)
        prefetch = is_prefetch(request)
        if agent and num_full_blocks and not prefetch:  # a prefetch is no prompt of the agent's: keep its own
            key = (workload, agent, session)
            self._prefixes[key] = (request, num_full_blocks)
            self._prefixes.move_to_end(key)
            while len(self._prefixes) > 1024:
                self._prefixes.popitem(last=False)
        if hashes:
            now = time.time()
            # The evictions that made room for these blocks came first: reported after them, a block evicted and
            # computed again in this step (a chain's cached tail past a miss, reused for its own recomputation)
            # would read as gone while it is resident.
            self._flush_removed(now)
            self._emit(ev.KvBlocksStored(workload=workload, agent=agent, session=session, time=now,
                                         request=request.request_id, block_hashes=tuple(hashes),
                                         block_size=self._block_size, start_index=start, prefetch=prefetch or None))

    def _report_chain(self, request: Any, workload: str, agent: str, session: str | None, now: float,
                      prefetch: bool) -> None:
        """A newly scheduled request's whole prompt chain, when computing it cached no new block (all hits)."""
        if request.request_id in self._reported:
            return
        full = request.num_prompt_tokens // self._block_size
        chain = [bytes(h).hex() for h in request.block_hashes[:full]]
        self._reported[request.request_id] = len(chain)
        if len(self._reported) > 4 * self.max_num_running_reqs + 1024:  # aborted requests never finish here
            del self._reported[next(iter(self._reported))]
        if chain:
            self._flush_removed(now)  # (the evictions first, as in ``_on_blocks_cached``)
            self._emit(ev.KvBlocksStored(workload=workload, agent=agent, session=session, time=now,
                                         request=request.request_id, block_hashes=tuple(chain),
                                         block_size=self._block_size, start_index=0, prefetch=prefetch or None))

    def _on_block_evicted(self, hx: str) -> None:
        owner = self._owners.pop(hx, None)
        self._depths.pop(hx, None)
        self._unlink(hx)
        self._orphans.discard(hx)
        key = owner.key if owner else (self.default_workload, "")
        if owner:
            self._agent_hashes.get(owner.key, set()).discard(hx)
        self._removed.setdefault(key, []).append(hx)
        self.agentrt_counters["evictions"] += 1
        self._orphan_descendants(hx)

    def _unlink(self, hx: str) -> None:
        """Forget the link from the block before ``hx``: a hot head (a shared system prompt) would
        otherwise collect every continuation ever cached after it."""
        parent = self._parents.pop(hx, None)
        if parent is not None:
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.pop(hx, None)
                if not siblings:
                    del self._children[parent]

    def _orphan_descendants(self, hx: str) -> None:
        """A hit needs the chain's whole head: once a block's last copy is gone, the blocks after it are dead
        weight (vLLM recomputes from the first miss, as new copies). Evict them first (when steering)."""
        steering = self.book.steering
        stack = list(self._children.pop(hx, ()))
        while stack:  # through cached blocks only: one recomputed later is whole again
            child = stack.pop()
            copies = self._copies(make_block_hash_with_group_id(BlockHash(bytes.fromhex(child)), 0))
            if child in self._orphans or not copies:
                continue
            self._orphans.add(child)
            stack.extend(self._children.get(child, ()))
            if steering:
                for block in copies:
                    if block.ref_cnt == 0:
                        self.free_queue.relevel(block)

    def _copies(self, block_hash: Any) -> list[Any]:
        """Every block holding this content: vLLM recomputes a chain after its first miss, so a
        block whose earlier neighbour was evicted gets a second copy (both stay cached)."""
        cache = getattr(self.block_pool.cached_block_hash_to_block, "_cache", None)
        entry = cache.get(block_hash) if cache is not None else None
        if entry is None:
            return []
        return list(entry.values()) if isinstance(entry, dict) else [entry]

    def _redundant(self, block: Any) -> bool:
        """Another copy of this block's content is in use, or free and not itself marked redundant."""
        for other in self._copies(block.block_hash):
            if other.block_id != block.block_id and (other.ref_cnt > 0 or self.free_queue.level(other) not in (None, 0)):
                return True
        return False

    def _demote_redundant(self, new_blocks: list[Any]) -> None:
        """Free copies of content just computed again are pure waste: evict them first (when steering)."""
        if not self.book.steering:
            return  # no decisions: stock behaviour, duplicates included
        for block in new_blocks:
            if block.block_hash is None:
                continue
            for other in self._copies(block.block_hash):
                if other.block_id != block.block_id and other.ref_cnt == 0:
                    self.free_queue.relevel(other)

    def _level_of(self, block: Any) -> int:
        if block.block_hash is None:
            return 0
        if not self.book.steering:
            return NEUTRAL_LEVEL  # no decisions at all: stock LRU order
        if self._redundant(block):
            self.agentrt_counters["redundant_copies_demoted"] += 1
            return 0
        hx = get_block_hash(block.block_hash).hex()
        if hx in self._orphans:
            self.agentrt_counters["orphaned_blocks_demoted"] += 1
            return 0
        owner = self._owners.get(hx)
        score = self.book.score(hx, owner.key if owner else None, self._now)
        if score is None:
            return NEUTRAL_LEVEL
        self.agentrt_counters["scored_frees"] += 1
        return 1 + min(int(score * SCORE_LEVELS), SCORE_LEVELS - 1)

    # --- decisions -------------------------------------------------------------------

    def apply_decisions(self, decisions: list[tuple[ev.Decision, float]]) -> None:
        """Apply decisions (normally drained from the feed at a step boundary)."""
        now = time.time()
        relevel: dict[str, None] = {}  # in the decisions' order: a set's would follow the hash seed
        for decision, received_at in decisions:
            if not self.book.apply(decision, now):
                continue
            self.agentrt_counters["decisions_applied"] += 1
            self.decision_latency.add(max(now - decision.time, 0.0))
            targets = decision.block_hashes or tuple(sorted(self._agent_hashes.get((decision.workload,
                                                                                    decision.agent), ())))
            if isinstance(decision, ev.EvictionScore):
                relevel.update(dict.fromkeys(targets))
            elif isinstance(decision, ev.Pin):
                self._pin(targets, now)
            elif isinstance(decision, ev.Prefetch):
                self._prefetch(decision, now)
        # Blocks moving level together go deepest first: within a level the oldest is evicted first, and a
        # chain whose head goes before its tail loses the whole tail (measured in the simulator: random order
        # cost CacheSage 0.4-1.8 pp and Belady up to 6 pp). Equal depths keep the decisions' order, as the
        # simulator's do, so two runs given the same decisions order the free queue alike.
        for hx in sorted(relevel, key=lambda h: self._depths.get(h, 0), reverse=True):
            block = self._cached_block(hx)
            if block is not None and block.ref_cnt == 0:
                self.free_queue.relevel(block)
        self._release_pins(now)

    def _prefetch(self, decision: ev.Prefetch, now: float) -> None:
        """Recompute the agent's last cached prefix with a 1-token request, unless it is resident."""
        found = self._prefixes.get((decision.workload, decision.agent, decision.session))
        if found is None:  # the agent's latest prefix in any session
            for (workload, agent, _), value in reversed(self._prefixes.items()):
                if (workload, agent) == (decision.workload, decision.agent):
                    found = value
                    break
        if found is None or self._block_hasher is None:
            self.agentrt_counters["prefetch_unknown_prefix"] += 1
            return
        source, num_full_blocks = found
        chain = [bytes(h).hex() for h in source.block_hashes[:num_full_blocks]]  # plain hashes: no group id
        if decision.block_hashes:  # only the leading blocks the policy asked for
            wanted = set(decision.block_hashes)
            num_full_blocks = next((k for k, hx in enumerate(chain) if hx not in wanted), len(chain))
            chain = chain[:num_full_blocks]
            if not chain:
                self.agentrt_counters["prefetch_unknown_prefix"] += 1
                return
        tokens = list(source.all_token_ids[: num_full_blocks * self._block_size])
        if all(self._cached_block(hx) is not None for hx in chain):
            self.agentrt_counters["prefetch_already_resident"] += 1
            return
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        tags = {"agentrt.workload": decision.workload, "agentrt.agent": decision.agent,
                "agentrt.session": decision.session, PREFETCH_TAG: True}
        request = Request(request_id=f"agentrt-prefetch-{uuid.uuid4().hex}", prompt_token_ids=list(tokens),
                          sampling_params=SamplingParams(max_tokens=1, temperature=0.0, extra_args=tags),
                          pooling_params=None, arrival_time=now, block_hasher=self._block_hasher)
        key = (decision.workload, decision.session)
        if key in self._held_prefetches:
            self.agentrt_counters["prefetches_replaced"] += 1
        self._held_prefetches[key] = (request, chain, decision.expires_at)
        self._held_prefetches.move_to_end(key)

    def _admit_prefetches(self, now: float) -> None:
        """Queue the held prefetches (nothing waits): those still needed, oldest decision first."""
        while self._held_prefetches:
            _, (request, chain, expires_at) = self._held_prefetches.popitem(last=False)
            hits = self._cached_head(chain)
            if expires_at <= now:
                self.agentrt_counters["prefetches_expired"] += 1
            elif len(hits) == len(chain):
                self.agentrt_counters["prefetch_already_resident"] += 1
            elif self._blocks_taken(hits, len(chain)) > self._spare_blocks():
                # It would wait ahead of the next call and evict what the running request frees (the session's
                # own history), or take a running request's next block and have it preempted: dropped, not held.
                self.agentrt_counters["prefetches_refused_room"] += 1
            else:
                super().add_request(request)  # outputs of ids the frontend never issued are ignored by it
                self.agentrt_counters["prefetches_issued"] += 1
                self.agentrt_counters["prefetch_prompt_tokens"] += request.num_prompt_tokens

    @staticmethod
    def _blocks_taken(hits: list[Any], num_blocks: int) -> int:
        """Free blocks a prompt of ``num_blocks`` blocks (its output included) whose cached head is ``hits``
        takes: its missing blocks, and its hits that sit in the free queue (they leave it when touched)."""
        return num_blocks - len(hits) + sum(block.ref_cnt == 0 for block in hits)

    def _cached_head(self, chain: list[str]) -> list[Any]:
        """The chain's cached blocks up to its first missing one: a prompt's hits (vLLM recomputes the rest)."""
        head = []
        for hx in chain:
            block = self._cached_block(hx)
            if block is None:
                break
            head.append(block)
        return head

    def _waiting_call(self) -> tuple[Any, list[Any]] | None:
        """The request at the head of the queue, unless it is a prefetch, and its cached head (its hits)."""
        if not self.waiting:
            return None
        head = self.waiting.peek_request()
        if is_prefetch(head):
            return None
        return head, self._hits(head)

    def _hits(self, request: Any) -> list[Any]:
        return self._cached_head([bytes(h).hex() for h in request.block_hashes])

    def _spare_blocks(self, waiting_call: tuple[Any, list[Any]] | None = None) -> int:
        """Free blocks beyond what the running requests still need to finish and, given, what the waiting
        call takes to be admitted and finish. vLLM admits a prompt when its prompt fits and preempts a running
        request that finds no block for its next token: a pin or a prefetch must leave these."""
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        owed = sum(max(self._blocks_to_finish(r) - len(manager.req_to_blocks.get(r.request_id, ())), 0)
                   for r in self.running)
        spare = self.block_pool.get_num_free_blocks() - owed
        if waiting_call is not None:
            head, hits = waiting_call
            spare -= self._blocks_taken(hits, self._blocks_to_finish(head))
        return spare

    def _blocks_to_finish(self, request: Any) -> int:
        return cdiv(request.num_prompt_tokens + request.max_tokens, self._block_size)

    def _yield_pins_to_waiting_call(self) -> None:
        """Release pins, soonest-ending first, until the call at the head of the queue fits: a pin is a
        prediction and the waiting call is certain. Held for a TTL, pins that leave no room for a long prompt
        would otherwise stall it until they end (the blocks keep their level in the free queue). Pins on the
        call's cached head stay: they are its hits."""
        head = self.waiting.peek_request()
        if is_prefetch(head):
            return
        spare, need = self._spare_blocks(), self._blocks_to_finish(head)
        if spare >= need:
            return  # it fits without a hit (the common case: no chain lookup on every step)
        hits = self._hits(head)
        short = self._blocks_taken(hits, need) - spare  # as -_spare_blocks((head, hits)), summing what runs once
        if short <= 0:
            return
        kept = {block.block_id for block in hits}
        for block_id, _ in sorted(self._pinned.items(), key=self._yield_order):
            if short <= 0:
                break
            if block_id in kept:
                continue
            short -= self._unpin(block_id)
            self.agentrt_counters["pins_yielded"] += 1

    def _yield_order(self, item: tuple[int, tuple[Any, float]]) -> tuple[float, int]:
        """Soonest-ending pin first; within a pin, its prefix's tail first (what is kept stays a prefix)."""
        block, until = item[1]
        depth = self._depths.get(get_block_hash(block.block_hash).hex(), 0) if block.block_hash is not None else 0
        return until, -depth

    def cancel_prefetches(self) -> int:
        """Drop the prefetches not yet queued (an evaluation between runs); returns how many."""
        count = len(self._held_prefetches)
        self._held_prefetches.clear()
        return count

    def has_unfinished_requests(self) -> bool:
        # A held prefetch is work: an idle engine must still step to run it.
        return super().has_unfinished_requests() or bool(self._held_prefetches)

    def _cached_block(self, hx: str) -> Any | None:
        # KV cache group 0: the only group of the decoder-only models this targets; hybrid
        # (multi-group) models would need one lookup per group.
        key = make_block_hash_with_group_id(BlockHash(bytes.fromhex(hx)), 0)
        return self.block_pool.cached_block_hash_to_block.get_one_block(key)

    def _pin(self, hashes: Iterable[str], now: float) -> None:
        cap = int(self.pin_cap_fraction * (self.block_pool.num_gpu_blocks - 1))
        spare = self._spare_blocks(self._waiting_call())
        # Head first: where the cap or the room cuts a prefix short, what is pinned is a prefix (a hit);
        # a tail without its head is never hit and only holds capacity.
        for hx in sorted(dict.fromkeys(hashes), key=lambda h: self._depths.get(h, 0)):
            block = self._cached_block(hx)
            if block is None or block.block_id in self._pinned:
                continue
            if len(self._pinned) >= cap:
                self.agentrt_counters["pins_refused_cap"] += 1
                continue
            owner = self._owners.get(hx)
            until = self.book.pinned_until(hx, owner.key if owner else None, now)
            if until is None:
                continue
            if block.ref_cnt == 0:
                if spare <= 0:  # it would hold back the waiting call or preempt a running one
                    self.agentrt_counters["pins_refused_room"] += 1
                    continue
                spare -= 1
                self.free_queue.remove(block)
            block.ref_cnt += 1  # the pin's own reference: not evictable while held
            self._pinned[block.block_id] = (block, until)
            self._next_unpin = min(self._next_unpin, until)
            self.agentrt_counters["pins_applied"] += 1

    def _release_pins(self, now: float) -> None:
        """Release the pins whose time is up or that the book no longer holds (an unpin, a cleared book)."""
        self._next_unpin = float("inf")
        for block_id, (block, until) in list(self._pinned.items()):
            hx = get_block_hash(block.block_hash).hex() if block.block_hash is not None else None
            owner = self._owners.get(hx) if hx else None
            still = self.book.pinned_until(hx, owner.key if owner else None, now) if hx else None
            if until > now and still is not None:
                self._next_unpin = min(self._next_unpin, until)
                continue
            self._unpin(block_id)
            self.agentrt_counters["pins_released"] += 1

    def _unpin(self, block_id: int) -> bool:
        """Drop a pin's reference; whether that freed the block (no request holds it)."""
        block, _ = self._pinned.pop(block_id)
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue.append(block)
        return block.ref_cnt == 0

    @property
    def pinned_blocks(self) -> int:
        return len(self._pinned)

    def counts(self) -> dict[str, int]:
        """The integration's own event counts and its decision book's (``book_``: applied, expired, duplicate)."""
        return {**self.agentrt_counters, **{f"book_{k}": v for k, v in self.book.counters.items()}}

    def snapshot(self) -> dict[str, Any]:
        """Every counter of the integration (also exported as Prometheus metrics)."""
        return {
            **self.counts(), "pinned_blocks": self.pinned_blocks,
            **({f"feed_{k}": v for k, v in self.feed.counters.items()} if self.feed else {}),
            **({f"events_{k}": v for k, v in self.producer.counters.snapshot().items()} if self.producer else {}),
            "evicted_by_level": list(self.free_queue.evicted_by_level),
            "decision_latency": self.decision_latency.percentiles(),
        }

    # --- scheduler overrides -------------------------------------------------------------

    def add_request(self, request: Any) -> None:
        if self._block_hasher is None:
            self._block_hasher = getattr(request, "_block_hasher", None)
        super().add_request(request)
        workload, agent, session = request_identity(request, self.default_workload)
        if self._held_prefetches.pop((workload, session), None) is not None:
            self.agentrt_counters["prefetches_superseded"] += 1  # the call came first: it computes its prefix
        if agent:
            self._emit(ev.RequestQueued(workload=workload, agent=agent, session=session, time=time.time(),
                                        request=request.request_id, prompt_tokens=request.num_prompt_tokens,
                                        priority=max(int(request.priority), 0)))

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        now = self._now = time.time()
        decisions = self.feed.drain() if self.feed is not None else []
        if decisions:
            self.apply_decisions(decisions)
        elif now >= self._next_unpin:  # (an unpin or a cleared book comes through apply_decisions, which releases)
            self._release_pins(now)
        if self._pinned and self.waiting:
            self._yield_pins_to_waiting_call()
        if self._held_prefetches:
            running, waiting = self.get_request_counts()
            if not waiting and running <= self.prefetch_max_running:
                self._admit_prefetches(now)
        if now - self._last_expiry > 1.0:
            self.book.expire(now)
            self._last_expiry = now
        if now - self._last_log > 60.0:
            self._last_log = now
            log.info("agentrt: %s", self.snapshot())
        output = super().schedule(*args, **kwargs)
        for new in output.scheduled_new_reqs:
            request = self.requests.get(new.req_id)
            if request is None:
                continue
            workload, agent, session = request_identity(request, self.default_workload)
            stats = request.prefill_stats
            cached = stats.num_cached_tokens if stats is not None else 0
            self._timing[request.request_id] = {"scheduled_at": now, "cached": cached}
            prefetch = is_prefetch(request)
            if prefetch:
                # What a prefetch costs is what it computes: its resident head is a hit like any request's.
                self.agentrt_counters["prefetch_computed_tokens"] += request.num_prompt_tokens - cached
            self._report_chain(request, workload, agent, session, now, prefetch)
            if agent:
                self._emit(ev.RequestScheduled(workload=workload, agent=agent, session=session, time=now,
                                               request=request.request_id, prompt_tokens=request.num_prompt_tokens,
                                               cached_tokens=cached, queue_time_s=max(now - request.arrival_time, 0.0)))
        self._flush_removed(now)
        return output

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> None:
        # A preempted request recomputes its prompt: a prefetch that causes preemptions costs far more than its
        # own prefill, so both kinds are counted.
        self.agentrt_counters["prefetches_preempted" if is_prefetch(request) else "requests_preempted"] += 1
        super()._preempt_request(request, *args, **kwargs)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        requests = [self.requests.get(rid) for rid in scheduler_output.num_scheduled_tokens]
        result = super().update_from_output(scheduler_output, model_runner_output)
        now = time.time()
        for request in requests:
            if request is None:
                continue
            workload, agent, session = request_identity(request, self.default_workload)
            rid = request.request_id
            timing = self._timing.setdefault(rid, {"scheduled_at": now, "cached": 0})
            if request.num_output_tokens >= 1 and "ttft" not in timing:
                timing["ttft"] = max(now - request.arrival_time, 0.0)
                if agent:
                    self._emit(ev.RequestFirstToken(workload=workload, agent=agent, session=session, time=now,
                                                    request=rid, ttft_s=timing["ttft"]))
            if request.is_finished():
                del self._timing[rid]
                self._reported.pop(rid, None)
                if agent:
                    reason = request.get_finished_reason()
                    self._emit(ev.RequestFinished(
                        workload=workload, agent=agent, session=session, time=now, request=rid,
                        prompt_tokens=request.num_prompt_tokens, cached_tokens=int(timing["cached"]),
                        output_tokens=request.num_output_tokens,
                        queue_time_s=max(timing["scheduled_at"] - request.arrival_time, 0.0),
                        ttft_s=timing.get("ttft", 0.0), e2e_s=max(now - request.arrival_time, 0.0),
                        finish_reason=str(reason) if reason is not None else None))
        return result

    def shutdown(self) -> None:
        if self.feed is not None:
            self.feed.close()
        if self.producer is not None:
            self.producer.close(timeout_s=2.0)
        super().shutdown()

    # --- emission ----------------------------------------------------------------------

    def _flush_removed(self, now: float) -> None:
        for (workload, agent), hashes in self._removed.items():
            self._emit(ev.KvBlocksRemoved(workload=workload, agent=agent, time=now, block_hashes=tuple(hashes)))
        self._removed.clear()

    def _emit(self, event: ev.Event) -> None:
        if self.producer is not None and not self.producer.publish(event):
            self.agentrt_counters["events_dropped"] += 1
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # a listener's bug must not stop the engine
                self.agentrt_counters["observer_errors"] += 1


class AsyncAgentRuntimeScheduler(AgentRuntimeScheduler, AsyncScheduler):
    """The same integration on vLLM's ``AsyncScheduler`` (GPU hosts, where async scheduling is on).

    vLLM composes its own diffusion scheduler the same way. Select it with
    ``--scheduler-cls engine_emitter.scheduler.AsyncAgentRuntimeScheduler``;
    the plain class turns async scheduling off (vLLM warns about it).
    """
