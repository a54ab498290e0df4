"""Rate limits, the shutdown drain, deep health and a dying Triton, over the real tritonserver."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from clients import processes_mentioning, read_metric
from proxy_harness import SERVED, Proxy, proxy_config, running_proxy
from triton_harness import Server, start_server
from vdiff_client.ratelimit import RateLimits

SHORT = {"model": SERVED[0], "prompt": "hello", "max_tokens": 4}
LONG = {"model": SERVED[0], "prompt": "long", "max_tokens": 256, "ignore_eos": True}


def rejections(proxy: Proxy, reason: str) -> float:
    label = f'engine="0",model_name="{SERVED[0]}",reason="{reason}"'
    return read_metric(f"{proxy.url}/metrics", f"vdiff:request_rejections_total{{{label}}}")


@pytest.fixture
def limited(triton_server: Server, tiny_llada: Path, request: pytest.FixtureRequest) -> Iterator[Proxy]:
    limits, changes = request.param
    with running_proxy(proxy_config(tiny_llada, triton_server.grpc, None, rate_limits=limits, **changes)) as proxy:
        yield proxy


@pytest.mark.parametrize("limited", [(RateLimits(requests_per_minute=2), {})], indirect=True)
def test_requests_over_the_budget_get_429_with_openai_headers(limited: Proxy) -> None:
    first = httpx.post(f"{limited.v1}/completions", json=SHORT, timeout=60)
    second = httpx.post(f"{limited.v1}/completions", json=SHORT, timeout=60)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == [
        "1",
        "0",
    ]
    assert second.headers["x-ratelimit-reset-requests"].endswith("s")  # about 1 minute: "59.9s"
    refused = httpx.post(f"{limited.v1}/completions", json=SHORT, timeout=60)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # one request refills in 30 s
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    error = refused.json()["error"]
    assert error["type"] == "RateLimitError" and error["code"] == 429
    assert "Rate limit reached for requests: limit 2 per minute" in error["message"]
    client = openai.OpenAI(base_url=limited.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=SERVED[0], messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    models = httpx.get(f"{limited.v1}/models")  # not a generation: never refused, still told the budget
    assert models.status_code == 200 and models.headers["x-ratelimit-remaining-requests"] == "0"
    assert rejections(limited, "rate_limit_requests") == 2


@pytest.mark.parametrize(
    "limited", [(RateLimits(requests_per_minute=1), {"api_keys": ("alice", "bob")})], indirect=True
)
def test_budgets_are_per_api_key(limited: Proxy) -> None:
    def post(key: str) -> httpx.Response:
        return httpx.post(
            f"{limited.v1}/completions", json=SHORT, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    assert post("alice").status_code == 200
    assert post("alice").status_code == 429
    assert post("bob").status_code == 200  # bob's budget is his own
    assert post("nobody").status_code == 401  # refused before touching any budget


@pytest.mark.parametrize("limited", [(RateLimits(tokens_per_minute=600), {})], indirect=True)
def test_tokens_are_charged_up_front_and_settled_to_real_use(limited: Proxy) -> None:
    body = SHORT | {"max_tokens": 200, "temperature": 0}
    full = httpx.post(f"{limited.v1}/completions", json=body, timeout=60).json()
    started = time.monotonic()
    # the same greedy answer, ended early by a stop string from its middle: most of max_tokens goes unused
    text = full["choices"][0]["text"]
    stopped = httpx.post(f"{limited.v1}/completions", json=body | {"stop": [text[len(text) // 4 :][:3]]}, timeout=60)
    assert stopped.status_code == 200 and stopped.json()["choices"][0]["finish_reason"] == "stop"
    used = full["usage"]["total_tokens"] + stopped.json()["usage"]["total_tokens"]
    assert stopped.json()["usage"]["completion_tokens"] < 150
    remaining = int(httpx.get(f"{limited.v1}/models").headers["x-ratelimit-remaining-tokens"])
    refill = 600 / 60 * (time.monotonic() - started) + 600 / 60 * 5  # generous: the first answer's time too
    assert 600 - used <= remaining <= 600 - used + refill, (remaining, used)
    four = SHORT | {"max_tokens": 200, "n": 4, "temperature": 0.5}  # 4 x 200 tokens: above the whole budget
    too_large = httpx.post(f"{limited.v1}/completions", json=four, timeout=60)
    assert too_large.status_code == 429 and "Request too large" in too_large.json()["error"]["message"]
    assert rejections(limited, "rate_limit_tokens") == 1


async def stream_to_the_end(http: httpx.AsyncClient, url: str, body: dict[str, Any], first: asyncio.Event) -> list[Any]:
    """The stream's events (JSON objects, then "[DONE]"); `first` is set when the first one arrives."""
    events: list[Any] = []
    async with http.stream("POST", url, json=body | {"stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                first.set()
    return events


Probes = dict[str, int]  # path -> status during the drain


def drain_while_streaming(proxy: Proxy, body: dict[str, Any], streams: int) -> tuple[list[Any], httpx.Response, Probes]:
    """Start `streams` streams, drain once each has sent an event; (their events, a new request,
    /health and /ping during the drain)."""

    async def run() -> tuple[list[Any], httpx.Response, Probes]:
        async with httpx.AsyncClient(timeout=120) as http:
            firsts = [asyncio.Event() for _ in range(streams)]
            tasks = [
                asyncio.create_task(stream_to_the_end(http, f"{proxy.v1}/completions", body, first)) for first in firsts
            ]
            await asyncio.wait_for(asyncio.gather(*(first.wait() for first in firsts)), 60)
            proxy.drain.begin_threadsafe()
            await asyncio.sleep(0.2)
            refused = await http.post(f"{proxy.v1}/completions", json=SHORT)
            probes = {path: (await http.get(f"{proxy.url}{path}")).status_code for path in ("/health", "/ping")}
            return list(await asyncio.gather(*tasks)), refused, probes

    return asyncio.run(run())


def test_drain_lets_streams_in_flight_finish_and_refuses_new_work(triton_server: Server, tiny_llada: Path) -> None:
    config = proxy_config(tiny_llada, triton_server.grpc, None, shutdown_timeout_s=60)
    body = LONG | {"max_tokens": 96, "stream_options": {"include_usage": True}}
    with running_proxy(config) as proxy:
        streams, refused, probes = drain_while_streaming(proxy, body, streams=4)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]
        assert probes == {"/health": 503, "/ping": 200}  # out of the pool, but alive: no restart
        for events in streams:
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            assert events[-2]["usage"]["completion_tokens"] == 96  # every token arrived
        assert rejections(proxy, "shutdown") == 1
        deadline = time.monotonic() + 10  # drained: the server stops by itself
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{proxy.url}/version", timeout=1)
            except httpx.TransportError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server kept serving after the drain")


def test_drain_aborts_what_outlives_the_shutdown_timeout(triton_server: Server, tiny_llada: Path) -> None:
    config = proxy_config(tiny_llada, triton_server.grpc, triton_server.metrics, shutdown_timeout_s=0.5)
    with running_proxy(config) as proxy:
        streams, _, _ = drain_while_streaming(proxy, LONG, streams=2)
    for events in streams:
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == 503 and "aborted after the 0.5 s drain" in error["message"]
    running = "vdiff:num_requests_running"
    deadline = time.monotonic() + 10  # the stop orders reached the engine
    while read_metric(triton_server.metrics, running) + read_metric(triton_server.metrics, running[:-7] + "waiting"):
        assert time.monotonic() < deadline, "the engine kept the aborted requests"
        time.sleep(0.1)


def test_health_runs_a_cached_probe_through_the_engine(proxy: Proxy, triton_server: Server) -> None:
    # the engine's count of finished requests: the liveness pings (stop orders) never reach it
    served = "vdiff:e2e_request_latency_seconds_count"
    time.sleep(5.1)  # past any cached answer
    before = read_metric(triton_server.metrics, served)
    assert [httpx.get(f"{proxy.url}/health").status_code for _ in range(3)] == [200] * 3
    time.sleep(0.5)  # Triton's counters are updated asynchronously
    assert read_metric(triton_server.metrics, served) - before == 1  # one probe answered all three


def test_a_dead_triton_fails_requests_fast_and_health_turns_503(tiny_llada: Path, tmp_path: Path) -> None:
    triton = start_server(tiny_llada, tmp_path, max_num_seqs="4", max_queue_size="4")
    address = triton.config.address
    config = proxy_config(tiny_llada, address.grpc_target, None)
    try:
        with running_proxy(config) as proxy:
            assert httpx.get(f"{proxy.url}/health", timeout=30).status_code == 200

            async def kill_under_load() -> tuple[list[Any], list[httpx.Response], float]:
                async with httpx.AsyncClient(timeout=60) as http:
                    firsts = [asyncio.Event() for _ in range(3)]
                    streams = [
                        asyncio.create_task(stream_to_the_end(http, f"{proxy.v1}/completions", LONG, f)) for f in firsts
                    ]
                    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
                    plain = [asyncio.create_task(http.post(f"{proxy.v1}/completions", json=LONG)) for _ in range(2)]
                    await asyncio.sleep(0.3)
                    triton.process.kill()
                    killed = time.monotonic()
                    ended = await asyncio.gather(*streams), await asyncio.gather(*plain)
                    return ended[0], ended[1], time.monotonic() - killed

            streams, plain, took = asyncio.run(kill_under_load())
            assert took < 5
            for events in streams:
                assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503
            assert [r.status_code for r in plain] == [503, 503]
            assert "unavailable" in plain[0].json()["error"]["message"]
            assert httpx.get(f"{proxy.url}/health", timeout=30).status_code == 503
            after = httpx.post(f"{proxy.v1}/completions", json=SHORT, timeout=30)
            assert after.status_code == 503 and after.headers["retry-after"] == "1"
    finally:
        triton.process.kill()
        triton.wait(30)
    assert processes_mentioning(str(tmp_path)) == []  # the backend stubs went with it
