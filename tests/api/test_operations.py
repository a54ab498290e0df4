"""Health, auth, metrics, capacity and cancellation of the OpenAI server over the real tritonserver."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from clients import Stream, read_metric
from proxy_harness import SERVED, Proxy, proxy_config, running_proxy
from triton_harness import MAX_NUM_SEQS, MAX_QUEUE_SIZE, Server
from vdiff.serve.launcher import free_loopback_address
from vdiff_client.errors import APIError
from vdiff_client.serving import sse_stream

LONG = {"model": SERVED[0], "prompt": "long", "max_tokens": 256, "ignore_eos": True}


def engine_running(server: Server) -> float:
    return read_metric(server.metrics, "vdiff:num_requests_running") + read_metric(
        server.metrics, "vdiff:num_requests_waiting"
    )


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - started


def test_version_ping_health_and_models(proxy: Proxy) -> None:
    assert httpx.get(f"{proxy.url}/version").json() == {"version": "0.1.0"}
    health = httpx.get(f"{proxy.url}/health")
    assert health.status_code == 200 and health.content == b""
    assert httpx.get(f"{proxy.url}/ping").status_code == 200 and httpx.post(f"{proxy.url}/ping").status_code == 200
    cards = httpx.get(f"{proxy.v1}/models").json()
    assert cards["object"] == "list" and [c["id"] for c in cards["data"]] == list(SERVED)
    assert cards["data"][0]["max_model_len"] == proxy.config.max_model_len


def test_health_is_503_without_a_ready_triton(tiny_llada: Path) -> None:
    nowhere = f"127.0.0.1:{free_loopback_address().grpc_port}"
    with running_proxy(proxy_config(tiny_llada, nowhere, None)) as dead:
        assert httpx.get(f"{dead.url}/health", timeout=10).status_code == 503
        assert httpx.get(f"{dead.url}/ping", timeout=10).status_code == 503


def test_api_keys_guard_v1_only(triton_server: Server, tiny_llada: Path) -> None:
    config = proxy_config(tiny_llada, triton_server.grpc, None, api_keys=("first", "second"))
    with running_proxy(config) as guarded:
        assert httpx.get(f"{guarded.v1}/models").status_code == 401
        assert httpx.get(f"{guarded.v1}/models").json() == {"error": "Unauthorized"}
        assert httpx.get(f"{guarded.v1}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{guarded.v1}/models", headers={"Authorization": "Bearer second"}).status_code == 200
        assert httpx.get(f"{guarded.url}/health").status_code == 200
        assert httpx.get(f"{guarded.url}/metrics").status_code == 200
        preflight = httpx.options(
            f"{guarded.v1}/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=guarded.v1, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=guarded.v1, api_key="first", max_retries=0)
        assert ok.completions.create(model=SERVED[0], prompt="hi", max_tokens=2).choices


def test_metrics_count_tokens_and_finishes_exactly(proxy: Proxy) -> None:
    metrics = f"{proxy.url}/metrics"
    label = f'engine="0",model_name="{SERVED[0]}"'
    per_request = [
        "vllm:e2e_request_latency_seconds_count",
        "vllm:time_to_first_token_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:request_inference_time_seconds_count",
        "vllm:request_prompt_tokens_count",
        "vllm:request_generation_tokens_count",
        "vllm:request_params_max_tokens_count",
        "vdiff:request_nfe_count",
        "vdiff:request_tokens_per_nfe_count",
    ]
    counted = {
        **{name: f"{name}{{{label}}}" for name in per_request},
        "generated": f"vllm:generation_tokens_total{{{label}}}",
        "prompt": f"vllm:prompt_tokens_total{{{label}}}",
        "length": f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{SERVED[0]}"}}',
        "http": 'http_requests_total{handler="/v1/completions",method="POST",status="2xx"}',
        "itl": f"vllm:inter_token_latency_seconds_count{{{label}}}",
    }
    before = {key: read_metric(metrics, name) for key, name in counted.items()}
    client = openai.OpenAI(base_url=proxy.v1, api_key="x", max_retries=0)
    prompt_tokens = 0
    for _ in range(3):
        answer = client.completions.create(
            model=SERVED[0], prompt="count", max_tokens=8, extra_body={"ignore_eos": True}
        )
        assert answer.usage is not None
        prompt_tokens += answer.usage.prompt_tokens
    delta = {key: read_metric(metrics, name) - before[key] for key, name in counted.items()}
    assert {name: delta[name] for name in per_request} == dict.fromkeys(per_request, 3)
    assert delta["generated"] == 24 and delta["prompt"] == prompt_tokens and delta["length"] == 3
    assert delta["http"] == 3
    # 8 tokens each: the first is timed as TTFT, the other 7 as inter-token latencies
    assert delta["itl"] == 21
    text = httpx.get(metrics).text
    assert "vllm:num_requests_running{" in text and "vllm:time_to_first_token_seconds_bucket" in text
    assert f'vdiff:request_rejections_total{{{label},reason="capacity"}}' in text
    assert "http_request_duration_seconds_bucket" in text and 'handler="/health"' not in text


def test_a_full_server_answers_503_with_retry_after(proxy: Proxy, triton_server: Server) -> None:
    capacity = MAX_NUM_SEQS + MAX_QUEUE_SIZE

    async def fill_then_probe() -> httpx.Response:
        async with httpx.AsyncClient(timeout=120) as http:
            fillers = [asyncio.create_task(http.post(f"{proxy.v1}/completions", json=LONG)) for _ in range(capacity)]
            try:
                await asyncio.to_thread(wait_until, lambda: engine_running(triton_server) == capacity, 30)
                return await http.post(f"{proxy.v1}/completions", json=LONG | {"max_tokens": 4})
            finally:
                for filler in fillers:
                    filler.cancel()
                await asyncio.gather(*fillers, return_exceptions=True)

    refused = asyncio.run(fill_then_probe())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == 503 and error["type"] == "ServiceUnavailableError" and "at capacity" in error["message"]
    wait_until(lambda: engine_running(triton_server) == 0, timeout=10)
    assert capacity_rejections(proxy) >= 1


def test_refusals_count_as_rejections_only_and_disconnects_as_aborts(proxy: Proxy, triton_server: Server) -> None:
    """Exact counters after one success, two refusals by a full denoiser (filled by a direct Triton
    client, so the proxy's own reservations let the requests through) and one client that hangs
    up: vLLM counts a refused request in no finished_reason, only as a rejection."""
    metrics = f"{proxy.url}/metrics"
    finished = {reason: f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="{SERVED[0]}"}}'
                for reason in ("stop", "length", "abort")}  # fmt: skip
    before = {reason: read_metric(metrics, name) for reason, name in finished.items()}
    refusals_before = capacity_rejections(proxy)
    capacity = MAX_NUM_SEQS + MAX_QUEUE_SIZE
    fillers = [Stream(triton_server.grpc) for _ in range(capacity)]
    try:
        for filler in fillers:
            filler.send("vdiff", {"text_input": "long", "max_tokens": 256, "ignore_eos": True, "stream": True})
        wait_until(lambda: engine_running(triton_server) == capacity, 30)
        for _ in range(2):
            refused = httpx.post(f"{proxy.v1}/completions", json=LONG | {"max_tokens": 4}, timeout=30)
            assert refused.status_code == 503 and "at capacity" in refused.json()["error"]["message"]
    finally:
        for filler in fillers:
            filler.cancel()
            filler.close()
    wait_until(lambda: engine_running(triton_server) == 0, timeout=10)
    answer = httpx.post(f"{proxy.v1}/completions", json={"prompt": "after", "max_tokens": 4}, timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
    with httpx.stream("POST", f"{proxy.v1}/completions", json=LONG | {"stream": True}, timeout=30) as stream:
        next(line for line in stream.iter_lines() if line.startswith("data: "))  # it runs: hang up
    wait_until(lambda: engine_running(triton_server) == 0, timeout=10)
    time.sleep(0.5)  # the disconnect's abort is counted when its generation ends
    delta = {reason: read_metric(metrics, name) - before[reason] for reason, name in finished.items()}
    assert delta == {"stop": 0, "length": 1, "abort": 1}
    assert capacity_rejections(proxy) - refusals_before == 2


def capacity_rejections(proxy: Proxy) -> float:
    label = f'engine="0",model_name="{SERVED[0]}",reason="capacity"'
    return read_metric(f"{proxy.url}/metrics", f"vdiff:request_rejections_total{{{label}}}")


def test_client_disconnects_free_the_engine(proxy: Proxy, triton_server: Server) -> None:
    def impatient(stream: bool) -> None:
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{proxy.v1}/completions", json=LONG | {"stream": stream}, timeout=0.5)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(impatient, [True, False] * 6))
    freed_after = wait_until(lambda: engine_running(triton_server) == 0, timeout=10)
    started = time.monotonic()
    answer = httpx.post(f"{proxy.v1}/completions", json={"prompt": "after", "max_tokens": 8}, timeout=10)
    assert answer.status_code == 200 and time.monotonic() - started < 5
    assert freed_after < 10


def test_an_error_after_the_stream_started_is_an_event_then_done() -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield '{"n": 1}'
        raise APIError(503, "the server shut down before the request finished")

    async def collect() -> list[str]:
        return [event async for event in sse_stream(chunks())]

    events = asyncio.run(collect())
    assert events[0] == 'data: {"n": 1}\n\n' and events[-1] == "data: [DONE]\n\n"
    assert '"code":503' in events[1] and "shut down" in events[1]
