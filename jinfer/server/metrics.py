"""Prometheus metrics under vLLM's names, so existing vLLM dashboards and alerts work unchanged.

State (running, waiting, KV usage and pages) and engine totals are read from the engine when
scraped; latency histograms are fed per request output from the engine loop. Every server has
its own registry, so several can live in one process (tests); each exports the process's own
(`process_resident_memory_bytes`, CPU seconds, open files), as vLLM's default registry does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jinfer.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # no `_created` series: vLLM's exposition has none

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip


class _EngineCollector(Collector):
    """Gauges and totals read straight from the engine at scrape time."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self) -> Iterator[Any]:
        e = self.engine
        if e is None:
            return
        stats = e.stats
        yield self._gauge(
            "vllm:num_requests_running", "Requests in the running batch.", e.num_running()
        )
        yield self._gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", e.num_waiting()
        )
        yield self._gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV cache pages in use (0-1).",
            e.kv_cache_usage(),
        )
        blocks = e.blocks
        yield self._gauge(
            "jinfer:kv_cache_pages_in_use",
            "KV cache pages referenced by requests (idle cached pages are free).",
            blocks.num_used_pages,
        )
        yield self._gauge(
            "jinfer:kv_cache_pages_total",
            "KV cache pages requests can use.",
            blocks.num_usable_pages,
        )
        yield self._counter(
            "vllm:prompt_tokens", "Prompt tokens received.", stats.num_prompt_tokens
        )
        yield self._counter(
            "vllm:generation_tokens", "Tokens generated.", stats.num_generated_tokens
        )
        yield self._counter(
            "vllm:num_preemptions", "Requests preempted (recomputed later).", stats.num_preemptions
        )
        yield self._counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries,
        )
        yield self._counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            stats.prefix_cache_hits,
        )
        yield self._counter(
            "vllm:spec_decode_num_drafts",
            "Speculative verifications run (a request's drafts checked in one step).",
            stats.spec_num_drafts,
        )
        yield self._counter(
            "vllm:spec_decode_num_draft_tokens",
            "Draft tokens verified.",
            stats.spec_num_draft_tokens,
        )
        yield self._counter(
            "vllm:spec_decode_num_accepted_tokens",
            "Draft tokens accepted.",
            stats.spec_num_accepted_tokens,
        )
        per_pos = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in their draft.",
            labels=[*self.labels, "position"],
        )
        for i, n in enumerate(stats.spec_accepted_per_pos):
            per_pos.add_metric([*self.labels.values(), str(i)], n)
        yield per_pos
        yield self._gauge(
            "jinfer:prefix_cache_pages",
            "KV pages holding a cached prefix (in use or idle).",
            e.blocks.num_cached_pages,
        )
        yield self._counter(
            "jinfer:prefix_cache_evictions",
            "Cached pages evicted for reuse.",
            e.blocks.num_evictions,
        )
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "The KV cache's configuration (labels; the value is 1).",
            labels=["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
        )
        config = e.config
        info.add_metric(
            [str(config.page_size), str(blocks.num_usable_pages), str(config.kv_cache_dtype),
             str(config.enable_prefix_caching)],
            1.0,
        )  # fmt: skip
        yield info
        yield self._counter("jinfer:engine_steps", "Engine steps run.", stats.num_steps)
        yield self._counter(
            "jinfer:xla_compiles", "XLA compilations in this process.", e.num_compiles
        )


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self._collector: _EngineCollector | None = None
        labels = ["model_name"]
        reg = self.registry
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, ..., as vLLM exports
        self.request_success = Counter(
            "vllm:request_success",
            "Finished completions, by finish reason.",
            labels + ["finished_reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between successive output tokens.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time from arrival to first scheduled.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self._lock = threading.Lock()
        self._progress: dict[str, tuple[int, float]] = {}  # request -> (tokens, last token time)

    def attach(self, engine: Any) -> None:
        """Starts exporting the engine's state (once it is loaded)."""
        self._collector = _EngineCollector(engine, self.model_name)
        self.registry.register(self._collector)

    def observe(self, out: RequestOutput) -> None:
        """Feeds the histograms from one request output (any thread)."""
        now = time.monotonic()
        name = self.model_name
        tokens = sum(len(o.token_ids) for o in out.outputs)
        with self._lock:
            seen = self._progress.get(out.request_id)
            if out.finished:
                self._progress.pop(out.request_id, None)
            elif tokens:
                self._progress[out.request_id] = (tokens, now)
        m = out.metrics
        if seen is None and tokens and m is not None and m.first_token_time is not None:
            self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue_time.labels(name).observe(m.first_scheduled_time - m.arrival_time)
        elif seen is not None and tokens > seen[0]:
            self.itl.labels(name).observe(now - seen[1])
        if out.finished:
            reasons = [o.finish_reason or "abort" for o in out.outputs]
            for reason in reasons:
                self.request_success.labels(name, reason).inc()
            if m is not None and any(r != "abort" for r in reasons):
                self.e2e.labels(name).observe(now - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
