"""CacheSage vs stock vLLM vs the oracle on real multi-agent traces, side by side (engine environment).

    .venv-engine/bin/python -m evaluation.bench --workloads chatdev [--calls 120] [--fraction 0.05] [--repeats 2]
    .venv-engine/bin/python -m evaluation.bench --all          # the five workloads

Per workload: the trace's first whole sessions up to --calls calls,
interleaved 16 at a time (the simulator's order); KV capacity = --fraction of
their distinct full prompt blocks (default: the workload's pressure band), at
least one longest prompt; both stated in the output. Each repeat runs, on the same model,
capacity, order and prompts, each arm from an empty prefix cache, side by side: every arm on an
engine of its own in this process, the engines taking turns one step each, each run timed on
its own steps only, so a change in the machine's speed falls on every arm alike
(``--one-after-another``: each arm alone, every other repeat in reverse order). The arms:
- stock: vLLM with its own scheduler;
- lru-runtime (a control, not in the default arms): the policy arms' engine
  (AgentRuntimeScheduler) with no policy, which evicts exactly as stock; its
  hit rate must equal stock's, and its TTFT and throughput against stock's
  are what the second engine instance and the runtime layer cost or give
  before any policy acts (on a 2-core CPU the two engines' speeds can
  differ between processes);
- cachesage: vLLM + AgentRuntimeScheduler + CacheSage's eviction scores only,
  its state first learned from the workload's other sessions (--warm-calls
  of them, never the replayed ones), as a worker that has been running
  persists it;
- cachesage-cold: the same, learning from nothing at the first call;
- cachesage+prefetch: the same with its pins and prefetches too;
- oracle: exact next-use scores from the trace's future through the same
  decision path (Belady in the engine: the limit for eviction alone). The simulator's hit rates for the same order and capacity are shown
beside the engine's.

Output: a markdown table per workload (hit rate, mean/p50/p99 TTFT, p99
without the run's first burst (the first 2 x max-in-flight requests), requests/s, tokens/s, session completion p50, prefill tokens computed incl.
prefetches; min–max over repeats), rows in SQL (``--db``, SQLite by default),
and PNG plots when matplotlib is installed (``pip install agentrt[eval]``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Container, Sequence

# Capacity as a fraction of the replayed calls' distinct prompt blocks where eviction order matters
# (../shared/notes/headroom.md: about 5-10% of the footprint; at 25% LRU is within ~1 pp of optimal).
PRESSURE = {"ag2_captainagent": 0.05, "chatdev": 0.05, "crewai": 0.05, "magentic_one": 0.10, "tau_airline": 0.05}
# Calls replayed per workload by default (whole sessions, enough for 16 to run at once where cheap): crewAI's
# sessions are two short calls; magentic_one and tau_airline reuse 83-96% of their prompts, so 400 calls cost
# little prefill.
CALLS = {"ag2_captainagent": 120, "chatdev": 120, "crewai": 400, "magentic_one": 400, "tau_airline": 400}
ARMS = ("stock", "cachesage", "cachesage-cold", "cachesage+prefetch", "oracle")
CONTROL_ARMS = ("lru-runtime",)
WARM_CALLS = 2000
MAX_OUTPUT_TOKENS = 8  # generated per call at most: the engine's KV holds them, so the simulator in its setting too


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(int(round(q * (len(ordered) - 1))), len(ordered) - 1)]


def metrics(result: Any, warmup_calls: int = 0) -> dict[str, float]:
    """The figures one arm's run is judged by.

    ``ttft_p99_warm_s`` leaves out the first ``warmup_calls`` requests submitted: with requests in flight the
    run's first burst arrives together on an empty cache, the same in every arm, and with a few hundred
    requests it is most of p99 (session 10, crewAI with 8 in flight).
    """
    ttfts = result.ttfts()
    warm = [c.ttft_s for c in sorted(result.calls, key=lambda c: c.submitted)[warmup_calls:]]
    wall = max(result.wall_s, 1e-9)
    return {
        "hit_rate": result.hit_rate,
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan"),
        "ttft_p50_s": _percentile(ttfts, 0.5),
        "ttft_p99_s": _percentile(ttfts, 0.99),
        "ttft_p99_warm_s": _percentile(warm, 0.99),
        "requests_per_s": len(result.calls) / wall,
        "tokens_per_s": (result.prompt_tokens + result.output_tokens) / wall,
        "session_p50_s": _percentile(result.session_times(), 0.5),
        "prefill_tokens": float(result.prefill_tokens),
        "prefetch_tokens": float(result.prefetch_tokens),
        "wall_s": result.wall_s,
    }


COLUMNS = [("hit rate", "hit_rate", "{:.3f}"), ("TTFT mean (s)", "ttft_mean_s", "{:.3f}"),
           ("TTFT p50 (s)", "ttft_p50_s", "{:.3f}"), ("TTFT p99 (s)", "ttft_p99_s", "{:.3f}"),
           ("TTFT p99 after the first burst (s)", "ttft_p99_warm_s", "{:.3f}"),
           ("req/s", "requests_per_s", "{:.2f}"), ("tok/s", "tokens_per_s", "{:,.0f}"),
           ("session p50 (s)", "session_p50_s", "{:.1f}"), ("prefill tokens", "prefill_tokens", "{:,.0f}")]


def table(rows: dict[str, list[dict[str, float]]], simulated: dict[str, float], side_by_side: bool = False) -> str:
    """Markdown: one row per arm, median over repeats with [min–max], plus each arm against stock (and
    against the control arm, where it ran): with ``side_by_side`` (every arm of a repeat ran in turns with
    the others) repeat by repeat, the ratios' median and range; else the ratio of the medians."""
    head = "| arm | " + " | ".join(c[0] for c in COLUMNS) + " | simulated hit rate (same capacity and requests in flight) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for arm, runs in rows.items():
        cells = []
        for _, key, fmt in COLUMNS:
            values = [r[key] for r in runs]
            mid = statistics.median(values)
            cell = fmt.format(mid)
            if len(values) > 1:
                cell += f" [{fmt.format(min(values))}–{fmt.format(max(values))}]"
            cells.append(cell)
        sim = simulated.get(arm)
        lines.append(f"| {arm} | " + " | ".join(cells) + (f" | {sim:.3f} |" if sim is not None else " | – |"))
    # Against stock, and against the control (the policy arms' own engine with no policy) where it ran.
    baselines = [arm for arm in ("stock", *CONTROL_ARMS) if arm in rows]
    how = " (side by side, repeat by repeat: median [range])" if side_by_side else ""
    for n, baseline in enumerate(baselines):
        for arm, runs in rows.items():
            if arm not in baselines[: n + 1]:
                lines.append(f"\n{arm} vs {baseline}{how}: {_comparison(runs, rows[baseline], side_by_side)}")
    if "stock" in rows:
        base = _medians(rows["stock"])
        if "oracle" in rows:
            oracle = statistics.median(r["hit_rate"] for r in rows["oracle"])
            gap = oracle - base["hit_rate"]
            for arm in ("cachesage", "cachesage-cold"):
                if arm in rows:
                    sage = statistics.median(r["hit_rate"] for r in rows[arm])
                    share = (f"{(sage - base['hit_rate']) / gap:+.0%}" if gap > 0.005
                             else "n/a (oracle within 0.5 pp of stock)")
                    lines.append(f"\n{arm} closes {share} of the stock→oracle hit-rate gap.")
    return "\n".join(lines)


