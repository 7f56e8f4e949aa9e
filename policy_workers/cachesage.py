"""CacheSage: hit-density KV eviction, pinning and prefetch from learned agent transitions.

Per workload it learns the agent transition matrix online (decayed counts, a
prior), per-agent timing (step duration, the gap before a call) and each
session's call interval. For every cached prefix block it knows who used it:
(agent, session) pairs from the engine's KV events, and how many prompts ago
each last had it. A block's score is its hit density, the expected reuses per
unit of time it is kept (see ``CacheSage._group_scorer``):

    density(block) = sum over users (agent a, session s) of
                         sum_j P(a's j-th next prompt in s is the first to reuse it) * E[1 / T_j]
                     + the rate at which new sessions have come to it, times P(they still come)
                       (blocks seen in 2+ sessions; a silence long against their spacing says it is done)

where T_j is when that prompt comes: the time left before s calls again
(with many sessions sharing the engine, the one that has waited longest runs
next), then the number of calls until a runs (its distribution from the
transition chain) at the session's call interval; and the reuse probabilities
come from a learned hazard by prompt age (``reuse``; agents alternate prompt families: a
new phase keeps the system prompt but not the conversation, and a family often
comes back a call later) and by the reply the prompt got (a long one tends to
close the conversation). A block shared by several agents or sessions is worth
all of its expected reuses; one used only by an ended session is worth nothing.

Acts: eviction scores (bucketed, only when a block's bucket changes),
pins with a TTL for the predicted next agent's resident prefix while its session
waits (tool call, between steps), and prefetch of that prefix when it is no
longer resident, for the sessions due to call soonest, where prefetches this
confident have served enough of what they computed (``calibration``).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from streams import events as ev

from .calibration import PrefetchCalibration, served_fraction
from .continuation import Continuation
from .policy import Policy, Prediction
from .reuse import (AGES, CLASSES, REUSE_LAYOUT, ReuseHazard, is_fresh, position_bin, reply_class,
                    reused_class, tail_class)
from .transitions import TransitionModel
from .work_clock import make_clock


@dataclass
class CacheSageConfig:
    """CacheSage's settings. Durations (the ``_s`` fields but ``max_wall_ttl_s``) are on the policy's clock:
    agent steps started in the workload with ``clock="steps"`` (the default; ``work_clock``), seconds with
    ``clock="wall"``."""

    clock: str = "steps"  # "steps" or "wall" (work_clock.CLOCKS)
    horizon_s: float = 60.0  # how far ahead reuse counts when the cache is under no pressure
    max_turnover_s: float = 3600.0
    max_lookahead_calls: int = 32
    decision_ttl_s: float = 30.0  # every decision expires; refreshed while still true
    max_wall_ttl_s: float = 300.0  # wall seconds, any clock: the longest a silent worker's decision holds
    session_idle_expiry_s: float = 900.0  # a session with no event for this long is over
    pin_threshold: float = 0.6  # next-call probability that earns a pin
    pin_ttl_cap_s: float = 30.0
    prefetch_threshold: float = 0.5
    # Prefetch only for the sessions due to call soonest: one prefetched far ahead of its call is evicted
    # again before the call comes, and the engine runs prefetches only where no request waits (idle capacity).
    prefetch_lead: int = 2
    keep_threshold: float = 0.5  # P(the next prompt keeps a block) for pins and prefetches to cover it
    score_buckets: int = ev.SCORE_LEVELS  # the engine's bins: a finer score changes nothing there
    max_blocks: int = 200_000  # block metadata tracked per workload (oldest forgotten first)
    max_users_per_block: int = 8
    decay: float = 0.97
    prior_strength: float = 0.5
    rate_window_s: float = 300.0  # time constant of the eviction-rate estimate (the cache's turnover)
    default_step_s: float = 5.0  # assumed call-to-call time before any timing is learned
    min_residual: float = 0.25  # the least time left before a session's next call, in call intervals


@dataclass
class _Step:
    agent: str
    started: float
    ended: float | None = None
    learned_in: bool = False  # the transition into this step was learned from its own event
    prefix_tokens: int | None = None  # the prompt before its newest message (the framework's view)


@dataclass
class _Session:
    """A session's recent steps by step number.

    Events are keyed by agent, so one session's events arrive in order per
    agent but interleaved arbitrarily across agents (different partitions);
    the step number, not arrival, orders them.
    """

    steps: OrderedDict = field(default_factory=OrderedDict)  # step -> _Step, the latest MAX_STEPS_KEPT
    seen: set = field(default_factory=set)  # every step number observed (duplicate detection)
    latest: int = -1
    last_seen: float = 0.0
    in_tool: bool = False
    handoff_to: str | None = None
    pinned_step: tuple[int | None, str] | None = None  # (step, agent) last pinned for
    prefetched_step: tuple[int | None, str] | None = None  # (step, agent) last prefetched for
    # (agent, step, hashes) of the pin in force for its next call: released when that call starts (its
    # prompt holds the blocks from there), when another agent is named instead, or when the session ends
    pinned: tuple[str, int | None, tuple[str, ...]] | None = None
    # (probability, blocks it would compute, whether it ran) of the latest prefetch considered for its next
    # call: scored against the next prompt (PrefetchCalibration)
    considered: tuple[float, tuple[str, ...], bool] | None = None
    interval: float = 0.0  # EWMA of the time from one of its calls' start to the next's
    ended: bool = False  # kept until idle expiry so re-read events are recognised as duplicates
    calls_by_agent: dict = field(default_factory=dict)  # agent -> its calls in this session so far

    @property
    def agent(self) -> str | None:
        current = self.steps.get(self.latest)
        return current.agent if current else None

    @property
    def step(self) -> int | None:
        return self.latest if self.latest >= 0 else None

    @property
    def step_ended(self) -> float | None:
        current = self.steps.get(self.latest)
        return current.ended if current else None


MAX_STEPS_KEPT = 64
FORGOTTEN = AGES  # a block's users that had it in none of their last AGES prompts: they will not reuse it
MAX_STEPS_SEEN = 4096


@dataclass
class _Block:
    """A cached block's group key: (users by age, shared, position bin).

    Users are (agent, session) pairs; ``users[age]`` holds those whose prompt
    ``age`` prompts ago (0: the latest) was the last to contain the block, most
    recent last, and ``users[FORGOTTEN]`` those that have not had it for longer. ``shared`` turns on once two sessions have used the block
    (system prompts, tool schemas) and stays on. The position bin is fixed: a
    chained hash has one chain position. Blocks with one key share one score,
    so keys are tuples computed once per KV event, not per block.
    """

    key: tuple = ((),) * (AGES + 1) + (0, 0)
    resident: bool = False
    request: str | None = None  # the last request that used it (a different one marks it reused)
    born: float = 0.0  # when it was first stored
    renewed: float = 0.0  # when a session new to it last used it (``born`` until a second session does)

    @classmethod
    def new(cls, block_class: int, now: float, request: str | None = None) -> "_Block":
        """A block first seen now: no users, no sessions yet, and its class."""
        return cls(((),) * (AGES + 1) + (0, block_class), request=request, born=now, renewed=now)


class _AgentTiming:
    """Per-agent EWMAs in float32 arrays indexed like the transition model (bounded state)."""

    ROWS = 2  # step_s, gap_s

    def __init__(self) -> None:
        self.arrays = np.zeros((self.ROWS, 8), dtype=np.float32)

    def _grow(self, i: int) -> None:
        while i >= self.arrays.shape[1]:
            self.arrays = np.concatenate([self.arrays, np.zeros_like(self.arrays)], axis=1)

    def update(self, row: int, i: int, value: float, alpha: float = 0.2) -> None:
        self._grow(i)
        old = self.arrays[row, i]
        self.arrays[row, i] = value if old == 0 else (1 - alpha) * old + alpha * value

    def get(self, row: int, i: int) -> float:
        return float(self.arrays[row, i]) if i < self.arrays.shape[1] else 0.0

    def nbytes(self, n: int) -> int:
        return self.arrays.shape[0] * n * self.arrays.itemsize


STEP_S, GAP_S = 0, 1


class _Workload:
    def __init__(self, config: CacheSageConfig) -> None:
        self.clock = make_clock(config.clock)
        self.model = TransitionModel(config.decay, config.prior_strength)
        self.timing = _AgentTiming()
        self.reuse = ReuseHazard()
        self.turns = Continuation()  # P(an agent that has made n calls in its session makes another); key: agent index + 1
        self.spread = Continuation()  # P(a block n sessions have used gets another session); pooled key only
        # Whether a block two sessions have used gets a third, by its latest user's agent (key: its index + 1;
        # at two only, the state stays small): one agent's documents are read by a few sessions each, another's
        # by two and done
        self.spread_by_agent = Continuation(max_calls=0)
        self.calibration = PrefetchCalibration()
        self.sessions: dict[str, _Session] = {}
        self.blocks: OrderedDict[str, _Block] = OrderedDict()
        self.prefix_of: dict[tuple[str, str], tuple[str | None, list[str]]] = {}  # (agent, session) -> (request, hashes)
        self.earlier: dict[tuple[str, str], deque] = {}  # (agent, session) -> its earlier prompts' chains, newest last
        # (agent, session) -> whether each of its prompts got a long reply, newest first (aligned with ages)
        self.replies: dict[tuple[str, str], deque] = {}
        # Resident blocks grouped by key (same users => same score): act works per group, not per block.
        self.groups: dict[tuple, set[str]] = {}
        self.emitted: dict[tuple, tuple[int, float, float]] = {}  # group key -> (bucket, when, wall time) last decided
        self.dirty: set[tuple] = set()  # groups that gained blocks since their last decision
        self.removals = (0.0, 0.0)  # decayed count of evicted blocks, when last updated (turnover)
        self.watched_since: float | None = None  # the first event's time: how long the rate has been measured
        self.born: dict[tuple, float] = {}  # group key -> when its oldest member was first stored
        self.renewed: dict[tuple, float] = {}  # group key -> when a member last gained a session
        # (handoff, current agent, agent) -> (model version, P(the agent's first call is at t))
        self.pmf_cache: dict[tuple, tuple] = {}
        self.events_since_act = 0
        self.last_act = -math.inf  # on the policy's clock
        self.last_act_wall = -math.inf
        self.unpins: list[tuple[str, str, int | None, tuple[str, ...]]] = []  # (session, agent, step, hashes)
        self.interval = 0.0  # EWMA over sessions of call start to the session's next call start

    def ungroup(self, block_hash: str, block: "_Block") -> None:
        key = block.key
        members = self.groups.get(key)
        if members is not None:
            members.discard(block_hash)
            if not members:
                del self.groups[key]
                self._drop(key)

    def regroup(self, hashes: list[str], old: tuple | None, new: tuple) -> None:
        """Move resident blocks from group ``old`` (None: they were not resident) to group ``new``."""
        if old is not None:
            members = self.groups.get(old)
            if members is not None:
                members.difference_update(hashes)
                if not members:
                    del self.groups[old]
                    self._drop(old)
        self.groups.setdefault(new, set()).update(hashes)
        self.dirty.add(new)
        members = [self.blocks[h] for h in hashes if h in self.blocks]
        if members:
            born = min(b.born for b in members)
            self.born[new] = min(self.born.get(new, born), born)
            renewed = max(b.renewed for b in members)
            self.renewed[new] = max(self.renewed.get(new, renewed), renewed)

    def _drop(self, key: tuple) -> None:
        """Forget what was kept for a group that has no members left."""
        self.emitted.pop(key, None)
        self.dirty.discard(key)
        self.born.pop(key, None)
        self.renewed.pop(key, None)

    def spread_agent(self, key: tuple) -> int:
        """A block group's key in ``spread_by_agent``: its latest user's agent index + 1 (0, the pooled row:
        no user, or an agent the model has not registered; scoring must not register agents)."""
        agent = _latest_agent(key)
        i = self.model.index.get(agent) if agent is not None else None
        return 0 if i is None else i + 1

    def observe_spread(self, key: tuple, n: int, outcome: str) -> None:
        """A block group that ``n`` sessions have used got another (``continued``), has none for now
        (``stopped``), or got one after that stop (``revived``): pooled, and at two by its agent."""
        getattr(self.spread, f"observe_{outcome}")(n, 0)
        if n == 2:
            getattr(self.spread_by_agent, f"observe_{outcome}")(0, self.spread_agent(key))

    def p_spread(self, sessions: int, agent_key: int) -> float:
        """P(a block ``sessions`` (>= 2) sessions have used gets another): every block's rate at ``sessions``;
        at two, its agent's blocks' shrunk toward it."""
        pooled = self.spread.p_more(sessions, 0, prior=1.0)
        return self.spread_by_agent.p_more(0, agent_key, prior=pooled, pooled=False) if sessions == 2 else pooled

    def all_ended(self, sessions: Iterable[str]) -> bool:
        """Every one of these sessions has ended (or expired)."""
        return all(self.sessions.get(s) is None or self.sessions[s].ended for s in sessions)

    def learned_nbytes(self) -> int:
        """Bytes of what was learned about the workload's agents (transitions, timing, reuse hazard, turns, spread,
        prefetch outcomes)."""
        n = len(self.model)
        return (self.model.nbytes() + self.timing.nbytes(n) + self.reuse.nbytes(n) + self.turns.nbytes(n)
                + self.spread.nbytes(0) + self.spread_by_agent.nbytes(n) + self.calibration.nbytes())


class CacheSage(Policy):
    name = "cachesage"

    def __init__(self, config: CacheSageConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = config or CacheSageConfig(**overrides)
        make_clock(self.config.clock)  # an unknown clock is an error here, not at the first event
        self._workloads: dict[str, _Workload] = {}

    # --- observe --------------------------------------------------------------

    def workload(self, name: str) -> _Workload:
        state = self._workloads.get(name)
        if state is None:
            state = self._workloads[name] = _Workload(self.config)
        return state

    def workloads(self) -> list[str]:
        return sorted(self._workloads)

    def observe(self, event: ev.Event) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is None:
            self.skip(f"unused:{event.type_name}")
            return
        needs_session = isinstance(event, ev.FrameworkEvent)
        if needs_session and not event.session:
            self.skip("missing_session")
            return
        w = self.workload(event.workload)
        t = w.clock.event_time(event)  # the event's time on the policy's clock: what handlers time it by
        w.events_since_act += 1
        if w.watched_since is None or t < w.watched_since:
            w.watched_since = t
        handler(self, w, event, t)

    def _session(self, w: _Workload, event: ev.Event, t: float) -> _Session:
        session = w.sessions.get(event.session)
        if session is None:
            session = w.sessions[event.session] = _Session()
        session.last_seen = max(session.last_seen, t)
        return session

    def _on_session_start(self, w: _Workload, event: ev.SessionStart, t: float) -> None:
        self._session(w, event, t)

    def _on_session_end(self, w: _Workload, event: ev.SessionEnd, t: float) -> None:
        session = self._session(w, event, t)
        if not session.ended:  # every agent's last call in the session was its last
            for agent, turns in session.calls_by_agent.items():
                w.turns.observe_stopped(turns, w.model.agent_id(agent) + 1)
        if session.considered is not None:  # the call it was for never came
            w.calibration.observe(session.considered[0], 0.0)
            session.considered = None
        session.ended, session.in_tool, session.handoff_to = True, False, None
        self._release_pin(w, event.session, session)
        session.steps.clear()
        users = [k for k in w.prefix_of if k[1] == event.session]
        self._spread_stopped(w, users)
        for key in users:
            del w.prefix_of[key]
            w.earlier.pop(key, None)
            w.replies.pop(key, None)

    def _spread_stopped(self, w: _Workload, users: list[tuple[str, str]]) -> None:
        """The ended session's users' blocks whose sessions have all ended: so far, they stop at the sessions
        they have (censored: a later session's reuse revives the outcome, see ``_spread``)."""
        keys: dict[tuple, None] = {}  # ordered, as everything the policy iterates: reproducible decisions
        for user in users:
            for chain in (w.prefix_of[user][1], *w.earlier.get(user, ())):
                keys.update((w.blocks[h].key, None) for h in chain if h in w.blocks)
        for key in keys:
            sessions = _sessions_of(key)
            if w.all_ended(sessions):
                w.observe_spread(key, max(key[-2], len(sessions)), "stopped")

    def _spread(self, w: _Workload, key: tuple, session: str) -> None:
        """A block with ``key`` is used by ``session``: if it is new to the block, the block spread."""
        sessions = _sessions_of(key)
        if not sessions or session in sessions:
            return
        # A stop was counted when its last session ended: a late session revives it.
        w.observe_spread(key, max(key[-2], len(sessions)), "revived" if w.all_ended(sessions) else "continued")

    def _on_step_start(self, w: _Workload, event: ev.AgentStepStart, t: float) -> None:
        session = self._session(w, event, t)
        step = event.step if event.step is not None else session.latest + 1
        if step in session.seen or len(session.seen) >= MAX_STEPS_SEEN:
            self.skip("duplicate_step")  # e.g. re-read after a restart
            return
        session.seen.add(step)
        w.clock.step_started()
        i = w.model.observe_call(event.agent)
        turns = session.calls_by_agent[event.agent] = session.calls_by_agent.get(event.agent, 0) + 1
        if turns >= 2:
            w.turns.observe_continued(turns - 1, i + 1)
        if step <= session.latest - MAX_STEPS_KEPT:  # far behind its session's other agents
            if event.previous_agent is not None:
                w.model.observe(event.previous_agent, event.agent)
            elif step > 0:  # a first step has no transition into it
                self.skip("transition_lost_without_previous_agent")
            return
        session.steps[step] = _Step(event.agent, t, learned_in=event.previous_agent is not None,
                                    prefix_tokens=event.prefix_tokens)
        before, after = session.steps.get(step - 1), session.steps.get(step + 1)
        # Learn each transition exactly once: from the event's own previous_agent when the
        # framework sent it; otherwise when the second of the two consecutive steps arrives.
        if event.previous_agent is not None:
            w.model.observe(event.previous_agent, event.agent)
        elif before is not None:
            w.model.observe(before.agent, event.agent)
        if before is not None and before.ended is not None:
            w.timing.update(GAP_S, i, max(t - before.ended, 0.0))
        if before is not None and step > session.latest:
            gap = max(t - before.started, 0.0)
            session.interval = gap if not session.interval else 0.7 * session.interval + 0.3 * gap
            w.interval = gap if not w.interval else 0.95 * w.interval + 0.05 * gap
        if after is not None and not after.learned_in:
            w.model.observe(event.agent, after.agent)
        if step > session.latest:
            session.latest = step
            session.in_tool, session.handoff_to = False, None
            self._release_pin(w, event.session, session)
        while len(session.steps) > MAX_STEPS_KEPT:
            session.steps.pop(min(session.steps))

    def _on_step_end(self, w: _Workload, event: ev.AgentStepEnd, t: float) -> None:
        session = self._session(w, event, t)
        step = event.step if event.step is not None else session.latest
        current = session.steps.get(step)
        if current is None or current.agent != event.agent:
            if session.ended:
                self.skip("step_end_after_session_end")  # its agent's partition ran behind the session end
            else:
                self.skip("duplicate_step_end" if step in session.seen and current is None else "step_end_without_start")
            return
        current.ended = t
        # A duration the framework measured is in seconds: it stands only on the wall clock.
        measured = event.duration_s if w.clock.kind == "wall" else None
        duration = measured if measured is not None else t - current.started
        i = w.model.agent_id(event.agent)
        w.timing.update(STEP_S, i, max(duration, 0.0))
        replies = w.replies.get((event.agent, event.session))
        if replies:
            replies[0] = w.reuse.long_reply(i, event.output_tokens)
        after = session.steps.get(step + 1)
        if after is not None:
            w.timing.update(GAP_S, w.model.agent_id(after.agent), max(after.started - t, 0.0))

    def _on_handoff(self, w: _Workload, event: ev.Handoff, t: float) -> None:
        session = self._session(w, event, t)
        if event.step is not None and event.step <= session.latest:
            self.skip("handoff_after_its_step")  # the named step started first (another partition ran ahead)
            return
        session.handoff_to = event.to_agent

    def _on_tool_start(self, w: _Workload, event: ev.ToolCallStart, t: float) -> None:
        self._session(w, event, t).in_tool = True

    def _on_tool_end(self, w: _Workload, event: ev.ToolCallEnd, t: float) -> None:
        self._session(w, event, t).in_tool = False

    def _with_user(self, key: tuple, user: tuple[str, str]) -> tuple:
        """``user`` has the block in its latest prompt (age 0)."""
        *ages, shared, pbin = key
        if ages[0] and ages[0][-1] == user and not any(user in users for users in ages[1:]):
            return key
        cap = self.config.max_users_per_block
        if user[1] not in _sessions_of(key):
            shared += 1  # counted past the users kept: a prompt every session reads has its true count
        ages = [tuple(u for u in users if u != user) for users in ages]
        ages[0] = (*ages[0], user)[-cap:]
        return (*ages, shared, pbin)

    def _aged(self, key: tuple, user: tuple[str, str]) -> tuple:
        """``user``'s new prompt does not have the block: one prompt older (forgotten past the last age)."""
        *ages, shared, pbin = key
        for age, users in enumerate(ages):
            if user in users:
                if age == FORGOTTEN:
                    return key
                ages[age] = tuple(u for u in users if u != user)
                ages[age + 1] = (*ages[age + 1], user)[-self.config.max_users_per_block:]
                break
        return (*ages, shared, pbin)

    def _rekey(self, w: _Workload, user: tuple[str, str], hashes: Iterable[str], change) -> None:  # noqa: ANN001
        """Apply ``change(key, user)`` to the keys of these blocks."""
        new_keys: dict[tuple, tuple] = {}
        moves: dict[tuple[tuple, tuple], list[str]] = {}
        for block_hash in hashes:
            block = w.blocks.get(block_hash)
            if block is None:
                continue
            old = block.key
            new = new_keys.get(old)
            if new is None:
                new = new_keys[old] = change(old, user)
            if new == old:
                continue
            block.key = new
            if block.resident:
                moves.setdefault((old, new), []).append(block_hash)
        for (old, new), moved in moves.items():
            w.regroup(moved, old, new)

    def _on_blocks_stored(self, w: _Workload, event: ev.KvBlocksStored, t: float) -> None:
        if event.prefetch:
            self._on_prefetched(w, event, t)
            return
        if event.start_index == 0 and event.session:  # a request's first store: its whole chain
            self._score_considered(w, event)
        user = (event.agent, event.session) if event.agent and event.session else None
        new_keys: dict[tuple, tuple] = {}
        moves: dict[tuple[tuple | None, tuple], list[str]] = {}
        classes_before: dict[str, int] = {}
        newest_from = self._newest_from(w, event)
        for position, block_hash in enumerate(event.block_hashes, start=event.start_index):
            block = w.blocks.get(block_hash)
            if block is None:
                block = w.blocks[block_hash] = _Block.new(tail_class(position, newest_from), t, event.request)
            else:
                w.blocks.move_to_end(block_hash)
            old = block.key
            new = old
            if user is not None:
                new = new_keys.get(old)
                if new is None:
                    self._spread(w, old, user[1])
                    new = new_keys[old] = self._with_user(old, user)
                if new[-2] > old[-2]:  # a session new to the block
                    block.renewed = t
            if block.request != event.request and is_fresh(new[-1]):  # a second prompt uses it
                classes_before[block_hash] = new[-1]
                new = (*new[:-1], reused_class(new[-1]))
            block.request = event.request
            if new != old or not block.resident:
                moves.setdefault((old if block.resident else None, new), []).append(block_hash)
                block.key, block.resident = new, True
        for (old, new), hashes in moves.items():
            w.regroup(hashes, old, new)
        if user is not None:
            request, hashes = w.prefix_of.get(user, (None, []))
            if request is not None and request == event.request:
                hashes = hashes + [h for h in event.block_hashes if h not in hashes]
            else:
                if hashes:  # a new prompt: the previous one joins the user's earlier prompts
                    self._new_prompt(w, user, hashes, event, classes_before)
                w.replies.setdefault(user, deque(maxlen=AGES)).appendleft(False)
                hashes = list(event.block_hashes)
            w.prefix_of[user] = (event.request, hashes)
        self._forget_oldest(w)

    def _score_considered(self, w: _Workload, event: ev.KvBlocksStored) -> None:
        """A new prompt of the session (before its blocks are marked resident): what the prefetch last
        considered for it would have served and, if it ran, how much of that was still cached."""
        session = w.sessions.get(event.session)
        if session is None or session.considered is None:
            return
        probability, computed, ran = session.considered
        read = set(event.block_hashes)
        w.calibration.observe(probability, served_fraction(computed, read))
        if ran:
            read_computed = [h for h in computed if h in read]
            w.calibration.observe_kept(sum(h in w.blocks and w.blocks[h].resident for h in read_computed),
                                       len(read_computed))
        session.considered = None

    def _forget_oldest(self, w: _Workload) -> None:
        while len(w.blocks) > self.config.max_blocks:
            block_hash, block = w.blocks.popitem(last=False)
            if block.resident:
                w.ungroup(block_hash, block)

    def _on_prefetched(self, w: _Workload, event: ev.KvBlocksStored, t: float) -> None:
        """A prefetch recomputed these blocks: resident again as they were known. No prompt read them, so
        nobody's prompt ages, nothing is learned about reuse and the blocks' users stay as they were."""
        session = w.sessions.get(event.session) if event.session else None
        if session is not None and session.considered is not None:
            probability, computed, _ = session.considered
            session.considered = (probability, computed, True)
        back: dict[tuple, list[str]] = {}
        for position, block_hash in enumerate(event.block_hashes, start=event.start_index):
            block = w.blocks.get(block_hash)
            if block is None:
                block = w.blocks[block_hash] = _Block.new(tail_class(position, math.inf), t)
            else:
                w.blocks.move_to_end(block_hash)
            if not block.resident:
                block.resident = True
                back.setdefault(block.key, []).append(block_hash)
        for key, hashes in back.items():
            w.regroup(hashes, None, key)
        self._forget_oldest(w)

    def _newest_from(self, w: _Workload, event: ev.KvBlocksStored) -> float:
        """The first block of the prompt's newest message, from its step's ``prefix_tokens`` (inf: unknown,
        e.g. the engine's KV event came before the framework's step start)."""
        session = w.sessions.get(event.session) if event.session else None
        step = session.steps.get(session.latest) if session is not None else None
        if step is None or step.agent != event.agent or step.prefix_tokens is None or not event.block_size:
            return math.inf
        return step.prefix_tokens // event.block_size

    def _new_prompt(self, w: _Workload, user: tuple[str, str], previous: list[str], event: ev.KvBlocksStored,
                    classes_before: dict[str, int]) -> None:
        """Learn which of the user's earlier prompts' blocks its new prompt reused; age the others."""
        earlier = w.earlier.setdefault(user, deque())
        chains = [previous, *reversed(earlier)]  # newest first: index = age

        def class_of(block_hash: str, position: int) -> int:
            found = classes_before.get(block_hash)
            if found is not None:
                return found
            block = w.blocks.get(block_hash)
            return block.key[-1] if block is not None else position_bin(position)

        if event.start_index == 0:  # the whole chain: what it reused is known
            w.reuse.observe(w.model.agent_id(event.agent), chains, event.block_hashes, class_of,
                            list(w.replies.get(user, ())))
        current = set(event.block_hashes)
        older = dict.fromkeys(h for chain in chains for h in chain if h not in current)
        self._rekey(w, user, older, self._aged)
        earlier.append(previous)
        while len(earlier) > AGES - 1:
            earlier.popleft()

    def _on_blocks_removed(self, w: _Workload, event: ev.KvBlocksRemoved, t: float) -> None:
        count, at = w.removals
        decayed = count * math.exp(-max(t - at, 0.0) / self.config.rate_window_s) if at else 0.0
        w.removals = (decayed + len(event.block_hashes), max(t, at))
        for block_hash in event.block_hashes:
            block = w.blocks.get(block_hash)
            if block is not None and block.resident:
                block.resident = False
                w.ungroup(block_hash, block)

    def _on_all_cleared(self, w: _Workload, event: ev.KvAllBlocksCleared, t: float) -> None:
        for block in w.blocks.values():
            block.resident = False
        w.groups.clear(), w.emitted.clear(), w.dirty.clear(), w.born.clear(), w.renewed.clear()

    # --- predict ----------------------------------------------------------------

    def _expire_sessions(self, w: _Workload, now: float) -> None:
        idle = [s for s, st in w.sessions.items() if now - st.last_seen > self.config.session_idle_expiry_s]
        for s in idle:
            del w.sessions[s]
        if idle:
            gone = set(idle)
            for key in [k for k in w.prefix_of if k[1] in gone]:
                del w.prefix_of[key]
                w.earlier.pop(key, None)
                w.replies.pop(key, None)

    def _mean_cycle_s(self, w: _Workload) -> float:
        n = len(w.model)
        if n == 0:
            return self.config.default_step_s
        cycle = w.timing.arrays[STEP_S, :n] + w.timing.arrays[GAP_S, :n]
        learned = cycle[cycle > 0]
        return float(learned.mean()) if len(learned) else self.config.default_step_s

    def _turnover_s(self, w: _Workload, now: float) -> float:
        """How long a block lasts in the cache now: resident blocks / eviction rate (KV events).

        Scores are reported on this scale (delays from 1/32 to 32 turnovers).
        Without evictions (no pressure) order does not matter: the configured
        horizon stands in.
        """
        count, at = w.removals
        window = self.config.rate_window_s
        # The decayed count covers only the time watched so far: divide by that, not the whole window.
        since = now if w.watched_since is None else w.watched_since
        watched = window * -math.expm1(-max(now - since, 0.0) / window)
        rate = count * math.exp(-max(now - at, 0.0) / window) / max(watched, 1e-9)
        resident = sum(len(members) for members in w.groups.values())
        if rate <= 0 or resident == 0:
            return self.config.horizon_s
        return min(max(resident / rate, 1.0), self.config.max_turnover_s)

    def _next_agent(self, w: _Workload, session: _Session) -> tuple[str, float] | None:
        if session.handoff_to:
            return session.handoff_to, 1.0
        if session.agent is None or len(w.model) == 0:
            return None
        row = w.model.row(session.agent)
        j = int(np.argmax(row))
        return w.model.names[j], float(row[j])

    def _session_timing(self, w: _Workload, name: str, session: _Session, now: float,
                        cycle: float) -> tuple[float, float]:
        """(time left before session ``name`` makes its next call, its call interval), learned from its calls."""
        started, interval = self._latest_call(w, session, cycle)
        elapsed = now - started if started is not None else 0.0
        # Sessions do not wait exactly their mean interval: one overdue is soon, not certain.
        return max(interval - max(elapsed, 0.0), self.config.min_residual * interval), interval

    @staticmethod
    def _latest_call(w: _Workload, session: _Session, cycle: float) -> tuple[float | None, float]:
        """(when the session's latest call started, None when unknown; its learned call interval)."""
        current = session.steps.get(session.latest)
        return (current.started if current is not None else None), session.interval or w.interval or cycle

    def _p_calls_again(self, w: _Workload, name: str, session: _Session, agent: str, chain: float) -> float | None:
        """P(the agent calls again in session ``name``), ``chain`` the chain's prediction; None: the chain's stands.

        Learned from the agent's calls so far in the session (its turns). On ag2 this probability
        is most of the gap to the offline optimum (``evaluation.ablation``'s "calls again"). An agent
        the framework named next (a handoff) calls: its turns do not discount that.
        """
        if session.handoff_to == agent:
            return None
        turns = session.calls_by_agent.get(agent, 0)
        i = w.model.index.get(agent)
        if not turns or i is None:
            return None
        return w.turns.p_more(turns, i + 1, prior=chain)

    def predict(self, workload: str, now: float) -> list[Prediction]:
        w = self._workloads.get(workload)
        if w is None:
            return []
        now = w.clock.now(now)
        self._expire_sessions(w, now)
        out = []
        for name, session in w.sessions.items():
            if session.ended:
                continue
            nxt = self._next_agent(w, session)
            if nxt is None:
                continue
            agent, probability = nxt
            i = w.model.index.get(agent)
            gap = w.timing.get(GAP_S, i) if i is not None else 0.0
            since = now - (session.step_ended or session.last_seen)
            out.append(Prediction(workload, name, agent, probability, w.clock.seconds(max(gap - since, 0.0))))
        return out

    # --- score --------------------------------------------------------------------

    def _group_scorer(self, w: _Workload, now: float, keys: Iterable[tuple]):
        """A function: group key -> score in [0, 1] at one ``now``; higher = more hits per block-second.
        ``keys``: the group keys it will be asked about (their users' arrival times are computed together).

        A block's score is its hit density: expected reuses per unit of time it
        is kept (as LHD ranks objects; Belady's order is the special case of
        certain reuse, where density = 1 / time to next use). Each user
        (agent a, session s) of a block at age r and chain position bin p adds

            sum_j P(a's j-th next prompt is the first to reuse it) * E[1 / T_j]
            T_j = residual_s + (K - 1) * interval_s + j * spacing_a * interval_s

        K the number of calls until a next runs in s (its distribution from the
        learned chain; a framework handoff fixes the next agent), residual_s the
        time left before s makes its next call (its learned call interval minus
        the time since its latest call started: with many sessions sharing the
        engine, the session that has waited longest runs next), spacing_a the
        calls between a's calls, and the reuse probabilities from the learned
        hazard by age. A block seen in several sessions adds the rate new
        sessions came to it, weighed by the posterior that they still come
        given the silence since the latest. The score is the delay 1 / density
        on a log scale, 1/32 to 32 turnovers over the buckets: the scale only
        sets the range, the order is the density's.
        """
        cfg = self.config
        tau = self._turnover_s(w, now)
        cycle = self._mean_cycle_s(w)
        steps = cfg.max_lookahead_calls
        self._expire_sessions(w, now)
        visits = w.model.visits[: len(w.model)]
        share = (visits / visits.sum() if len(visits) and visits.sum() > 0 else visits).tolist()
        later_calls = np.arange(steps, dtype=float)
        later_prompts = np.arange(AGES, dtype=float)
        columns: dict[tuple, tuple[np.ndarray, float]] = {}
        timing: dict[str, tuple[float, float]] = {}
        factors: dict[tuple, float] = {}
        spread: dict[tuple[int, int], float] = {}

        def first_calls(session: _Session, target: str) -> tuple[np.ndarray, float] | None:
            """P(``target``'s next call in the session is the t-th from now), t = 1..steps (the learned chain),
            and its sum (P(it calls within the steps))."""
            agent = session.handoff_to or session.agent
            if agent is None:
                return None
            key = (bool(session.handoff_to), agent, target)
            column = columns.get(key)
            if column is None:
                cached = w.pmf_cache.get(key)
                if cached is not None and cached[0] == w.model.version:
                    found = cached[1]
                else:
                    if session.handoff_to:  # the framework said who is next: it is call 1
                        found = np.zeros(steps)
                        if target == agent:  # (it may come back later too, but its first call is call 1)
                            found[0] = 1.0
                        else:
                            found[1:] = w.model.first_call_column(agent, target, steps - 1)
                    else:
                        found = w.model.first_call_column(agent, target, steps)
                    if len(w.pmf_cache) > 4096:
                        w.pmf_cache.clear()
                    w.pmf_cache[key] = (w.model.version, found)
                column = columns[key] = (found, float(found.sum()))
            return column

        def session_timing(name: str, session: _Session) -> tuple[float, float]:
            found = timing.get(name)
            if found is None:
                found = timing[name] = self._session_timing(w, name, session, now, cycle)
            return found

        def inverse_times(users: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[float] | None]:
            """E[1 / T_j] for j = 0..AGES-1 per user: when the agent's j-th next prompt in the session comes.

            One numpy pass over all users (an act asks for every user of every cached block) in place of a
            small matrix product each: the same numbers, and 2-35% less time per act in the simulator."""
            found: dict[tuple[str, str], list[float] | None] = {}
            rows, call_weights, residuals, intervals, spacings = [], [], [], [], []
            for user in users:
                agent, name = user
                session = w.sessions.get(name)
                column = first_calls(session, agent) if session is not None and not session.ended else None
                if column is None:
                    found[user] = None
                    continue
                weights, chain = column
                residual, interval = session_timing(name, session)
                i = w.model.index.get(agent)
                spacing = 1.0 / max(share[i], 1e-3) if i is not None and i < len(share) else 1.0
                # P(a's next call is the t-th from now): when from the chain; whether at all from the chain and
                # from how many calls a has made in the session (agents have their turns and are done)
                if chain > 1e-9:
                    p = self._p_calls_again(w, name, session, agent, min(chain, 1.0))
                    if p is not None:
                        weights = weights * (p / chain)
                rows.append(user)
                call_weights.append(weights)
                residuals.append(residual)
                intervals.append(interval)
                spacings.append(spacing * interval)
            if rows:
                first = np.array(residuals)[:, None] + later_calls[None, :] * np.array(intervals)[:, None]
                arrival = first[:, None, :] + later_prompts[None, :, None] * np.array(spacings)[:, None, None]
                times = ((1.0 / arrival) @ np.array(call_weights)[:, :, None])[:, :, 0].tolist()
                found.update(zip(rows, times))
            return found

        inverse = inverse_times({user for key in keys for users in key[:AGES] for user in users})

        first_reuse, index = w.reuse.first_reuse, w.model.index

        def user_density(user: tuple[str, str], age: int, pbin: int) -> float:
            times = inverse[user]
            if times is None:
                return 0.0
            replies = w.replies.get(user)
            pbin = reply_class(pbin, bool(replies) and age < len(replies) and replies[age])
            density = 0
            for p, t in zip(first_reuse(age, index.get(user[0]), pbin), times):
                density += p * t
            return density

        def key_score(key: tuple, born: float, renewed: float) -> float:
            pbin = key[-1]
            density = 0.0  # expected hits per unit of time the block is kept
            for age in range(AGES):  # those who forgot it (``FORGOTTEN``) add nothing
                for user in key[age]:
                    slot = (user, age, pbin)
                    f = factors.get(slot)
                    if f is None:
                        f = factors[slot] = user_density(user, age, pbin)
                    density += f
            sessions = key[-2]
            if sessions >= 2:  # other sessions reuse it at the rate new sessions came, if any more do
                agent_key = w.spread_agent(key) if sessions == 2 else 0
                p = spread.get((sessions, agent_key))
                if p is None:
                    p = spread[(sessions, agent_key)] = w.p_spread(sessions, agent_key)
                # A block's sessions come while it is in use and stop when it is done with: a silence much
                # longer than their spacing says it is done (crewAI's documents two sessions read).
                rate = (sessions - 1) / max(renewed - born, cycle)
                silent = p * math.exp(-rate * max(now - renewed, 0.0))
                if silent > 0:
                    density += rate * silent / (silent + max(1.0 - p, 0.0))
            if density <= 0:
                return 0.0
            delay = max(1.0 / (density * tau), 1 / 32)  # in turnovers
            return min(max(1.0 - math.log(delay * 32) / math.log(1024), 0.0), 1.0)

        return key_score

    def block_scores(self, workload: str, now: float, resident_only: bool = True) -> dict[str, float]:
        """Reuse probability within the horizon of each (resident) cached block."""
        w = self._workloads.get(workload)
        if w is None:
            return {}
        blocks = [(h, b) for h, b in w.blocks.items() if b.resident or not resident_only]
        key_score = self._group_scorer(w, w.clock.now(now), {b.key for _, b in blocks})
        by_key: dict[tuple, float] = {}  # blocks share keys: each (key, born, renewed) scored once
        scores = {}
        for h, b in blocks:
            group = (b.key, w.born.get(b.key, b.born), w.renewed.get(b.key, b.renewed))
            found = by_key.get(group)
            if found is None:
                found = by_key[group] = key_score(*group)
            scores[h] = found
        return scores

    def score(self, workload: str, now: float) -> Mapping[str, float]:
        return self.block_scores(workload, now)

    # --- act ----------------------------------------------------------------------

    def _decision_id(self, kind: str, workload: str, agent: str, *parts: object) -> str:
        """A decision's id: the same decision made again (a restarted worker re-reading events) gets the same one.

        A tuple of block hashes goes in joined, not by ``repr``: the hashes of a large group cost most of an id."""
        digest = hashlib.blake2b(digest_size=12)
        for part in (self.name, kind, workload, agent, *parts):
            if isinstance(part, tuple) and part and isinstance(part[0], str):
                digest.update(b"\x1e" + "\x1f".join(part).encode())
            else:
                digest.update(repr(part).encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def act(self, workload: str, now: float) -> list[ev.Decision]:
        """``now``: the wall time, which decisions are stamped and expire with (whatever the policy's clock)."""
        w = self._workloads.get(workload)
        if w is None:
            return []
        t, quarter = w.clock.now(now), self.config.decision_ttl_s / 4
        if not w.events_since_act and t - w.last_act < quarter and now - w.last_act_wall < self._wall_ttl(w) / 4:
            return []  # nothing new, and every decision in force is far from expiry
        w.events_since_act, w.last_act, w.last_act_wall = 0, t, now
        decisions: list[ev.Decision] = self._eviction_scores(w, workload, t, now)
        pins_and_prefetches = self._pins_and_prefetches(w, workload, t, now)
        decisions += self._unpins(w, workload, now)  # before the new pins, which may cover the same blocks
        return decisions + pins_and_prefetches

    def _wall_ttl(self, w: _Workload) -> float:
        """A decision's life in wall seconds: ``decision_ttl_s`` on the policy's clock, at most ``max_wall_ttl_s``."""
        return min(w.clock.seconds(self.config.decision_ttl_s), self.config.max_wall_ttl_s)

    @staticmethod
    def _release_pin(w: _Workload, name: str | None, session: _Session) -> None:
        if session.pinned is not None and name is not None:
            w.unpins.append((name, *session.pinned))
        session.pinned = None

    def _unpins(self, w: _Workload, workload: str, now: float) -> list[ev.Decision]:
        """Unpin the blocks of pins released since the last act, less those another session's pin holds.
        Held for their whole TTL, a pin outlived its call: its blocks stayed out of the free queue after
        the call came (or, another agent named, never would; docs/policy_workers.md)."""
        if not w.unpins:
            return []
        held = {h for s in w.sessions.values() if s.pinned is not None for h in s.pinned[2]}
        out: list[ev.Decision] = []
        for name, agent, step, hashes in w.unpins:
            released = tuple(h for h in hashes if h not in held)
            if released:
                out.append(ev.Unpin(workload=workload, agent=agent, session=name, step=step, time=now,
                                    policy=self.name, expires_at=now + self._wall_ttl(w),
                                    block_hashes=released,
                                    decision_id=self._decision_id("unpin", workload, agent, name, step)))
        w.unpins.clear()
        return out

    def _eviction_scores(self, w: _Workload, workload: str, t: float, now: float) -> list[ev.Decision]:
        """One decision per group whose bucket changed, that gained blocks, or whose last decision is half-way to
        expiry (on the policy's clock, or on the wall clock while no work is done). ``t``: the policy's time,
        ``now``: the wall's."""
        cfg = self.config
        key_score = self._group_scorer(w, t, w.groups)
        wall_ttl = self._wall_ttl(w)
        top, refresh_after, wall_refresh_after = cfg.score_buckets - 1, cfg.decision_ttl_s / 2, wall_ttl / 2
        expires = now + wall_ttl
        out: list[ev.Decision] = []
        for key, members in w.groups.items():
            owner = _latest_agent(key)
            if owner is None:
                continue  # unattributed blocks: no agent to key a decision by
            bucket = min(int(key_score(key, w.born.get(key, t), w.renewed.get(key, t)) * cfg.score_buckets), top)
            last = w.emitted.get(key)
            if (last is not None and last[0] == bucket and t - last[1] < refresh_after
                    and now - last[2] < wall_refresh_after and key not in w.dirty):
                continue
            w.emitted[key] = (bucket, t, now)
            hashes = tuple(sorted(members))
            out.append(ev.EvictionScore(
                workload=workload, agent=owner, time=now, policy=self.name, expires_at=expires, block_hashes=hashes,
                score=(bucket + 0.5) / cfg.score_buckets,
                # The exact expiry: a group can go back to an earlier bucket within a second (acts come at
                # every engine step), and that is a new decision, not a duplicate to drop.
                decision_id=self._decision_id("score", workload, owner, bucket, hashes, expires)))
        w.dirty.clear()
        return out

    def _kept_prefix(self, w: _Workload, i: int | None, latest: list[str], long_reply: bool) -> list[str]:
        """The leading blocks of the agent's latest prompt that its next prompt probably keeps.

        Pins and prefetches cover only these: recomputing a conversation tail
        the next prompt drops costs prefill and brings nothing back.
        """
        kept = []
        for position, block_hash in enumerate(latest):
            block = w.blocks.get(block_hash)
            cls = reply_class(block.key[-1] if block is not None else position_bin(position), long_reply)
            if w.reuse.hazard(0, i, cls) < self.config.keep_threshold:
                break
            kept.append(block_hash)
        return kept

    def _pins_and_prefetches(self, w: _Workload, workload: str, t: float, now: float) -> list[ev.Decision]:
        """Pins for the predicted next agent's resident prefix in every waiting session; prefetches of its
        missing blocks for the ``prefetch_lead`` waiting sessions due to call soonest. ``t``: the policy's
        time, ``now``: the wall's."""
        cfg = self.config
        out: list[ev.Decision] = []
        if min(cfg.pin_threshold, cfg.prefetch_threshold) > 1.0:
            return out  # turned off (no probability reaches them): skip the walk over sessions
        waiting = [(name, session) for name, session in w.sessions.items() if not session.ended and (
            session.in_tool or session.step_ended is not None or session.handoff_to is not None)]
        cycle = self._mean_cycle_s(w)
        expires = now + self._wall_ttl(w)
        due_soonest = {name for name, _ in sorted(waiting, key=lambda item: self._due_at(w, item[1], cycle))[
            :max(cfg.prefetch_lead, 0)]}
        for name, session in waiting:
            nxt = self._next_agent(w, session)
            if nxt is None:
                continue
            agent, probability = nxt
            current = (session.step, agent)  # one pin and one prefetch per predicted call
            may_pin = probability >= cfg.pin_threshold and session.pinned_step != current
            may_prefetch = name in due_soonest and session.prefetched_step != current
            if not (may_pin or may_prefetch):
                continue
            # The chain says who comes next if the session goes on; whether that agent calls again at all
            # (its turns so far) says whether it does. Without it, a session that ends after the step
            # (half of crewAI's) held pins and drew prefetches for a call that never came.
            again = self._p_calls_again(w, name, session, agent, probability)
            if again is not None:
                probability *= again
            _, latest = w.prefix_of.get((agent, name), (None, []))
            i = w.model.index.get(agent)
            replies = w.replies.get((agent, name))
            hashes = self._kept_prefix(w, i, latest, bool(replies) and replies[0])
            if not hashes:
                continue
            resident = [h for h in hashes if h in w.blocks and w.blocks[h].resident]
            kept = set(resident)
            missing = [h for h in hashes if h not in kept]
            gap = w.timing.get(GAP_S, i) if i is not None else cfg.default_step_s
            if may_pin and probability >= cfg.pin_threshold and resident:
                self._release_pin(w, name, session)  # a pin for another agent's call (a handoff named this one)
                session.pinned = (agent, session.step, tuple(resident))
                ttl = min(w.clock.seconds(min(cfg.pin_ttl_cap_s, max(2.0 * gap, 1.0))), cfg.max_wall_ttl_s)
                out.append(ev.Pin(workload=workload, agent=agent, session=name, step=session.step, time=now,
                                  policy=self.name, expires_at=expires, block_hashes=tuple(resident), ttl_s=ttl,
                                  decision_id=self._decision_id("pin", workload, agent, name, session.step)))
                session.pinned_step = current
            if may_prefetch and missing:
                session.considered = (probability, tuple(missing), False)
                # What prefetches this confident have served, not the probability itself, must reach the threshold.
                if w.calibration.served(probability) >= cfg.prefetch_threshold:
                    out.append(ev.Prefetch(
                        workload=workload, agent=agent, session=name, step=session.step, time=now, policy=self.name,
                        expires_at=expires, block_hashes=tuple(hashes), probability=probability,
                        expected_at=now + w.clock.seconds(self._due_at(w, session, cycle) - t),
                        decision_id=self._decision_id("prefetch", workload, agent, name, session.step)))
                    session.prefetched_step = current
        return out

    def _due_at(self, w: _Workload, session: _Session, cycle: float) -> float:
        """When the session's next call is expected: its latest call's start plus its learned call interval
        (sessions served in turn call in the order they last called)."""
        started, interval = self._latest_call(w, session, cycle)
        return (session.last_seen if started is None else started) + interval

    # --- state ----------------------------------------------------------------------

    def learned_nbytes(self, workload: str) -> int:
        w = self._workloads.get(workload)
        return w.learned_nbytes() if w else 0

    def to_state(self, workloads: Iterable[str] | None = None) -> dict[str, Any]:
        """Learned state: transitions, timing, and the active sessions' recent steps.

        Sessions are kept so a restarted worker still learns the transition
        between a step before the snapshot and the next one after it. The
        block index is not: it mirrors the engine's cache and is rebuilt from
        its KV events.
        """
        names = self._workloads if workloads is None else [w for w in workloads if w in self._workloads]
        return {name: self._workload_state(self._workloads[name]) for name in names}

    @staticmethod
    def _workload_state(w: _Workload) -> dict[str, Any]:
        sessions = {
            name: {"latest": st.latest, "last_seen": st.last_seen, "in_tool": st.in_tool, "seen": sorted(st.seen),
                   "ended": st.ended, "calls_by_agent": dict(st.calls_by_agent),
                   "handoff_to": st.handoff_to,
                   "steps": [[k, s.agent, s.started, s.ended, s.learned_in] for k, s in st.steps.items()],
                   "prefixes": {agent: [request, hashes] for (agent, sess), (request, hashes) in w.prefix_of.items()
                                if sess == name}}
            for name, st in w.sessions.items()
        }
        n = len(w.model)
        return {"model": w.model.to_state(), "timing": w.timing.arrays[:, :n].tolist(),
                "reuse_packed": w.reuse.arrays[:, :, :n].tolist(), "reuse_layout": REUSE_LAYOUT,
                "typical_reply": w.reuse.typical_reply[:n].tolist(), "turns": w.turns.to_state(),
                "spread": w.spread.to_state(), "spread_by_agent": w.spread_by_agent.to_state(),
                "prefetch_calibration": w.calibration.to_state(), "sessions": sessions,
                "clock": {"kind": w.clock.kind, "steps": getattr(w.clock, "steps", 0)}}

    def forget(self, workloads: Iterable[str]) -> None:
        for name in workloads:
            self._workloads.pop(name, None)

    def load_state(self, state: Mapping[str, Any]) -> None:
        for name, saved in state.items():
            w = self._workloads[name] = _Workload(self.config)
            w.model = TransitionModel.from_state(saved["model"])
            clock = saved.get("clock") or {"kind": "wall"}  # states saved before there was a choice: wall
            same_clock = clock["kind"] == w.clock.kind
            if same_clock:
                w.clock = make_clock(clock["kind"], int(clock.get("steps", 0)))
            if saved.get("timing") is not None and same_clock:  # left out where its clock is not this one's
                rows = _AgentTiming.ROWS  # an older state's extra rows (per-agent call rates, unused) are dropped
                timing = np.asarray(saved["timing"], dtype=np.float32)[:rows].reshape(rows, -1)
                w.timing.arrays = np.zeros((rows, max(8, timing.shape[1])), dtype=np.float32)
                w.timing.arrays[:, : timing.shape[1]] = timing
            if saved.get("turns"):
                w.turns.load_state(saved["turns"])
            if saved.get("spread"):
                w.spread.load_state(saved["spread"])
            if saved.get("spread_by_agent"):
                w.spread_by_agent.load_state(saved["spread_by_agent"])
            if saved.get("prefetch_calibration"):
                w.calibration.load_state(saved["prefetch_calibration"])
            # Another class layout or cell encoding (an older version's, or "reuse", an older encoding) is relearned.
            if saved.get("reuse_packed") and saved.get("reuse_layout") == REUSE_LAYOUT:
                reuse = np.asarray(saved["reuse_packed"], dtype=np.uint8).reshape(AGES, CLASSES, -1)
                w.reuse.arrays = np.zeros((AGES, CLASSES, max(8, reuse.shape[2])), dtype=np.uint8)
                w.reuse.arrays[:, :, : reuse.shape[2]] = reuse
                typical = np.asarray(saved.get("typical_reply", []), dtype=np.float16)
                w.reuse.typical_reply = np.zeros(max(8, len(typical)), dtype=np.float16)
                w.reuse.typical_reply[: len(typical)] = typical
            restart = w.clock.now(0.0)  # sessions timed on another clock: retimed to its start (wall: they expire)

            def retimed(time: float | None) -> float | None:
                return time if same_clock or time is None else restart

            for session_name, st in saved.get("sessions", {}).items():
                session = w.sessions[session_name] = _Session(
                    latest=st["latest"], last_seen=retimed(st["last_seen"]), in_tool=st["in_tool"],
                    handoff_to=st["handoff_to"], seen=set(st["seen"]), ended=st["ended"],
                    calls_by_agent=dict(st.get("calls_by_agent", {})))
                for step, agent, started, ended, learned_in in st["steps"]:
                    session.steps[int(step)] = _Step(agent, retimed(started), retimed(ended), learned_in)
                for agent, (request, hashes) in st.get("prefixes", {}).items():
                    w.prefix_of[(agent, session_name)] = (request, list(hashes))


def _latest_agent(key: tuple) -> str | None:
    """The agent of a block group's most recent user (its youngest age first), None for unattributed blocks."""
    for age in range(FORGOTTEN + 1):
        users = key[age]
        if users:
            return users[-1][0]
    return None


def _sessions_of(key: tuple) -> set[str]:
    return {session for users in key[: FORGOTTEN + 1] for _, session in users}


_HANDLERS = {
    ev.SessionStart: CacheSage._on_session_start,
    ev.SessionEnd: CacheSage._on_session_end,
    ev.AgentStepStart: CacheSage._on_step_start,
    ev.AgentStepEnd: CacheSage._on_step_end,
    ev.Handoff: CacheSage._on_handoff,
    ev.ToolCallStart: CacheSage._on_tool_start,
    ev.ToolCallEnd: CacheSage._on_tool_end,
    ev.KvBlocksStored: CacheSage._on_blocks_stored,
    ev.KvBlocksRemoved: CacheSage._on_blocks_removed,
    ev.KvAllBlocksCleared: CacheSage._on_all_cleared,
}
