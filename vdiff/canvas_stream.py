"""The canvas stream: what each denoising step did to a request's canvas, for those that ask.

A request with `SamplingParams(stream_canvas=True)` gets one `CanvasEvent` per denoising step it
takes part in: the positions the step committed (token id, text piece, the model's probability
of the token at that step), the span the step could commit in (the block, or APD's lookahead),
the masks left and the forwards so far; APD's steps also show the round's drafts and how many
were accepted. The first event also describes the canvas itself. Replaying the commits in order
over an all-masked canvas rebuilds the canvas the request ended with (`replay`).

Nothing here runs for a request without the option: the engine records events only for the
requests that asked, after the step's commits are applied, with one extra LM-head call on the
committed positions of those requests alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vdiff.canvas import Commits
from vdiff.decoding.ops import Candidates
from vdiff.request import Request
from vdiff.runner import StepBatch
from vdiff.tokenizer import Tokenizer


@dataclass(frozen=True)
class CanvasStart:
    """The canvas a request starts from: its prompt, then `length - prompt_len` masks."""

    prompt_len: int
    length: int
    mask_id: int
    mask_text: str


@dataclass(frozen=True)
class Committed:
    """One position a step committed."""

    pos: int  # canvas position
    id: int
    text: str  # the token alone, special tokens spelled out
    conf: float  # the model's probability of this token at this step (guided, end bans applied)


@dataclass(frozen=True)
class Draft:
    """One token APD's round drafted (committed or not)."""

    pos: int
    id: int
    text: str


@dataclass(frozen=True)
class APDRound:
    drafts: tuple[Draft, ...]
    accepted: int  # the drafts' prefix the round committed


@dataclass(frozen=True)
class CanvasEvent:
    step: int  # the request's denoising step, from 1
    nfe: int  # forwards the request took part in so far
    masks: int  # generated positions still masked after this step
    span: tuple[int, int]  # [start, end): the canvas positions this step could commit
    commits: tuple[Committed, ...]
    start: CanvasStart | None = None  # on the request's first event only
    apd: APDRound | None = None  # on APD's steps only

    def to_json(self) -> dict[str, Any]:
        """The event as the APIs send it (the SSE `canvas` lists, Triton's `canvas_events`)."""
        event: dict[str, Any] = {
            "step": self.step,
            "nfe": self.nfe,
            "masks": self.masks,
            "span": list(self.span),
            "commits": [{"pos": c.pos, "id": c.id, "text": c.text, "conf": c.conf} for c in self.commits],
        }
        if self.start is not None:
            event["start"] = vars(self.start).copy()
        if self.apd is not None:
            drafts = [vars(d).copy() for d in self.apd.drafts]
            event["apd"] = {"drafts": drafts, "accepted": self.apd.accepted}
        return event


def replay(events: Iterable[dict[str, Any]]) -> list[int | None]:
    """The generated part of the canvas the events rebuild: token ids, the mask id where still
    masked (None before a first event says which id that is)."""
    canvas: list[int | None] = []
    prompt_len = 0
    for event in events:
        if "start" in event:
            start = event["start"]
            prompt_len = start["prompt_len"]
            canvas = [start["mask_id"]] * (start["length"] - prompt_len)
        for commit in event["commits"]:
            canvas[commit["pos"] - prompt_len] = commit["id"]
    return canvas


class CanvasRecorder:
    """Builds the step's events for the requests that stream their canvas."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}  # token id -> its text piece

    def spans(self, requests: Sequence[Request]) -> dict[int, tuple[int, int]]:
        """Batch row -> the span each streaming request's next step may commit in (read before the
        strategies advance their schedules)."""
        return {row: r.strategy.span(r) for row, r in enumerate(requests) if r.params.stream_canvas}

    @torch.inference_mode()
    def record(self, batch: StepBatch, spans: dict[int, tuple[int, int]], commits: Commits) -> None:
        """Append this step's event to each streaming request's `canvas_events`."""
        if not spans:
            return
        rows, cols, tokens = _commits_of(commits, sorted(spans))
        confidences = self._confidences(batch, rows, cols, tokens)
        by_row: dict[int, list[Committed]] = {row: [] for row in spans}
        for row, col, token, conf in zip(rows.tolist(), cols.tolist(), tokens.tolist(), confidences, strict=True):
            by_row[row].append(Committed(col, token, self.text(token), conf))
        for row, span in spans.items():
            request = batch.requests[row]
            request.canvas_events.append(self._event(request, span, tuple(by_row[row])))

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _event(self, request: Request, span: tuple[int, int], commits: tuple[Committed, ...]) -> CanvasEvent:
        request.canvas_steps += 1
        start = None
        if request.canvas_steps == 1:
            mask = request.mask_id
            start = CanvasStart(request.prompt_len, request.canvas_len, mask, self.text(mask))
        drafts = request.strategy.drafts(request)
        apd = None
        if drafts is not None:
            first, ids = drafts
            accepted = len(commits)
            apd = APDRound(tuple(Draft(first + i, t, self.text(t)) for i, t in enumerate(ids)), accepted)
        masks = request.answer.count(request.mask_id)
        return CanvasEvent(request.canvas_steps, request.nfe, masks, span, commits, start, apd)

    def _confidences(self, batch: StepBatch, rows: Tensor, cols: Tensor, tokens: Tensor) -> list[float]:
        """The model's probability of each committed token, from this step's forward."""
        if not len(rows):
            return []
        order = rows.tolist()
        counts = Counter(order)  # batch row -> its commits; rows come sorted, so in order
        members = list(counts)
        index = {row: i for i, row in enumerate(members)}
        group = torch.tensor([index[r] for r in order], device=rows.device)
        requests = [batch.requests[r] for r in members]
        candidates = Candidates(requests, members, rows, group, cols, [counts[r] for r in members])
        probs = torch.softmax(batch.logits_at(candidates).float(), dim=-1)  # (N, V)
        return probs[torch.arange(len(tokens), device=probs.device), tokens].tolist()


def _commits_of(commits: Commits, rows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The commits in batch `rows`, ordered by row, then position."""
    keep = torch.isin(commits.rows, torch.tensor(rows, device=commits.rows.device))
    picked_rows, cols, tokens = commits.rows[keep], commits.cols[keep], commits.tokens[keep]
    order = torch.argsort(picked_rows * (int(cols.max()) + 1 if len(cols) else 1) + cols)
    return picked_rows[order], cols[order], tokens[order]