def _comparison(runs: list[dict[str, float]], base: list[dict[str, float]], paired: bool) -> str:
    """An arm's figures against a baseline's: ``paired``, run by run (the i-th run of each ran together)."""
    def change(key: str) -> str:
        if not paired:
            return _change(statistics.median(r[key] for r in runs), statistics.median(b[key] for b in base))
        ratios = [100 * (r[key] / b[key] - 1) for r, b in zip(runs, base) if b[key]]
        if not ratios:
            return "n/a"
        spread = f" [{min(ratios):+.1f}% to {max(ratios):+.1f}%]" if len(ratios) > 1 else ""
        return f"{statistics.median(ratios):+.1f}%{spread}"

    hit = 100 * (statistics.median(r["hit_rate"] for r in runs) - statistics.median(b["hit_rate"] for b in base))
    return (f"hit rate {hit:+.1f} pp, mean TTFT {change('ttft_mean_s')}, p99 TTFT {change('ttft_p99_s')} "
            f"({change('ttft_p99_warm_s')} after the first burst), throughput {change('requests_per_s')} (req/s), "
            f"prefill tokens {change('prefill_tokens')}")


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for _, key, _ in COLUMNS}


def _change(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%" if old else "n/a"


def save_sql(url: str, run_id: str, workload: str, setup: dict[str, Any], arm: str, repeat: int,
             figures: dict[str, float], calls: Sequence[Any] = ()) -> None:
    """One row per arm and repeat (``agentrt_eval_runs``: the figures it is judged by) and one per request
    (``agentrt_eval_requests``: what it asked, what was cached, when its first token came; ``calls`` are
    ``engine_replay.CallResult``s, numbered in submission order), to find which requests make a tail."""
    from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, create_engine

    meta = MetaData()
    runs = Table("agentrt_eval_runs", meta,
                 Column("id", Integer, primary_key=True, autoincrement=True),
                 Column("run_id", String(64), nullable=False, index=True),
                 Column("created_at", Float, nullable=False),
                 Column("workload", String(64), nullable=False, index=True),
                 Column("arm", String(32), nullable=False),
                 Column("repeat", Integer, nullable=False),
                 Column("setup", Text, nullable=False),
                 *(Column(key, Float) for key in figures))
    requests = Table("agentrt_eval_requests", meta,
                     Column("id", Integer, primary_key=True, autoincrement=True),
                     Column("run_id", String(64), nullable=False, index=True),
                     Column("workload", String(64), nullable=False),
                     Column("arm", String(32), nullable=False),
                     Column("repeat", Integer, nullable=False),
                     Column("call", Integer, nullable=False),  # submission order within the arm's run
                     Column("session", String(128), nullable=False),
                     Column("agent", String(128), nullable=False),
                     Column("seq", Integer, nullable=False),
                     Column("prompt_tokens", Integer, nullable=False),
                     Column("cached_tokens", Integer, nullable=False),
                     Column("submitted_s", Float, nullable=False),  # since the arm's first submission
                     Column("ttft_s", Float, nullable=False),
                     Column("latency_s", Float, nullable=False))
    engine = create_engine(url, future=True)
    meta.create_all(engine)
    _add_missing_columns(engine, runs)
    start = min((c.submitted for c in calls), default=0.0)
    with engine.begin() as conn:
        conn.execute(runs.insert(), [{"run_id": run_id, "created_at": time.time(), "workload": workload, "arm": arm,
                                      "repeat": repeat, "setup": json.dumps(setup), **figures}])
        if calls:
            conn.execute(requests.insert(), [
                {"run_id": run_id, "workload": workload, "arm": arm, "repeat": repeat, "call": index,
                 "session": c.session, "agent": c.agent, "seq": c.seq, "prompt_tokens": c.prompt_tokens,
                 "cached_tokens": c.cached_tokens, "submitted_s": c.submitted - start, "ttft_s": c.ttft_s,
                 "latency_s": c.finished - c.submitted}
                for index, c in enumerate(sorted(calls, key=lambda c: c.submitted))])
    engine.dispose()


def _add_missing_columns(engine: Any, table: Any) -> None:
    """A results database written by an earlier version lacks the figures added since: add them (NULL there)."""
    from sqlalchemy import inspect, text

    present = {c["name"] for c in inspect(engine).get_columns(table.name)}
    with engine.begin() as conn:
        for column in table.columns:
            if column.name not in present:
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" '
                                  f'{column.type.compile(dialect=engine.dialect)}'))


