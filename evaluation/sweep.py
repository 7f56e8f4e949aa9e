"""Simulated prefix-cache hit rate per policy on the shared traces.

    .venv/bin/python -m evaluation.sweep [--workloads chatdev tau_airline ...] [--fractions 0.05 0.10]
    .venv/bin/python -m evaluation.sweep --engine-setting [--calls N] [--in-flight 8]
    .venv/bin/python -m evaluation.sweep --engine-setting --prefetch [--cachesage prefetch_threshold=0.4]
    .venv/bin/python -m evaluation.sweep --grid [--workloads crewai ag2_captainagent] [--cachesage min_residual=0.1]

Capacity = a fraction of the workload's distinct full prompt blocks (block size 32); calls in
the order of 16 interleaved sessions. Policies: LRU (stock vLLM); TTL pinning, Continuum-like
(a finished call's blocks pinned for 16 calls, the session's next turn); steps-to-execution,
KVFlow-like (the workflow graph known from the whole trace; blocks of the agents farthest from
running evicted first, per agent); CacheSage (the real policy through the real decision path);
Belady (offline optimum for eviction). The ceiling is infinite capacity. Token-level hit rate,
as vLLM counts cached prompt tokens.
"""
from __future__ import annotations

import argparse

from framework_emitter.replayer import interleave
from framework_emitter.traces import WORKLOADS, read_trace, sessions

from .simulator import (LRU, Belady, TTLPinned, block_depths, block_uses, distinct_blocks, run_cachesage,
                        run_steps_to_execution, simulate)

