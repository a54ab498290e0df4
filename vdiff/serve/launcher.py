"""Run tritonserver over a rendered vdiff repository: start, wait until ready, supervise, drain.

The server binds to loopback by default, on ports that leave 8000 to the OpenAI proxy. Its log
goes to `<workdir>/tritonserver.log` and, once the models are ready, to this process's stderr. On
SIGTERM or SIGINT the server is asked to stop: Triton refuses new work, waits up to
`exit_timeout_s` for requests in flight (the denoiser's finalize waits for its streams) and exits.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from vdiff.serve.repository import render_repository
from vdiff.serve.tritonserver import TritonInstallation, find_tritonserver, server_environment

LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class ServerAddress:
    host: str = "127.0.0.1"
    http_port: int = 8100
    grpc_port: int = 8101
    metrics_port: int = 8102

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{_url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def ready_url(self) -> str:
        return f"{self.http_url}/v2/health/ready"


@dataclass(frozen=True)
class LaunchConfig:
    repository: Path
    workdir: Path
    address: ServerAddress = field(default_factory=ServerAddress)
    exit_timeout_s: int = 30
    startup_timeout_s: float = 600.0
    extra_args: tuple[str, ...] = ()  # passed to tritonserver as they are


def tritonserver_command(installation: TritonInstallation, config: LaunchConfig) -> list[str]:
    address = config.address
    return [
        str(installation.binary),
        f"--model-repository={config.repository}",
        f"--backend-directory={installation.backend_directory(config.workdir)}",
        f"--http-address={address.host}",
        f"--http-port={address.http_port}",
        f"--grpc-address={address.host}",
        f"--grpc-port={address.grpc_port}",
        f"--metrics-address={address.host}",
        f"--metrics-port={address.metrics_port}",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        "--strict-readiness=true",
        *config.extra_args,
    ]


class TritonProcess:
    """A running tritonserver whose output is kept (the last lines) and logged to a file."""

    def __init__(self, installation: TritonInstallation, config: LaunchConfig, echo: TextIO | None) -> None:
        self.config = config
        self.log_path = config.workdir / "tritonserver.log"
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._echo = echo
        self._echoing = threading.Event()
        self.process = subprocess.Popen(
            tritonserver_command(installation, config),
            env=server_environment(installation),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we forward one signal
            preexec_fn=_stop_with_parent,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read_output, name="tritonserver-log", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                self.tail.append(line.rstrip("\n"))
                if self._echo is not None and self._echoing.is_set():
                    self._echo.write(line)
                    self._echo.flush()

    def wait_ready(self, progress: TextIO | None) -> bool:
        """Poll readiness until ready (True), the process exits or the startup timeout passes (False)."""
        started = time.monotonic()
        line = _ProgressLine(progress)
        while self.process.poll() is None:
            waited = time.monotonic() - started
            if _is_ready(self.config.address.ready_url):
                line.finish(f"tritonserver is ready after {waited:.0f} s")
                self._echoing.set()
                return True
            if waited > self.config.startup_timeout_s:
                return False
            line.update(f"loading the models into tritonserver ... {waited:.0f} s", waited)
            time.sleep(0.5)
        line.finish("tritonserver exited while loading")
        return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        self._end_leftovers()
        self._reader.join(5)
        return code

    def _end_leftovers(self) -> None:
        """A killed tritonserver leaves its Python backend stubs running (the denoiser's, whose engine
        thread is busy, does not notice); they share its process group, so end the group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def last_lines(self) -> str:
        return "\n".join(self.tail)


def _stop_with_parent() -> None:
    """In the child before exec: on Linux, SIGTERM tritonserver if its parent dies without stopping it
    (kill -9, the OOM killer), so that it drains and stops its backend stubs instead of living on."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_loopback_address() -> ServerAddress:
    """Three ports that are free on 127.0.0.1 now (for tests and benchmarks that start their own server)."""
    sockets = [socket.socket() for _ in range(3)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        http, grpc, metrics = (s.getsockname()[1] for s in sockets)
    finally:
        for s in sockets:
            s.close()
    return ServerAddress("127.0.0.1", http, grpc, metrics)


def start_local(
    parameters: dict[str, str],
    workdir: Path,
    progress: TextIO | None = None,
    exit_timeout_s: int = 30,
    startup_timeout_s: float = 600.0,
) -> TritonProcess:
    """The repository rendered with `parameters`, served on free loopback ports once ready.

    Raises RuntimeError with the server's last lines when it does not become ready.
    """
    repository = render_repository(workdir / "model_repository", parameters)
    address = free_loopback_address()
    config = LaunchConfig(repository, workdir, address, exit_timeout_s, startup_timeout_s)
    server = TritonProcess(find_tritonserver(), config, echo=None)
    if not server.wait_ready(progress):
        server.stop()
        server.wait(30)
        raise RuntimeError(f"tritonserver did not become ready:\n{server.last_lines()}")
    return server


def supervise(server: TritonProcess, out: TextIO = sys.stderr) -> int:
    """Serve until a signal or the server's death; the exit code for `vdiff serve`."""
    stopping = threading.Event()

    def forward(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():  # a second signal: stop waiting for requests in flight
            server.process.kill()
            return
        stopping.set()
        out.write(f"\nstopping: draining requests in flight (up to {server.config.exit_timeout_s} s)\n")
        server.stop()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if server.wait_ready(out):
            _print_endpoints(server.config.address, out)
        elif server.process.poll() is None and not stopping.is_set():
            out.write(f"\ntritonserver was not ready after {server.config.startup_timeout_s:.0f} s\n")
            server.process.kill()
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping.is_set() and code == 0:
        return 0
    out.write(f"\ntritonserver exited with code {code}; its last lines (full log: {server.log_path}):\n")
    out.write(server.last_lines() + "\n")
    return code or 1


class _ProgressLine:
    """One line rewritten in place on a terminal; a line every 15 s in a log."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.tty = out is not None and out.isatty()
        self.next_log = 0.0

    def update(self, text: str, waited: float) -> None:
        if self.out is None:
            return
        if self.tty:
            self.out.write(f"\r{text}")
        elif waited >= self.next_log:
            self.out.write(text + "\n")
            self.next_log = waited + 15
        self.out.flush()

    def finish(self, text: str) -> None:
        if self.out is not None:
            self.out.write(("\r" if self.tty else "") + text + " " * 20 * self.tty + "\n")
            self.out.flush()


def _print_endpoints(address: ServerAddress, out: TextIO) -> None:
    out.write(
        f"vdiff is serving: HTTP {address.http_url}/v2/models/vdiff/generate[_stream], "
        f"gRPC {address.grpc_target}, metrics {address.metrics_url}\n"
    )
    out.flush()


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
