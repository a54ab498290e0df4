"""Clients that cannot hold the server: made-up methods and paths add no metric series, and
requests whose headers or body never finish are answered 408 and closed, over real sockets
against the real OpenAI server (and the session's tritonserver)."""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy_harness import SERVED, Proxy, proxy_config, running_proxy
from triton_harness import Server
from vdiff.serve.cli import openai_parser
from vdiff_client.args import UvicornOptions, add_frontend_arguments, uvicorn_options
from vdiff_client.cli import http_settings
from vdiff_client.timeouts import HeaderTimeoutH11Protocol

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
TIMEOUT_FLAGS = ["--header-timeout", "1", "--body-timeout", "1", "--timeout-keep-alive", "5",
                 "--h11-max-incomplete-event-size", "8192"]  # fmt: skip
COMPLETION = b'{"model": "%s", "prompt": "hi", "max_tokens": 4}' % SERVED[0].encode()
STALLED_BODY = (
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    b"content-length: 100\r\n\r\n" + COMPLETION[:4]
)


def series(proxy: Proxy) -> Series:
    text = httpx.get(f"{proxy.url}/metrics").text
    families = text_string_to_metric_families(text)
    samples = (sample for family in families for sample in family.samples)
    return {(sample.name, frozenset(sample.labels.items())): sample.value for sample in samples}


def http_requests(proxy: Proxy, method: str, handler: str, status: str) -> float:
    labels = frozenset({"method": method, "handler": handler, "status": status}.items())
    return series(proxy).get(("http_requests_total", labels), 0.0)


def test_made_up_methods_and_paths_add_no_metric_series(proxy: Proxy) -> None:
    with httpx.Client(timeout=10) as client:

        def send_made_up(count: int) -> None:
            for i in range(count):
                assert client.request(f"X{i:08d}", f"{proxy.v1}/models").status_code == 405
                assert client.get(f"{proxy.url}/made-up/{i}").status_code == 404

        send_made_up(1)  # the first of each makes the one "other" method and "none" handler
        before, size = series(proxy), len(client.get(f"{proxy.url}/metrics").content)
        send_made_up(1000)
        after = series(proxy)
        assert after.keys() == before.keys()
        assert len(client.get(f"{proxy.url}/metrics").content) < size + 1000  # digits of counts
    other = frozenset({"method": "other", "handler": "/v1/models", "status": "4xx"}.items())
    none = frozenset({"method": "GET", "handler": "none", "status": "4xx"}.items())
    for labels in (other, none):
        key = ("http_requests_total", labels)
        assert after[key] - before[key] == 1000
    assert not any(value.startswith("X0") for _, labels in after for _, value in labels)


@pytest.fixture(scope="module")
def strict_proxy(triton_server: Server, tiny_llada: Path) -> Iterator[Proxy]:
    """A server with one-second header and body timeouts, set by the `vdiff` command's flags."""
    args = openai_parser().parse_args(TIMEOUT_FLAGS)
    config = proxy_config(tiny_llada, triton_server.grpc, None)
    with running_proxy(config, http_settings(args), uvicorn_options(args).kwargs()) as running:
        yield running


def connect(proxy: Proxy, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", httpx.URL(proxy.url).port or 80))
    sock.sendall(sent)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 20) -> tuple[float, bytes]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit_s)
    with sock:
        while chunk := sock.recv(65536):
            received += chunk
    return time.monotonic() - started, received


def one_response(sock: socket.socket, request: bytes) -> int:
    """Send `request` on a kept-alive connection and read its whole answer; its status."""
    sock.sendall(request)
    sock.settimeout(10)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536) or pytest.fail("the server closed the connection")
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    fields = (line.partition(b":") for line in lines)
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    while len(body) < int(headers[b"content-length"]):
        body += sock.recv(65536)
    return int(status_line.split(b" ", 2)[1])


