"""Prometheus metrics of the denoising service, exported through Triton's custom-metrics API.

Names follow vLLM's (`vllm:num_requests_running` becomes `vdiff:num_requests_running`) so dashboards
carry over; they appear on Triton's metrics port next to its own `nv_inference_*` families.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKENS_PER_NFE_BUCKETS = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0]


class ServiceMetrics:
    """What the service reports; this base records nothing (the service runs without Triton too).

    The engine thread calls the recording methods; the responder thread calls `flush`.
    """

    def queue(self, running: int, waiting: int) -> None:
        pass

    def step(self, seconds: float) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def tokens(self, generated: int) -> None:
        pass

    def finished(self, prompt_tokens: int, nfe: int, generated: int, seconds: float) -> None:
        pass

    def flush(self) -> None:
        pass


class TritonMetrics(ServiceMetrics):
    """The same reports as Triton metric families, labelled with the model name and version.

    Each metric update is a call across processes, so reports are kept here and handed to Triton by
    `flush()` on the responder thread, a few times a second.
    """

    def __init__(self, pb_utils: Any, labels: Mapping[str, str]) -> None:
        family = pb_utils.MetricFamily
        self._families: list[Any] = []

        def make(name: str, description: str, kind: Any, buckets: list[float] | None = None) -> Any:
            metric_family = family(name=name, description=description, kind=kind)
            self._families.append(metric_family)
            if buckets is None:
                return metric_family.Metric(labels=dict(labels))
            return metric_family.Metric(labels=dict(labels), buckets=buckets)

        gauge, counter, histogram = family.GAUGE, family.COUNTER, family.HISTOGRAM
        self.running = make("vdiff:num_requests_running", "Requests in the denoising batch", gauge)
        self.waiting = make("vdiff:num_requests_waiting", "Requests waiting for a batch slot", gauge)
        self.prompt_tokens = make("vdiff:prompt_tokens_total", "Prompt tokens of finished requests", counter)
        self.generation_tokens = make("vdiff:generation_tokens_total", "Tokens made final", counter)
        self.nfe = make("vdiff:nfe_total", "Forward evaluations spent on finished requests", counter)
        self.tokens_per_nfe = make(
            "vdiff:tokens_per_nfe",
            "Generated tokens per forward evaluation, per request",
            histogram,
            TOKENS_PER_NFE_BUCKETS,
        )
        self.step_latency = make(
            "vdiff:denoising_step_seconds",
            "Wall time of one engine step (one batched forward)",
            histogram,
            LATENCY_BUCKETS,
        )
        self.ttft = make(
            "vdiff:time_to_first_token_seconds", "Arrival to the first final token", histogram, LATENCY_BUCKETS
        )
        self.e2e = make("vdiff:e2e_request_latency_seconds", "Arrival to the last response", histogram, LATENCY_BUCKETS)

        self._lock = threading.Lock()
        self._gauges: dict[Any, float] = {}  # metric -> latest value, until flushed
        self._counts: dict[Any, float] = {}  # counter -> increment, until flushed
        self._observed: list[tuple[Any, float]] = []  # (histogram, value), until flushed

    def queue(self, running: int, waiting: int) -> None:
        with self._lock:
            self._gauges[self.running] = running
            self._gauges[self.waiting] = waiting

    def step(self, seconds: float) -> None:
        self._observe(self.step_latency, seconds)

    def first_token(self, seconds: float) -> None:
        self._observe(self.ttft, seconds)

    def tokens(self, generated: int) -> None:
        self._count(self.generation_tokens, generated)

    def finished(self, prompt_tokens: int, nfe: int, generated: int, seconds: float) -> None:
        self._count(self.prompt_tokens, prompt_tokens)
        self._count(self.nfe, nfe)
        if nfe:
            self._observe(self.tokens_per_nfe, generated / nfe)
        self._observe(self.e2e, seconds)

    def flush(self) -> None:
        with self._lock:
            gauges, self._gauges = self._gauges, {}
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, []
        for gauge, value in gauges.items():
            gauge.set(value)
        for counter, value in counts.items():
            counter.increment(value)
        for histogram, value in observed:
            histogram.observe(value)

    def _count(self, counter: Any, value: float) -> None:
        with self._lock:
            self._counts[counter] = self._counts.get(counter, 0.0) + value

    def _observe(self, histogram: Any, value: float) -> None:
        with self._lock:
            self._observed.append((histogram, value))
