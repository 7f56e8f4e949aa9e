"""Which blocks each policy evicts, by how soon the trace uses them again (simulator, bench setting).

    .venv/bin/python -m evaluation.evictions [--workload ag2_captainagent] [--capacity 697] [--in-flight 8]

For LRU, CacheSage and Belady on exactly the calls evaluation.bench replays:
evictions counted by the distance (in calls) to the block's next use, and
by whether more than one session ever uses the block. A policy that closes
the gap to Belady evicts fewer blocks needed soon.
"""
from __future__ import annotations

import argparse
import bisect
from collections import Counter, defaultdict

from framework_emitter.prefix_blocks import block_hashes

from .bench import bench_window
from .simulator import LRU, Belady, block_depths, block_uses, run_cachesage, simulate

BANDS = ((16, "< 16 calls"), (48, "16–47 calls"), (None, ">= 48 calls"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluation.evictions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="ag2_captainagent")
    parser.add_argument("--capacity", type=int, default=None, help="blocks (default: the bench's rule)")
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args(argv)
    w = args.workload
    _, calls, capacity = bench_window(w, args.in_flight)
    capacity = args.capacity or capacity
    uses = block_uses(calls)
    sessions_of: dict[str, set[str]] = defaultdict(set)
    for call in calls:
        for h in block_hashes(call.segments, 32):
            sessions_of[h].add(call.session)

    def counted(run) -> tuple[float, Counter]:  # noqa: ANN001
        now, found = {"i": 0}, Counter()

        def on_call(i, call, hashes, hit):  # noqa: ANN001
            now["i"] = i

        def on_evict(h: str) -> None:
            later = uses[h][bisect.bisect_right(uses[h], now["i"]):]
            distance = later[0] - now["i"] if later else None
            band = "never again" if distance is None else next(
                name for limit, name in BANDS if limit is None or distance < limit)
            found[(band, "shared" if len(sessions_of[h]) > 1 else "one session")] += 1

        return run(on_call, on_evict).hit_rate, found

    print(f"{w}: {len(calls)} calls, capacity {capacity} blocks, {args.in_flight} in flight")
    print("| policy | hit rate | " + " | ".join(f"{band}, {kind}" for _, band in BANDS
                                                  for kind in ("one session", "shared")) + " | never again |")
    print("|---|---|" + "---|" * (2 * len(BANDS) + 1))
    runs = {
        "LRU": lambda oc, oe: simulate(calls, capacity, LRU(), in_flight=args.in_flight, on_call=oc, on_evict=oe),
        "CacheSage": lambda oc, oe: run_cachesage(calls, capacity, w, in_flight=args.in_flight,
                                                  observe_sim=(oc, oe)),
        "Belady": lambda oc, oe: simulate(calls, capacity, Belady(uses, block_depths(calls)), in_flight=args.in_flight,
                                          on_call=oc, on_evict=oe),
    }
    for name, run in runs.items():
        hit, found = counted(run)
        cells = [found[(band, kind)] for _, band in BANDS for kind in ("one session", "shared")]
        never = found[("never again", "one session")] + found[("never again", "shared")]
        print(f"| {name} | {hit:.3f} | " + " | ".join(f"{c:,}" for c in cells) + f" | {never:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
