"""Prometheus metrics of a gateway: its requests' serving and speculation figures, and the deployment's
queue and workers as the coordinator reports them at each scrape. Names follow vLLM's, under `amusd:`."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ..config import DRAFT, VERIFY
from ..wire import protocol as p
from .client import GenerationResult

# Seconds: from a millisecond token on a GPU to a minute-long request on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0)


class Metrics:
    def __init__(self):
        disable_created_metrics()  # a `_created` sample beside every counter only doubles the scrape, as vLLM finds
        self.registry = CollectorRegistry()
        r = self.registry
        self.draft_tokens = Counter("amusd:spec_decode_num_draft_tokens", "Draft tokens the verifier checked.",
                                    registry=r)
        self.accepted = Counter("amusd:spec_decode_num_accepted_tokens", "Draft tokens the verifier accepted.",
                                registry=r)
        self.verify_steps = Counter("amusd:spec_decode_num_verify_steps",
                                    "Verify forward passes that committed tokens, one per request per pass.",
                                    registry=r)
        self.rollbacks = Counter("amusd:spec_decode_num_rollbacks", "Rollback points: the draft's path was wrong.",
                                 registry=r)
        self.generation_tokens = Counter("amusd:generation_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("amusd:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.success = Counter("amusd:request_success", "Requests that finished.", ["finished_reason"], registry=r)
        self.failed = Counter("amusd:request_failure", "Requests that failed, by HTTP status.", ["status"], registry=r)
        self.ttft = Histogram("amusd:time_to_first_token_seconds", "From arrival at the gateway to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("amusd:inter_token_latency_seconds", "Between consecutive tokens, one observation per "
                             "token: a chunk of k tokens after t seconds counts k times t/k.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("amusd:e2e_request_latency_seconds", "From arrival at the gateway to the last token.",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("amusd:request_queue_time_seconds", "Waiting at the coordinator for a verifier.",
                               buckets=REQUEST_BUCKETS, registry=r)
        self.running = Gauge("amusd:num_requests_running", "Requests a verifier serves, deployment-wide.", registry=r)
        self.waiting = Gauge("amusd:num_requests_waiting", "Requests waiting for a verifier, deployment-wide.",
                             registry=r)
        self.workers = Gauge("amusd:workers", "Registered workers that can serve, by role.", ["role"], registry=r)
        self.unhealthy = Gauge("amusd:workers_unhealthy", "Registered workers whose passes keep failing: given no "
                               "work.", registry=r)

    def timer(self) -> "Timer":
        return Timer(self)

    def finished(self, result: GenerationResult) -> None:
        stats = result.stats
        self.draft_tokens.inc(stats.get("proposed", 0))
        self.accepted.inc(stats.get("accepted", 0))
        self.verify_steps.inc(stats.get("verify_steps", 0))
        self.rollbacks.inc(stats.get("rollbacks", 0))
        self.prompt_tokens.inc(len(result.prompt_ids))
        self.queue.observe(stats.get("queue_s", 0.0))
        self.success.labels(result.finish_reason).inc()

    def exposition(self, status: p.StatusReply | None) -> bytes:
        """The scrape's text; the deployment-wide gauges from `status`, when the coordinator answered."""
        if status is not None:
            self.running.set(status.active)
            self.waiting.set(status.queued)
            self.workers.labels(VERIFY).set(status.verifiers)
            self.workers.labels(DRAFT).set(status.drafts)
            self.unhealthy.set(status.unhealthy)
        return generate_latest(self.registry)


class Timer:
    """One request's latencies, observed as its tokens arrive."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.arrived = self.last = time.monotonic()
        self.tokens = 0

    def tokens_arrived(self, n: int) -> None:
        if n == 0:
            return
        now = time.monotonic()
        m = self.metrics
        m.generation_tokens.inc(n)
        if self.tokens == 0:
            m.ttft.observe(now - self.arrived)
            for _ in range(n - 1):  # the rest of the first chunk came with the first token
                m.itl.observe(0.0)
        else:
            for _ in range(n):
                m.itl.observe((now - self.last) / n)
        self.tokens += n
        self.last = now

    def done(self) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrived)
