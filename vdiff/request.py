"""The one object that carries a request from admission to its last output.

The scheduler moves it between queues, the runner reads its canvas, its decoding strategy
commits tokens and advances its schedule, the engine reports what became final. Nothing else
travels between them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vdiff.kv_cache import RequestKV
from vdiff.sampling_params import SamplingParams

if TYPE_CHECKING:
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
    canvas: Tensor  # (P + G,) long: the prompt, then G generated positions holding the mask id until committed
    generator: torch.Generator  # per-request RNG: results do not depend on the other requests in the batch
    stop_ids: frozenset[int]  # token ids that end the answer (EOS, end of turn, stop_token_ids)
    mask_id: int
    arrival_time: float = 0.0  # time.perf_counter() when it reached the engine (or its server)
    scheduled_time: float | None = None  # when the scheduler admitted it to the running batch

    # the strategy's own progress (set at admission), and what the engine and runner read of it
    state: StrategyState | None = None
    schedule_done: bool = False  # every generated position is final
    kv: RequestKV | None = None  # keys and values of the canvas, for strategies that keep them

    # the generated positions as a Python list (mask id until committed), so that finding the
    # stable prefix and reading new tokens costs no tensor op
    answer: list[int] = field(default_factory=list)
    stable: int = 0  # generated positions before the first still-masked one

    # progress, advanced by the engine
    output_ids: list[int] = field(default_factory=list)  # final tokens reported so far
    text: str = ""
    nfe: int = 0  # forward passes this request took part in
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def __post_init__(self) -> None:
        self.answer = self.canvas[self.prompt_len :].tolist()

    def record(self, positions: list[int], tokens: list[int]) -> None:
        """Mirror tokens just committed at canvas positions on the answer list."""
        for position, token in zip(positions, tokens, strict=True):
            self.answer[position - self.prompt_len] = token

    def final_length(self) -> int:
        """Generated positions that can no longer change: those before the first mask, or all once the schedule ends."""
        if self.schedule_done:
            return self.gen_length
        while self.stable < self.gen_length and self.answer[self.stable] != self.mask_id:
            self.stable += 1
        return self.stable

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def canvas_len(self) -> int:
        return int(self.canvas.shape[0])

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
