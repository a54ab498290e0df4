"""Triton and the OpenAI server as one service: what `vdiff --model X` runs.

The HTTP port is bound first (as vLLM does), so `/health` answers 503 while the models load and
200 once Triton's ensemble is ready; the URL is printed then. On SIGTERM or SIGINT the OpenAI
server stops accepting and lets requests in flight finish (up to the shutdown timeout), then
Triton drains and stops; the exit code is 0. If tritonserver dies, the OpenAI server is stopped
and the exit code is `BACKEND_FAILED_EXIT` (1), with Triton's last lines. If the denoiser's stub dies or stops
answering while tritonserver lives on (it then still reports the model ready), the app's
`BackendWatch` ends the requests in flight with 503 and the stack exits non-zero too, within
`BACKEND_EXIT_WITHIN_S`, so that a supervisor restarts the whole service.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import TextIO

from vdiff.serve.launcher import TritonProcess
from vdiff_client.calls import ABORT_GRACE_S
from vdiff_client.cli import ProxyServer, stop_on_signals
from vdiff_client.health import DEAD_WITHIN_S

# The one exit status of `vdiff` whenever its backend failed (tritonserver died, or the denoiser's
# stub died or stopped answering), whatever tritonserver's own status was (247 after a SIGKILL):
# a supervisor restarts on it; 0 is a clean drain.
BACKEND_FAILED_EXIT = 1
KILL_GRACE_S = 15  # past Triton's own exit timeout
DEAD_BACKEND_STOP_S = 5  # a tritonserver whose stub died waits on it forever: SIGTERM, then kill
# the documented bound: noticing; the drain (a grace for the ended calls' last events, then
# aborts and a second grace); uvicorn's graceful stop; Triton's stop
BACKEND_EXIT_WITHIN_S = DEAD_WITHIN_S + 3 * ABORT_GRACE_S + DEAD_BACKEND_STOP_S


class TritonWatch:
    """A thread that reports readiness (prints the URL) and stops the HTTP server if Triton dies."""

    def __init__(self, triton: TritonProcess, server: ProxyServer, url: str, out: TextIO) -> None:
        self.triton = triton
        self.server = server
        self.url = url
        self.out = out
        self.died = False
        self.thread = threading.Thread(target=self._watch, name="triton-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _watch(self) -> None:
        if self.triton.wait_ready(self.out):
            self.out.write(f"vdiff is serving the OpenAI API at {self.url}/v1 (health: {self.url}/health)\n")
            self.out.flush()
        elif self.triton.process.poll() is None and not self.server.should_exit:
            self.out.write("tritonserver did not become ready in time; stopping\n")
            self.triton.process.kill()
        self.triton.process.wait()
        if not self.server.should_exit:
            # requests in flight fail at once (503: Triton unreachable); new ones get 503 until the exit
            self.died = True
            self.out.write("tritonserver died; answering 503 while the requests in flight end, then exiting\n")
            self.server.drain.begin_threadsafe()


class BackendDeath:
    """Told by the app's BackendWatch (on the server's loop) that the denoiser stopped answering."""

    def __init__(self, triton: TritonProcess, server: ProxyServer, out: TextIO) -> None:
        self.triton = triton
        self.server = server
        self.out = out
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        if self.triton.process.poll() is not None:
            return  # tritonserver itself died: TritonWatch reports that
        self.reason = reason
        self.out.write(f"the denoiser stopped answering ({reason}); exiting so that a supervisor restarts vdiff\n")
        self.out.flush()
        # new requests 503; the ones in flight were just ended and get a moment to say so
        self.server.drain.begin(ABORT_GRACE_S)


def run_stack(triton: TritonProcess, server: ProxyServer, url: str, out: TextIO = sys.stderr) -> int:
    watch = TritonWatch(triton, server, url, out)
    watch.start()
    death = BackendDeath(triton, server, out)
    if server.backend_watch is not None:
        server.backend_watch.listeners.append(death)
    timeout = triton.config.exit_timeout_s
    with stop_on_signals(server, f"\nstopping: draining requests in flight (up to {timeout} s)"):
        try:
            server.run()
        finally:  # also when uvicorn could not bind its port and exits
            wait_s = DEAD_BACKEND_STOP_S if death.reason else timeout + KILL_GRACE_S
            code = _stop_triton(triton, wait_s)
    if death.reason is not None:
        out.write(f"\ntritonserver's last lines (full log: {triton.log_path}):\n")
        out.write(triton.last_lines() + "\n")
        return BACKEND_FAILED_EXIT
    if watch.died or code not in (0, None):
        out.write(f"\ntritonserver exited with code {code}; its last lines (full log: {triton.log_path}):\n")
        out.write(triton.last_lines() + "\n")
        return BACKEND_FAILED_EXIT
    return 0


def _stop_triton(triton: TritonProcess, wait_s: int) -> int:
    triton.stop()
    try:
        return triton.wait(wait_s)
    except subprocess.TimeoutExpired:  # still draining past its own timeout: end it
        triton.process.kill()
        return triton.wait()
