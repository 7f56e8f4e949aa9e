"""A model of vLLM v1's prefix-cache block pool, driven by the shared traces (pure, no I/O).

What it models (vLLM 0.32, see ../shared/notes/vllm-integration.md):
- blocks of ``block_size`` tokens identified by chained hashes (framework_emitter.prefix_blocks);
- a call hits the leading full prompt blocks that are cached (resident, in use or free), whole
  blocks only and never its last token (vLLM's ``get_computed_blocks``): a prompt cached to its
  end on a block boundary computes its last block again;
- the call then allocates the rest, taking free blocks in eviction order and dropping their
  cached content; its full blocks become cached;
- with ``generated`` set, the tokens a call generates need blocks too (allocated after its
  prefill, as vLLM's first decode step does) and the blocks they fill are cached, as vLLM caches
  every full block; their tokens are the random ones the bench's model samples, so nothing reads
  them again (without it, outputs are not modelled);
- when it finishes, its blocks are freed tail first (the chain's tail is evicted first, as
  vLLM orders them);
- calls run one at a time in the order of ``interleave`` (16 sessions active at once), or with
  ``in_flight`` > 1 as the bench's replay keeps them in flight, through vLLM's scheduler one engine
  step at a time (``evaluation.batched``: token budget, chunked prefill, preemption).

The pool itself (hashes, empty blocks, users, the eviction order) is ``evaluation.block_pool``.

One simplification: a hash is one block. When a call misses early in its chain but a later
block of the chain is still cached, vLLM computes it again into a new block and keeps both
(duplicates) until one is evicted; here the call takes the cached one back instead.

The eviction order is the policy: ``LRU`` (stock), ``Belady`` (the offline optimum: evict the
free block needed farthest in the future), and ``Scored`` (score levels, LRU within a level)
fed by the real policy code (CacheSage) through the real decision path
(``engine_emitter.decision_book.DecisionBook``), as in the engine.

Runs are reproducible: nothing here or in the policy lets a set's iteration order (which follows
the interpreter's hash seed) decide between two equal blocks.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from engine_emitter.decision_book import DecisionBook
from framework_emitter.prefix_blocks import block_hashes
from framework_emitter.traces import TraceCall, next_in_session
from streams import events as ev

from .batched import TOKEN_BUDGET, run_batched
from .block_pool import BlockPool, EvictionOrder, SimResult, generated_block

SCORE_LEVELS = ev.SCORE_LEVELS
NEUTRAL_SCORE = 0.5


class LRU(EvictionOrder):
    def __init__(self) -> None:
        self._free: OrderedDict[str, None] = OrderedDict()

    def add(self, h: str, now: int) -> None:
        self._free[h] = None

    def remove(self, h: str) -> None:
        del self._free[h]

    def pop(self, now: int) -> str:
        return self._free.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._free)

    def __contains__(self, h: str) -> bool:
        return h in self._free


class Belady(EvictionOrder):
    """Evict the free block whose next use is farthest away (never again: first); among blocks next used
    by the same call, the deepest in its chain first.

    The tie matters: a prompt's blocks are all next used by the same call, and a chain is only as
    good as its unbroken head. Broken at random (hash order), the "optimum" fell below LRU on
    tau_airline at high pressure (0.540 vs 0.734) and lost 6 pp on magentic_one.
    """

    def __init__(self, uses: dict[str, list[int]], depths: Mapping[str, int] | None = None) -> None:
        self._uses = uses  # block hash -> call indices that use it, ascending
        self._depths = depths or {}  # block hash -> its position in its chain
        self._heap: list[tuple[float, int, str]] = []
        self._free: set[str] = set()

    @classmethod
    def for_calls(cls, calls: Sequence[TraceCall], block_size: int = 32) -> "Belady":
        """The optimum for exactly these calls (their future is its input)."""
        return cls(block_uses(calls, block_size), block_depths(calls, block_size))

    def _next_use(self, h: str, now: int) -> float:
        uses = self._uses.get(h, [])
        lo, hi = 0, len(uses)
        while lo < hi:  # first use strictly after now
            mid = (lo + hi) // 2
            if uses[mid] <= now:
                lo = mid + 1
            else:
                hi = mid
        return uses[lo] if lo < len(uses) else math.inf

    def add(self, h: str, now: int) -> None:
        self._free.add(h)
        heapq.heappush(self._heap, (-self._next_use(h, now), -self._depths.get(h, 0), h))

    def remove(self, h: str) -> None:
        self._free.discard(h)  # its heap entry goes stale and is skipped

    def pop(self, now: int) -> str:
        while True:
            neg_next, neg_depth, h = heapq.heappop(self._heap)
            if h not in self._free:
                continue  # a stale entry: the block was used again
            upcoming = self._next_use(h, now)
            if -neg_next == upcoming:
                self._free.discard(h)
                return h
            # Its next use went by while it was free (a preempted request's, in the batched engine): rank it anew.
            heapq.heappush(self._heap, (-upcoming, neg_depth, h))

    def __len__(self) -> int:
        return len(self._free)

    def __contains__(self, h: str) -> bool:
        return h in self._free


class Scored(EvictionOrder):
    """Score levels (lowest evicted first), LRU within a level; scores from a DecisionBook: the engine's
    free queue (engine_emitter.scheduler) as decisions steer it.

    Blocks moved to a level together go deepest first, so a chain's tail is evicted before its
    head; once a block is evicted, the blocks after it in its chains (``children_of``) are
    unreachable and go to the lowest level."""

    def __init__(self, book: DecisionBook, owner_of: Callable[[str], tuple[str, str] | None],
                 clock: Callable[[], float], depth_of: Callable[[str], int] | None = None,
                 children_of: Callable[[str], Iterable[str]] | None = None,
                 adjust: Callable[[str, int], int] | None = None) -> None:
        self.book, self._owner_of, self._clock = book, owner_of, clock
        self._depth_of, self._children_of, self._adjust = depth_of, children_of, adjust
        self._levels = [OrderedDict() for _ in range(SCORE_LEVELS)]
        self._level_of: dict[str, int] = {}
        self._orphans: set[str] = set()
        self.evicted_level = 0  # the level the latest evicted block was taken from (analysis)

    def level(self, h: str) -> int:
        if h in self._orphans:
            return 0
        score = self.book.score(h, self._owner_of(h), self._clock())
        score = NEUTRAL_SCORE if score is None else score
        level = min(int(score * SCORE_LEVELS), SCORE_LEVELS - 1)
        return level if self._adjust is None else self._adjust(h, level)

    def add(self, h: str, now: int) -> None:
        level = self.level(h)
        self._levels[level][h] = None
        self._level_of[h] = level

    def remove(self, h: str) -> None:
        del self._levels[self._level_of.pop(h)][h]
        self._orphans.discard(h)  # in use again: the prompt using it has its whole head

    def relevel(self, hashes: Iterable[str]) -> None:
        if self._depth_of is not None:
            # Ties keep the given order (a set's would vary with the interpreter's hash seed).
            hashes = sorted(dict.fromkeys(hashes), key=self._depth_of, reverse=True)
        for h in hashes:
            current = self._level_of.get(h)
            if current is not None and self.level(h) != current:
                self.remove(h)
                self.add(h, 0)

    def free_above(self, level: int) -> Iterator[str]:
        """Free blocks kept at a higher level than ``level`` (analysis)."""
        for kept in self._levels[level + 1:]:
            yield from kept

    def pop(self, now: int) -> str:
        for index, level in enumerate(self._levels):
            if level:
                self.evicted_level = index
                h = level.popitem(last=False)[0]
                del self._level_of[h]
                self._orphans.discard(h)
                self._orphan_descendants(h)
                return h
        raise IndexError("no free block")

    def _orphan_descendants(self, h: str) -> None:
        if self._children_of is None or not self.book.steering:
            return
        stack = list(self._children_of(h))
        while stack:  # through free blocks only: one in use has its head in use too
            child = stack.pop()
            if child in self._orphans or child not in self._level_of:
                continue
            self._orphans.add(child)
            stack.extend(self._children_of(child))
            if self._level_of[child] != 0:
                del self._levels[self._level_of[child]][child]
                self._levels[0][child] = None
                self._level_of[child] = 0

    def __len__(self) -> int:
        return len(self._level_of)

    def __contains__(self, h: str) -> bool:
        return h in self._level_of


class TTLPinned(LRU):
    """Continuum-like: a finished call's blocks are pinned for ``ttl`` calls (the session's next turn),
    LRU otherwise; when every free block is pinned the oldest goes anyway (pins never starve allocation)."""

    def __init__(self, ttl: int) -> None:
        super().__init__()
        self.ttl = ttl
        self._until: dict[str, int] = {}

    def add(self, h: str, now: int) -> None:
        super().add(h, now)
        self._until[h] = now + self.ttl

    def remove(self, h: str) -> None:
        super().remove(h)
        self._until.pop(h, None)

    def pop(self, now: int) -> str:
        for h in self._free:  # oldest first; pins expire, so the scan stops early
            if self._until.get(h, 0) <= now:
                del self._free[h]
                self._until.pop(h, None)
                return h
        h = self._free.popitem(last=False)[0]
        self._until.pop(h, None)
        return h


class StepsToExecution(EvictionOrder):
    """KVFlow-like: with the workflow graph known, evict first the blocks whose agents are the most
    steps away from running in their sessions (ended sessions: never), LRU among equals.

    Agent granularity, as KVFlow: a block's priority is the nearest of its (agent, session) users.
    """

    def __init__(self, distance: dict[str, dict[str, int]], state: "WorkflowState") -> None:
        self._distance, self._state = distance, state
        self._groups: dict[frozenset, OrderedDict[str, int]] = {}
        self._group_of: dict[str, frozenset] = {}
        self._clock = 0
        self._memo: dict[frozenset, float] = {}
        self._memo_at = -1

    def _steps(self, users: frozenset) -> float:
        best = math.inf
        for agent, session in users:
            current = self._state.current.get(session)
            if current is None or session in self._state.ended:
                continue
            best = min(best, self._distance.get(current, {}).get(agent, math.inf))
        return best

    def add(self, h: str, now: int) -> None:
        users = frozenset(self._state.users.get(h, ()))
        self._clock += 1
        self._groups.setdefault(users, OrderedDict())[h] = self._clock
        self._group_of[h] = users

    def remove(self, h: str) -> None:
        users = self._group_of.pop(h)
        group = self._groups[users]
        del group[h]
        if not group:
            del self._groups[users]

    def pop(self, now: int) -> str:
        if now != self._memo_at:  # session states change only between calls
            self._memo, self._memo_at = {}, now

        def priority(item):  # farthest first, then oldest
            users, group = item
            steps = self._memo.get(users)
            if steps is None:
                steps = self._memo[users] = self._steps(users)
            return (-steps, next(iter(group.values())))

        users, group = min(self._groups.items(), key=priority)
        h, _ = group.popitem(last=False)
        if not group:
            del self._groups[users]
        del self._group_of[h]
        return h

    def __len__(self) -> int:
        return len(self._group_of)

    def __contains__(self, h: str) -> bool:
        return h in self._group_of


@dataclass
class WorkflowState:
    """What a workflow-aware engine knows during a run: each session's current agent, which sessions
    are over, and who used each block (the last few (agent, session) pairs)."""

    current: dict[str, str] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    users: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


def workflow_distances(calls: Sequence[TraceCall]) -> dict[str, dict[str, int]]:
    """Steps from each agent to each other along the workflow graph (every observed transition an
    edge); from an agent to itself: its shortest cycle."""
    edges: dict[str, set[str]] = {}
    last: dict[str, str] = {}
    for call in calls:
        before = last.get(call.session)
        if before is not None:
            edges.setdefault(before, set()).add(call.agent)
        edges.setdefault(call.agent, set())
        last[call.session] = call.agent
    distance: dict[str, dict[str, int]] = {}
    for start in edges:
        found: dict[str, int] = {}
        frontier, steps = [start], 0
        seen: set[str] = set()
        while frontier:
            steps += 1
            nxt = []
            for agent in frontier:
                for target in edges[agent]:
                    if target not in found:
                        found[target] = steps
                    if target not in seen:
                        seen.add(target)
                        nxt.append(target)
            frontier = nxt
        distance[start] = found
    return distance


def run_steps_to_execution(calls: Sequence[TraceCall], capacity_blocks: int, *, block_size: int = 32) -> SimResult:
    """KVFlow-like eviction with the workflow graph taken from the whole trace (known in advance)."""
    state = WorkflowState()
    remaining: dict[str, int] = {}
    for call in calls:
        remaining[call.session] = remaining.get(call.session, 0) + 1
    order = StepsToExecution(workflow_distances(calls), state)

    def on_call(i: int, call: TraceCall, hashes: list[str], hit: int) -> None:
        state.current[call.session] = call.agent
        user = (call.agent, call.session)
        for h in hashes:
            before = state.users.get(h, ())
            state.users[h] = (*(u for u in before if u != user), user)[-8:]

    def after_call(i: int, call: TraceCall) -> None:
        remaining[call.session] -= 1
        if not remaining[call.session]:
            state.ended.add(call.session)

    return simulate(calls, capacity_blocks, order, block_size=block_size, name="StepsToExecution",
                    on_call=on_call, after_call=after_call)


def distinct_blocks(calls: Sequence[TraceCall], block_size: int = 32) -> int:
    return len({h for c in calls for h in block_hashes(c.segments, block_size)})


def simulate(calls: Sequence[TraceCall], capacity_blocks: int, order: EvictionOrder, *, block_size: int = 32,
             name: str = "", on_call: Callable[[int, TraceCall, list[str], int], None] | None = None,
             on_evict: Callable[[str], None] | None = None, after_call: Callable[[int, TraceCall], None] | None = None,
             in_flight: int = 1, on_finish: Callable[[int, TraceCall], None] | None = None,
             prefetch: Callable[[int], Iterable[Sequence[str]]] | None = None,
             on_prefetch: Callable[[Sequence[str]], None] | None = None, generated: int = 0,
             on_generated: Callable[[int, TraceCall, list[str]], None] | None = None,
             on_step: Callable[[int], None] | None = None, token_budget: int = TOKEN_BUDGET) -> SimResult:
    """Run the calls through a block pool of ``capacity_blocks`` with eviction ``order``.

    Callbacks let a policy observe (``on_call(i, call, hashes, hit_blocks)``, ``on_evict(h)``,
    ``on_finish(i, call)`` when the call's blocks are freed) and act (``after_call``) between
    calls, as the stream would around an engine.
    ``in_flight`` > 1 runs the engine's steps (``evaluation.batched``): the replay keeps that many requests in
    flight, and each step schedules them as vLLM's scheduler does; ``on_step(step)`` opens each step, the
    policy's act cadence (``after_call`` and ``prefetch`` are not called).
    ``capacity_blocks`` is the engine's whole KV capacity, working set included.
    ``prefetch(i)``, one at a time only: the block chains to compute while call ``i`` runs (its blocks
    in use), as the engine runs a held prefetch in the decode steps of the one running request; each
    hits its resident head, computes the rest (evicting in policy order), is reported to
    ``on_prefetch(chain)`` and frees its blocks at once.
    ``generated``: the most tokens a call generates, as the engine's ``max_tokens`` (each call generates
    ``min(output_tokens, generated)``, at least one); 0 leaves outputs out. The KV of all but the last of
    them takes blocks after the call's prefill; the blocks they fill are cached, reported to
    ``on_generated(i, call, hashes)``, and freed with the call's own, before them (they are its tail).
    """
    result = SimResult(name or type(order).__name__, capacity_blocks)
    pool = BlockPool(capacity_blocks, order, result, on_evict)
    if in_flight > 1:
        return run_batched(calls, pool, in_flight, block_size=block_size, generated=generated,
                            token_budget=token_budget, on_call=on_call, on_finish=on_finish,
                            on_generated=on_generated, on_step=on_step)

    def run_prefetch(chain: list[str], now: int) -> None:
        """Compute a prefetch's chain past its resident head; its blocks are free again at once."""
        head = pool.resident_head(chain)
        if head == len(chain):
            return  # all resident: the engine does not run it
        for h in chain:
            if h in order:
                order.remove(h)
        pool.allocate(sum(h not in pool.cached for h in chain), now)
        pool.cached.update(chain)
        result.prefetches += 1
        result.prefetch_tokens += (len(chain) - head) * block_size
        if on_prefetch:
            on_prefetch(chain)
        for h in reversed(chain):
            if h not in pool.users:  # (a block the running call uses stays in use)
                order.add(h, now)

    for i, call in enumerate(calls):
        hashes = block_hashes(call.segments, block_size)
        prompt = call.prompt_tokens
        # A last block computed again goes into a block of its own (here a spare, empty once the call ends; vLLM
        # keeps that copy cached beside the first until one of them is evicted).
        hit, recomputed = pool.cache_hit(hashes, prompt, block_size)
        hit_tokens = hit * block_size
        unique = list(dict.fromkeys(hashes))
        missing = sum(h not in pool.cached for h in unique)
        for h in unique:  # every cached block of the prompt is in use now: out of the free queue
            pool.take(h)
        pool.allocate(missing + recomputed + (1 if prompt % block_size else 0), i)
        if on_call:
            on_call(i, call, hashes, hit)
        pool.cached.update(hashes)
        held, kv_tokens = unique, prompt
        if generated:
            # The last generated token's KV is never computed: the request stops when it is sampled.
            kv_tokens = prompt + call.generated_tokens(generated) - 1
            pool.allocate(-(-kv_tokens // block_size) - -(-prompt // block_size), i)
            filled = [generated_block(i, j) for j in range(prompt // block_size, kv_tokens // block_size)]
            if filled:
                for h in filled:
                    pool.compute(h)
                held = unique + filled
                if on_generated:
                    on_generated(i, call, filled)
        if prefetch is not None:
            for chain in prefetch(i):
                run_prefetch(list(chain), i)
        # Finished before the next call: its blocks are free (and scored) now.
        pool.release(held, recomputed + (1 if kv_tokens % block_size else 0), i)
        if on_finish:
            on_finish(i, call)
        result.prompt_tokens += prompt
        result.hit_tokens += hit_tokens
        result.calls += 1
        result.per_call_hits.append(hit_tokens)
        if after_call:
            after_call(i, call)
    return result


def block_uses(calls: Sequence[TraceCall], block_size: int = 32) -> dict[str, list[int]]:
    """Block hash -> the indices of the calls that use it, ascending."""
    uses: dict[str, list[int]] = {}
    for i, call in enumerate(calls):
        for h in block_hashes(call.segments, block_size):
            uses.setdefault(h, []).append(i)
    return uses


def block_depths(calls: Sequence[TraceCall], block_size: int = 32) -> dict[str, int]:
    """Block hash -> its position in its chain (a chained hash has exactly one)."""
    return {h: position for call in calls for position, h in enumerate(block_hashes(call.segments, block_size))}


# The simulated clock CacheSage sees: call i of a run starts at CLOCK_START + i + 1 (one unit per call started).
CLOCK_START = 1_000_000.0


def run_cachesage(calls: Sequence[TraceCall], capacity_blocks: int, workload: str, *, block_size: int = 32,
                  policy=None, in_flight: int = 1, observe_sim=None,  # noqa: ANN001
                  adjust_level: Callable[[str, int], int] | None = None,
                  on_order: Callable[[Scored], None] | None = None, prefetch: bool = False,
                  announce: bool = True, generated: int = 0) -> SimResult:
    """The real CacheSage, fed the events a run would produce, its decisions applied through a DecisionBook.

    ``announce``: as the replay's framework does, a call's end names the agent of the session's next call
    (a handoff, to itself when the agent goes on): the framework's routing decision, made when the step
    ends; without it CacheSage has only its learned chain for who is next.

    ``prefetch`` (one at a time): its prefetches run as the engine runs them (``AgentRuntimeScheduler``):
    held per session, dropped when the session's own call comes first or the decision expires, run in
    the decode steps of the next call (see ``simulate``); without it they are ignored, as in the
    bench's ``cachesage`` arm. Pins are not modelled (the free queue here has score levels only).

    ``generated`` (see ``simulate``): with outputs modelled, the policy also acts between a call's prefill and
    its decode, as the engine's act cadence does once the prefill step is over, and sees the blocks the
    outputs fill stored.

    ``observe_sim``: an optional (on_call, on_evict) pair that also sees the simulation (analysis);
    ``adjust_level(hash, level)``: changes the level a free block gets (an oracle fact added, analysis);
    ``on_order(order)``: given the free queue before the run, to read it during the run (analysis)."""
    from policy_workers.cachesage import CacheSage

    sage = policy or CacheSage()
    book = DecisionBook()
    owners: dict[str, tuple[str, str]] = {}
    depths: dict[str, int] = {}
    children: dict[str, dict[str, None]] = {}
    clock = {"t": CLOCK_START}
    order = Scored(book, owners.get, lambda: clock["t"], lambda h: depths.get(h, 0), lambda h: children.get(h, ()),
                   adjust_level)
    if on_order is not None:
        on_order(order)
    previous: dict[str, TraceCall] = {}
    steps: dict[str, int] = {}
    started: dict[int, int] = {}  # call index -> its step number, while it runs
    chains: dict[int, list[str]] = {}  # call index -> its prompt's blocks, while it runs (outputs modelled)
    evicted: list[str] = []
    held: OrderedDict[str, ev.Prefetch] = OrderedDict()  # session -> its prefetch not yet run
    running_prefetch: dict[tuple[str, ...], ev.Prefetch] = {}
    remaining: dict[str, int] = {}
    for call in calls:
        remaining[call.session] = remaining.get(call.session, 0) + 1
    following = next_in_session(calls)

    stepped = in_flight > 1  # the batched engine: time is its steps, and the policy acts between them

    def on_call(i: int, call: TraceCall, hashes: list[str], hit: int) -> None:
        if not stepped:
            clock["t"] += 1.0
        now = clock["t"]
        step = steps.get(call.session, 0)
        steps[call.session] = step + 1
        before = previous.get(call.session)
        sage.observe(ev.AgentStepStart(workload=workload, agent=call.agent, session=call.session, step=step,
                                       time=now, prefix_fingerprint="-",
                                       prefix_tokens=sum(n for _, n in call.segments[:-1] or call.segments),
                                       previous_agent=before.agent if before else None))
        report_evicted(now)
        if hashes:
            sage.observe(ev.KvBlocksStored(workload=workload, agent=call.agent, session=call.session, time=now,
                                           request=f"{call.session}-{step}", block_hashes=tuple(hashes),
                                           block_size=block_size))
            for position, h in enumerate(hashes):
                owners[h] = (workload, call.agent)
                depths[h] = position
                if position:
                    children.setdefault(hashes[position - 1], {})[h] = None  # ordered: reproducible runs
        previous[call.session] = call
        started[i] = step
        held.pop(call.session, None)  # its call came first: it computes its own prefix
        if generated:
            chains[i] = hashes
            if not stepped:  # a decode follows, and the engine's act cadence comes round once the prefill is over
                act(now + 0.1)

    def report_evicted(now: float) -> None:  # before the stores they made room for, as the engine reports them
        if evicted:
            sage.observe(ev.KvBlocksRemoved(workload=workload, agent="", time=now, block_hashes=tuple(evicted)))
            evicted.clear()

    def on_generated(i: int, call: TraceCall, filled: list[str]) -> None:
        prompt = chains[i]
        report_evicted(clock["t"] + 0.2)
        sage.observe(ev.KvBlocksStored(workload=workload, agent=call.agent, session=call.session,
                                       time=clock["t"] + 0.2, request=f"{call.session}-{started[i]}",
                                       block_hashes=tuple(filled), block_size=block_size, start_index=len(prompt)))
        parent = prompt[-1] if prompt else None
        for position, h in enumerate(filled, start=len(prompt)):
            owners[h] = (workload, call.agent)
            depths[h] = position
            if parent is not None:
                children.setdefault(parent, {})[h] = None
            parent = h

    def on_finish(i: int, call: TraceCall) -> None:
        now = clock["t"] + 0.5
        chains.pop(i, None)
        sage.observe(ev.AgentStepEnd(workload=workload, agent=call.agent, session=call.session, step=started.pop(i),
                                     time=now, output_tokens=call.output_tokens))
        remaining[call.session] -= 1
        if not remaining[call.session]:  # the framework knows when a session is over
            sage.observe(ev.SessionEnd(workload=workload, agent=call.agent, session=call.session, time=now))
        elif announce and i in following:  # and, having routed the step's outcome, who runs next
            nxt = following[i]
            sage.observe(ev.Handoff(workload=workload, agent=call.agent, session=call.session, time=now,
                                    step=nxt.seq, to_agent=nxt.agent))
        if not stepped:  # as the engine replay does: a finished request is acted on before the next allocates
            act(now)

    def on_step(step: int) -> None:  # (batched) the act after the last step's finished requests
        clock["t"] = CLOCK_START + step
        act(clock["t"])

    def act(now: float) -> None:
        touched = []
        for decision in sage.act(workload, now):
            if not book.apply(decision, now):
                continue
            if isinstance(decision, ev.Prefetch):
                if prefetch:
                    held.pop(decision.session, None)
                    held[decision.session] = decision
            else:
                touched.extend(decision.block_hashes)
        order.relevel(touched)

    def admit(i: int) -> list[tuple[str, ...]]:
        now = clock["t"]
        running_prefetch.clear()
        while held:
            _, decision = held.popitem(last=False)
            if decision.expires_at > now:
                running_prefetch[decision.block_hashes] = decision
        return list(running_prefetch)

    def on_prefetch(chain: Sequence[str]) -> None:
        decision = running_prefetch[tuple(chain)]
        sage.observe(ev.KvBlocksStored(workload=workload, agent=decision.agent, session=decision.session,
                                       time=clock["t"] + 0.25, request=f"prefetch-{decision.decision_id}",
                                       block_hashes=tuple(chain), block_size=block_size, prefetch=True))

    def after_call(i: int, call: TraceCall) -> None:
        act(clock["t"] + 0.6)

    on_evict = evicted.append
    if observe_sim is not None:
        extra_call, extra_evict = observe_sim
        policy_call = on_call

        def on_call(i: int, call: TraceCall, hashes: list[str], hit: int) -> None:  # noqa: F811
            extra_call(i, call, hashes, hit)
            policy_call(i, call, hashes, hit)

        def on_evict(h: str) -> None:
            evicted.append(h)
            extra_evict(h)

    return simulate(calls, capacity_blocks, order, block_size=block_size, name="CacheSage", on_call=on_call,
                    on_evict=on_evict, after_call=after_call, in_flight=in_flight, on_finish=on_finish,
                    prefetch=admit if prefetch else None, on_prefetch=on_prefetch, generated=generated,
                    on_generated=on_generated, on_step=on_step)


def learned_state(calls: Sequence[TraceCall], capacity_blocks: int, workload: str, *, in_flight: int = 1,
                  block_size: int = 32, announce: bool = True, generated: int = 0,
                  overrides: dict | None = None) -> dict:
    """What CacheSage (with these CacheSageConfig ``overrides``) learns about a workload from ``calls`` (run
    through the simulator at this capacity), as a worker persists it: transitions, reuse by age, agents' turns.
    Timing is left out (learned on the step clock it is in the engine's units, but keeping it was mixed within
    0.3 pp in session 30), and so are the sessions (all ended)."""
    from policy_workers.cachesage import CacheSage

    sage = CacheSage(**(overrides or {}))
    run_cachesage(calls, capacity_blocks, workload, block_size=block_size, policy=sage, in_flight=in_flight,
                  announce=announce, generated=generated)
    state = sage.to_state([workload])
    for saved in state.values():
        saved["timing"], saved["sessions"] = None, {}
    return state
