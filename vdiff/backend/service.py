"""The denoising service: one Engine on a background thread, fed by Triton's execute().

`submit()` only checks capacity and enqueues, so execute() returns at once and Triton keeps handing
over requests. The engine thread loops: take new requests, stop orders and cancellations, run one
engine step for every running request (continuous batching), and hand each request's news to the
Responder, whose thread does the sending and the cancellation polling (Triton's calls block on
IPC; see responder.py). Capacity is `max_num_seqs` running plus `max_queue_size` waiting; past it
`submit` raises UNAVAILABLE at once, because the queue of a model whose execute() hands work to a
thread never fills (Triton's own max_queue_size cannot act).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from vdiff.backend.inputs import StreamOptions, name_inputs
from vdiff.backend.metrics import ServiceMetrics
from vdiff.backend.responder import Responder, Sink, Update
from vdiff.canvas_stream import CanvasEvent
from vdiff.engine import Admitted, Engine
from vdiff.outputs import RequestOutput
from vdiff.sampling_params import SamplingParams
from vdiff_client.codes import ErrorCode

logger = logging.getLogger("vdiff.backend")

ABANDON_GRACE_S = 5.0


class ServiceError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Stream:
    key: str
    client_id: str
    admitted: Admitted  # the engine's checks passed on Triton's thread: not run again on the engine's
    prompt_text: str
    options: StreamOptions
    sink: Sink
    arrived: float = field(default_factory=time.perf_counter)
    sent_chars: int = 0
    sent_tokens: int = 0
    first_token_at: float | None = None
    echoed: bool = False
    cancelled: bool = False  # the client went away: end with CANCELLED
    broken: bool = False  # its sender failed: end without another response
    canvas: list[CanvasEvent] = field(default_factory=list)  # canvas events not yet sent


@dataclass(frozen=True)
class Add:
    """A new request for the engine."""

    stream: Stream


@dataclass(frozen=True)
class Stop:
    """A stop order: end every request whose service key or client request id is `request_id`."""

    request_id: str


@dataclass(frozen=True)
class Cancelled:
    """The client of the request `key` went away: end it with CANCELLED."""

    key: str


@dataclass(frozen=True)
class Broken:
    """The sender of the request `key` failed: end it without another response."""

    key: str


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look again: shutdown started."""


@dataclass(frozen=True)
class Abandon:
    """Shutdown's grace is over: end every request in flight."""


Message = Add | Stop | Cancelled | Broken | Wake | Abandon  # what the engine thread's inbox carries


