"""vLLM's Prometheus metrics (names, labels, buckets), observed at the proxy.

Each choice is one engine request, as in vLLM (n > 1 fans out). A diffusion model finalizes
tokens in groups (the stable prefix grows by a block at a time), so:
- time to first token = request received -> first response with text;
- inter-token latency = the gap between two responses divided by the tokens of the later one,
  observed once per token, so its count is the generated tokens after the first response.
Queue time is the engine's (arrival in the denoiser -> first denoising step), reported on the
request's first response; inference time is end-to-end latency minus queue time.
vdiff's own families: forward evaluations (NFE) per request, generated tokens per NFE, and the
requests refused before running, by reason.
The running and waiting gauges are the engine's own (the denoiser's `vdiff:num_requests_*` on
Triton's metrics endpoint, read at scrape time), so they count requests queued inside Triton too.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics
from starlette.applications import Starlette

from vdiff_client.codes import ErrorCode
from vdiff_client.triton import Delta, TritonRequestError

log = logging.getLogger(__name__)

LABELS = ("model_name", "engine")
FINISH_REASONS = ("stop", "length", "abort")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
NFE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
TOKENS_PER_NFE_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0)
# why a request was refused: rate limits (429), a full engine, a stopping or unreachable server (503)
# the proxy's own refusals, then the codes of the backend's (vdiff_client/codes.py)
REJECTION_REASONS = ("rate_limit_requests", "rate_limit_tokens", *(c.value for c in ErrorCode if c.is_refusal))
HTTP_METRICS_EXCLUDED = ["/metrics", "/health", "/ping", "/version", "/load", "/server_info"]  # as vLLM
# RFC 9110's methods and PATCH; any other method a client makes up is counted as OTHER_METHOD
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                          "PATCH"))  # fmt: skip
OTHER_METHOD = "other"
ENGINE_GAUGES = {"vdiff:num_requests_running": "vllm:num_requests_running",
                 "vdiff:num_requests_waiting": "vllm:num_requests_waiting"}  # fmt: skip


def buckets_1_2_5(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > limit:
                return out
            out.append(float(value))
        exponent += 1


class ProxyMetrics:
    """The families, each already bound to this server's labels (one model, engine "0")."""

    def __init__(self, model_name: str, max_model_len: int, triton_metrics_url: str | None) -> None:
        self.registry = r = CollectorRegistry()
        self.labels = labels = {"model_name": model_name, "engine": "0"}
        length = buckets_1_2_5(max_model_len)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Any:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(**labels)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", LABELS, registry=r).labels(
            **labels
        )
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", LABELS, registry=r).labels(
            **labels
        )
        self.success = Counter("vllm:request_success", "Finished requests.", (*LABELS, "finished_reason"), registry=r)
        for reason in FINISH_REASONS:  # every series exists from the start, at 0
            self.success.labels(**labels, finished_reason=reason)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "TTFT.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "ITL.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end latency.", LATENCY_BUCKETS)
        self.request_prompt = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", length)
        self.request_generation = histogram("vllm:request_generation_tokens", "Generated tokens per request.", length)
        self.params_n = histogram("vllm:request_params_n", "The n parameter.", N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens", "The max_tokens parameter.", length)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Time waiting for the engine.", LATENCY_BUCKETS)
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds", "Time from the engine's first step to the end.", LATENCY_BUCKETS
        )
        self.nfe = histogram("vdiff:request_nfe", "Denoising forward evaluations per request.", NFE_BUCKETS)
        self.tokens_per_nfe = histogram(
            "vdiff:request_tokens_per_nfe", "Generated tokens per forward evaluation.", TOKENS_PER_NFE_BUCKETS
        )
        self.rejections = Counter(
            "vdiff:request_rejections", "Requests refused before running.", (*LABELS, "reason"), registry=r
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(**labels, reason=reason)
        if triton_metrics_url:
            r.register(EngineGauges(triton_metrics_url, labels))

    def finished(self, reason: str, count: int = 1) -> None:
        self.success.labels(**self.labels, finished_reason=reason).inc(count)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(**self.labels, reason=reason).inc()

    def track(self, n: int, choices: int, max_tokens: int | None) -> RequestTracker:
        self.params_n.observe(n)
        if max_tokens is not None:
            for _ in range(choices):  # one engine request per choice, as in vLLM
                self.params_max_tokens.observe(max_tokens)
        return RequestTracker(self, choices)


class RequestTracker:
    """The timings of one HTTP request's choices, observed as their responses arrive."""

    def __init__(self, metrics: ProxyMetrics, choices: int) -> None:
        self.metrics = metrics
        self.started = time.monotonic()
        self.last_text_at: dict[int, float] = {}
        self.tokens = dict.fromkeys(range(choices), 0)  # the unfinished choices' generated tokens
        self.queue_time: dict[int, float] = {}
        self.responded = False

    def on_delta(self, index: int, delta: Delta) -> None:
        m = self.metrics
        now = time.monotonic()
        self.responded = True
        if delta.new_tokens:
            # every token after a choice's first is one inter-token latency, however the tokens were
            # grouped into responses: those that came with the first token came 0 s after it
            previous = self.last_text_at.get(index)
            if previous is None:
                m.ttft.observe(now - self.started)
            gap = 0.0 if previous is None else (now - previous) / delta.new_tokens
            for _ in range(delta.new_tokens - (previous is None)):
                m.itl.observe(gap)
            self.last_text_at[index] = now
            m.generation_tokens.inc(delta.new_tokens)
        self.tokens[index] += delta.new_tokens
        if delta.queue_time is not None and index not in self.queue_time:
            self.queue_time[index] = delta.queue_time
            m.queue_time.observe(delta.queue_time)
        if delta.finish_reason is not None:
            self._on_finish(index, delta, now - self.started)

    def _on_finish(self, index: int, delta: Delta, e2e: float) -> None:
        m = self.metrics
        generated = self.tokens.pop(index)
        m.prompt_tokens.inc(delta.prompt_tokens)
        m.request_prompt.observe(delta.prompt_tokens)
        m.request_generation.observe(generated)
        m.e2e.observe(e2e)
        m.inference_time.observe(max(0.0, e2e - self.queue_time.get(index, 0.0)))
        if delta.nfe > 0:
            m.nfe.observe(delta.nfe)
            m.tokens_per_nfe.observe(generated / delta.nfe)
        m.finished(delta.finish_reason or "stop")

    def on_error(self, error: TritonRequestError) -> None:
        """A refusal (503) before any response is a rejection, counted by its reason, and only
        there: the choices never ran, so none of them finishes, aborted or otherwise (as in vLLM)."""
        if error.reason is not None and not self.responded:
            self.metrics.rejected(error.reason)
            self.tokens.clear()

    def on_abort(self) -> None:
        """The choices that never finished (client gone, error) end as aborted."""
        if self.tokens:
            self.metrics.finished("abort", len(self.tokens))
            self.tokens.clear()


class EngineGauges:
    """vllm:num_requests_running/waiting from the denoiser's gauges on Triton's metrics endpoint."""

    def __init__(self, url: str, labels: dict[str, str]) -> None:
        self.url = url
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        totals = dict.fromkeys(ENGINE_GAUGES, 0.0)
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                text = response.read().decode("utf-8")
        except OSError as error:
            log.warning("cannot read Triton's metrics at %s: %s", self.url, error)
            return
        for family in text_string_to_metric_families(text):
            if family.name in totals:
                totals[family.name] += sum(sample.value for sample in family.samples)
        for source, name in ENGINE_GAUGES.items():
            gauge = GaugeMetricFamily(name, f"Engine requests ({source} summed over Triton instances).", labels=LABELS)
            gauge.add_metric([self.labels["model_name"], self.labels["engine"]], totals[source])
            yield gauge


def instrument_http(app: Starlette, registry: CollectorRegistry) -> None:
    """HTTP metrics whose label values a client cannot choose, so it cannot add series.

    Each new value of `method` adds 9 samples to /metrics. Unmatched paths are already one
    handler, "none" (`should_group_untemplated`); the method is the request's own string, which
    uvicorn accepts for any token, so unknown ones are folded into "other" here.
    """
    observe = http_metrics.default(registry=registry)
    assert observe is not None  # None only when the families already exist in `registry`

    def observe_known_method(info: http_metrics.Info) -> None:
        if info.method not in HTTP_METHODS:
            info.method = OTHER_METHOD
        observe(info)

    instrumentator = Instrumentator(
        should_group_untemplated=True,
        should_ignore_untemplated=False,  # a flood of 404s stays visible, as one series
        excluded_handlers=HTTP_METRICS_EXCLUDED,
        registry=registry,
    )
    instrumentator.add(observe_known_method).instrument(app)
