"""The proxy knows the denoiser's capacity (max_num_seqs + max_queue_size, read from Triton).

A request of more choices than the engine can ever hold is a 400 at once; one that fits, but not
beside the proxy's own requests in flight, is a 503 with Retry-After at once; and when the denoiser
itself refuses one choice (its other clients fill it), the request's other choices stop at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx

from clients import Stream, read_metric
from proxy_harness import SERVED, Proxy
from triton_harness import MAX_NUM_SEQS, MAX_QUEUE_SIZE, Server
from vdiff.backend.settings import BackendSettings
from vdiff_client.capacity import DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_QUEUE_SIZE, EngineCapacity

CAPACITY = MAX_NUM_SEQS + MAX_QUEUE_SIZE
SLOW = {"model": SERVED[0], "prompt": "x", "max_tokens": 256, "ignore_eos": True, "stream": True}
DIRECT = {"max_tokens": 480, "ignore_eos": True, "stream": True}  # to Triton, past the proxy
CHAT = {"model": SERVED[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def engine_running(server: Server) -> float:
    """Requests in the denoiser, running or waiting."""
    names = ("vdiff:num_requests_running", "vdiff:num_requests_waiting")
    return sum(read_metric(server.metrics, name) for name in names)


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED[0], "prompt": "hi", "max_tokens": 4, "temperature": 1.0} | fields


def timed_post(url: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = httpx.post(url, json=body, timeout=120)
    return answer, time.monotonic() - started


def test_the_defaults_are_the_backends() -> None:
    settings = BackendSettings()
    assert settings.max_num_seqs == DEFAULT_MAX_NUM_SEQS
    assert settings.max_queue_size == DEFAULT_MAX_QUEUE_SIZE
    parameters = {"max_num_seqs": "${max_num_seqs}", "max_queue_size": " 3 "}
    config = {"parameters": {key: {"string_value": value} for key, value in parameters.items()}}
    assert EngineCapacity.from_model_config(config) == EngineCapacity(DEFAULT_MAX_NUM_SEQS, 3)
    two = config | {"instance_group": [{"count": 2, "kind": "KIND_MODEL"}]}
    assert EngineCapacity.from_model_config(two).sequences == 2 * (DEFAULT_MAX_NUM_SEQS + 3)


def test_more_choices_than_it_holds_is_400_at_once(proxy: Proxy, triton_server: Server) -> None:
    body = completion(prompt=["hi"] * 128, n=128)  # within --max-prompts and --max-n
    with ThreadPoolExecutor(2) as pool:
        refused = pool.submit(timed_post, f"{proxy.v1}/completions", body)
        chat = pool.submit(timed_post, f"{proxy.v1}/chat/completions", CHAT)
        (answer, seconds), (chatted, chat_seconds) = refused.result(), chat.result()
    print(f"refused in {seconds:.3f} s; a chat beside it took {chat_seconds:.3f} s")
    assert answer.status_code == 400 and seconds < 1, (answer.text, seconds)
    error = answer.json()["error"]
    assert error["param"] == "n" and error["message"].startswith(
        f"n × prompts = 128 × 128 = 16384 sequences exceeds this server's capacity of {CAPACITY} "
        f"(max_num_seqs {MAX_NUM_SEQS} running + max_queue_size {MAX_QUEUE_SIZE} waiting)"
    )
    assert chatted.status_code == 200 and chat_seconds < 1, chat_seconds
    nine = CHAT | {"n": CAPACITY + 1, "temperature": 1.0}
    one_too_many = httpx.post(f"{proxy.v1}/chat/completions", json=nine, timeout=10)
    assert one_too_many.status_code == 400
    assert f"n = {CAPACITY + 1} sequences exceeds" in one_too_many.json()["error"]["message"]
    wait_until(lambda: engine_running(triton_server) == 0, 2)  # the chat's end: gauges flush 4x a second


@contextmanager
def slow_streams(proxy: Proxy, server: Server, count: int) -> Iterator[None]:
    """`count` streamed completions through the proxy, in the engine until the block ends."""
    loop = asyncio.new_event_loop()
    http = httpx.AsyncClient(timeout=120)

    async def stream() -> None:
        async with http.stream("POST", f"{proxy.v1}/completions", json=SLOW) as answer:
            async for _ in answer.aiter_bytes():
                pass

    tasks = [loop.create_task(stream()) for _ in range(count)]
    with ThreadPoolExecutor(1) as runner:
        everything = asyncio.gather(*tasks, return_exceptions=True)
        running = runner.submit(loop.run_until_complete, everything)
        try:
            wait_until(lambda: engine_running(server) == count, 30)
            yield
        finally:
            for task in tasks:
                loop.call_soon_threadsafe(task.cancel)
            running.result(30)
            loop.run_until_complete(http.aclose())
            loop.close()
    wait_until(lambda: engine_running(server) == 0, 10)


def test_fitting_but_not_now_is_503_at_once(proxy: Proxy, triton_server: Server) -> None:
    with slow_streams(proxy, triton_server, CAPACITY - 2):
        answer, seconds = timed_post(f"{proxy.v1}/completions", completion(n=3))
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1" and seconds < 1
        error = answer.json()["error"]
        assert error["type"] == "ServiceUnavailableError" and "at capacity" in error["message"]
        taken = f"hold {CAPACITY - 2} of its {CAPACITY} sequences and this one needs 3"
        assert taken in error["message"]
        assert engine_running(triton_server) == CAPACITY - 2  # the proxy refused, not the engine
        fits, _ = timed_post(f"{proxy.v1}/completions", completion(n=2))
        assert fits.status_code == 200, fits.text
    every_slot, _ = timed_post(f"{proxy.v1}/completions", completion(n=CAPACITY))
    assert every_slot.status_code == 200, every_slot.text  # each request gave its slots back


def test_a_refused_choice_stops_the_others_at_once(proxy: Proxy, triton_server: Server) -> None:
    direct = CAPACITY - 3  # another client of Triton, unseen by the proxy
    streams = [Stream(triton_server.grpc) for _ in range(direct)]
    try:
        for i, stream in enumerate(streams):
            stream.send("vdiff", {"text_input": f"direct {i}"} | DIRECT)
        wait_until(lambda: engine_running(triton_server) == direct, 10)
        answer, seconds = timed_post(f"{proxy.v1}/completions", completion(n=4, max_tokens=256))
        assert answer.status_code == 503 and "at capacity" in answer.json()["error"]["message"]
        freed = wait_until(lambda: engine_running(triton_server) == direct, 5)
        print(f"refused after {seconds:.3f} s; its admitted choices stopped {freed:.3f} s later")
        assert seconds < 2 and freed < 2
    finally:
        for stream in streams:
            stream.cancel()
    wait_until(lambda: engine_running(triton_server) == 0, 10)
    every_slot = httpx.post(f"{proxy.v1}/completions", json=completion(n=CAPACITY), timeout=60)
    assert every_slot.status_code == 200, every_slot.text