TTL_CALLS = 16  # one round of the 16 interleaved sessions: a session's next call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluation.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.10])
    parser.add_argument("--engine-setting", action="store_true",
                        help="the bench's calls and capacity, one call at a time and --in-flight at a time")
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--capacity", nargs="+", default=[], metavar="WORKLOAD=BLOCKS",
                        help="with --engine-setting: a capacity other than the bench's rule")
    parser.add_argument("--calls", type=int, default=None,
                        help="with --engine-setting: replay this many calls (whole sessions) instead of the bench's "
                             "default, capacity by the same rule (a longer window, less noise)")
    parser.add_argument("--grid", action="store_true",
                        help="warm CacheSage's share of the LRU->Belady gap over 12 settings around the bench's "
                             "(a change is kept when the mean holds)")
    parser.add_argument("--jobs", type=int, default=2, help="with --grid: processes")
    parser.add_argument("--prefetch", action="store_true",
                        help="with --engine-setting: one at a time, warm CacheSage's scores alone and with its "
                             "prefetches (hit rate, prefill computed vs LRU's, prefetches run)")
    parser.add_argument("--cachesage", action="append", default=[], metavar="KEY=VALUE",
                        help="with --prefetch or --grid: a CacheSageConfig setting (repeatable)")
    parser.add_argument("--no-announce", dest="announce", action="store_false",
                        help="with --engine-setting: the framework does not name a session's next agent when the "
                             "step before ends (as the bench's --no-announce)")
    args = parser.parse_args(argv)
    from .bench import config_overrides

    overrides = config_overrides(parser, args.cachesage)
    if args.grid:
        return grid(args.workloads, args.jobs, overrides)
    if args.engine_setting and args.prefetch:
        return prefetch_setting(args.workloads, dict(c.split("=") for c in args.capacity), args.calls,
                                overrides, args.announce)
    if args.engine_setting:
        return engine_setting(args.workloads, args.in_flight, dict(c.split("=") for c in args.capacity), args.calls,
                              args.announce)
    print("| workload | capacity (blocks) | LRU | TTL pin (Continuum-like) | steps-to-execution (KVFlow-like) | "
          "CacheSage | Belady | ceiling | CacheSage share of the LRU→Belady gap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        calls = list(interleave(sessions(read_trace(workload)), 16))
        total = distinct_blocks(calls)
        future = block_uses(calls), block_depths(calls)  # Belady's input, once per workload
        ceiling = simulate(calls, total + 1, LRU()).hit_rate
        for fraction in args.fractions:
            capacity = int(total * fraction)
            lru = simulate(calls, capacity, LRU()).hit_rate
            ttl = simulate(calls, capacity, TTLPinned(TTL_CALLS)).hit_rate
            steps = run_steps_to_execution(calls, capacity).hit_rate
            belady = simulate(calls, capacity, Belady(*future)).hit_rate
            sage = run_cachesage(calls, capacity, workload).hit_rate
            gap = belady - lru
            share = f"{(sage - lru) / gap:+.0%}" if gap > 0.005 else "n/a (gap < 0.5 pp)"
            print(f"| {workload} | {fraction:.0%} ({capacity:,}) | {lru:.3f} | {ttl:.3f} | {steps:.3f} | {sage:.3f} | "
                  f"{belady:.3f} | {ceiling:.3f} | {share} |", flush=True)
    return 0


def engine_setting(workloads: list[str], in_flight: int, capacities: dict[str, str], calls: int | None = None,
                   announce: bool = True) -> int:
    """LRU, CacheSage (cold, and warm from the workload's other sessions) and Belady on exactly what
    evaluation.bench replays, serial and with requests in flight, its outputs included."""
    from policy_workers.cachesage import CacheSage

    from .bench import MAX_OUTPUT_TOKENS as generated
    from .bench import warm_state

    def share(hit: float, lru: float, belady: float) -> str:
        return f"{(hit - lru) / (belady - lru):+.0%}" if belady - lru > 0.005 else "n/a (gap < 0.5 pp)"

    print("| workload | capacity (blocks) | in flight | LRU | CacheSage cold | CacheSage warm | Belady | "
          "share of the gap, cold | warm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        chosen, sim_calls, capacity = _bench_window(workload, calls, in_flight, capacities)
        future = block_uses(sim_calls), block_depths(sim_calls)
        for k in dict.fromkeys((1, in_flight)):  # once when in_flight is 1
            warm = CacheSage()
            warm.load_state(warm_state(workload, chosen, capacity, k, announce=announce)[0])
            lru = simulate(sim_calls, capacity, LRU(), in_flight=k, generated=generated).hit_rate
            cold = run_cachesage(sim_calls, capacity, workload, in_flight=k, announce=announce,
                                 generated=generated).hit_rate
            warmed = run_cachesage(sim_calls, capacity, workload, in_flight=k, policy=warm, announce=announce,
                                   generated=generated).hit_rate
            belady = simulate(sim_calls, capacity, Belady(*future), in_flight=k, generated=generated).hit_rate
            print(f"| {workload} | {capacity:,} | {k} | {lru:.3f} | {cold:.3f} | {warmed:.3f} | {belady:.3f} | "
                  f"{share(cold, lru, belady)} | {share(warmed, lru, belady)} |", flush=True)
    return 0


def _bench_window(workload: str, calls: int | None, sized_for: int,
                  capacities: dict[str, str]) -> tuple[dict, list, int]:
    """The bench's sessions, the prompts as its engine gets them and its capacity (sized for ``sized_for`` in
    flight; ``capacities`` overrides it per workload)."""
    from .bench import bench_window

    chosen, sim_calls, capacity = bench_window(workload, sized_for, calls)
    return chosen, sim_calls, int(capacities.get(workload, capacity))


def prefetch_setting(workloads: list[str], capacities: dict[str, str], calls: int | None = None,
                     overrides: dict | None = None, announce: bool = True) -> int:
    """The bench's ``cachesage`` and ``cachesage+prefetch`` arms one at a time, simulated (no pins): hit rate
    and prefill computed (requests' and prefetches') beside LRU's, Belady's (the eviction-only bound) and an
    unlimited cache's (the bound with prefetch)."""
    from policy_workers.cachesage import CacheSage, CacheSageConfig

    from .bench import MAX_OUTPUT_TOKENS as generated
    from .bench import warm_state

    print("| workload | capacity (blocks) | LRU | CacheSage | CacheSage + prefetch | Belady | ceiling | "
          "prefill vs LRU: CacheSage | + prefetch | prefetches (tokens) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        chosen, sim_calls, capacity = _bench_window(workload, calls, 8, capacities)
        state = warm_state(workload, chosen, capacity, 1, announce=announce, overrides=overrides)[0]
        lru = simulate(sim_calls, capacity, LRU(), generated=generated)
        belady = simulate(sim_calls, capacity, Belady.for_calls(sim_calls), generated=generated)
        # A prefetch recomputes what a session's earlier prompt held, so no prefetch serves a block an
        # unlimited cache would not: where Belady reaches this, nothing is left to pass it by.
        ceiling = simulate(sim_calls, distinct_blocks(sim_calls) + 1, LRU())
        runs = []
        for prefetch in (False, True):
            sage = CacheSage(CacheSageConfig(**(overrides or {})))
            sage.load_state(state)
            runs.append(run_cachesage(sim_calls, capacity, workload, policy=sage, prefetch=prefetch, announce=announce,
                                      generated=generated))
        scores, fetched = runs
        print(f"| {workload} | {capacity:,} | {lru.hit_rate:.3f} | {scores.hit_rate:.3f} | {fetched.hit_rate:.3f} | "
              f"{belady.hit_rate:.3f} | {ceiling.hit_rate:.3f} | "
              f"{scores.computed_tokens / lru.computed_tokens - 1:+.1%} | "
              f"{fetched.computed_tokens / lru.computed_tokens - 1:+.1%} | "
              f"{fetched.prefetches} ({fetched.prefetch_tokens:,}) |", flush=True)
    return 0


GRID_SCALES = (0.75, 1.0, 1.5)  # x the bench's capacity
GRID_IN_FLIGHT = (1, 8)


def grid_calls(workload: str) -> tuple[int, int]:
    """The bench's window and a longer one (crewAI's sessions are short: 400 and 1,000 calls)."""
    from .bench import CALLS

    return (CALLS[workload], 1000) if workload == "crewai" else (CALLS[workload], 2 * CALLS[workload])


def grid_point(workload: str, calls: int, scale: float, in_flight: int,
               overrides: dict | None = None) -> tuple[float, float, float, int]:
    """(LRU, warm CacheSage with these CacheSageConfig ``overrides``, Belady, capacity) at one setting of the
    grid."""
    from policy_workers.cachesage import CacheSage

    from .bench import MAX_OUTPUT_TOKENS as generated
    from .bench import warm_state

    chosen, sim_calls, capacity = _bench_window(workload, calls, 8, {})
    capacity = int(capacity * scale)
    warm = CacheSage(**(overrides or {}))
    warm.load_state(warm_state(workload, chosen, capacity, in_flight, overrides=overrides)[0])
    lru = simulate(sim_calls, capacity, LRU(), in_flight=in_flight, generated=generated).hit_rate
    sage = run_cachesage(sim_calls, capacity, workload, in_flight=in_flight, policy=warm, generated=generated).hit_rate
    belady = simulate(sim_calls, capacity, Belady(block_uses(sim_calls), block_depths(sim_calls)),
                      in_flight=in_flight, generated=generated).hit_rate
    return lru, sage, belady, capacity


def grid(workloads: list[str], jobs: int = 2, overrides: dict | None = None) -> int:
    """Warm CacheSage's share of the LRU->Belady gap at 12 settings per workload (two windows, 0.75/1/1.5 x the
    bench's capacity, 1 and 8 in flight) and its mean over the settings with a gap of at least 0.5 pp: one
    window and one capacity move a share by several points by chance."""
    from concurrent.futures import ProcessPoolExecutor
    from itertools import product

    points = [(w, c, s, k) for w in workloads for c, s, k in product(grid_calls(w), GRID_SCALES, GRID_IN_FLIGHT)]
    with ProcessPoolExecutor(max_workers=max(jobs, 1)) as pool:
        results = list(pool.map(grid_point, *zip(*points), [overrides] * len(points)))
    print("| workload | calls | capacity (blocks) | in flight | LRU | CacheSage warm | Belady | share of the gap |")
    print("|---|---|---|---|---|---|---|---|")
    shares: dict[str, list[float]] = {w: [] for w in workloads}
    for (workload, calls, _, k), (lru, sage, belady, capacity) in zip(points, results):
        gap = belady - lru
        share = "n/a (gap < 0.5 pp)"
        if gap >= 0.005:
            shares[workload].append((sage - lru) / gap)
            share = f"{shares[workload][-1]:+.1%}"
        print(f"| {workload} | {calls} | {capacity:,} | {k} | {lru:.3f} | {sage:.3f} | {belady:.3f} | {share} |")
    print()
    for workload, found in shares.items():
        mean = f"{sum(found) / len(found):+.1%}" if found else "n/a"
        print(f"{workload}: mean share {mean} over {len(found)} settings")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
