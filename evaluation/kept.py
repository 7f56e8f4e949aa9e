"""Which dead blocks CacheSage keeps while it evicts live ones (simulator, the bench's setting).

    .venv/bin/python -m evaluation.kept --workload crewai [--in-flight 1] [--capacity 212]

On exactly the calls evaluation.bench replays, CacheSage warm (as the bench's
``cachesage`` arm): at each eviction of a block the trace uses again, every
free block kept at a higher level that the trace never uses again is counted
by what CacheSage knows of it (how many sessions have read it, whether they
have all ended, its class and its latest user's agent), and so is the victim.
Where the top rows of the two tallies differ in something CacheSage could
learn, that is what to learn next: session 10 found crewAI's dead blocks to be
File Analyst documents two or three ended sessions had read, and its victims
File Analyst documents one session had read (docs/policy_workers.md).
"""
from __future__ import annotations

import argparse
from collections import Counter

from .ablation import _Future
from .bench import bench_window, warm_state
from .simulator import Scored, run_cachesage

CLASS_NAMES = ("head", "reused", "newest message", "newest message, long reply")


def describe(sage, workload: str, h: str) -> tuple[str, ...]:  # noqa: ANN001
    """What CacheSage knows of a block, coarsely: sessions, ended, class, latest user's agent."""
    from policy_workers.cachesage import FORGOTTEN
    from policy_workers.reuse import POSITION_BINS

    w = sage.workload(workload)
    block = w.blocks.get(h)
    if block is None:
        return ("untracked", "", "", "")
    users = [user for users in block.key[: FORGOTTEN + 1] for user in users]
    sessions = {session for _, session in users}
    return (f"{min(block.key[-2], 3)}{'+' if block.key[-2] >= 3 else ''}",
            "ended" if w.all_ended(sessions) else "running",
            CLASS_NAMES[min(block.key[-1] // POSITION_BINS, len(CLASS_NAMES) - 1)],
            users[-1][0] if users else "-")


def tally(workload: str, in_flight: int, capacity: int | None = None) -> tuple[float, int, int, Counter, Counter]:
    """Hit rate, evictions, live evictions, dead blocks kept above a live victim, live victims."""
    from policy_workers.cachesage import CacheSage

    chosen, calls, rule = bench_window(workload, 8)
    capacity = capacity or rule
    future = _Future(calls)
    sage = CacheSage()
    sage.load_state(warm_state(workload, chosen, capacity, in_flight)[0])
    found = {"evictions": 0, "live": 0}
    orders: list[Scored] = []
    kept, victims = Counter(), Counter()

    def used_again(h: str) -> bool:
        return future.next_use(h) is not None

    def on_evict(h: str) -> None:
        found["evictions"] += 1
        if not used_again(h):
            return
        found["live"] += 1
        victims[describe(sage, workload, h)] += 1
        for other in orders[0].free_above(orders[0].evicted_level):
            if not used_again(other):
                kept[describe(sage, workload, other)] += 1

    result = run_cachesage(calls, capacity, workload, in_flight=in_flight, policy=sage,
                           observe_sim=(future.on_call, on_evict), on_order=orders.append)
    return result.hit_rate, found["evictions"], found["live"], kept, victims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluation.kept", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="crewai")
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--capacity", type=int, default=None, help="blocks (default: the bench's rule for 8 in flight)")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    hit, evictions, live, kept, victims = tally(args.workload, args.in_flight, args.capacity)
    print(f"{args.workload}, {args.in_flight} in flight: CacheSage warm hit rate {hit:.3f}; {evictions:,} evictions, "
          f"{live:,} of blocks used again")
    for title, counts in (("dead blocks kept above a live victim (block × eviction)", kept), ("live victims", victims)):
        print(f"\n| {title} | sessions that read it | they have | class | latest user's agent |\n|---|---|---|---|---|")
        for (sessions, ended, cls, agent), n in counts.most_common(args.top):
            print(f"| {n:,} | {sessions} | {ended} | {cls} | {agent} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
