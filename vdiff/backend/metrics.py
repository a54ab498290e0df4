"""Prometheus metrics of the denoising service, exported through Triton's custom-metrics API.

Names follow vLLM's (`vllm:num_requests_running` becomes `vdiff:num_requests_running`) so dashboards
carry over; they appear on Triton's metrics port next to its own `nv_inference_*` families.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKENS_PER_NFE_BUCKETS = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0]


class ServiceMetrics:
    """What the service reports; this base records nothing (the service runs without Triton too)."""

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


class TritonMetrics(ServiceMetrics):
    """The same reports as Triton metric families, labelled with the model name and version."""

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

    def queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def step(self, seconds: float) -> None:
        self.step_latency.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, generated: int) -> None:
        self.generation_tokens.increment(generated)

    def finished(self, prompt_tokens: int, nfe: int, generated: int, seconds: float) -> None:
        self.prompt_tokens.increment(prompt_tokens)
        self.nfe.increment(nfe)
        if nfe:
            self.tokens_per_nfe.observe(generated / nfe)
        self.e2e.observe(seconds)
