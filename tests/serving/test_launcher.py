"""`vdiff triton` as a user runs it: serves, drains on SIGTERM and exits 0; reports a dead server."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clients import http_post, processes_mentioning, read_metric
from vdiff.serve.launcher import free_loopback_address


class ServeProcess:
    """`python -m vdiff.serve.cli triton ...` (Triton alone) with its output read line by line."""

    def __init__(self, *args: str) -> None:
        address = free_loopback_address()
        self.http, self.grpc, self.metrics = address.http_port, address.grpc_port, address.metrics_port
        command = [sys.executable, "-m", "vdiff.serve.cli", "triton", "--torch-num-threads", "1"]
        command += ["--triton-http-port", str(self.http), "--triton-grpc-port", str(self.grpc)]
        command += ["--triton-metrics-port", str(self.metrics), "--exit-timeout", "20", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=deadline - time.monotonic()):
                    return
            except queue.Empty:
                break
        self.process.kill()
        pytest.fail(f"no line with {text!r} within {timeout} s:\n{''.join(self.output)}")


def test_serve_answers_and_drains_a_request_in_flight_on_sigterm(tiny_llada: Path) -> None:
    server = ServeProcess("--model", str(tiny_llada))
    server.wait_for_line("vdiff is serving", timeout=180)
    url = f"http://127.0.0.1:{server.http}/v2/models/vdiff/generate"
    status, body = http_post(url, {"text_input": "hello", "max_tokens": 16})
    assert status == 200 and json.loads(body)["num_output_tokens"] == 16

    answers: list[tuple[int, str]] = []
    long_request = {"text_input": "drain me", "max_tokens": 256, "ignore_eos": True}
    worker = threading.Thread(target=lambda: answers.append(http_post(url, long_request)))
    worker.start()
    metrics = f"http://127.0.0.1:{server.metrics}/metrics"
    deadline = time.monotonic() + 10
    while read_metric(metrics, "vdiff:num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    worker.join(120)
    assert server.process.wait(120) == 0, "".join(server.output)
    status, body = answers[0]
    assert status == 200, body
    assert json.loads(body)["num_output_tokens"] == 256  # finished, not cut off
    assert any("draining requests in flight" in line for line in server.output)


def test_tritonserver_stops_when_vdiff_is_killed(tiny_llada: Path, tmp_path: Path) -> None:
    server = ServeProcess("--model", str(tiny_llada), "--workdir", str(tmp_path))
    server.wait_for_line("vdiff is serving", timeout=180)
    assert processes_mentioning(str(tmp_path))  # tritonserver and its stubs run from the work directory
    server.process.kill()  # no chance to stop its child: the kernel's parent-death signal must
    deadline = time.monotonic() + 60
    while processes_mentioning(str(tmp_path)):
        assert time.monotonic() < deadline, f"outlived vdiff: {processes_mentioning(str(tmp_path))}"
        time.sleep(0.5)


def test_serve_exits_nonzero_with_the_server_log_when_tritonserver_dies(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    server = ServeProcess("--model", str(missing))
    code = server.process.wait(180)
    output = "".join(server.output)
    assert code != 0
    assert "tritonserver exited with code" in output
    assert str(missing) in output  # the model's load error, from the server's last log lines


def test_triton_env_prepares_a_backend_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vdiff.serve.cli", "triton-env", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    backend = tmp_path / "backends" / "python"
    assert (backend / "triton_python_backend_stub").is_file() and (backend / "libtriton_python.so").is_file()
    lines = done.stdout.splitlines()
    assert lines[0].startswith("export LD_LIBRARY_PATH=") and lines[1].startswith("export PATH=")
    assert f"--backend-directory {tmp_path / 'backends'}" in lines[2]
