"""Every running request's canvas: one row of one device buffer, and the commits that change it.

A request gets a slot when it starts to run. `Request.canvas` is then a view of that row, so there
is one copy of each canvas; the runner gathers the rows of a step into its (B, L) batch (a lone
request's row is used in place). Decoding strategies never write a canvas: each returns its step's
`Commits` (batch row, canvas position, token), and the engine applies them all at once, writing
the buffer with one indexed store and mirroring them on each request's host-side answer list from
one device-to-host copy. The answer list is what the host reads afterwards (the stable prefix, stop
checks, the new tokens), without touching the device again.

Past its canvas a row holds the padding id, so the gathered rows are right-padded as the runner
needs. The buffer widens on demand (a model's maximum length may be far more than its requests
use), and re-points the views of the canvases it holds when it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vdiff.request import Request
from vdiff.tokenizer import SpecialTokens

MIN_WIDTH = 64  # the buffer's first width, in canvas positions; it doubles as canvases need


@dataclass(frozen=True)
class Commits:
    """Tokens a step commits: position `cols[i]` of the canvas in batch row `rows[i]` becomes `tokens[i]`."""

    rows: Tensor  # (N,) long
    cols: Tensor  # (N,) long
    tokens: Tensor  # (N,) long

    @classmethod
    def join(cls, parts: Sequence[Commits]) -> Commits:
        if len(parts) == 1:
            return parts[0]
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("rows", "cols", "tokens")))


class CanvasPool:
    # every method that writes the buffer runs in inference mode, so the buffer is an inference
    # tensor throughout: the engine steps in inference mode, and aborts arrive from outside it
    @torch.inference_mode()
    def __init__(self, slots: int, special: SpecialTokens, device: torch.device) -> None:
        self.mask_id = special.mask
        # padding is never attended to, but must not read as a mask where masks are counted
        self.pad_id = pad_id = special.pad if special.pad != special.mask else special.eos
        self.buffer = torch.full((slots, MIN_WIDTH), pad_id, dtype=torch.long, device=device)  # (slots, width)
        self._free = list(range(slots - 1, -1, -1))  # a stack: the lowest slot is taken first
        self._holders: dict[int, Request] = {}

    @torch.inference_mode()
    def place(self, request: Request) -> None:
        """Give a request that starts to run a slot holding its prompt, then masks."""
        assert request.slot is None, f"{request.request_id} already holds slot {request.slot}"
        self._widen(request.canvas_len)
        slot = self._free[-1]
        row = self.buffer[slot]
        row[: request.prompt_len] = torch.tensor(request.prompt_ids, dtype=torch.long)
        row[request.prompt_len : request.canvas_len] = self.mask_id
        self._free.pop()  # only once the row is written: a failure above loses no slot
        request.slot, self._holders[slot] = slot, request
        request.canvas = row[: request.canvas_len]

    @torch.inference_mode()
    def release(self, request: Request) -> None:
        """Free a request's slot; it keeps a copy of its last canvas."""
        slot = request.slot
        if slot is None:
            return
        request.canvas = request.canvas.clone()
        self.buffer[slot] = self.pad_id
        del self._holders[slot]
        request.slot = None
        self._free.append(slot)

    def rows(self, requests: Sequence[Request]) -> tuple[Tensor, Tensor]:
        """(B, L) the requests' canvases, right-padded to the longest, and (B,) their slots.

        A lone request's row is its canvas itself, not a copy.
        """
        slots = [r.slot for r in requests if r.slot is not None]
        assert len(slots) == len(requests), "every running request holds a slot"
        index = torch.tensor(slots, dtype=torch.long, device=self.buffer.device)
        longest = max(r.canvas_len for r in requests)
        if len(requests) == 1:
            return self.buffer[slots[0] : slots[0] + 1, :longest], index
        return self.buffer[:, :longest].index_select(0, index), index

    @torch.inference_mode()
    def apply(self, requests: Sequence[Request], slots: Tensor, commits: Commits) -> None:
        """Write a step's commits into the buffer, and onto each request's answer list."""
        if not len(commits.rows):
            return
        self.buffer.index_put_((slots[commits.rows], commits.cols), commits.tokens)
        rows, cols, tokens = torch.stack([commits.rows, commits.cols, commits.tokens]).tolist()  # the one copy
        for row, col, token in zip(rows, cols, tokens, strict=True):
            request = requests[row]
            request.answer[col - request.prompt_len] = token

    @torch.inference_mode()
    def _widen(self, length: int) -> None:
        width = self.buffer.shape[1]
        if length <= width:
            return
        wider = torch.full((self.buffer.shape[0], max(length, 2 * width)), self.pad_id, dtype=torch.long,
                           device=self.buffer.device)  # fmt: skip
        wider[:, :width] = self.buffer
        self.buffer = wider
        for slot, request in self._holders.items():
            request.canvas = wider[slot, : request.canvas_len]
