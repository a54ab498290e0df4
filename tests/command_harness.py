"""The `vdiff` command as a subprocess on free loopback ports, for the tests that run it whole."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from vdiff.serve.cli import triton_port_flags
from vdiff.serve.launcher import ServerAddress, free_loopback_address


def start_vdiff(model: Path | None, *extra: str) -> tuple[subprocess.Popen[str], int, ServerAddress]:
    """`vdiff` as a subprocess on free loopback ports; (process, HTTP port, Triton's addresses).

    `model` None: no --model and no --served-model-name, as a user starts it for the shipped default.
    """
    port = free_loopback_address().http_port
    triton = free_loopback_address()
    named = [] if model is None else ["--model", str(model), "--served-model-name", "tiny"]
    flags = ["--port", str(port), "--host", "127.0.0.1", "--torch-num-threads", "1", *triton_port_flags(triton)]
    command = [sys.executable, "-m", "vdiff.serve.cli", *named, *flags, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), port, triton


@contextlib.contextmanager
def served_vdiff(model: Path | None = None, *extra: str) -> Iterator[tuple[int, ServerAddress]]:
    """`vdiff` started and healthy: (HTTP port, Triton's addresses); SIGTERM and its exit after."""
    process, port, triton = start_vdiff(model, *extra)
    try:
        wait_healthy(process, port)
        yield port, triton
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)  # reads its output to the end, so it never blocks on the pipe


def wait_healthy(process: subprocess.Popen[str], port: int) -> list[int]:
    """/health's answers until the first 200."""
    statuses: list[int] = []
    deadline = time.monotonic() + 180
    while not statuses or statuses[-1] != 200:
        assert time.monotonic() < deadline and process.poll() is None, "vdiff did not become healthy"
        with contextlib.suppress(httpx.TransportError):
            statuses.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
        time.sleep(0.2)
    return statuses
