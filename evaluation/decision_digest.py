"""A digest of every decision CacheSage makes on the bench's windows (simulator): the check for a change
that must not change a decision.

    .venv/bin/python -m evaluation.decision_digest [--workloads crewai ...] [--in-flight 1 8] [--prefetch]
        [--bench-arm]

Run it before and after the change: equal digests mean the same decisions, in the same order, with
the same fields (all but ``decision_id`` and ``event_id``, which name a decision and do not steer the
engine), so the same hit rates. It also prints the seconds CacheSage spent observing and acting, as a
rough side-by-side timing of the two versions (run them alternately: this machine is noisy).
``--bench-arm`` configures CacheSage as the bench's ``cachesage`` arm (eviction scores only, no pins or
prefetches); ``--prefetch`` runs one at a time with its prefetches applied, as the simulator runs them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from typing import Any, Sequence

from framework_emitter.traces import WORKLOADS, TraceCall
from policy_workers.cachesage import CacheSage
from streams import events as ev

from .bench import bench_window
from .simulator import run_cachesage

UNSTEERING = ("decision_id", "event_id")  # fields that name a decision and change nothing in the engine


class _Recording(CacheSage):
    """CacheSage that hashes each decision it makes and times its own observe and act."""

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.digest = hashlib.sha256()
        self.decisions = 0
        self.seconds = {"observe": 0.0, "act": 0.0}

    def observe(self, event: ev.Event) -> None:
        began = time.perf_counter()
        super().observe(event)
        self.seconds["observe"] += time.perf_counter() - began

    def act(self, workload: str, now: float) -> list[ev.Decision]:
        began = time.perf_counter()
        out = super().act(workload, now)
        self.seconds["act"] += time.perf_counter() - began
        for decision in out:
            fields = [(f.name, getattr(decision, f.name)) for f in dataclasses.fields(decision)
                      if f.name not in UNSTEERING]
            self.digest.update(repr((type(decision).__name__, fields)).encode())
            self.decisions += 1
        return out


@dataclasses.dataclass
class Digest:
    hit_rate: float
    decisions: int
    digest: str  # the first 16 hex digits of the SHA-256 of the decision stream
    observe_s: float
    act_s: float


def decision_digest(calls: Sequence[TraceCall], capacity: int, workload: str, *, in_flight: int = 1,
                    prefetch: bool = False, **overrides: Any) -> Digest:
    """CacheSage (``overrides``: CacheSageConfig settings) run cold on ``calls``: its decisions' digest."""
    sage = _Recording(**overrides)
    result = run_cachesage(calls, capacity, workload, policy=sage, in_flight=in_flight, prefetch=prefetch)
    return Digest(result.hit_rate, sage.decisions, sage.digest.hexdigest()[:16], sage.seconds["observe"],
                  sage.seconds["act"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluation.decision_digest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--in-flight", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prefetch", action="store_true", help="one at a time, CacheSage's prefetches applied")
    parser.add_argument("--bench-arm", action="store_true",
                        help="as the bench's cachesage arm: eviction scores only (pins and prefetch off)")
    args = parser.parse_args(argv)
    overrides = {"pin_threshold": 2.0, "prefetch_threshold": 2.0} if args.bench_arm else {}
    print("| workload | in flight | capacity (blocks) | hit rate | decisions | digest | observe (s) | act (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        for in_flight in ([1] if args.prefetch else args.in_flight):
            sized_for = 8 if args.prefetch else in_flight  # the bench runs its prefetch arm on the engine sized for 8
            _, calls, capacity = bench_window(workload, sized_for)
            d = decision_digest(calls, capacity, workload, in_flight=in_flight, prefetch=args.prefetch, **overrides)
            print(f"| {workload} | {in_flight} | {capacity:,} | {d.hit_rate:.6f} | {d.decisions:,} | {d.digest} | "
                  f"{d.observe_s:.2f} | {d.act_s:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
