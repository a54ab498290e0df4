"""Tensor math shared by the decoding strategies, as free functions.

Strategies work on the candidates of a step: the masked canvas positions each request may commit,
gathered for all requests of the step at once and flattened row-major, so that per-position math
(softmax, argmax, confidence) runs as one batched op. Only what is per request by nature (its RNG,
its top-k over its own canvas) loops over requests.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vdiff.canvas import Commits
from vdiff.request import Request


@dataclass
class Candidates:
    """Masked positions that a step may commit, for a group of requests, flattened row-major."""

    requests: list[Request]
    rows: list[int]  # row of each request in the step batch
    batch_rows: Tensor  # (N,) row of each candidate in the step batch
    group_rows: Tensor  # (N,) index of each candidate's request in `requests`
    cols: Tensor  # (N,) canvas position of each candidate
    counts: list[int]  # candidates per request

    def segments(self) -> Iterator[tuple[int, Request, slice]]:
        start = 0
        for g, (request, count) in enumerate(zip(self.requests, self.counts, strict=True)):
            yield g, request, slice(start, start + count)
            start += count

    def groups(self, key: Callable[[Request], Hashable]) -> Iterator[tuple[Request, Tensor | slice]]:
        """(a request, candidate indices) for each set of requests sharing a key; a plain slice when all do."""
        keys = [key(r) for r in self.requests]
        if len(set(keys)) == 1:
            yield self.requests[0], slice(None)
            return
        for value in dict.fromkeys(keys):
            members = torch.tensor([k == value for k in keys], device=self.cols.device)
            yield self.requests[keys.index(value)], members[self.group_rows].nonzero().squeeze(1)


def masked_candidates(input_ids: Tensor, rows: list[int], requests: list[Request], ends: list[int]) -> Candidates:
    """The masked positions before each request's window end; prompts never hold the mask id."""
    device = input_ids.device
    whole = len(rows) == input_ids.shape[0]
    ids = (input_ids if whole else input_ids[rows])[:, : max(ends)]  # (G, W)
    hit = ids == requests[0].mask_id
    if min(ends) < ids.shape[1]:
        hit &= torch.arange(ids.shape[1], device=device) < torch.tensor(ends, device=device)[:, None]
    group_rows, cols = hit.nonzero(as_tuple=True)
    batch_rows = group_rows if whole else torch.tensor(rows, device=device)[group_rows]
    counts = [len(cols)] if len(rows) == 1 else hit.sum(dim=1).tolist()
    return Candidates(requests, rows, batch_rows, group_rows, cols, counts)


def span_candidates(
    input_ids: Tensor, rows: list[int], requests: list[Request], spans: list[tuple[int, int]]
) -> Candidates:
    """The canvas positions [start, end) of each request (APD's lookahead: all masked, by construction)."""
    device = input_ids.device
    counts = [end - start for start, end in spans]
    cols = torch.cat([torch.arange(start, end, device=device) for start, end in spans])
    group_rows = torch.repeat_interleave(torch.arange(len(rows), device=device), torch.tensor(counts, device=device))
    batch_rows = torch.tensor(rows, device=device)[group_rows]
    return Candidates(requests, rows, batch_rows, group_rows, cols, counts)


def transfer_counts(masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: `masked // steps` per step, the remainder to the earliest steps."""
    base, remainder = divmod(masked, steps)
    return [base + (i < remainder) for i in range(steps)]


def gumbel_argmax(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """Sample at `temperature` as LLaDA does: argmax of exp(l) / (-log u)^T, in float64.

    Equal to argmax(l / T + Gumbel noise); float64 because low-precision Gumbel-max hurts
    generation quality (arXiv 2409.02908, cited by LLaDA's generate.py).
    """
    logits64 = logits.to(torch.float64)  # (N, V)
    noise = torch.rand(logits64.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits64.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (the first is always kept)."""
    ordered, order = torch.sort(logits, descending=True)
    drop = torch.softmax(ordered, dim=-1).cumsum(dim=-1) > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, drop)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def softmax_in(logits: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Softmax over the vocabulary, in `dtype` (None: the logits dtype, as the published samplers do)."""
    return torch.softmax(logits if dtype is None else logits.to(dtype), dim=-1)


def confidence_rows(confidence: Tensor, candidates: Candidates) -> Tensor:
    """(G, W) confidence in canvas layout, -inf off the candidates, as the published samplers lay it out."""
    width = max(r.canvas_len for r in candidates.requests)
    rows = confidence.new_full((len(candidates.requests), width), float("-inf"))
    rows[candidates.group_rows, candidates.cols] = confidence
    return rows


def top_by_confidence(confidence: Tensor, candidates: Candidates, ks: Sequence[int]) -> list[Tensor]:
    """Each request's k most confident candidates, via torch.topk on a full-canvas row.

    The published samplers call topk on a (canvas_len,) row holding -inf off the candidates;
    topk's order among equal values is implementation-defined, so the same row is rebuilt
    here to keep ties (common with bf16 confidences) resolved exactly as theirs are.
    """
    rows = confidence_rows(confidence, candidates)
    picks = []
    for g, (request, k) in enumerate(zip(candidates.requests, ks, strict=True)):
        assert k <= candidates.counts[g], "a schedule never asks for more tokens than there are masks"
        picks.append(torch.topk(rows[g, : request.canvas_len], k).indices)
    return picks


def commit(candidates: Candidates, x0: Tensor, picks: list[Tensor]) -> Commits:
    """The commits of x0 at each request's picked canvas positions (the engine applies them)."""
    device = x0.device
    if len(picks) == 1:  # one request: a handful of ops instead of the batched bookkeeping below
        cols = picks[0]
        tokens = x0[torch.searchsorted(candidates.cols, cols)]  # candidates are sorted by position
        return Commits(torch.full_like(cols, candidates.rows[0]), cols, tokens)
    width = max(r.canvas_len for r in candidates.requests)
    layout = torch.zeros((len(candidates.requests), width), dtype=torch.long, device=device)
    layout[candidates.group_rows, candidates.cols] = x0  # (G, W): candidate tokens in canvas layout
    sizes = torch.tensor([len(cols) for cols in picks], device=device)
    groups = torch.repeat_interleave(torch.arange(len(picks), device=device), sizes)
    cols = torch.cat(picks)
    rows = torch.tensor(candidates.rows, device=device)[groups]
    return Commits(rows, cols, layout[groups, cols])
