"""Replaying a real trace into a real vLLM engine, one arm (policy) at a time (engine environment).

The driver submits the trace's calls in a fixed global order (``interleave``
of the chosen sessions, as the simulator uses), each call only once its
session's previous call has finished (plus its tool gap, scaled), with at most
``max_in_flight`` requests in the engine at once. Prompts are token ids with
exactly the trace's prefix sharing; requests carry the agent identity
(``extra_args``), and the framework events go through the SDK
(``AgentEventEmitter``).

Arms differ only in what steers eviction:
- ``stock``: vLLM's own scheduler, untouched;
- ``cachesage``: ``AgentRuntimeScheduler`` with the real CacheSage policy
  observing the engine's events and the framework's, its decisions applied at
  step boundaries through the engine's decision path;
- ``oracle``: the same path, with scores computed from the trace's future
  (next use of each block: Belady through the decision path), the measured limit.

The policies run in the engine process here (``scheduler.observers``) so a run
is deterministic enough to repeat; in production the same events and
decisions travel through Kafka (``agentrt worker``). Nothing in the decision
path differs. As a worker reads the event stream after the fact, an arm takes
the events it was handed only when it next acts (``EventBacklog``): the
policy's bookkeeping runs between engine steps, on the engine's thread, but
not inside the step or the submission that serves a call.
"""
from __future__ import annotations

import bisect
import logging
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from framework_emitter.prefix_blocks import block_hashes
from framework_emitter.sdk import AgentEventEmitter, CallbackSink, prefix_fingerprint
from framework_emitter.token_ids import prompt_token_ids
from framework_emitter.traces import TraceCall, next_in_session
from streams import events as ev

log = logging.getLogger(__name__)


@dataclass
class CallResult:
    session: str
    agent: str
    seq: int
    prompt_tokens: int
    cached_tokens: int
    submitted: float
    first_token: float
    finished: float

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.submitted

    @property
    def e2e_s(self) -> float:
        return self.finished - self.submitted


