"""The service's I/O thread: sends responses, polls cancellation, flushes metrics, off the engine thread.

Every call into Triton's Python backend crosses a process boundary. Measured in the denoiser under
load (cProfile, 16 streams): a response send took 0.76 ms, an `is_cancelled()` 0.11 ms and a metric
update 0.2 ms, together as long as the forward passes themselves. These calls release the GIL
while they wait, so on a thread of their own they overlap with the next engine step. One thread
sends everything, so each request's responses keep their order. When the sends fall behind the
steps (many requests in flight), a request's queued responses go out as one: their deltas joined,
so a client reads the same text in fewer, larger pieces and the sends keep up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, cast

from vdiff.backend.metrics import ServiceMetrics
from vdiff.canvas_stream import CanvasEvent
from vdiff_client.codes import ErrorCode

logger = logging.getLogger("vdiff.backend")

CANCEL_POLL_S = 0.005  # a cancelled request is noticed within this, then leaves before the next step
METRICS_FLUSH_S = 0.25


@dataclass(frozen=True)
class Update:
    """One response: the tokens that became final since the last one, and their text."""

    key: str  # the service's id of the request; a stop order with it ends the request
    token_ids: list[int]  # the ids whose text is in `text`
    text: str  # the new text (after the echoed prompt, in the first response of an echo request)
    prompt_tokens: int
    step_index: int  # the request's forward evaluations so far
    queue_time: float  # seconds from arrival to the first denoising step; -1: it never ran
    finish_reason: str  # "" until the last response: stop, length or abort
    # "" until the last response, then vLLM's stop_reason as JSON: null (EOS, length, abort), the
    # stop token id, or the stop string that ended it
    stop_reason: str = ""
    # with stream_canvas: the denoising steps since the last response (vdiff/canvas_stream.py)
    canvas: tuple[CanvasEvent, ...] = ()


class Sink(Protocol):
    """Where a request's responses go (Triton's response sender, in the model)."""

    def send(self, update: Update, final: bool) -> None: ...

    def fail(self, code: ErrorCode, message: str) -> None: ...  # an error response that ends the stream

    def is_cancelled(self) -> bool: ...


@dataclass(frozen=True)
class Watch:
    """Poll the request's cancellation until its last response is sent."""

    key: str
    sink: Sink


@dataclass(frozen=True)
class Send:
    key: str
    sink: Sink
    update: Update
    final: bool


@dataclass(frozen=True)
class Fail:
    """An error response that ends the request."""

    key: str
    sink: Sink
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Close:
    """Send what is queued, then end the thread."""


Outgoing = Watch | Send | Fail | Close  # what the responder's outbox carries


class Responder:
    def __init__(
        self,
        on_cancelled: Callable[[str], None],
        on_broken: Callable[[str], None],
        metrics: ServiceMetrics,
    ) -> None:
        self._on_cancelled = on_cancelled  # told once per cancelled request (from this thread)
        self._on_broken = on_broken  # told when a request's sender failed
        self._metrics = metrics
        self._outbox: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self._watched: dict[str, Sink] = {}  # key -> sink, owned by this thread
        self._thread = threading.Thread(target=self._run, name="vdiff-responder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def watch(self, key: str, sink: Sink) -> None:
        """Poll this request's cancellation until its last response is sent."""
        self._outbox.put(Watch(key, sink))

    def send(self, key: str, sink: Sink, update: Update, final: bool) -> None:
        self._outbox.put(Send(key, sink, update, final))

    def fail(self, key: str, sink: Sink, code: ErrorCode, message: str) -> None:
        """An error response that ends the request."""
        self._outbox.put(Fail(key, sink, code, message))

    def stop(self, timeout: float) -> None:
        """Send what is queued, then end the thread (waiting at most `timeout` seconds)."""
        self._outbox.put(Close())
        self._thread.join(timeout)

    def _run(self) -> None:
        next_poll = next_flush = time.monotonic()
        while True:
            for message in coalesced(self._take()):
                if isinstance(message, Close):
                    self._metrics.flush()
                    return
                self._handle(message)
            now = time.monotonic()
            if now >= next_poll:
                self._poll_cancellation()
                next_poll = now + CANCEL_POLL_S
            if now >= next_flush:
                self._metrics.flush()
                next_flush = now + METRICS_FLUSH_S

    def _take(self) -> list[Outgoing]:
        """Everything queued, waiting up to CANCEL_POLL_S for the first."""
        taken: list[Outgoing] = []
        try:
            taken.append(self._outbox.get(timeout=CANCEL_POLL_S))
            while True:
                taken.append(self._outbox.get_nowait())
        except queue.Empty:
            return taken

    def _handle(self, message: Watch | Send | Fail) -> None:
        if isinstance(message, Watch):
            self._watched[message.key] = message.sink
            return
        if isinstance(message, Fail) or message.final:
            self._watched.pop(message.key, None)
        try:
            if isinstance(message, Fail):
                message.sink.fail(message.code, message.message)
            else:
                message.sink.send(message.update, message.final)
        except Exception:  # this request's sender is broken; the others go on
            logger.exception("could not send a response for %s; ending it", message.key)
            self._watched.pop(message.key, None)
            self._on_broken(message.key)

    def _poll_cancellation(self) -> None:
        for key, sink in list(self._watched.items()):
            try:
                cancelled = sink.is_cancelled()
            except Exception:
                logger.exception("could not ask whether %s was cancelled", key)
                cancelled = True
            if cancelled:
                del self._watched[key]
                self._on_cancelled(key)


def coalesced(messages: list[Outgoing]) -> list[Outgoing]:
    """The messages in order, each request's sends that follow one another joined into one."""
    out: list[Outgoing] = []
    open_send: dict[str, int] = {}  # key -> index in `out` of its send still open to more
    for message in messages:
        if isinstance(message, Send):
            index = open_send.get(message.key)
            if index is not None:
                out[index] = joined(cast(Send, out[index]), message)
                continue
            open_send[message.key] = len(out)
        elif isinstance(message, Fail):
            open_send.pop(message.key, None)
        out.append(message)
    return out


def joined(first: Send, then: Send) -> Send:
    """One response carrying both: the deltas in order, the later counts and finish."""
    a, b = first.update, then.update
    queue_time = a.queue_time if a.queue_time >= 0 else b.queue_time
    update = replace(
        b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text, queue_time=queue_time, canvas=a.canvas + b.canvas
    )
    return Send(first.key, first.sink, update, then.final)
