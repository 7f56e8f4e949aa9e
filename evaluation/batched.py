"""The bench's replay with requests in flight through vLLM v1's scheduler, one engine step at a time (pure,
no I/O): the simulator's model of the batched engine (``simulate(..., in_flight=k)``)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from framework_emitter.prefix_blocks import block_hashes
from framework_emitter.traces import TraceCall

from .block_pool import BlockPool, SimResult, generated_block

TOKEN_BUDGET = 4096  # tokens an engine step computes at most (the bench's max_num_batched_tokens)
MAX_RUNNING = 16  # requests an engine step runs at most (the bench's max_num_seqs)


@dataclass
class _Request:
    """A call in the batched engine, its progress and blocks as vLLM's ``Request`` keeps them. ``slots``: one per
    block held, its hash, "" for a block with nothing reusable (a recomputed copy), None for a partial one."""

    index: int
    call: TraceCall
    hashes: list[str]  # the prompt's full blocks
    max_tokens: int
    computed: int = 0
    outputs: int = 0
    slots: list[str | None] = field(default_factory=list)
    admitted: bool = False

    @property
    def tokens(self) -> int:
        return self.call.prompt_tokens + self.outputs

    def key(self, position: int) -> str:
        """The hash of the request's full block at ``position``: the prompt's, or one its output filled."""
        return self.hashes[position] if position < len(self.hashes) else generated_block(self.index, position)


def run_batched(calls: Sequence[TraceCall], pool: BlockPool, in_flight: int, *, block_size: int = 32,
                generated: int = 0, token_budget: int = TOKEN_BUDGET,
                on_call: Callable[[int, TraceCall, list[str], int], None] | None = None,
                on_finish: Callable[[int, TraceCall], None] | None = None,
                on_generated: Callable[[int, TraceCall, list[str]], None] | None = None,
                on_step: Callable[[int], None] | None = None) -> SimResult:
    """The replay with ``in_flight`` requests in flight through vLLM v1's scheduler, one engine step at a time.

    The replay submits calls in strict order, at most ``in_flight`` at once and a session's next call only
    after its previous one finished. Each step, as ``vllm.v1.core.sched.scheduler.Scheduler.schedule``:
    the running requests first, in order (a decode needs one token, a prefill its rest, within the step's
    ``token_budget``); one that cannot get its blocks preempts the last running request (its blocks freed,
    back to the front of the waiting queue, recomputed later from its cached head); then, if nothing was
    preempted, the waiting ones in order while budget and blocks last (chunked prefill: a prompt may take
    several steps). A request's hit is counted when it is first scheduled; blocks are cached when allocated,
    so a request scheduled later in the same step hits what an earlier one is computing, as in vLLM. The
    eviction order's ``now`` is the last call index admitted (every call before it holds its blocks)."""
    result, order = pool.result, pool.order
    waiting: deque[_Request] = deque()
    running: list[_Request] = []
    busy: set[str] = set()  # sessions with a call in flight: one each
    submitted = admitted = 0  # calls submitted; calls admitted (strict order: a prefix of them)

    def grow(request: _Request, upto: int, now: int, copy_at: int = -1, force: bool = False) -> bool:
        """Give ``request`` blocks for its first ``upto`` tokens, caching the full ones (the block at ``copy_at``
        computed again into a block of its own); False, with nothing changed, when the free blocks do not
        suffice (``allocate_slots`` refuses), unless ``force``d (a prompt larger than the pool: computed, as
        in the serial model)."""
        full, total = upto // block_size, -(-upto // block_size)
        new = range(len(request.slots), total)
        keys = [("" if j == copy_at else request.key(j)) if j < full else None for j in new]
        taken = sum(1 for k in keys if k and k in order)
        fresh = sum(1 for k in keys if not k or k not in pool.cached)
        if taken + fresh > pool.free and not force:
            return False
        filled = []
        last = len(request.slots) - 1
        if last >= 0 and request.slots[last] is None and last < full:  # the partial block is full now
            k = request.key(last)
            if k in pool.cached:  # (a hash is one block: the copy is dropped)
                pool.take(k)
                pool.empty += 1
            else:
                pool.compute(k)
                filled.append(last)
            request.slots[last] = k
        for k in keys:
            if k and k in pool.cached:
                pool.take(k)
        pool.allocate(fresh, now)
        for j, k in zip(new, keys):
            if k and k not in pool.users:
                pool.compute(k)
                filled.append(j)
            request.slots.append(k)
        outputs = [request.slots[j] for j in filled if j >= len(request.hashes)]
        if outputs and on_generated:
            on_generated(request.index, request.call, outputs)
        return True

    def release(request: _Request, now: int) -> None:
        kept = [k for k in request.slots if k]
        pool.release(kept, len(request.slots) - len(kept), now)
        request.slots = []

    step = 0
    while submitted < len(calls) or waiting or running:
        step += 1
        if on_step:
            on_step(step)  # between steps: the policy acts on what the last one reported
        while submitted < len(calls) and len(busy) < in_flight and calls[submitted].session not in busy:
            call = calls[submitted]
            waiting.append(_Request(submitted, call, block_hashes(call.segments, block_size),
                                    call.generated_tokens(generated) if generated else 1))
            busy.add(call.session)
            submitted += 1
        now = admitted - 1
        budget, scheduled, preempted = token_budget, [], False
        position = 0
        while position < len(running) and budget > 0:
            request = running[position]
            tokens = min(request.tokens - request.computed, budget)
            while not grow(request, request.computed + tokens, now):
                victim = running.pop()
                release(victim, now)
                victim.computed = 0
                waiting.appendleft(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append((request, tokens))
                budget -= tokens
                position += 1
        while not preempted and waiting and budget > 0 and len(running) < MAX_RUNNING:
            request = waiting[0]
            # (keys made as the head is walked: a request that waits long is looked at every step)
            hit, recomputed = pool.cache_hit((request.key(j) for j in range(request.tokens // block_size)),
                                             request.tokens, block_size)
            tokens = min(request.tokens - hit * block_size, budget)
            if not grow(request, hit * block_size + tokens, max(now, request.index),
                        copy_at=hit if recomputed else -1, force=not running):
                break
            waiting.popleft()
            running.append(request)
            request.computed = hit * block_size
            scheduled.append((request, tokens))
            budget -= tokens
            if not request.admitted:
                request.admitted = True
                admitted = max(admitted, request.index + 1)
                now = admitted - 1
                result.prompt_tokens += request.call.prompt_tokens
                result.hit_tokens += hit * block_size
                result.calls += 1
                result.per_call_hits.append(hit * block_size)
                if on_call:
                    on_call(request.index, request.call, request.hashes, hit)
        finished = []
        for request, tokens in scheduled:
            request.computed += tokens
            if request.computed >= request.tokens:  # the step sampled a token
                request.outputs += 1
                if request.outputs >= request.max_tokens:
                    finished.append(request)
        for request in finished:
            running.remove(request)
            release(request, now)
            busy.discard(request.call.session)
            if on_finish:
                on_finish(request.index, request.call)
    return result
