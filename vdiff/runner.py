"""One forward pass for every running request: the only place requests become model tensors.

Canvases of different lengths, gathered from the engine's CanvasPool, are right-padded into one
(B, L) batch. Right padding keeps every canvas at positions 0..len-1, as when it runs alone, and
padding is masked on the key side only, so a request's logits do not depend on its neighbours
beyond floating-point reduction order. Classifier-free guidance adds one unconditional row (the
prompt masked out) per request that asks for it, in the same forward. When a request in the step
keeps a KV cache or feeds less than its canvas (APD's lookahead), each row feeds only the window
its strategy names, at its absolute positions, and attends to its cached canvas
(vdiff/kv_cache.py); logits then cover each row's window, and `offsets` say where it starts.

In batch-invariant mode (vdiff/models/invariant.py) every row is padded to whole tiles, the model
gets each row's real query and key lengths so that it attends one row at a time, and row-local
ops run on fixed tiles: a row's logits are then the bits it gets alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from vdiff.canvas import CanvasPool
from vdiff.decoding.ops import Candidates
from vdiff.kv_cache import BatchKV, RequestKV, Window
from vdiff.models.base import DiffusionLM, canvas_rows
from vdiff.models.invariant import RowTiles, padded_length
from vdiff.models.layers import AttentionMask
from vdiff.request import Request
from vdiff.tokenizer import SpecialTokens
from vdiff.verifier import Verifier

# On this CPU, float32 GEMMs of 1-3, 5-7 and 9-11 rows round differently from larger ones
# (measured: 4, 8 and 12 or more rows give the bits of a whole-canvas head), so the head on a
# few rows runs on at least this many and the published samplers' tokens stay exact.
MIN_HEAD_ROWS = 16


@dataclass
class StepBatch:
    requests: list[Request]
    # (B, L) the canvases as the step found them, right-padded: a copy gathered from the pool, or
    # for a lone request its pool row itself (which the engine's commits change after the step)
    input_ids: Tensor
    slots: Tensor  # (B,) each row's slot in the CanvasPool, where the engine applies commits
    # (R, Q, D) per row and query: the last hidden states (D = hidden size) when `head` is set,
    # else the logits (D = V); rows B.. are the CFG unconditional canvases
    outputs: Tensor
    logits_shift: int
    uncond_rows: list[int]  # per request: its unconditional row in `outputs`, or -1
    eos_id: int
    eot_id: int | None
    end_ids: Tensor  # (E,) what ignore_eos bans: EOS, end of turn, a pad id of its own
    offsets: Tensor | None = None  # (B,) canvas position of each row's first output; None: all 0
    verifier: Verifier | None = None  # the engine's autoregressive verifier (APD), if it has one
    head: Callable[[Tensor], Tensor] | None = None  # hidden states -> logits, on the rows read

    def logits_at(self, candidates: Candidates) -> Tensor:
        """(N, V) logits scoring each candidate position, guided, and with EOS (logits_eos_inf)
        or every end token (ignore_eos) banned as its request asks.

        With a head, it runs on these rows (and their CFG rows) only, in one call.
        """
        sources = canvas_rows(candidates.cols, self.logits_shift)
        if self.offsets is not None:
            sources = sources - self.offsets[candidates.batch_rows]
        width = self.outputs.shape[1]
        wanted = [candidates.batch_rows * width + sources]
        guided = []  # (candidates' slice, CFG scale) in the order their unconditional rows follow
        for g, request, seg in candidates.segments():
            if request.params.cfg_scale > 0:
                wanted.append(self.uncond_rows[candidates.rows[g]] * width + sources[seg])
                guided.append((seg, request.params.cfg_scale))
        logits = self._logits_of(torch.cat(wanted) if guided else wanted[0])
        out, start = logits[: len(sources)], len(sources)  # a fresh tensor the strategy may edit
        for seg, scale in guided:
            uncond = logits[start : start + seg.stop - seg.start]
            start += seg.stop - seg.start
            out[seg] = uncond + (scale + 1) * (out[seg] - uncond)
        self._ban_end_tokens(out, candidates)
        return out

    def _ban_end_tokens(self, logits: Tensor, candidates: Candidates) -> None:
        """-inf logits for the tokens a request may not propose: every choice (x0, drafts) is
        drawn from these rows, so a banned token never reaches the canvas."""
        ignore_eos = [r.params.ignore_eos for r in candidates.requests]
        if all(ignore_eos):  # the usual benchmark batch: one op for all
            logits[:, self.end_ids] = float("-inf")
            return
        for (_, request, seg), bans_all in zip(candidates.segments(), ignore_eos, strict=True):
            if bans_all:
                logits[seg, self.end_ids] = float("-inf")
            elif request.params.logits_eos_inf:
                logits[seg, self.eos_id] = float("-inf")

    def _logits_of(self, flat_rows: Tensor) -> Tensor:
        # index_select on the flat view is ~3x faster than 2-D indexing on CPU
        picked = self.outputs.view(-1, self.outputs.shape[-1]).index_select(0, flat_rows)
        return picked if self.head is None else head_on_rows(self.head, picked)


def end_token_ids(special: SpecialTokens) -> list[int]:
    """The tokens ignore_eos bans: EOS, end of turn, and the pad id where it is a token of its own
    (a filler, never text); never the mask id."""
    ids = [special.eos] + ([] if special.eot is None else [special.eot])
    return ids + ([] if special.pad in (*ids, special.mask) else [special.pad])


def head_on_rows(head: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
    """(N, V) logits of (N, D) hidden rows, on at least MIN_HEAD_ROWS rows."""
    count = hidden.shape[0]
    if count >= MIN_HEAD_ROWS:
        return head(hidden)
    return head(F.pad(hidden, (0, 0, 0, MIN_HEAD_ROWS - count)))[:count]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        special: SpecialTokens,
        canvases: CanvasPool,
        verifier: Verifier | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.canvases = canvases
        self.verifier = verifier
        self.batch_invariant = batch_invariant
        self.pad_id = canvases.pad_id
        self.mask_id = special.mask
        self.eos_id = special.eos
        self.eot_id = special.eot
        self.logits_shift = cast(DiffusionLM, model).logits_shift
        self.device = next(model.parameters()).device
        self.end_ids = torch.tensor(end_token_ids(special), device=self.device)

    def forward(self, requests: list[Request]) -> StepBatch:
        windows = [r.strategy.window(r) for r in requests]
        if any(not w.covers_canvas or r.strategy.keeps_cache(r.params) for r, w in zip(requests, windows, strict=True)):
            return self._windowed_forward(requests, windows)
        lengths = [r.canvas_len for r in requests]
        input_ids, slots = self.canvases.rows(requests)
        uncond_rows, uncond_ids = self._unconditional_rows(requests, input_ids)
        model_ids = input_ids if not uncond_ids else torch.cat([input_ids, *uncond_ids])
        lengths += [lengths[i] for i, row in enumerate(uncond_rows) if row >= 0]
        outputs, head = self._run(model_ids, [(n, n) for n in lengths])
        for request in requests:
            request.nfe += 1
        return self._batch(requests, input_ids, slots, outputs, head, uncond_rows)

    def _windowed_forward(self, requests: list[Request], spans: list[Window]) -> StepBatch:
        """Each row feeds its strategy's window (from one position before the first it reads for a
        shifted family, whose logits for position i come from row i - 1, when that row is not in
        the window already) and attends to its cached canvas. CFG's
        unconditional canvases (never cached) follow as whole-canvas rows."""
        shift = self.logits_shift
        windows = [Window(w.fed_from(shift), w.end, w.canvas_len, w.key_end) for w in spans]
        caches = [self._cache_of(r, w) for r, w in zip(requests, windows, strict=True)]
        fed = [r.canvas[w.start : w.end] for r, w in zip(requests, windows, strict=True)]
        input_ids, slots = self.canvases.rows(requests)
        uncond_rows, uncond_ids = self._unconditional_rows(requests, input_ids)
        guided = [r for r, row in zip(requests, uncond_rows, strict=True) if row >= 0]
        for request, canvas in zip(guided, uncond_ids, strict=True):
            length = request.canvas_len  # the unconditional canvas, without the batch's right padding
            windows.append(Window(0, length, length))
            caches.append(RequestKV(persistent=False))
            fed.append(canvas[0, :length])
        positions = pad_sequence(
            [torch.arange(w.start, w.end, device=self.device) for w in windows], batch_first=True
        )  # (R, Q); padded queries sit at 0 and are never read
        kv = BatchKV(caches, windows, self.device)
        lengths = [(w.length, w.key_len) for w in windows]
        outputs, head = self._run(self._pack(fed), lengths, positions, kv)  # (R, Q, D)
        for request in requests:
            request.nfe += 1
        offsets = torch.tensor([w.start for w in windows[: len(requests)]], device=self.device)
        return self._batch(requests, input_ids, slots, outputs, head, uncond_rows, offsets)

    def _run(
        self, ids: Tensor, spans: list[tuple[int, int]], positions: Tensor | None = None, kv: BatchKV | None = None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
        """One forward over `ids` (R, Q); `spans`: each row's real (queries, keys).

        (R, Q, hidden) states and the head that makes them logits, where the model splits its
        forward and the mode allows; else (R, Q, V) logits and None. Batch-invariant mode keeps
        the whole head: a row's bits there come from its fixed place in fixed tiles.
        """
        model = cast(DiffusionLM, self.model)
        if not self.batch_invariant:
            mask = None if kv is not None else self._padding_mask([keys for _, keys in spans])
            if model.supports_row_head:
                return model.hidden_states(ids, attention_mask=mask, position_ids=positions, kv=kv), model.head
            return model(ids, attention_mask=mask, position_ids=positions, kv=kv).logits, None
        return self._run_invariant(ids, spans, positions, kv), None

    def _run_invariant(
        self, ids: Tensor, spans: list[tuple[int, int]], positions: Tensor | None, kv: BatchKV | None
    ) -> Tensor:
        """(R, Q, V) logits, each row's the bits it gets alone."""
        if not cast(DiffusionLM, self.model).supports_batch_invariance:
            return self._run_row_by_row(ids, spans)
        width = padded_length(ids.shape[1])
        ids = F.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)
        if positions is not None:
            positions = F.pad(positions, (0, width - positions.shape[1]))
        per_row = AttentionMask(sequences=tuple(spans))
        with RowTiles():
            return self.model(ids, attention_mask=per_row, position_ids=positions, kv=kv).logits

    def _run_row_by_row(self, ids: Tensor, spans: list[tuple[int, int]]) -> Tensor:
        """Batch invariance for a model that runs its own code: each canvas alone, on its own length."""
        rows = [self.model(ids[row : row + 1, :length]).logits[0] for row, (length, _) in enumerate(spans)]
        return pad_sequence(rows, batch_first=True)  # (R, L, V)

    def _batch(
        self,
        requests: list[Request],
        input_ids: Tensor,
        slots: Tensor,
        outputs: Tensor,
        head: Callable[[Tensor], Tensor] | None,
        uncond: list[int],
        offsets: Tensor | None = None,
    ) -> StepBatch:
        return StepBatch(
            requests, input_ids, slots, outputs, self.logits_shift, uncond, self.eos_id,
            self.eot_id, self.end_ids, offsets, self.verifier, head,
        )  # fmt: skip

    def _cache_of(self, request: Request, window: Window) -> RequestKV:
        """The request's cache; a throwaway for a request that keeps none, which then feeds all it attends to."""
        if not request.strategy.keeps_cache(request.params):
            assert window.is_full, "a request without a cache feeds every position it attends to"
            return RequestKV(persistent=False)
        if request.kv is None:
            assert window.is_full, "a cache starts with a refresh over every position it attends to"
            request.kv = RequestKV()
        return request.kv

    def _pack(self, windows: list[Tensor]) -> Tensor:
        """(R, Q) the fed windows, right-padded."""
        if len(windows) == 1:
            return windows[0][None]
        return pad_sequence(windows, batch_first=True, padding_value=self.pad_id)

    def _unconditional_rows(self, requests: list[Request], input_ids: Tensor) -> tuple[list[int], list[Tensor]]:
        """LLaDA's CFG input: the canvas with every prompt position set to the mask id."""
        rows: list[int] = []
        canvases: list[Tensor] = []
        for i, request in enumerate(requests):
            if request.params.cfg_scale > 0:
                rows.append(len(requests) + len(canvases))
                canvas = input_ids[i : i + 1].clone()  # (1, L)
                canvas[0, : request.prompt_len] = self.mask_id
                canvases.append(canvas)
            else:
                rows.append(-1)
        return rows, canvases

    def _padding_mask(self, lengths: list[int]) -> Tensor | None:
        longest = max(lengths)
        if min(lengths) == longest:
            return None
        positions = torch.arange(longest, device=self.device)
        return positions < torch.tensor(lengths, device=self.device)[:, None]  # (R, L) True on real tokens