def plot(path: Path, workload: str, rows: dict[str, list[dict[str, float]]], results: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    arms = list(rows)
    axes[0].bar(arms, [statistics.median(r["hit_rate"] for r in rows[a]) for a in arms], color="#4c72b0")
    axes[0].set_title("prefix-cache hit rate (tokens)")
    for arm, result in results.items():
        ttfts = result.ttfts()
        axes[1].plot(ttfts, [i / max(len(ttfts) - 1, 1) for i in range(len(ttfts))], label=arm)
    axes[1].set_xscale("log")
    axes[1].set_title("TTFT CDF (s), last repeat")
    axes[1].legend()
    axes[2].bar(arms, [statistics.median(r["requests_per_s"] for r in rows[a]) for a in arms], color="#55a868")
    axes[2].set_title("throughput (requests/s)")
    for axis in (axes[0], axes[2]):
        axis.tick_params(axis="x", labelrotation=20)
    fig.suptitle(workload)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cpu_dtype() -> str:
    """bfloat16 where the CPU has AMX tiles for it, else float32. Measured with the small model: AMX
    2,400-3,700 prefill tokens/s; AVX-512 BF16 without AMX 575; AVX2 only (bfloat16 emulated) 85,
    where float32 gave 330."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "bfloat16"
    return "bfloat16" if "amx_bf16" in flags else "float32"


def _make_llm(model: str, blocks: int, max_len: int, agentrt: bool, dtype: str) -> Any:
    from vllm import LLM

    extra = {"scheduler_cls": "engine_emitter.scheduler.AgentRuntimeScheduler"} if agentrt else {}
    return LLM(model=model, skip_tokenizer_init=True, block_size=32, num_gpu_blocks_override=blocks,
               enable_prefix_caching=True, max_model_len=max_len, max_num_seqs=16, dtype=dtype, seed=0,
               enable_chunked_prefill=True, max_num_batched_tokens=max(max_len, 2048), **extra)


def _working_set(calls: Sequence[Any], in_flight: int) -> float:
    """Mean distinct full blocks of ``in_flight`` consecutive calls: what the running batch holds
    (calls in flight together share their common prefixes' blocks)."""
    from framework_emitter.prefix_blocks import block_hashes

    chains = [block_hashes(c.segments, 32) for c in calls]
    sizes = [len(set().union(*chains[i:i + in_flight])) for i in range(max(len(chains) - in_flight + 1, 1))]
    return statistics.fmean(sizes) if sizes else 0.0


def _prefill(llm: Any, vocab: int, lengths: Sequence[int], seed: int) -> float:
    """Prefill random prompts of these lengths (one output token each); the seconds it took."""
    import random

    from vllm import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(n)]} for n in lengths]
    began = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - began