@dataclass
class ArmResult:
    arm: str
    calls: list[CallResult]
    wall_s: float
    output_tokens: int
    prefetch_tokens: int = 0  # prompt tokens the prefetches computed (their resident heads were hits)
    counters: dict[str, Any] = field(default_factory=dict)  # the engine's agentrt counters, this run's change

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def hit_rate(self) -> float:
        """Token-level prefix-cache hit rate, as vLLM counts it (cached prompt tokens / prompt tokens)."""
        return sum(c.cached_tokens for c in self.calls) / max(self.prompt_tokens, 1)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed: requests' uncached tokens plus every prefetch's."""
        return sum(c.prompt_tokens - c.cached_tokens for c in self.calls) + self.prefetch_tokens

    def ttfts(self) -> list[float]:
        return sorted(c.ttft_s for c in self.calls)

    def session_times(self) -> list[float]:
        spans: dict[str, list[float]] = {}
        for c in self.calls:
            span = spans.setdefault(c.session, [c.submitted, c.finished])
            span[0], span[1] = min(span[0], c.submitted), max(span[1], c.finished)
        return sorted(end - start for start, end in spans.values())


class Arm:
    """What a run does besides submitting requests: no-op for stock vLLM."""

    name = "stock"

    def attach(self, scheduler: Any, workload: str) -> AgentEventEmitter | None:
        return None

    def before_submit(self, index: int) -> None: ...

    def after_step(self, now: float, finished: int = 0) -> None:
        """After an engine step in which ``finished`` requests (agent steps) ended."""

    def detach(self) -> None: ...


class EventBacklog:
    """Events handed to an arm, kept in order until it next acts.

    A policy worker consumes the event stream behind the engine; an in-process
    arm that took each event as it was emitted would put its bookkeeping inside
    the engine step and the submission that serve a call, on its TTFT, where
    production never has it. An act sees exactly the events it would have seen
    taking them one by one, so no decision changes.
    """

    def __init__(self, take: Callable[[Any], None]) -> None:
        self._take = take
        self._events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self._events.append(event)

    def drain(self) -> None:
        """Take every held event, oldest first."""
        events, self._events = self._events, []
        for event in events:
            self._take(event)


class PolicyArm(Arm):
    """A policy in the engine process: it observes engine and framework events and acts at step boundaries."""

    def __init__(self, policy: Any, name: str | None = None, act_every_s: float = 0.0) -> None:
        self.policy = policy
        self.name = name or policy.name
        self.act_every_s = act_every_s
        self._last_act = 0.0
        # Seconds of the engine's thread this arm spent on the policy and on applying its decisions.
        self.cost_s = {"observe": 0.0, "act": 0.0, "apply": 0.0}
        self.decisions = 0
        self.acts = 0
        self._backlog = EventBacklog(policy.observe)

    def attach(self, scheduler: Any, workload: str) -> AgentEventEmitter:
        self.scheduler, self.workload = scheduler, workload
        scheduler.observers.append(self._backlog)
        return AgentEventEmitter(CallbackSink(self._backlog), workload)

    def _catch_up(self) -> None:
        began = time.perf_counter()
        self._backlog.drain()
        self.cost_s["observe"] += time.perf_counter() - began

    def after_step(self, now: float, finished: int = 0) -> None:
        # A finished request is an agent step's end: its blocks are free now and the session's next call may
        # allocate before a throttled act comes round (the simulator acts there too). Otherwise, a worker's
        # batch cadence.
        if not finished and now - self._last_act < self.act_every_s:
            return
        self._last_act = now
        self.acts += 1
        self._catch_up()
        began = time.perf_counter()
        decisions = self.policy.act(self.workload, now)
        acted = time.perf_counter()
        self.cost_s["act"] += acted - began
        if decisions:
            self.decisions += len(decisions)
            self.scheduler.apply_decisions([(d, now) for d in decisions])
            self.cost_s["apply"] += time.perf_counter() - acted

    def detach(self) -> None:
        self.scheduler.observers.remove(self._backlog)
        self._catch_up()  # the policy ends up knowing every event of its run


class OracleArm(Arm):
    """Belady through the decision path: each resident block scored by its next use in the replay order.

    Score = 1 - log2(1 + d) / log2(1 + N) for a block next used ``d`` calls
    ahead (N calls in all); 0 for a block never used again. Levels are
    logarithmic in the distance, so a block is rescored only when its distance
    halves. Engine block hashes are matched to the trace's prefix blocks by
    chain position when the engine reports a request's chain.
    """

    name = "oracle"

    def __init__(self, order: Sequence[TraceCall], block_size: int, max_prompt_tokens: int) -> None:
        self._chains = [block_hashes(c.segments, block_size)[: max_prompt_tokens // block_size] for c in order]
        self._uses: dict[str, list[int]] = {}
        for i, chain in enumerate(self._chains):
            for h in chain:
                self._uses.setdefault(h, []).append(i)
        self._n = len(order)
        self._engine_of: dict[str, str] = {}  # trace block hash -> engine block hash
        self._trace_of: dict[str, str] = {}
        self._resident: dict[str, int] = {}  # engine hash -> last published bucket
        self._request_call: dict[str, int] = {}
        self._now = 0
        self._dirty = False
        self._backlog = EventBacklog(self._take)

    def attach(self, scheduler: Any, workload: str) -> None:
        self.scheduler, self.workload = scheduler, workload
        scheduler.observers.append(self._backlog)
        return None

    def detach(self) -> None:
        self.scheduler.observers.remove(self._backlog)

    def register(self, request_id: str, index: int) -> None:
        self._request_call[request_id] = index

    def before_submit(self, index: int) -> None:
        self._now = index
        self._dirty = True

    def _take(self, event: ev.Event) -> None:
        if isinstance(event, ev.KvBlocksStored):
            request = event.request or ""
            index = self._request_call.get(request)
            if index is None:  # vLLM suffixes the id it was given ("<id>-<8 hex>")
                index = self._request_call.get(request.rsplit("-", 1)[0])
            if index is not None:
                chain = self._chains[index]
                for pos, engine_hash in enumerate(event.block_hashes, start=event.start_index):
                    if pos < len(chain):
                        self._engine_of[chain[pos]] = engine_hash
                        self._trace_of[engine_hash] = chain[pos]
            for engine_hash in event.block_hashes:
                self._resident.setdefault(engine_hash, -1)
            self._dirty = True
        elif isinstance(event, ev.KvBlocksRemoved):
            for engine_hash in event.block_hashes:
                self._resident.pop(engine_hash, None)

    def _score(self, engine_hash: str) -> float:
        uses = self._uses.get(self._trace_of.get(engine_hash, ""), [])
        k = bisect.bisect_right(uses, self._now)
        if k >= len(uses):
            return 0.0
        return max(1.0 - math.log2(1 + uses[k] - self._now) / math.log2(1 + self._n), 0.0)

    def after_step(self, now: float, finished: int = 0) -> None:
        self._backlog.drain()
        if not self._dirty:
            return
        self._dirty = False
        by_bucket: dict[int, list[str]] = {}
        for engine_hash, published in self._resident.items():
            bucket = min(int(self._score(engine_hash) * ev.SCORE_LEVELS), ev.SCORE_LEVELS - 1)
            if bucket != published:
                by_bucket.setdefault(bucket, []).append(engine_hash)
        decisions = []
        for bucket, hashes in by_bucket.items():
            for engine_hash in hashes:
                self._resident[engine_hash] = bucket
            decisions.append(ev.EvictionScore(
                workload=self.workload, agent="oracle", time=now, policy="oracle", expires_at=now + 3600,
                block_hashes=tuple(hashes), score=(bucket + 0.5) / ev.SCORE_LEVELS, decision_id=uuid.uuid4().hex))
        if decisions:
            self.scheduler.apply_decisions([(d, now) for d in decisions])


@dataclass
class Submission:
    """One call ready to go: what to send and how to tag it."""

    index: int
    call: TraceCall
    request_id: str
    token_ids: list[int]
    max_tokens: int
    tags: dict[str, Any]
    submitted: float


class ReplayDriver:
    """The replay's order, pacing and framework events, shared by the offline and server paths.

    Calls go in the fixed global ``order``; a call waits until its session's
    previous call has finished (plus its tool gap x ``time_scale``) and a slot
    of ``max_in_flight`` is free; strict order keeps every arm comparable with
    the simulator's. The framework's events go through ``emitter`` (the SDK).
    With ``announce`` a call's end also names who runs next in its session (a
    handoff, to the same agent when it goes on): a framework routes a step's
    outcome when the step ends (an Agents SDK handoff, a tool call returning to
    its agent, a graph's conditional edge), long before the session's next
    request reaches a busy engine; without it the handoff comes with that request.
    """

    def __init__(self, order: Sequence[TraceCall], *, workload: str, vocab_size: int, max_prompt_tokens: int,
                 max_output_tokens: int, max_in_flight: int, time_scale: float,
                 emitter: AgentEventEmitter | None, announce: bool = True) -> None:
        self.order, self.workload, self.emitter, self.announce = order, workload, emitter, announce
        self.vocab_size, self.max_prompt_tokens = vocab_size, max_prompt_tokens
        self.max_output_tokens, self.max_in_flight, self.time_scale = max_output_tokens, max_in_flight, time_scale
        self.remaining: dict[str, int] = {}
        for call in order:
            self.remaining[call.session] = self.remaining.get(call.session, 0) + 1
        self.next_in_session = next_in_session(order)  # index in order -> the session's following call
        self.ready_at: dict[str, float] = {}  # session -> when its next call may go (previous finished + gap)
        self.busy: set[str] = set()
        self.previous: dict[str, TraceCall] = {}
        self.in_flight: dict[str, Submission] = {}
        self.next_index = 0
        self.truncated = 0
        self.results: list[CallResult] = []
        self.output_tokens = 0

    @property
    def done(self) -> bool:
        return self.next_index >= len(self.order) and not self.in_flight

    def wait_s(self, now: float) -> float:
        """How long until the next call could become ready (nothing in flight)."""
        return max(min(self.ready_at.values(), default=now) - now, 0.0)

    def ready(self, now: float) -> Iterator[Submission]:
        """The calls that may go now, in order; each is counted in flight once yielded."""
        while self.next_index < len(self.order) and len(self.in_flight) < self.max_in_flight:
            call = self.order[self.next_index]
            if call.session in self.busy or self.ready_at.get(call.session, 0.0) > now:
                return  # strict order: the replay stays comparable with the simulator's
            ids = prompt_token_ids(call.segments, self.vocab_size, max_tokens=self.max_prompt_tokens)
            self.truncated += call.prompt_tokens > len(ids)
            request_id = f"{self.workload}-{call.session}-{call.seq}-{uuid.uuid4().hex[:6]}"
            before = self.previous.get(call.session)
            tags = {"agentrt.workload": self.workload, "agentrt.agent": call.agent, "agentrt.session": call.session}
            if self.emitter is not None:
                if before is None:
                    self.emitter.session_start(call.session, call.agent, at=now)
                elif before.agent != call.agent and not self.announce:
                    self.emitter.handoff(call.session, before.agent, call.agent, step=call.seq, at=now)
                prefix = call.segments[:-1] or call.segments
                self.emitter.step_start(call.session, call.agent, call.seq, prefix_fingerprint(s for s, _ in prefix),
                                        sum(n for _, n in prefix), prompt_tokens=len(ids), request=request_id,
                                        previous_agent=before.agent if before else None, at=now)
                tags = self.emitter.request_tags(call.session, call.agent, call.seq)
            submission = Submission(self.next_index, call, request_id, ids,
                                    call.generated_tokens(self.max_output_tokens), tags, now)
            self.in_flight[request_id] = submission
            self.busy.add(call.session)
            self.previous[call.session] = call
            self.next_index += 1
            yield submission

    def finished(self, request_id: str, *, prompt_tokens: int, cached_tokens: int, output_tokens: int,
                 first_token: float, now: float) -> Submission:
        """Record a finished call; its session's next call becomes ready after the tool gap."""
        sent = self.in_flight.pop(request_id)
        call = sent.call
        self.busy.discard(call.session)
        self.output_tokens += output_tokens
        self.results.append(CallResult(call.session, call.agent, call.seq, prompt_tokens, cached_tokens,
                                       sent.submitted, first_token, now))
        self.remaining[call.session] -= 1
        gap = 0.0
        following = self.next_in_session.get(sent.index)
        if following is not None and following.t is not None and call.t is not None:
            gap = max(following.t - call.t, 0.0) * self.time_scale
        self.ready_at[call.session] = now + gap
        if self.emitter is not None:
            # The agent's reply is the trace's (later prompts carry it), not the few tokens generated here
            # to keep runs short: report its length, as framework_emitter.replayer does.
            self.emitter.step_end(call.session, call.agent, call.seq, output_tokens=call.output_tokens,
                                  request=request_id, duration_s=now - sent.submitted, at=now)
            if self.remaining[call.session] == 0:
                self.emitter.session_end(call.session, call.agent, status="completed", at=now)
            elif self.announce and following is not None:
                self.emitter.handoff(call.session, call.agent, following.agent, step=following.seq, at=now)
        return sent

    def warn_truncated(self) -> None:
        if self.truncated:
            log.warning("%d of %d prompts were longer than %d tokens and were truncated", self.truncated,
                        len(self.order), self.max_prompt_tokens)


class OwnClock:
    """A run's own time: the sum of the spans in which it worked, so runs that take turns on one machine
    each measure only their own steps (``side_by_side``). Alone, with no gaps between spans, it is wall time."""

    def __init__(self) -> None:
        self.total = 0.0
        self._walls: list[float] = []  # wall time each span began
        self._owns: list[float] = []  # own time then
        self._began: float | None = None

    def start(self, wall: float) -> None:
        self._walls.append(wall)
        self._owns.append(self.total)
        self._began = wall

    def stop(self, wall: float) -> None:
        if self._began is not None:
            self.total += max(wall - self._began, 0.0)
            self._began = None

    def own(self, wall: float) -> float:
        """Own time at a wall time taken inside a span (a submission, a first token, a finish)."""
        k = bisect.bisect_right(self._walls, wall) - 1
        if k < 0:
            return 0.0
        return self._owns[k] + max(wall - self._walls[k], 0.0)


class ReplayRun:
    """One arm's replay of ``order`` through the engine of ``llm`` (an in-process ``vllm.LLM``), one engine
    step at a time: ``replay`` runs it to the end alone, ``side_by_side`` takes turns with other runs."""

    def __init__(self, llm: Any, order: Sequence[TraceCall], arm: Arm, *, workload: str, vocab_size: int,
                 max_prompt_tokens: int, max_output_tokens: int = 8, max_in_flight: int = 16,
                 time_scale: float = 0.0, progress: Callable[[int, int], None] | None = None,
                 announce: bool = True) -> None:
        self.engine = llm.llm_engine
        scheduler = getattr(self.engine.engine_core, "engine_core", None)
        self.scheduler = scheduler = getattr(scheduler, "scheduler", None)
        self.runtime = scheduler is not None and hasattr(scheduler, "observers")
        if not self.runtime and type(arm) is not Arm:
            raise RuntimeError(f"arm {arm.name!r} needs AgentRuntimeScheduler in this process")
        self.arm, self.order, self.progress = arm, order, progress
        emitter = arm.attach(scheduler, workload) if self.runtime else None
        self.counters_before = scheduler.counts() if self.runtime else {}
        self.driver = ReplayDriver(order, workload=workload, vocab_size=vocab_size,
                                   max_prompt_tokens=max_prompt_tokens, max_output_tokens=max_output_tokens,
                                   max_in_flight=max_in_flight, time_scale=time_scale, emitter=emitter,
                                   announce=announce)
        self.first_token: dict[str, float] = {}
        self.clock = OwnClock()
        self.began = time.perf_counter()
        self.result: ArmResult | None = None  # once finished
        self._attached = True

    @property
    def done(self) -> bool:
        return self.driver.done

    def step(self) -> None:
        """Submit what is ready, run one engine step (or wait a little when nothing runs), record what it
        finished, and let the arm act."""
        from vllm import SamplingParams

        driver, arm, engine = self.driver, self.arm, self.engine
        now = time.time()
        self.clock.start(now)
        try:
            for sent in driver.ready(now):
                if isinstance(arm, OracleArm):
                    arm.register(sent.request_id, sent.index)
                arm.before_submit(sent.index)
                params = SamplingParams(max_tokens=sent.max_tokens, temperature=0.0, ignore_eos=True,
                                        extra_args=sent.tags)
                engine.add_request(sent.request_id, {"prompt_token_ids": sent.token_ids}, params)
            if not driver.in_flight and not (self.runtime and self.scheduler.has_unfinished_requests()):
                time.sleep(min(driver.wait_s(now), 0.05))
                return  # (an idle engine still steps the policy's prefetches: that is their time)
            outputs = engine.step()
            now = time.time()
            finished = 0
            for out in outputs:
                if out.request_id not in driver.in_flight:
                    continue
                if out.request_id not in self.first_token and out.outputs and out.outputs[0].token_ids:
                    self.first_token[out.request_id] = now
                if not out.finished:
                    continue
                finished += 1
                driver.finished(out.request_id, prompt_tokens=len(out.prompt_token_ids or []),
                                cached_tokens=int(out.num_cached_tokens or 0),
                                output_tokens=len(out.outputs[0].token_ids) if out.outputs else 0,
                                first_token=self.first_token.pop(out.request_id, now), now=now)
                if self.progress:
                    self.progress(len(driver.results), len(self.order))
            arm.after_step(now, finished)
        finally:
            self.clock.stop(time.time())

    def finish(self, own_time: bool = False) -> ArmResult:
        """Let the arm's own requests end, detach it and return its figures: on the wall clock, or with
        ``own_time`` on the run's own clock (its steps' time only)."""
        self.clock.start(time.time())
        try:
            # The policy's own requests (prefetches) are invisible to the frontend: drop those not yet queued
            # (no call is left to use them) and let the rest finish, so the next run starts from an idle engine.
            if self.runtime:
                self.scheduler.cancel_prefetches()
            while self.runtime and self.scheduler.has_unfinished_requests():
                self.engine.step()
        finally:
            self.clock.stop(time.time())
            self.close()
        self.driver.warn_truncated()
        counters: dict[str, Any] = {}
        if self.runtime:  # this run's share of the engine's counters
            counters = {k: v - self.counters_before.get(k, 0) for k, v in self.scheduler.counts().items()
                        if v != self.counters_before.get(k, 0)}
        calls, wall_s = self.driver.results, time.perf_counter() - self.began
        if own_time:
            own = self.clock.own
            calls = [replace(c, submitted=own(c.submitted), first_token=own(c.first_token), finished=own(c.finished))
                     for c in calls]
            wall_s = self.clock.total
        self.result = ArmResult(self.arm.name, calls, wall_s, self.driver.output_tokens,
                                counters.get("prefetch_computed_tokens", 0), counters)
        return self.result

    def alone(self) -> ArmResult:
        """Step to the end with nothing else running: figures on the wall clock."""
        try:
            while not self.done:
                self.step()
            return self.finish()
        finally:
            self.close()

    def close(self) -> None:
        """Detach the arm (idempotent)."""
        if self._attached:
            self._attached = False
            self.arm.detach()


def replay(llm: Any, order: Sequence[TraceCall], arm: Arm, *, workload: str, vocab_size: int,
           max_prompt_tokens: int, max_output_tokens: int = 8, max_in_flight: int = 16, time_scale: float = 0.0,
           progress: Callable[[int, int], None] | None = None, announce: bool = True) -> ArmResult:
    """Run ``order`` through the engine of ``llm`` (an in-process ``vllm.LLM``) under ``arm``, alone."""
    return ReplayRun(llm, order, arm, workload=workload, vocab_size=vocab_size, max_prompt_tokens=max_prompt_tokens,
                     max_output_tokens=max_output_tokens, max_in_flight=max_in_flight, time_scale=time_scale,
                     progress=progress, announce=announce).alone()


def side_by_side(runs: Sequence[ReplayRun]) -> list[ArmResult]:
    """Runs (in this order) on separate engines in one process, taking turns one engine step each until all are done; each
    is measured on its own clock (the time of its own steps), so a change in the machine's speed, which on a
    shared host moves one arm's figures against another's by more than a policy does, falls on all of them
    alike. Back to back replays only (``time_scale`` 0): a tool gap would run on while the others step."""
    if any(r.driver.time_scale for r in runs):
        raise ValueError("side_by_side replays back to back (time_scale 0): a gap would pass during other runs")
    try:
        while not all(r.done for r in runs):
            for run in runs:
                if not run.done:
                    run.step()
        return [run.finish(own_time=True) for run in runs]
    finally:
        for run in runs:
            run.close()
