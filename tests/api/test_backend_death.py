"""A denoiser stub that dies or stops answering under a running `vdiff` is noticed.

tritonserver outlives its stub and keeps reporting the model ready, while requests in flight
never hear from it again. The proxy's liveness pings must turn /health to 503 within 5 s, end
the requests in flight with 503, and the command must exit non-zero so a supervisor restarts it.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest

from clients import backend_stub, processes_mentioning
from command_harness import start_vdiff, wait_healthy
from vdiff.serve.stack import BACKEND_EXIT_WITHIN_S

HEALTH_WITHIN_S = 5.0


def stream_in_thread(url: str, body: dict[str, object], started: threading.Event) -> Future[str]:
    """A long streamed completion in a thread: the whole SSE body; `started` at its first bytes."""

    def run() -> str:
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            chunks = []
            for chunk in response.iter_text():
                started.set()
                chunks.append(chunk)
            return "".join(chunks)

    future: Future[str] = Future()
    threading.Thread(target=lambda: future.set_result(run()), daemon=True).start()
    return future


def seconds_until_unhealthy(port: int, since: float) -> float:
    """Until /health answers 503, or nothing listens: the command may exit between two polls."""
    while time.monotonic() - since < 30:
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        except httpx.ConnectError:
            status = 503
        if status == 503:
            return time.monotonic() - since
        time.sleep(0.05)
    raise AssertionError("/health stayed 200 for 30 s after the denoiser stub was gone")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "wedged"])
def test_a_lost_denoiser_stub_fails_health_ends_requests_and_exits(
    tiny_llada: Path, tmp_path: Path, how: signal.Signals
) -> None:
    process, port, _ = start_vdiff(tiny_llada, "--workdir", str(tmp_path))
    try:
        wait_healthy(process, port)
        started = threading.Event()
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "stream": True, "ignore_eos": True}
        in_flight = stream_in_thread(f"http://127.0.0.1:{port}/v1/completions", body, started)
        assert started.wait(60)
        backend_stub(tmp_path, "diffusion_denoise").send_signal(how)
        lost = time.monotonic()
        assert seconds_until_unhealthy(port, lost) < HEALTH_WITHIN_S
        answer = in_flight.result(timeout=HEALTH_WITHIN_S)
        # the watch's abort, or Triton's own error for the lost stub if it reaches the stream first
        assert '"type":"ServiceUnavailableError"' in answer and '"code":503' in answer and "retry" in answer
        assert answer.rstrip().endswith("data: [DONE]")
        output, _ = process.communicate(timeout=BACKEND_EXIT_WITHIN_S + 10)
        exited = time.monotonic() - lost
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output
    assert "the denoiser stopped answering" in output and "restarts vdiff" in output
    assert exited < BACKEND_EXIT_WITHIN_S, exited
    assert processes_mentioning(str(tmp_path)) == []  # the stopped stub and tritonserver are gone
