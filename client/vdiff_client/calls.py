"""The generation calls in flight, and the drain that ends them on shutdown.

Every /v1 request is a `Call` from the moment it arrives until its last byte is sent (a stream
included), so the drain knows exactly what is in flight. On SIGTERM the drain:
1. refuses new /v1 requests (503 + Retry-After) and turns /health to 503, so load balancers stop
   sending traffic while the port stays open;
2. waits up to the shutdown timeout for the calls in flight to finish;
3. aborts the rest: their generations end with a 503 error (an error event then `[DONE]` for a
   stream) and their Triton requests are stopped;
4. tells the owner (`on_drained`) to stop the HTTP server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from vdiff_client.codes import ErrorCode
from vdiff_client.errors import APIError

log = logging.getLogger(__name__)

ABORT_GRACE_S = 5.0  # for aborted calls to send their last event
POLL_S = 0.05


def route_path(scope: Scope) -> str:
    """The request path without the server's --root-path."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def bearer_token(scope: Scope) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, if there is one."""
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return token if scheme.lower() == "bearer" else None


@dataclass(eq=False)
class Call:
    """One /v1 request: whose budget it uses and how to abort it."""

    client: str = "addr:?"
    abort_message: str = ""
    abort_code: ErrorCode = ErrorCode.SHUTDOWN  # why: shutdown, or unavailable (the backend died)
    _abort_hooks: list[Callable[[str], None]] = field(default_factory=list)

    def abort(self, message: str, code: ErrorCode = ErrorCode.SHUTDOWN) -> None:
        self.abort_message, self.abort_code = message, code
        for hook in list(self._abort_hooks):
            hook(message)

    def on_abort(self, hook: Callable[[str], None]) -> Callable[[], None]:
        """Run `hook(message)` on abort (at once if already aborted); returns the unregistration."""
        if self.abort_message:
            hook(self.abort_message)
        self._abort_hooks.append(hook)
        return lambda: self._abort_hooks.remove(hook)


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.calls: set[Call] = set()
        self.draining = False
        self.on_drained: Callable[[], None] = lambda: None
        # why the backend is known dead (None while it answers): new calls are refused meanwhile
        self.backend_failure: Callable[[], str | None] = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The server's loop (the drain runs there; signals arrive on the main thread)."""
        self._loop = loop

    def begin_threadsafe(self) -> None:
        if self._loop is None or self._loop.is_closed():
            self.on_drained()  # not serving yet: nothing to drain
            return
        self._loop.call_soon_threadsafe(self.begin)

    def begin(self, timeout_s: float | None = None) -> None:
        """Start draining; `timeout_s` (default: the shutdown timeout) for the calls in flight."""
        if self.draining:
            return
        self.draining = True
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        self._task = asyncio.get_running_loop().create_task(self._drain(wait_s))

    async def _drain(self, timeout_s: float) -> None:
        log.info("[shutdown] refusing new requests; %d in flight get up to %g s", len(self.calls), timeout_s)
        if not await self._wait_idle(timeout_s):
            log.warning("[shutdown] shutdown timeout reached: aborting %d requests in flight", len(self.calls))
            message = f"the server is shutting down: the request was aborted after the {timeout_s:g} s drain"
            for call in list(self.calls):
                call.abort(message)
            await self._wait_idle(ABORT_GRACE_S)
        log.info("[shutdown] drained; stopping the HTTP server")
        self.on_drained()

    def abort_all(self, reason: str) -> None:
        """End every call in flight with a 503: the backend they wait on is gone."""
        if self.calls:
            log.warning("ending %d requests in flight: %s", len(self.calls), reason)
        for call in list(self.calls):
            message = f"the inference backend stopped answering ({reason}); retry later"
            call.abort(message, ErrorCode.UNAVAILABLE)

    async def _wait_idle(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.calls and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        return not self.calls


class DrainMiddleware:
    """Tracks /v1 calls for the drain and refuses new ones while it runs."""

    def __init__(self, app: ASGIApp, drain: Drain, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.drain = drain
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith("/v1"):
            await self.app(scope, receive, send)
            return
        error = self._refusal()
        if error is not None:
            await error.response()(scope, receive, send)
            return
        call = Call()
        scope.setdefault("state", {})["call"] = call
        self.drain.calls.add(call)
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.calls.discard(call)

    def _refusal(self) -> APIError | None:
        if self.drain.draining:
            self.on_reject(ErrorCode.SHUTDOWN.value)
            return APIError(503, "the server is shutting down; retry on another replica")
        failure = self.drain.backend_failure()
        if failure is not None:
            self.on_reject(ErrorCode.UNAVAILABLE.value)
            return APIError(503, f"the inference backend is not answering ({failure}); retry later")
        return None
