"""Starting a real tritonserver on the rendered repository, for the serving tests.

The session fixture that uses it (`triton_server`) lives in tests/conftest.py: a second conftest.py
under tests/serving would replace this one's `conftest` module for the tests that import it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdiff.serve.launcher import LaunchConfig, ServerAddress, TritonProcess
from vdiff.serve.repository import render_repository
from vdiff.serve.tritonserver import find_tritonserver

MAX_NUM_SEQS = 4
MAX_QUEUE_SIZE = 4  # capacity 8: eight concurrent streams fit, a ninth is refused


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Server:
    address: ServerAddress
    process: TritonProcess

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.address.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.address.http_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.address.metrics_port}/metrics"


def start_server(model: Path, workdir: Path, **parameters: str) -> TritonProcess:
    settings = {"model": str(model), "torch_num_threads": "1", "shutdown_timeout_s": "10"} | parameters
    repository = render_repository(workdir / "model_repository", settings)
    address = ServerAddress("127.0.0.1", *free_ports(3))
    config = LaunchConfig(repository, workdir, address, exit_timeout_s=10, startup_timeout_s=180)
    server = TritonProcess(find_tritonserver(), config, echo=None)
    if not server.wait_ready(None):
        server.stop()
        server.wait(30)
        pytest.fail(f"tritonserver did not become ready:\n{server.last_lines()}")
    return server
