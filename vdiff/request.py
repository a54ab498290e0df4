"""The one object that carries a request from admission to its last output.

The scheduler moves it between queues, the runner reads its canvas, its decoding strategy
chooses the tokens to commit and advances its schedule, the engine applies the commits and
reports what became final. Nothing else travels between them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vdiff.detokenizer import IncrementalDetokenizer
from vdiff.kv_cache import RequestKV
from vdiff.sampling_params import SamplingParams

if TYPE_CHECKING:
    from vdiff.canvas_stream import CanvasEvent
    from vdiff.decoding.base import DecodingStrategy, StrategyState

FinishReason = Literal["stop", "length", "abort"]


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # resolved: every field the strategy reads is set
    strategy: DecodingStrategy
    canvas_len: int  # P + G: the prompt, then G generated positions
    generator: torch.Generator  # per-request RNG: results do not depend on the other requests in the batch
    stop_ids: frozenset[int]  # token ids that end the answer (EOS, end of turn, stop_token_ids)
    mask_id: int
    arrival_time: float = 0.0  # time.perf_counter() when it reached the engine (or its server)
    scheduled_time: float | None = None  # when the scheduler admitted it to the running batch

    # while it runs: its slot in the engine's CanvasPool, and the canvas there, a view of the slot's
    # row (P + G,) long holding the mask id at generated positions until committed; once it is
    # finished, a copy of its last canvas (vdiff/canvas.py)
    slot: int | None = None
    _canvas: Tensor | None = field(default=None, repr=False)

    # the strategy's own progress (set at admission), and what the engine and runner read of it
    state: StrategyState | None = None
    schedule_done: bool = False  # every generated position is final
    kv: RequestKV | None = None  # keys and values of the canvas, for strategies that keep them

    # the generated positions as a Python list (mask id until committed), mirrored from the
    # commits the engine applies: finding the stable prefix and new tokens costs no tensor op
    answer: list[int] = field(default_factory=list)
    stable: int = 0  # generated positions before the first still-masked one

    # progress, advanced by the engine
    output_ids: list[int] = field(default_factory=list)  # final tokens reported so far
    text: str = ""  # the reported text: a prefix of the final text, which only grows
    detokenizer: IncrementalDetokenizer = field(default_factory=IncrementalDetokenizer, repr=False)
    nfe: int = 0  # forward passes this request took part in
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    # with params.stream_canvas: the steps' events not yet reported, and the steps recorded
    canvas_events: list[CanvasEvent] = field(default_factory=list)
    canvas_steps: int = 0

    def __post_init__(self) -> None:
        self.answer = [self.mask_id] * self.gen_length

    def final_length(self) -> int:
        """Generated positions that can no longer change: those before the first mask, or all once the schedule ends."""
        if self.schedule_done:
            return self.gen_length
        while self.stable < self.gen_length and self.answer[self.stable] != self.mask_id:
            self.stable += 1
        return self.stable

    @property
    def canvas(self) -> Tensor:
        assert self._canvas is not None, f"request {self.request_id} has not run: it has no canvas"
        return self._canvas

    @canvas.setter
    def canvas(self, canvas: Tensor) -> None:
        self._canvas = canvas

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def gen_length(self) -> int:
        """Generated positions on the canvas; max_tokens rounded up to what the schedule needs."""
        return self.canvas_len - self.prompt_len

    @property
    def max_tokens(self) -> int:
        assert self.params.max_tokens is not None
        return self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        # the caches (keys and values, APD's verifier state) are the bulk of a request's memory
        self.kv = self.state = None
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
