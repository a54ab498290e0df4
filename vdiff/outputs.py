"""What the engine reports: one RequestOutput per request per step, and the offline API's result."""

from __future__ import annotations

from dataclasses import dataclass

from vdiff.canvas_stream import CanvasEvent
from vdiff.request import FinishReason


@dataclass(frozen=True)
class RequestOutput:
    """A step's news for one request: the tokens that became final (the stable prefix grew)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # what `text` gained since the request's previous output
    token_ids: list[int]  # every final generated token so far
    text: str  # detokenised token_ids, cut before a stop string (a prefix of it while unfinished)
    nfe: int
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    queue_time: float | None = None  # seconds from arrival to the first denoising step; None: never ran
    canvas: tuple[CanvasEvent, ...] = ()  # with stream_canvas: the steps since the previous output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationOutput:
    """One finished prompt of `LLM.generate`; `.outputs[0]` is itself, for code written against vLLM."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # up to and including the token that stopped it
    finish_reason: FinishReason
    nfe: int
    stop_reason: int | str | None = None
    canvas: tuple[CanvasEvent, ...] = ()  # with stream_canvas: every step's event, in order

    @property
    def outputs(self) -> list[GenerationOutput]:
        return [self]
