"""Engine-side benchmark: step-time overhead of the integration vs stock vLLM, and decision latency.

    .venv-engine/bin/python -m benchmarks.bench_engine [--trace tau_airline] [--calls 48] [--repeats 3]

Runs in the engine environment (vLLM). One process holds two in-process
engines on the same random-weight model, KV capacity and requests: stock
vLLM (default scheduler) and vLLM with AgentRuntimeScheduler connected to an
embedded broker. Runs alternate stock / integration, the prefix cache reset
before each, so both see the same cold start. Requests: the first --calls
calls of the real trace (16 sessions interleaved), prompts rebuilt as token
ids with the trace's prefix sharing, 8 output tokens each, all submitted at
once (continuous batching). Overhead = integration wall time / stock wall
time - 1. Decision latency: while the integration runs, a thread publishes
eviction-score decisions at --decision-rate per second through the broker
(from a separate process, as the policy worker would be);
latency = decision made (its time field) -> applied at a step boundary. The
scores are the neutral 0.5 (the level of blocks no decision mentions), so the
decisions are processed in full yet cannot change what is evicted: both
engines do the same work (cached tokens are printed to show it) and the ratio
is the integration's cost alone.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
import uuid


def _prompts(trace: str, calls: int, vocab: int, max_len: int) -> list[list[int]]:
    from framework_emitter.replayer import interleave
    from framework_emitter.token_ids import prompt_token_ids
    from framework_emitter.traces import read_trace, sessions

    chosen = list(interleave(sessions(read_trace(trace)), concurrency=16))[:calls]
    return [prompt_token_ids(c.segments, vocab, max_tokens=max_len - 16) for c in chosen], chosen


def _publish_decisions(config, workload: str, agents: list[str], rate: float, stop) -> None:  # noqa: ANN001
    """The policy side, in its own process as in production: neutral scores at ``rate`` per second."""
    from streams import events as ev
    from streams.producer import EventProducer
    from streams.topics import Topics

    with EventProducer(config, Topics.for_prefix(config.topic_prefix)) as producer:
        i = 0
        while not stop.is_set():
            now = time.time()
            producer.publish(ev.EvictionScore(workload=workload, agent=agents[i % len(agents)], time=now,
                                              policy="bench", decision_id=f"bench-{uuid.uuid4().hex}",
                                              expires_at=now + 30, score=0.5))
            i += 1
            stop.wait(1.0 / rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="tau_airline")
    parser.add_argument("--calls", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--blocks", type=int, default=400, help="KV capacity in 32-token blocks")
    parser.add_argument("--decision-rate", type=float, default=20.0)
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from streams.admin import admin_client
    from streams.broker import EmbeddedBroker
    from streams.config import StreamsConfig
    from streams.topics import Topics, ensure_topics

    broker = EmbeddedBroker().start()
    config = StreamsConfig(broker.bootstrap, partitions=4, topic_prefix=f"benchengine{uuid.uuid4().hex[:6]}")
    topics = Topics.for_prefix(config.topic_prefix)
    ensure_topics(admin_client(config.bootstrap_servers), config, topics)
    os.environ.update({"AGENTRT_BOOTSTRAP_SERVERS": config.bootstrap_servers,
                       "AGENTRT_TOPIC_PREFIX": config.topic_prefix, "AGENTRT_PARTITIONS": "4"})

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from engine_emitter.tiny_model import SIZES, make_random_llama
    model = make_random_llama(os.path.expanduser(f"~/.cache/agentrt/model-{args.model_size}"), args.model_size)
    prompts, calls = _prompts(args.trace, args.calls, SIZES[args.model_size][4], 4096)
    tokens = sum(len(p) for p in prompts)
    common = dict(model=str(model), skip_tokenizer_init=True, block_size=32, num_gpu_blocks_override=args.blocks,
                  enable_prefix_caching=True, max_model_len=4096, max_num_seqs=16, dtype="bfloat16", seed=0)
    engines = {"stock": LLM(**common),
               "integration": LLM(**common, scheduler_cls="engine_emitter.scheduler.AgentRuntimeScheduler")}
    scheduler = engines["integration"].llm_engine.engine_core.engine_core.scheduler
    scheduler.feed.ready.wait(30)
    print(f"{args.trace}: {len(prompts)} calls, {tokens:,} prompt tokens; model {args.model_size}; "
          f"KV {args.blocks} blocks of 32", flush=True)

    def params(call) -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                              extra_args={"agentrt.workload": args.trace, "agentrt.agent": call.agent,
                                          "agentrt.session": call.session})

    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    sampling = [params(c) for c in calls]
    agents = sorted({c.agent for c in calls})


    ctx = multiprocessing.get_context("spawn")
    walls: dict[str, list[float]] = {"stock": [], "integration": []}
    cached: dict[str, list[int]] = {"stock": [], "integration": []}
    outputs: dict[str, list] = {}
    for repeat in range(args.repeats):
        for name, llm in engines.items():
            llm.reset_prefix_cache()
            stop = ctx.Event()
            feeder = ctx.Process(target=_publish_decisions,
                                 args=(config, args.trace, agents, args.decision_rate, stop))
            if name == "integration":
                feeder.start()
            began = time.perf_counter()
            result = llm.generate(batch, sampling, use_tqdm=False)
            walls[name].append(time.perf_counter() - began)
            stop.set()
            if feeder.is_alive():
                feeder.join(10)
            outputs[name] = [list(o.outputs[0].token_ids) for o in result]
            cached[name].append(sum(o.num_cached_tokens for o in result))
        print(f"repeat {repeat + 1}: stock {walls['stock'][-1]:.2f}s, integration {walls['integration'][-1]:.2f}s, "
              f"overhead {walls['integration'][-1] / walls['stock'][-1] - 1:+.1%}; cached tokens "
              f"{cached['stock'][-1]:,} vs {cached['integration'][-1]:,}", flush=True)
    ratios = [i / s - 1 for i, s in zip(walls["integration"], walls["stock"])]
    latency = scheduler.decision_latency.percentiles()
    print(f"\nidentical generated tokens: {outputs['stock'] == outputs['integration']}")
    print(f"overhead (integration / stock wall time - 1): median {statistics.median(ratios):+.1%} "
          f"(min {min(ratios):+.1%}, max {max(ratios):+.1%})")
    print(f"decision latency made -> applied: p50 {latency.get('p50_ms', float('nan')):.1f} ms, "
          f"p99 {latency.get('p99_ms', float('nan')):.1f} ms ({latency.get('n', 0)} decisions)")
    print(f"integration counters: {scheduler.snapshot()}")
    broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