def _warm_up(llm: Any, vocab: int, max_prompt_tokens: int) -> None:
    """First calls pay one-off costs (kernel selection, allocation): keep them out of every arm's figures."""
    _prefill(llm, vocab, (64, 512, max_prompt_tokens // 2, max_prompt_tokens), seed=0)


def _prefill_speed(llm: Any, vocab: int, max_prompt_tokens: int) -> float:
    """Prompt tokens/s of one uncached longest prompt, on a warm engine (not the warm-up's tokens: seed 1)."""
    return max_prompt_tokens / _prefill(llm, vocab, (max_prompt_tokens,), seed=1)


def parameters(size: str) -> int:
    """Parameter count of the generated Llama of this size."""
    from engine_emitter.tiny_model import SIZES

    hidden, layers, _, intermediate, vocab = SIZES[size]
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


def _whole_sessions(workload: str, calls: int, max_sessions: int, excluded: Container[str] = ()) -> dict:
    """The trace's first whole sessions (file order), none of ``excluded``, until ``calls`` calls or
    ``max_sessions`` sessions."""
    from framework_emitter.traces import read_trace, sessions

    chosen: dict = {}
    for name, session_calls in sessions(read_trace(workload)).items():
        if len(chosen) >= max_sessions or sum(map(len, chosen.values())) >= calls:
            break
        if name not in excluded:
            chosen[name] = session_calls
    return chosen


def config_overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as CacheSageConfig overrides, each value of its field's type; a clear error else."""
    from dataclasses import fields

    from policy_workers.cachesage import CacheSageConfig

    types = {f.name: type(f.default) for f in fields(CacheSageConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or not value:
            parser.error(f"--cachesage {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(types))}")
        try:
            out[key] = types[key](value)
        except ValueError:
            parser.error(f"--cachesage {pair!r}: {value!r} is not a {types[key].__name__}")
    return out


def replay_order(workload: str, calls: int, max_sessions: int) -> tuple[dict, list]:
    """The trace's first whole sessions (file order) up to ``calls`` calls, and the order a replay sends
    them in (16 sessions interleaved): (sessions, order)."""
    from framework_emitter.replayer import interleave

    chosen = _whole_sessions(workload, calls, max_sessions)
    return chosen, list(interleave(chosen, 16))


def held_out(workload: str, replayed: Container[str], calls: int, max_prompt_tokens: int) -> list:
    """Up to ``calls`` calls of the workload's sessions that a replay does not send (file order,
    interleaved like a replay): what a worker could have learned from before the measured window."""
    from framework_emitter.replayer import interleave

    others = _whole_sessions(workload, calls, max_sessions=10**9, excluded=replayed)
    return [c.truncated(max_prompt_tokens) for c in interleave(others, 16)][:calls]


def warm_state(workload: str, replayed: Container[str], capacity: int, in_flight: int, calls: int = WARM_CALLS,
               max_prompt_tokens: int = 4032, announce: bool = True,
               overrides: dict | None = None) -> tuple[dict, int]:
    """What the bench's ``cachesage`` arm starts from: CacheSage's state (with these CacheSageConfig
    ``overrides``) learned in the simulator (at this capacity and load) from up to ``calls`` calls of the
    workload's other sessions ({} when there are none), and how many calls that was."""
    from .simulator import learned_state

    history = held_out(workload, replayed, calls, max_prompt_tokens)
    if not history:
        return {}, 0
    return (learned_state(history, capacity, workload, in_flight=in_flight, announce=announce, overrides=overrides),
            len(history))


def bench_window(workload: str, sized_for: int, calls: int | None = None) -> tuple[dict, list, int]:
    """What the bench replays by default, as the simulator takes it: (sessions, prompts as the engine gets them,
    capacity sized for ``sized_for`` requests in flight)."""
    chosen, _, sim_calls, _, _, _, capacity = setting(workload, calls or CALLS[workload], 10_000, PRESSURE[workload],
                                                      4032, sized_for)
    return chosen, sim_calls, capacity


def setting(workload: str, calls: int, max_sessions: int, fraction: float, max_prompt_tokens: int,
            in_flight: int) -> tuple[dict, list, list, int, int, float, int]:
    """What a bench run replays and at which capacity (the simulator's sweep reuses it):
    (sessions, order, prompts as the engine gets them, footprint, cache part, working set, capacity)."""
    from .simulator import distinct_blocks

    chosen, order = replay_order(workload, calls, max_sessions)
    # The simulator sees the prompts the engine gets: truncated to the context the engine allows.
    sim_calls = [c.truncated(max_prompt_tokens) for c in order]
    footprint = distinct_blocks(sim_calls)
    # The cache part in the pressure band, plus the blocks the requests in flight hold (their working set).
    cache_part = int(footprint * fraction)
    batch = _working_set(sim_calls, in_flight)
    longest = max(c.prompt_tokens for c in sim_calls) // 32 + 2
    return chosen, order, sim_calls, footprint, cache_part, batch, max(cache_part + int(batch), longest)


_SHOWN_COUNTERS = ("prefetch", "pins_", "requests_preempted")  # the engine's own requests and what they cost


def _refused(counters: dict[str, int]) -> int:
    """Decisions the engine's book refused in a run: expired, duplicates, unsupported kinds."""
    return sum(v for k, v in counters.items() if k.startswith("book_") and not k.startswith("book_applied"))


def run_workload(workload: str, args: argparse.Namespace, model: str, vocab: int, run_id: str) -> str:
    from policy_workers.cachesage import CacheSage

    from .engine_replay import Arm, OracleArm, PolicyArm, ReplayRun, side_by_side
    from .simulator import LRU, Belady, run_cachesage, simulate

    fraction = args.fraction if args.fraction is not None else PRESSURE[workload]
    sized_for = args.sized_for_in_flight or args.max_in_flight
    chosen, order, sim_calls, footprint, cache_part, batch, capacity = setting(
        workload, args.calls or CALLS[workload], args.sessions, fraction, args.max_prompt_tokens, sized_for)
    setup = {"sessions": len(chosen), "calls": len(order), "footprint_blocks": footprint, "capacity_blocks": capacity,
             "cache_part_blocks": cache_part,
             "fraction": fraction, "model_size": args.model_size, "max_prompt_tokens": args.max_prompt_tokens,
             "max_output_tokens": args.max_output_tokens, "max_in_flight": args.max_in_flight,
             "capacity_sized_for_in_flight": sized_for,
             "time_scale": args.time_scale, "announce": args.announce, "repeats": args.repeats,
             "side_by_side": args.side_by_side,
             **({"cachesage": args.cachesage} if args.cachesage else {}),
             "dtype": cpu_dtype() if args.dtype == "auto" else args.dtype}
    print(f"\n## {workload}: {len(chosen)} sessions, {len(order)} calls; KV capacity {capacity} blocks of 32 tokens "
          f"= {cache_part} ({fraction:.0%} of the {footprint}-block prefix footprint) + {int(batch)} for "
          f"the working set of {sized_for} requests in flight"
          + (f"; {args.max_in_flight} in flight (a lighter load on the same engine)"
             if sized_for != args.max_in_flight else ""), flush=True)
    k = args.max_in_flight
    warm, setup["warm_calls"] = warm_state(workload, chosen, capacity, k, args.warm_calls, args.max_prompt_tokens,
                                           args.announce, args.cachesage)
    print(f"CacheSage's state learned from {setup['warm_calls']} calls of {workload}'s other sessions (simulated, the "
          f"replayed sessions excluded); cachesage-cold starts from nothing", flush=True)

    def cachesage(warmed: bool, **overrides: Any) -> CacheSage:
        policy = CacheSage(**{**args.cachesage, **overrides})
        if warmed and warm:
            policy.load_state(warm)
        return policy

    # The simulator in the engine's setting: the whole capacity, the same number of requests in flight.
    generated = args.max_output_tokens
    simulated = {"stock": simulate(sim_calls, capacity, LRU(), in_flight=k, generated=generated).hit_rate,
                 "cachesage": run_cachesage(sim_calls, capacity, workload, in_flight=k, policy=cachesage(True),
                                            announce=args.announce, generated=generated).hit_rate,
                 "cachesage-cold": run_cachesage(sim_calls, capacity, workload, in_flight=k,
                                                 announce=args.announce, generated=generated).hit_rate,
                 "oracle": simulate(sim_calls, capacity, Belady.for_calls(sim_calls), in_flight=k,
                                    generated=generated).hit_rate}
    simulated["lru-runtime"] = simulated["stock"]
    # Engines: side by side, one per arm (they take turns); one after another, stock's and one the other
    # arms share. One block more than the capacity: vLLM keeps one as its null block.
    dtype = setup["dtype"]
    engines: dict[str, Any] = {}

    def engine_key(arm_name: str) -> str:
        return arm_name if args.side_by_side or arm_name == "stock" else "runtime"

    for arm_name in args.arms:
        if engine_key(arm_name) not in engines:
            engines[engine_key(arm_name)] = _make_llm(model, capacity + 1, args.max_prompt_tokens + 64,
                                                      agentrt=arm_name != "stock", dtype=dtype)
    for llm in engines.values():  # all warm before any is timed: the first one timed used to read 40% slower
        _warm_up(llm, vocab, args.max_prompt_tokens)
    setup["prefill_tokens_per_s"] = {key: round(_prefill_speed(llm, vocab, args.max_prompt_tokens))
                                     for key, llm in engines.items()}
    speeds = ", ".join(f"{key} {speed:,}" for key, speed in setup["prefill_tokens_per_s"].items())
    print(f"model {args.model_size} ({parameters(args.model_size) / 1e6:.0f}M parameters, random weights, {dtype}): "
          f"prefill tokens/s on one uncached {args.max_prompt_tokens}-token prompt, by engine: {speeds}", flush=True)
    rows: dict[str, list[dict[str, float]]] = {arm: [] for arm in args.arms}
    last: dict[str, Any] = {}

    def prepare(arm_name: str) -> tuple[Any, Arm]:
        """The arm's engine, its prefix cache empty and no decision left from the arm before, and the arm."""
        llm = engines[engine_key(arm_name)]
        if arm_name != "stock":  # forget the previous arm's decisions; release its pins
            scheduler = llm.llm_engine.engine_core.engine_core.scheduler
            scheduler.book.clear()
            scheduler.apply_decisions([])
        if not llm.reset_prefix_cache():
            raise RuntimeError("the engine still holds blocks between arms; results would not be comparable")
        if arm_name in ("stock", "lru-runtime"):
            return llm, Arm()
        if arm_name in ("cachesage", "cachesage-cold"):  # eviction scores only: what the simulator models
            return llm, PolicyArm(cachesage(arm_name == "cachesage", pin_threshold=2.0, prefetch_threshold=2.0),
                                  name=arm_name, act_every_s=args.act_every_s)
        if arm_name == "cachesage+prefetch":  # everything it does: scores, pins, prefetch
            return llm, PolicyArm(cachesage(True), name=arm_name, act_every_s=args.act_every_s)
        return llm, OracleArm(order, 32, args.max_prompt_tokens)

    def run(arm_name: str, label: str | None) -> ReplayRun:
        llm, arm = prepare(arm_name)
        return ReplayRun(llm, order, arm, workload=workload, vocab_size=vocab,
                         max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                         max_in_flight=args.max_in_flight, time_scale=args.time_scale, announce=args.announce,
                         progress=_progress(label) if label else None)

    def record(arm_name: str, repeat: int, replayed: ReplayRun, seconds: float) -> None:
        result = replayed.result
        figures = metrics(result, warmup_calls=2 * args.max_in_flight)
        rows[arm_name].append(figures)
        last[arm_name] = result
        save_sql(args.db, run_id, workload, setup, arm_name, repeat, figures, result.calls)
        cost, arm = "", replayed.arm
        if isinstance(arm, PolicyArm):
            cost = (f" (policy in the engine's thread: observe {arm.cost_s['observe']:.1f} s, act "
                    f"{arm.cost_s['act']:.1f} s in {arm.acts:,} acts, applying {arm.decisions:,} decisions "
                    f"{arm.cost_s['apply']:.1f} s, {_refused(result.counters):,} refused)")
            shown = {k: v for k, v in result.counters.items() if k.startswith(_SHOWN_COUNTERS) and v}
            if shown:
                cost += " " + ", ".join(f"{k} {v:,}" for k, v in sorted(shown.items()))
        took = f"{result.wall_s:.0f} s of its own in {seconds:.0f} s" if args.side_by_side else f"{seconds:.0f} s"
        print(f"\r{workload} {arm_name} #{repeat + 1}: hit {figures['hit_rate']:.3f}, mean TTFT "
              f"{figures['ttft_mean_s']:.3f} s, {took}{cost}", flush=True)

    for repeat in range(args.repeats):
        # Every other repeat in reverse order: a drift in the machine's speed across a repeat weighs on
        # every arm alike over two repeats, not always on the last (side by side: who steps first).
        names = args.arms if repeat % 2 == 0 else args.arms[::-1]
        if args.side_by_side:  # all arms at once, their engines taking turns step for step
            label = f"{workload} {len(names)} arms side by side #{repeat + 1}"  # the first one's progress
            runs = [run(arm_name, label if n == 0 else None) for n, arm_name in enumerate(names)]
            began = time.perf_counter()
            side_by_side(runs)
            seconds = time.perf_counter() - began
            for arm_name, replayed in zip(names, runs):
                record(arm_name, repeat, replayed, seconds)
            continue
        for arm_name in names:
            began = time.perf_counter()
            replayed = run(arm_name, f"{workload} {arm_name} #{repeat + 1}")
            replayed.alone()
            record(arm_name, repeat, replayed, time.perf_counter() - began)
    del engines
    text = table(rows, simulated, args.side_by_side)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{workload}.md").write_text(f"{workload}: {json.dumps(setup)}\n\n{text}\n")
    if plot(out / f"{workload}.png", workload, rows, last):
        print(f"plot: {out / f'{workload}.png'}")
    return text


def _progress(label: str):
    interactive = sys.stdout.isatty()
    state = {"last": 0.0}

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - state["last"] > (0.5 if interactive else 30):
            state["last"] = now
            bar = "#" * int(30 * done / total)
            lead = "\r" if interactive else ""
            print(f"{lead}{label} [{bar:<30}] {done}/{total}", end="" if interactive else "\n", flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    from framework_emitter.traces import WORKLOADS

    parser = argparse.ArgumentParser(prog="evaluation.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["chatdev"], choices=list(WORKLOADS))
    parser.add_argument("--all", action="store_true", help="all five workloads")
    parser.add_argument("--calls", type=int, default=None,
                        help="whole sessions in file order until this many calls (default: CALLS per workload)")
    parser.add_argument("--sessions", type=int, default=10_000, help="at most this many sessions")
    parser.add_argument("--fraction", type=float, default=None,
                        help="KV capacity / prefix footprint (default: the workload's pressure band, PRESSURE)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + CONTROL_ARMS)
    parser.add_argument("--warm-calls", type=int, default=WARM_CALLS,
                        help="CacheSage's state is first learned (in the simulator) from up to this many calls of "
                             "the workload's sessions that are not replayed; 0: every CacheSage arm starts cold")
    parser.add_argument("--model-size", default="auto", choices=("auto", "tiny", "medium", "small"),
                        help="auto: small (168M, bfloat16) where the CPU has AMX, else medium "
                             "(46M, float32); both prefill slowly enough that cache hits dominate TTFT")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="auto: bfloat16 where the CPU has AMX, else float32")
    parser.add_argument("--max-prompt-tokens", type=int, default=4032)
    parser.add_argument("--max-output-tokens", type=int, default=MAX_OUTPUT_TOKENS)
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--sized-for-in-flight", type=int, default=None,
                        help="KV capacity: the pressure band plus the working set of this many requests in flight "
                             "(default: --max-in-flight); e.g. 8 with --max-in-flight 1 is the default run's engine "
                             "under a lighter load, where TTFT is a request's own prefill")
    parser.add_argument("--time-scale", type=float, default=0.0, help="tool gaps x this (0: back to back)")
    parser.add_argument("--one-after-another", dest="side_by_side", action="store_false",
                        help="run the arms one after another, each alone on the machine (needed with --time-scale), "
                             "instead of side by side: by default every arm of a repeat runs at once on an engine of "
                             "its own, the engines taking turns step for step, each timed on its own steps, so a "
                             "change in the machine's speed falls on all arms alike")
    parser.add_argument("--no-announce", dest="announce", action="store_false",
                        help="the framework names a session's next agent only when its request comes (a handoff "
                             "then), not when the step before ends: CacheSage has its learned chain alone")
    parser.add_argument("--act-every-s", type=float, default=0.1,
                        help="how often the in-process policy decides (a worker's batch cadence), besides at "
                             "every engine step in which a request finished; its time is charged to the engine")
    parser.add_argument("--cachesage", action="append", default=[], metavar="KEY=VALUE",
                        help="a CacheSageConfig setting for the engine's CacheSage arms (repeatable), e.g. "
                             "prefetch_threshold=0.6")
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--db", default="sqlite:///runs/eval/results.db")
    args = parser.parse_args(argv)
    args.cachesage = config_overrides(parser, args.cachesage)
    if args.side_by_side and args.time_scale:
        parser.error("--time-scale needs --one-after-another: side by side, a tool gap would run on while the "
                     "other arms' engines step")
    if args.model_size == "auto":
        args.model_size = "small" if cpu_dtype() == "bfloat16" else "medium"
    if args.all:
        args.workloads = list(WORKLOADS)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the policy and the scheduler share the process
    os.environ["AGENTRT_ENGINE_STREAMS"] = "0"  # policies run in-process here (see engine_replay)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from engine_emitter.tiny_model import SIZES, make_random_llama

    model = make_random_llama(Path("runs/models") / args.model_size, args.model_size,
                              max_len=args.max_prompt_tokens + 64)
    vocab = SIZES[args.model_size][4]
    run_id = args.run_id or uuid.uuid4().hex[:12]
    print(f"run {run_id}: model {args.model_size} ({model}), results in {args.out} and {args.db}")
    if len(args.workloads) == 1:
        text = run_workload(args.workloads[0], args, str(model), vocab, run_id)
        print(f"\n### {args.workloads[0]}\n{text}")
        return 0
    # One process per workload: vLLM's in-process engines do not survive being torn down and
    # rebuilt many times in one interpreter (its distributed state goes with the first).
    failed = []
    for workload in args.workloads:
        child = [sys.executable, "-m", "evaluation.bench", "--workloads", workload, "--run-id", run_id,
                 *_passed_on(argv if argv is not None else sys.argv[1:])]
        if subprocess.run(child).returncode != 0:
            failed.append(workload)
    for workload in args.workloads:
        path = Path(args.out) / f"{workload}.md"
        if workload not in failed and path.exists():
            print(f"\n### {workload}\n{path.read_text().split(chr(10), 2)[2]}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _passed_on(argv: list[str]) -> list[str]:
    """The parent's arguments minus the workload selection."""
    out, skip = [], False
    for arg in argv:
        if skip and not arg.startswith("--"):
            continue
        skip = arg in ("--workloads", "--all")
        if not skip:
            out.append(arg)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
