"""Prometheus metrics of the server, served at `/metrics` in the text exposition format.

Each app has its own registry (tests and benchmarks build several apps in one process, and the
default registry would mix them). Counters and histograms are updated as requests end or tokens
arrive; the scheduler's gauges (queue depth, running sequences, KV blocks) are read when
scraped, so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as exposition
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from infer.batching import Request, Scheduler

# Seconds: from a fraction of a decode step on an accelerator to a long queue on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class SchedulerGauges(Collector):
    """The scheduler's state at scrape time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        running = s.running  # `load` counts the waiting and the running
        yield _gauge("waiting_requests", "Requests queued for a decode slot", s.load - running)
        yield _gauge("running_sequences", "Sequences holding a decode slot", running)
        yield _gauge("kv_blocks_in_use", "KV cache blocks some sequence holds", s.blocks.in_use)
        yield _gauge("kv_blocks_total", "KV cache blocks in the pool", s.blocks.num_blocks)
        if s.engine.draft is not None:
            yield _gauge(
                "draft_acceptance_rate",
                "Speculative decoding: draft tokens the target accepted per proposed one",
                s.stats.acceptance_rate,
            )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"llama_jax_{name}", documentation, value=value)


class Metrics:
    """The server's metrics: `request_ended` (for `access_log.ResponseEnd`) counts requests
    and tokens, `TokenTimer`s time the tokens, `response()` is the `/metrics` body."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llama_jax_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("llama_jax_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter(
            "llama_jax_generated_tokens", "Generated tokens", registry=r
        )
        self.time_to_first_token = Histogram(
            "llama_jax_time_to_first_token_seconds", "From submission to the first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "llama_jax_inter_token_latency_seconds", "Between a request's consecutive tokens",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.blocked = Counter(
            "llama_jax_blocked", "Prompts blocked before generating (stage=input) and replies "
            "blocked after it (stage=output), by the guard model or Code Shield",
            ["by", "stage"], registry=r,
        )  # fmt: skip
        r.register(SchedulerGauges(scheduler))

    def request_ended(self, scope: dict[str, Any], status: int, _seconds: float) -> None:
        """Count a finished HTTP request under its route's path (unknown paths share one
        label, so scanners cannot grow the series without bound) and its job's tokens."""
        route = scope.get("route")
        self.requests.labels(getattr(route, "path", "other"), str(status)).inc()
        job = scope.get("state", {}).get("job")
        if job is not None and job.requests:
            counts = job.usage()
            self.prompt_tokens.inc(counts["prompt_tokens"])
            self.generated_tokens.inc(counts["completion_tokens"])

    def response(self) -> Response:
        return Response(exposition(self.registry), media_type=CONTENT_TYPE_LATEST)


class TokenTimer:
    """Times one request's tokens as the scheduler thread reports them: the first against its
    submission, each later one against the one before."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.seen, self.last = metrics, 0, 0.0

    def __call__(self, request: Request) -> None:
        count = len(request.token_ids)
        if count == self.seen:
            return
        if self.seen == 0:
            self.last = request.timings.first_token
            self.metrics.time_to_first_token.observe(self.last - request.timings.submitted)
        else:
            now = time.perf_counter()
            self.metrics.inter_token_latency.observe(now - self.last)
            self.last = now
        self.seen = count
