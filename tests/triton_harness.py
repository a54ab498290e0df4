"""Starting a real tritonserver on the rendered repository, for the serving tests.

The session fixture that uses it (`triton_server`) lives in tests/conftest.py: a second conftest.py
under tests/serving would replace this one's `conftest` module for the tests that import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from vdiff.serve.launcher import ServerAddress, TritonProcess, start_local

MAX_NUM_SEQS = 4
MAX_QUEUE_SIZE = 4  # capacity 8: eight concurrent streams fit, a ninth is refused


@dataclass(frozen=True)
class Server:
    address: ServerAddress
    process: TritonProcess

    @property
    def grpc(self) -> str:
        return self.address.grpc_target

    @property
    def http(self) -> str:
        return self.address.http_url

    @property
    def metrics(self) -> str:
        return self.address.metrics_url


def start_server(model: Path, workdir: Path, **parameters: str) -> TritonProcess:
    settings = {"model": str(model), "torch_num_threads": "1", "shutdown_timeout_s": "10"} | parameters
    try:
        return start_local(settings, workdir, exit_timeout_s=10, startup_timeout_s=180)
    except RuntimeError as error:
        pytest.fail(str(error))