class DenoiseService:
    def __init__(self, engine: Engine, max_queue_size: int, metrics: ServiceMetrics | None = None) -> None:
        if max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {max_queue_size}")
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_queue_size
        self.metrics = metrics or ServiceMetrics()
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._streams: dict[str, Stream] = {}  # owned by the engine thread
        self._in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._keys = itertools.count()
        self._thread = threading.Thread(target=self._run, name="vdiff-engine", daemon=True)
        self._responder = Responder(
            on_cancelled=lambda key: self._inbox.put(Cancelled(key)),
            on_broken=lambda key: self._inbox.put(Broken(key)),
            metrics=self.metrics,
        )

    def start(self) -> None:
        self._responder.start()
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Both threads run: requests can be taken, stepped and answered."""
        return self._thread.is_alive() and self._responder.alive

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(
        self,
        client_id: str,
        prompt_ids: list[int],
        prompt_text: str,
        params: SamplingParams,
        options: StreamOptions,
        sink: Sink,
    ) -> str:
        """Hand a request to the engine thread; raises ServiceError when it is invalid, full or closing.

        The engine's checks run here, on the caller's thread, so a request the engine would refuse
        is answered at once, however long the step in flight takes.
        """
        try:
            admitted = self.engine.check_request(prompt_ids, params)
        except ValueError as error:
            raise ServiceError(ErrorCode.INVALID_INPUT, name_inputs(str(error))) from None
        with self._lock:
            if self._closing.is_set():
                raise ServiceError(ErrorCode.SHUTDOWN, "the server is shutting down; retry on another replica")
            if self._in_flight >= self.capacity:
                raise ServiceError(
                    ErrorCode.CAPACITY,
                    f"the server is at capacity ({self._in_flight} requests in flight: max_num_seqs "
                    f"{self.engine.config.max_num_seqs} running plus max_queue_size "
                    f"{self.capacity - self.engine.config.max_num_seqs} waiting); retry later",
                )
            self._in_flight += 1
            key = f"vdiff-{next(self._keys)}"
        self._inbox.put(Add(Stream(key, client_id, admitted, prompt_text, options, sink)))
        return key

    def stop(self, request_id: str) -> None:
        """End every request whose service key or client request id is `request_id`, at the next step."""
        self._inbox.put(Stop(request_id))

    def shutdown(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for up to `timeout` seconds, end the rest.

        Bounded: past the timeout the remaining requests get an error, and the threads (daemons)
        get a few seconds to hand it over; a server that no longer reads cannot hold unloading up.
        """
        self._closing.set()
        self._inbox.put(Wake())
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._inbox.put(Abandon())
            self._thread.join(ABANDON_GRACE_S)
        self._responder.stop(ABANDON_GRACE_S)

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        abandon = False
        while True:
            try:
                abandon |= self._take_messages(block=not self.engine.has_unfinished())
                if abandon:
                    self._end_all(ErrorCode.SHUTDOWN, "the server shut down before the request finished")
                if self._closing.is_set() and not self._streams and self._inbox.empty():
                    return
                if self.engine.has_unfinished():
                    self._step()
            except Exception:  # the thread must outlive any one failure, or every later request hangs
                logger.exception("denoising service failed; ending every request in flight")
                self._end_all(ErrorCode.INTERNAL, "the denoising service failed (see the server log)")

    def _take_messages(self, block: bool) -> bool:
        """Apply queued requests, stop orders, cancellations and broken senders; True when told to abandon."""
        abandon = False
        try:
            message = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            while True:
                abandon |= self._apply(message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            return abandon

    def _apply(self, message: Message) -> bool:
        """Act on one message; True when it says to abandon the requests in flight."""
        match message:
            case Add(stream):
                self._add(stream)
            case Stop(request_id):
                self._stop(request_id)
            case Cancelled(key):
                self._cancel(key)
            case Broken(key):
                self._drop_broken(key)
            case Abandon():
                return True
        return False

    def _add(self, stream: Stream) -> None:
        try:
            self.engine.add_admitted(stream.admitted, request_id=stream.key, arrival_time=stream.arrived)
        except ValueError as error:
            self._refuse(stream, ErrorCode.INVALID_INPUT, name_inputs(str(error)))
            return
        except Exception:
            logger.exception("could not add request %s", stream.key)
            self._refuse(stream, ErrorCode.INTERNAL, "the engine could not take the request (see the server log)")
            return
        self._streams[stream.key] = stream
        self._responder.watch(stream.key, stream.sink)
        self._report_queue()

    def _refuse(self, stream: Stream, code: ErrorCode, message: str) -> None:
        self._release(stream)
        self._responder.fail(stream.key, stream.sink, code, message)

    def _stop(self, request_id: str) -> None:
        for stream in list(self._streams.values()):
            if request_id in (stream.key, stream.client_id):
                self.engine.abort(stream.key)

    def _cancel(self, key: str) -> None:
        stream = self._streams.get(key)
        if stream is not None and not stream.cancelled:
            stream.cancelled = True
            self.engine.abort(key)

    def _drop_broken(self, key: str) -> None:
        stream = self._streams.get(key)
        if stream is not None:
            stream.broken = True
            self.engine.abort(key)

    def _step(self) -> None:
        computing = bool(self.engine.scheduler.has_unfinished())
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; ending every request in flight")
            self._end_all(ErrorCode.INTERNAL, "the engine failed during a denoising step (see the server log)")
            return
        if computing:
            self.metrics.step(time.perf_counter() - started)
        for output in outputs:
            self._deliver(output)
        self._report_queue()

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        now = time.perf_counter()
        if output.new_token_ids:
            self.metrics.tokens(len(output.new_token_ids))
            if stream.first_token_at is None:
                stream.first_token_at = now
                self.metrics.first_token(now - stream.arrived)
        if output.finished:
            self._release(stream)
            prompt_tokens = len(stream.admitted.prompt_ids)
            self.metrics.finished(prompt_tokens, output.nfe, len(output.token_ids), now - stream.arrived)
        stream.canvas.extend(output.canvas)  # a whole (not streamed) response carries every step
        if stream.broken:
            return
        if stream.cancelled:
            if output.finished:
                self._responder.fail(stream.key, stream.sink, ErrorCode.CANCELLED, "the request was cancelled")
            return
        if stream.options.stream or output.finished:
            self._responder.send(stream.key, stream.sink, self._update(stream, output), output.finished)

    def _update(self, stream: Stream, output: RequestOutput) -> Update:
        echo = stream.prompt_text if stream.options.echo and not stream.echoed else ""
        stream.echoed = True
        update = Update(
            key=stream.key,
            token_ids=output.token_ids[stream.sent_tokens :],
            text=echo + output.text[stream.sent_chars :],
            prompt_tokens=len(stream.admitted.prompt_ids),
            step_index=output.nfe,
            queue_time=-1.0 if output.queue_time is None else output.queue_time,
            finish_reason=output.finish_reason or "",
            stop_reason=json.dumps(output.stop_reason) if output.finished else "",
            canvas=tuple(stream.canvas),
        )
        stream.canvas.clear()
        stream.sent_chars, stream.sent_tokens = len(output.text), len(output.token_ids)
        return update

    def _release(self, stream: Stream) -> None:
        self._streams.pop(stream.key, None)
        with self._lock:
            self._in_flight -= 1

    def _end_all(self, code: ErrorCode, message: str) -> None:
        for stream in list(self._streams.values()):
            self.engine.abort(stream.key)
            self._release(stream)
            self._responder.fail(stream.key, stream.sink, code, message)
        self._report_queue()

    def _report_queue(self) -> None:
        running = len(self.engine.scheduler.running)
        self.metrics.queue(running, max(0, self._in_flight - running))
