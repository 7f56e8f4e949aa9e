"""Prometheus metrics of the engine-side integration, served from the EngineCore process.

Set ``AGENTRT_METRICS_PORT`` in the engine's environment; the endpoint is
separate from vLLM's own /metrics (which lives in the API server process and
cannot see the block pool).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class _Collector:
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.scheduler.snapshot()
        counters = CounterMetricFamily("agentrt_engine_events", "Integration counters by kind", labels=["kind"])
        for kind, value in snap.items():
            if isinstance(value, (int, float)) and kind != "pinned_blocks":
                counters.add_metric([kind], float(value))
        yield counters
        yield GaugeMetricFamily("agentrt_engine_pinned_blocks", "KV blocks held by pins", value=snap["pinned_blocks"])
        bands = CounterMetricFamily("agentrt_engine_evictions", "Cached blocks evicted, by score level",
                                    labels=["level"])
        for level, value in enumerate(snap["evicted_by_level"]):
            bands.add_metric([str(level)], float(value))
        yield bands
        latency = snap["decision_latency"]
        if latency:
            gauge = GaugeMetricFamily("agentrt_engine_decision_latency_ms", "Decision made -> applied",
                                      labels=["quantile"])
            gauge.add_metric(["0.5"], latency["p50_ms"])
            gauge.add_metric(["0.99"], latency["p99_ms"])
            yield gauge


def serve_metrics(scheduler: Any, port: int) -> None:
    try:
        from prometheus_client import REGISTRY, start_http_server

        REGISTRY.register(_Collector(scheduler))
        start_http_server(port)
        log.info("agentrt metrics on :%d/metrics", port)
    except Exception:  # metrics must never stop the engine
        log.exception("agentrt: could not serve metrics on port %d", port)