def completes(proxy: Proxy) -> bool:
    answer = httpx.post(f"{proxy.v1}/completions", content=COMPLETION,
                        headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    return answer.status_code == 200 and bool(answer.json()["choices"])


def test_a_stalled_body_gets_408_after_the_body_timeout_while_others_are_served(
    strict_proxy: Proxy,
) -> None:
    timed_out_before = http_requests(strict_proxy, "POST", "/v1/completions", "4xx")
    stalled = connect(strict_proxy, STALLED_BODY)
    assert completes(strict_proxy)
    waited, answer = read_until_closed(stalled)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
    assert b"the request body did not arrive within 1 s" in answer
    assert waited < 3
    assert not strict_proxy.drain.calls  # nothing left for a drain to wait on
    assert http_requests(strict_proxy, "POST", "/v1/completions", "4xx") == timed_out_before + 1


def test_half_sent_headers_and_silent_connections_are_dropped(strict_proxy: Proxy) -> None:
    half_head = connect(strict_proxy, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-le")
    silent = connect(strict_proxy, b"")
    assert httpx.get(f"{strict_proxy.v1}/models").status_code == 200
    waited, answer = read_until_closed(half_head)
    assert answer.startswith(b"HTTP/1.1 408 ") and answer.endswith(b"did not arrive in time")
    assert 0.5 < waited < 3
    waited, answer = read_until_closed(silent)
    assert answer == b"" and waited < 3


def test_slow_but_timely_requests_and_idle_kept_alive_connections_work(
    strict_proxy: Proxy,
) -> None:
    head = STALLED_BODY[: -len(COMPLETION[:4])].replace(b"100", str(len(COMPLETION)).encode())
    sock = connect(strict_proxy, head[:20])
    time.sleep(0.4)
    sock.sendall(head[20:] + COMPLETION[:10])
    time.sleep(0.4)
    sock.sendall(COMPLETION[10:])
    sock.settimeout(30)
    with sock:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    version = b"GET /version HTTP/1.1\r\nhost: x\r\n\r\n"
    with connect(strict_proxy, b"") as kept_alive:
        assert one_response(kept_alive, version) == 200
        time.sleep(1.5)  # idle past the header timeout, within the keep-alive
        assert one_response(kept_alive, version) == 200


def test_a_response_before_the_body_is_read_closes_the_connection(strict_proxy: Proxy) -> None:
    unread = STALLED_BODY.replace(b"/v1/completions", b"/v1/models")  # 405, body never read
    waited, answer = read_until_closed(connect(strict_proxy, unread))
    assert answer.startswith(b"HTTP/1.1 405 ") and b"connection: close" in answer.lower()
    assert waited < 0.9  # closed with the response, not by the body timeout


def test_a_head_over_h11_max_incomplete_event_size_gets_400(strict_proxy: Proxy) -> None:
    endless = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 16384  # 8192 allowed
    waited, answer = read_until_closed(connect(strict_proxy, endless))
    assert answer.startswith(b"HTTP/1.1 400 ") and waited < 0.9  # not the header timeout
    assert httpx.get(f"{strict_proxy.v1}/models").status_code == 200


def test_a_drain_does_not_wait_for_a_stalled_body(triton_server: Server, tiny_llada: Path) -> None:
    args = openai_parser().parse_args(TIMEOUT_FLAGS)
    config = proxy_config(tiny_llada, triton_server.grpc, None, shutdown_timeout_s=30)
    with running_proxy(config, http_settings(args), uvicorn_options(args).kwargs()) as draining:
        stalled = connect(draining, STALLED_BODY)
        deadline = time.monotonic() + 5
        while not draining.drain.calls:
            assert time.monotonic() < deadline, "the stalled request never became a call"
            time.sleep(0.02)
        started = time.monotonic()
        draining.drain.begin_threadsafe()
        _, answer = read_until_closed(stalled)
        assert answer.startswith(b"HTTP/1.1 408 ")
        while True:  # the drain ends by stopping the server, which closes its port
            try:
                socket.create_connection(("127.0.0.1", httpx.URL(draining.url).port or 80)).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() - started < 5, "the drain waited for the stalled body"
            time.sleep(0.05)


def parsed_by_both_commands(flags: list[str]) -> list[argparse.Namespace]:
    proxy = argparse.ArgumentParser()
    add_frontend_arguments(proxy)  # vdiff-proxy's flags
    return [proxy.parse_args(flags), openai_parser().parse_args(flags)]


def test_timeout_flags_reach_uvicorn_and_the_app_for_both_commands() -> None:
    for args in parsed_by_both_commands(TIMEOUT_FLAGS):
        options = uvicorn_options(args)
        assert (options.header_timeout_s, options.timeout_keep_alive) == (1.0, 5)
        assert http_settings(args).body_timeout_s == 1.0
        kwargs = options.kwargs()
        assert issubclass(kwargs["http"], HeaderTimeoutH11Protocol)
        assert kwargs["http"].header_timeout_s == 1.0
        assert kwargs["h11_max_incomplete_event_size"] == 8192
    for args in parsed_by_both_commands([]):
        defaults: UvicornOptions = uvicorn_options(args)
        assert (defaults.header_timeout_s, defaults.timeout_keep_alive) == (10.0, 5)
        assert http_settings(args).body_timeout_s == 30.0
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            openai_parser().parse_args(["--body-timeout", bad])
