"""One HTTP request's generation: n samples of each prompt, run side by side on Triton.

Choice `prompt_index * n + i` is one Triton request with its own id (`<request id>-<random>-<choice>`,
the id a stop order names). Their responses are merged in arrival order. Streaming answers start only
after the first response, so a full or refusing server still gets a proper status code (503, 400)
instead of an error inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vdiff_client.calls import Call
from vdiff_client.capacity import Reservation
from vdiff_client.codes import ErrorCode
from vdiff_client.errors import APIError
from vdiff_client.metrics import RequestTracker
from vdiff_client.ratelimit import TokenCharge
from vdiff_client.triton import Delta, TritonBackend, TritonRequestError

log = logging.getLogger(__name__)

Event = tuple[int, Delta]  # (choice index, response)
Item = tuple[int, Delta | None, TritonRequestError | None]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # what `echo` puts before the answer


@dataclass(frozen=True)
class Job:
    index: int
    request_id: str
    values: dict[str, Any]


@dataclass
class ChoiceResult:
    """A choice accumulated to its end (non-streaming answers)."""

    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    canvas: list[dict[str, Any]] | None = None  # with stream_canvas: every step's event

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        if delta.canvas:
            self.canvas = self.canvas or []
            self.canvas.extend(delta.canvas)
        self.completion_tokens += delta.new_tokens
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


class Generation:
    def __init__(
        self,
        backend: TritonBackend,
        jobs: list[Job],
        tracker: RequestTracker,
        call: Call,
        charge: TokenCharge,
        reservation: Reservation,
    ) -> None:
        self.backend = backend
        self.jobs = jobs
        self.tracker = tracker
        self.call = call  # its abort (the shutdown drain) ends the generation with a 503
        self.charge = charge  # the token budget it took; the unused part goes back at the end
        # its engine slots, released once its streams are cancelled: the stop orders are on their
        # way then, so the denoiser may still hold a slot for a step and refuse a newcomer (503)
        self.reservation = reservation
        self.completion_tokens = 0

    async def events(self) -> AsyncGenerator[Event, None]:
        """Every choice's responses as they arrive; an error ends it (as an APIError)."""
        queue: asyncio.Queue[Item] = asyncio.Queue()

        def aborted(message: str) -> None:
            queue.put_nowait((-1, None, TritonRequestError(self.call.abort_code, message)))

        unregister = self.call.on_abort(aborted)
        tasks = [asyncio.create_task(self._pump(job, queue)) for job in self.jobs]
        unfinished = len(tasks)
        try:
            while unfinished:
                index, delta, error = await queue.get()
                if error is not None:
                    self.tracker.on_error(error)
                    raise as_api_error(error)
                assert delta is not None
                self.tracker.on_delta(index, delta)
                self.completion_tokens += delta.new_tokens
                unfinished -= delta.finish_reason is not None
                yield index, delta
        finally:
            unregister()
            self.tracker.on_abort()
            self.charge.settle(self.completion_tokens)
            for task in tasks:  # one choice refused or failed: the others stop now too
                task.cancel()
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                self.reservation.release()

    async def _pump(self, job: Job, queue: asyncio.Queue[Item]) -> None:
        """One choice's responses into the queue; whatever goes wrong ends up there too (never a hang)."""
        try:
            async for delta in self.backend.generate(job.request_id, job.values):
                await queue.put((job.index, delta, None))
        except TritonRequestError as error:
            await queue.put((job.index, None, error))
        except Exception as error:
            log.exception("choice %s failed", job.request_id)
            failure = TritonRequestError(ErrorCode.INTERNAL, f"internal server error: {type(error).__name__}")
            await queue.put((job.index, None, failure))

    async def collect(self) -> list[ChoiceResult]:
        results = [ChoiceResult() for _ in self.jobs]
        async for index, delta in self.events():
            results[index].add(delta)
        return results

    async def started(self) -> AsyncIterator[Event]:
        """`events()` once the first response is in (raises its error before any byte is sent)."""
        events = self.events()
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise

        async def chained() -> AsyncIterator[Event]:
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()

        return chained()


def as_api_error(error: TritonRequestError) -> APIError:
    return APIError(error.status, error.message)


def make_jobs(request_id: str, prompts: list[Prompt], n: int, values_for: Any) -> list[Job]:
    """Jobs in OpenAI's choice order (`prompt_index * n + i`); values_for(prompt, i) gives the inputs.

    Triton ids get a random part: clients may reuse an X-Request-Id, and a stop order must end
    only this request's work.
    """
    unique = f"{request_id}-{secrets.token_hex(4)}"
    return [
        Job(p * n + i, f"{unique}-{p * n + i}", values_for(prompt, i))
        for p, prompt in enumerate(prompts)
        for i in range(n)
    ]
