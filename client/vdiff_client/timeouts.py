"""Deadlines for clients that start a request and never finish it.

uvicorn times out only an idle kept-alive connection, and only once a response was sent on it: a
connection that opens and sends nothing, part of a request head, or part of a body is held for
as long as the client keeps it open, and a stalled body is a call the drain waits for. So:
- the request head (request line and headers) must be complete within `header_timeout_s` of the
  connection opening, or of the first byte of a later request on a kept-alive connection
  (`HeaderTimeoutH11Protocol`; uvicorn's keep-alive timer still bounds the idle time between
  requests). Past it the connection is closed, after a 408 if part of a head had arrived;
- the body must be complete within `body_timeout_s` of the head (`BodyReadTimeout`). Past it the
  client gets 408 and the connection is closed, and the application sees the client gone, so its
  call ends and a drain never waits for a body that is not coming;
- a response that starts before its request's body was read in full closes the connection, so
  the rest of that body is never waited for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from vdiff_client.errors import APIError
from vdiff_client.limits import declared_length

DEFAULT_KEEP_ALIVE_S = 5  # vLLM's
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
CLOSE = (b"connection", b"close")
HEAD_TIMEOUT_MESSAGE = b"the request headers did not arrive in time"
HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(HEAD_TIMEOUT_MESSAGE), HEAD_TIMEOUT_MESSAGE)
)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head.

    h11 is chosen on purpose: uvicorn's "auto" would take httptools where it is installed, and
    neither the deadline nor --h11-max-incomplete-event-size would apply there.
    """

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends a byte is held too

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head():
            self._arm_head_timer()
        super().data_received(data)
        if not self._awaiting_head():
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined head that arrived in part is waited for without another data_received
        if self._awaiting_head() and self.conn.trailing_data[0]:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _arm_head_timer(self) -> None:
        if self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: tell the client why it ends
            self.transport.write(HEAD_TIMEOUT_RESPONSE)
        self.transport.close()


def h11_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with this head deadline."""

    class Protocol(HeaderTimeoutH11Protocol):
        pass

    Protocol.header_timeout_s = header_timeout_s
    return Protocol


class BodyReadTimeout:
    """408 and a closed connection for a body not complete within `timeout_s` of its head."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read = BodyRead(scope, receive, send, self.timeout_s)
        await self.app(scope, read.receive, read.send)


def expects_body(scope: Scope) -> bool:
    chunked = any(name == b"transfer-encoding" for name, _ in scope["headers"])
    return chunked or declared_length(scope) > 0


class BodyRead:
    """One request's `receive` with a deadline until the last body chunk, and its `send`."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, timeout_s: float) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.timeout_s = timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.body_complete = not expects_body(scope)
        self.timed_out = False
        self.response_started = False
        self.answered_408 = False

    async def receive(self) -> Message:
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.body_complete:
            return await self._receive()  # past the body: waiting for a disconnect is not a stall
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            await self._time_out()
            return {"type": "http.disconnect"}
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_complete = True
        return message

    async def send(self, message: Message) -> None:
        if self.answered_408:
            return  # the application's own answer comes too late
        if message["type"] == "http.response.start":
            self.response_started = True
            if not self.body_complete:  # never wait for the rest of a body nobody reads
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
        await self._send(message)

    async def _time_out(self) -> None:
        self.timed_out = True
        if self.response_started:
            return  # its headers said close; the connection ends with the response
        self.answered_408 = True
        error = APIError(408, f"the request body did not arrive within {self.timeout_s:g} s")
        response = error.response()
        response.headers["connection"] = "close"
        await response(self.scope, self._receive, self._send)
