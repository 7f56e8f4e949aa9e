"""How far CacheSage is from knowing one fact more: its own order with an oracle fact added (simulator).

    .venv/bin/python -m evaluation.ablation [--workloads crewai ag2_captainagent] [--in-flight 8]

On exactly the calls and capacity evaluation.bench replays, CacheSage warm (as
the bench's ``cachesage`` arm) runs again with one fact from the trace's future
added to the level each free block gets, everything else its own:
- deadness: blocks no later call uses go to the lowest level; the others keep
  theirs (at least the next one up). It knows whether, not when;
- new session: blocks whose next use is by a session that never used them are
  raised to at least the middle level. It knows which blocks spread to another
  session, not when;
- calls again: CacheSage's probability that an agent calls again in its
  session (learned from its turns) replaced by the truth, 1 or 0. It knows
  which agents are done, not when the others call;
- session timing: the time left before each running session's next call
  (learned from its call interval) replaced by the truth. It knows when a
  session calls, not which agent.
Where a fact closes much of the LRU→Belady gap, the gap is that fact; where it
closes little, learning it better would not help. LRU and Belady frame the
shares, as in ``evaluation.sweep --engine-setting``.
"""
from __future__ import annotations

import argparse
import bisect
from typing import Callable, Sequence

from framework_emitter.traces import WORKLOADS, TraceCall

from .simulator import CLOCK_START, SCORE_LEVELS, LRU, Belady, block_depths, block_uses, run_cachesage, simulate

Adjust = Callable[[str, int], int]


class _Future:
    """The trace's future as seen from the call the simulation is at."""

    def __init__(self, calls: Sequence[TraceCall], block_size: int = 32) -> None:
        self.uses = block_uses(calls, block_size)
        self.session_of_call = [call.session for call in calls]
        self.now = 0
        self.sessions_so_far: dict[str, set[str]] = {}

    def on_call(self, i: int, call: TraceCall, hashes: list[str], hit: int) -> None:
        self.now = i
        for h in hashes:
            self.sessions_so_far.setdefault(h, set()).add(call.session)

    def next_use(self, h: str) -> int | None:
        uses = self.uses.get(h, ())
        j = bisect.bisect_right(uses, self.now)
        return uses[j] if j < len(uses) else None


def knows_deadness(future: _Future) -> Adjust:
    def adjust(h: str, level: int) -> int:
        return 0 if future.next_use(h) is None else max(level, 1)
    return adjust


def knows_new_sessions(future: _Future) -> Adjust:
    def adjust(h: str, level: int) -> int:
        later = future.next_use(h)
        if later is not None and future.session_of_call[later] not in future.sessions_so_far.get(h, ()):
            return max(level, SCORE_LEVELS // 2)
        return level
    return adjust


def knows_calls_again(calls: Sequence[TraceCall]):  # noqa: ANN201 - a CacheSage
    """CacheSage told, for each agent of a running session, whether it calls again there."""
    from policy_workers.cachesage import CacheSage

    agents: dict[str, list[str]] = {}
    for call in calls:
        agents.setdefault(call.session, []).append(call.agent)

    class KnowsCallsAgain(CacheSage):
        def _p_calls_again(self, w, name, session, agent, chain):  # noqa: ANN001, ANN202
            later = agents.get(name)
            if later is None:
                return super()._p_calls_again(w, name, session, agent, chain)
            return 1.0 if agent in later[len(session.seen):] else 0.0

    return KnowsCallsAgain()


def knows_session_timing(calls: Sequence[TraceCall]):  # noqa: ANN201 - a CacheSage
    """CacheSage told when each running session makes its next call (exact on the step clock; on the wall clock,
    the simulator's one at a time)."""
    from policy_workers.cachesage import CacheSage

    starts: dict[str, list[int]] = {}
    for i, call in enumerate(calls):
        starts.setdefault(call.session, []).append(i)

    class KnowsSessionTiming(CacheSage):
        steps_before: dict[int, int] = {}  # id(workload) -> its clock's steps when the run began

        def load_state(self, state):  # noqa: ANN001, ANN202
            super().load_state(state)
            # A warm state's step clock goes on counting from the steps it learned over
            self.steps_before = {id(w): getattr(w.clock, "steps", 0) for w in self._workloads.values()}

        def _session_timing(self, w, name, session, now, cycle):  # noqa: ANN001, ANN202
            residual, interval = super()._session_timing(w, name, session, now, cycle)
            later = starts.get(name, ())
            made = len(session.seen)
            if made < len(later):
                # on the step clock, call i is the (i + 1)-th step started in the run
                at = later[made] + 1 + self.steps_before.get(id(w), 0)
                if self.config.clock == "wall":  # the simulator's clock: one unit per call started, one at a time
                    at += CLOCK_START
                residual = max(at - now, self.config.min_residual)
            return residual, interval

    return KnowsSessionTiming()


FACTS: dict[str, Callable[[_Future], Adjust]] = {"deadness": knows_deadness, "new session": knows_new_sessions}
POLICY_FACTS = {"calls again": knows_calls_again, "session timing": knows_session_timing}


def ablate(workload: str, in_flight: int) -> dict[str, float]:
    """Hit rates: LRU, CacheSage warm, CacheSage warm + each fact, Belady (the bench's calls and capacity)."""
    from policy_workers.cachesage import CacheSage

    from .bench import MAX_OUTPUT_TOKENS as generated
    from .bench import bench_window, warm_state

    chosen, calls, capacity = bench_window(workload, in_flight)
    state, _ = warm_state(workload, chosen, capacity, in_flight)

    def warm(adjust: Callable[[_Future], Adjust] | None = None, policy: CacheSage | None = None) -> float:
        policy, future = policy or CacheSage(), _Future(calls)
        policy.load_state(state)
        return run_cachesage(calls, capacity, workload, in_flight=in_flight, policy=policy,
                             observe_sim=(future.on_call, lambda h: None),
                             adjust_level=adjust(future) if adjust else None, generated=generated).hit_rate

    rates = {"capacity": capacity,
             "LRU": simulate(calls, capacity, LRU(), in_flight=in_flight, generated=generated).hit_rate,
             "CacheSage": warm()}
    for name, fact in FACTS.items():
        rates[f"+ {name}"] = warm(fact)
    for name, knowing in POLICY_FACTS.items():
        rates[f"+ {name}"] = warm(policy=knowing(calls))
    rates["Belady"] = simulate(calls, capacity, Belady(block_uses(calls), block_depths(calls)),
                               in_flight=in_flight, generated=generated).hit_rate
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluation.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args(argv)
    columns = ["CacheSage", *(f"+ {name}" for name in (*FACTS, *POLICY_FACTS))]
    print(f"| workload | capacity | in flight | LRU | {' | '.join(columns)} | Belady |")
    print("|---|---|---|---|" + "---|" * len(columns) + "---|")
    for workload in args.workloads:
        r = ablate(workload, args.in_flight)
        gap = r["Belady"] - r["LRU"]

        def cell(name: str) -> str:
            share = f" ({(r[name] - r['LRU']) / gap:+.0%})" if gap > 0.005 else ""
            return f"{r[name]:.3f}{share}"

        print(f"| {workload} | {r['capacity']:,} | {args.in_flight} | {r['LRU']:.3f} | "
              f"{' | '.join(cell(c) for c in columns)} | {r['Belady']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
