"""One HTTP request's generation: n samples of each prompt, run side by side on Triton.

Choice `prompt_index * n + i` is one Triton request with its own id (`<request id>-<random>-<choice>`,
the id a stop order names). Their responses are merged in arrival order. Streaming answers start only
after the first response, so a full or refusing server still gets a proper status code (503, 400)
instead of an error inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vdiff_client.errors import APIError
from vdiff_client.metrics import RequestTracker
from vdiff_client.triton import Delta, TritonBackend, TritonRequestError

Event = tuple[int, Delta]  # (choice index, response)


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

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        self.completion_tokens += delta.new_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class Generation:
    def __init__(self, backend: TritonBackend, jobs: list[Job], tracker: RequestTracker) -> None:
        self.backend = backend
        self.jobs = jobs
        self.tracker = tracker

    async def events(self) -> AsyncGenerator[Event, None]:
        """Every choice's responses as they arrive; TritonRequestError ends it (as an APIError)."""
        queue: asyncio.Queue[tuple[int, Delta | None, TritonRequestError | None]] = asyncio.Queue()

        async def pump(job: Job) -> None:
            try:
                async for delta in self.backend.generate(job.request_id, job.values):
                    await queue.put((job.index, delta, None))
            except TritonRequestError as error:
                await queue.put((job.index, None, error))

        tasks = [asyncio.create_task(pump(job)) for job in self.jobs]
        unfinished = len(tasks)
        try:
            while unfinished:
                index, delta, error = await queue.get()
                if error is not None:
                    raise as_api_error(error)
                assert delta is not None
                self.tracker.on_delta(index, delta)
                unfinished -= delta.finish_reason is not None
                yield index, delta
        finally:
            self.tracker.on_abort()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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
