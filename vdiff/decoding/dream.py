"""Dream's sampler: `_sample` of Dream's generation_utils.py (HKUNLP/Dream; per-row version as in
NVlabs/Fast-dLLM@24cc59e dream/model/generation_utils.py).

Time runs from t = 1 to eps over `steps` steps (`linspace(1, eps, steps + 1)`, float32). Between t
and s each masked position is unmasked with probability 1 - s/t: independently for `origin`;
for the confidence algorithms as the floor(n_masked * (1 - s/t)) most confident positions
(probability of the sampled token for `maskgit_plus`, top-1 minus top-2 for `topk_margin`,
negative entropy for `entropy`), or a draw weighted by softmax(confidence / alg_temp). The last
step unmasks everything left. Rows are independent (the per-row semantics); the original HF file
ranked the masks of a whole batch together, which no continuous batcher can reproduce.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vdiff.canvas import Commits
from vdiff.decoding.base import DecodingStrategy, StrategyState, refuse_apd_fields, register, state_of
from vdiff.decoding.ops import (
    Candidates,
    commit,
    confidence_rows,
    masked_candidates,
    softmax_in,
    top_k_filter,
    top_p_filter,
)

if TYPE_CHECKING:
    from vdiff.request import Request
    from vdiff.runner import StepBatch
    from vdiff.sampling_params import SamplingDefaults, SamplingParams


@dataclass
class DiffusionTimes(StrategyState):
    """Where a request is on Dream's time grid."""

    timesteps: Tensor  # (steps + 1,) float32 diffusion times t, linspace(1, eps) as published
    step: int = 0  # steps taken; the next one goes from timesteps[step] to timesteps[step + 1]


class DreamSampler(DecodingStrategy):
    def resolve(self, params: SamplingParams, defaults: SamplingDefaults) -> SamplingParams:
        refuse_apd_fields(params, self.name)
        if params.block_length is not None:
            raise ValueError(f"block_length applies to LLaDA's algorithms; {self.name!r} decodes the whole canvas")
        blockwise = {"confidence_eos_eot_inf": params.confidence_eos_eot_inf, "threshold": params.threshold,
                     "factor": params.factor, "cache": params.cache != "none"}  # fmt: skip
        for name, used in blockwise.items():
            if used:
                raise ValueError(
                    f"{name} applies to LLaDA's algorithms ('low_confidence', 'random'), which also decode "
                    f"Dream models; {self.name!r} has no blocks"
                )
        return params.replace(
            steps=params.steps or defaults.steps or params.max_tokens,
            eps=defaults.eps if params.eps is None else params.eps,
            alg_temp=defaults.alg_temp if params.alg_temp is None else params.alg_temp,
        )

    def gen_length(self, params: SamplingParams) -> int:
        assert params.max_tokens is not None
        return params.max_tokens

    def start(self, request: Request) -> DiffusionTimes:
        steps, eps = request.params.steps, request.params.eps
        assert steps is not None and eps is not None
        return DiffusionTimes(torch.linspace(1, eps, steps + 1, device=request.generator.device))

    def step(self, batch: StepBatch, rows: list[int]) -> Commits:
        requests = [batch.requests[r] for r in rows]
        candidates = masked_candidates(batch.input_ids, rows, requests, [r.canvas_len for r in requests])
        logits = batch.logits_at(candidates)  # (N, V)
        x0, picks = self.choose(logits, candidates)
        for request in requests:
            times = state_of(request, DiffusionTimes)
            times.step += 1
            request.schedule_done = times.step == request.params.steps
        return commit(candidates, x0, picks)

    @abstractmethod
    def choose(self, logits: Tensor, candidates: Candidates) -> tuple[Tensor, list[Tensor]]:
        """(N,) proposed tokens and, per request, the canvas positions to commit this step."""


@register
class Origin(DreamSampler):
    name = "origin"

    def choose(self, logits: Tensor, candidates: Candidates) -> tuple[Tensor, list[Tensor]]:
        x0 = torch.full_like(candidates.cols, candidates.requests[0].mask_id)
        picks = []
        for _, request, seg in candidates.segments():
            # each mask is revealed with probability 1 - s/t; the reference draws for every mask
            draw = torch.rand(seg.stop - seg.start, device=logits.device, generator=request.generator)
            chosen = (
                draw < _reveal_fraction(request) if not _last_step(request) else torch.ones_like(draw, dtype=torch.bool)
            )
            index = torch.arange(seg.start, seg.stop, device=logits.device)[chosen]
            x0[index] = sample_tokens(logits[index], request)[2]
            picks.append(candidates.cols[index])
        return x0, picks


class ConfidenceSampler(DreamSampler):
    """Commit the floor(n_masked * (1 - s/t)) best masks by a confidence score."""

    def choose(self, logits: Tensor, candidates: Candidates) -> tuple[Tensor, list[Tensor]]:
        x0 = torch.empty_like(candidates.cols)
        scored: list[tuple[Tensor | slice, Tensor]] = []
        for request, index in candidates.groups(_sampling_key):
            probs, confidence, x0[index] = sample_tokens(logits[index], request)
            scored.append((index, self.score(probs, confidence)))
        dtype = scored[0][1].dtype if len({part.dtype for _, part in scored}) == 1 else torch.float64
        confidence = torch.empty(len(x0), dtype=dtype, device=logits.device)
        for index, part in scored:
            confidence[index] = part
        rows = confidence_rows(confidence, candidates)  # (G, W), -inf off the candidates
        picks = [
            _pick(rows[g, : r.canvas_len], _reveal_count(r, candidates.counts[g]), r)
            for g, r, _ in candidates.segments()
        ]
        return x0, picks

    @abstractmethod
    def score(self, probs: Tensor, confidence: Tensor) -> Tensor:
        """(N,) confidence of each proposal from its (N, V) probabilities and the probability of x0."""


@register
class MaskGitPlus(ConfidenceSampler):
    name = "maskgit_plus"

    def score(self, probs: Tensor, confidence: Tensor) -> Tensor:
        return confidence


@register
class TopKMargin(ConfidenceSampler):
    name = "topk_margin"

    def score(self, probs: Tensor, confidence: Tensor) -> Tensor:
        top2 = torch.topk(probs, 2, dim=-1).values  # (N, 2)
        return top2[:, 0] - top2[:, 1]


@register
class Entropy(ConfidenceSampler):
    name = "entropy"

    def score(self, probs: Tensor, confidence: Tensor) -> Tensor:
        return torch.sum(probs * torch.log(probs + 1e-10), dim=-1)  # negative entropy: higher is surer


def sample_tokens(logits: Tensor, request: Request) -> tuple[Tensor, Tensor, Tensor]:
    """Dream's sample_tokens: (probs (N, V), probability of x0 (N,), x0 (N,)).

    Above temperature 0 the token is drawn with the request's generator (torch.multinomial);
    the reference draws with torch.distributions.Categorical and the global RNG, and silently
    falls back to argmax when Categorical rejects bf16 probabilities.
    """
    params = request.params
    temperature = params.temperature or 0.0
    if temperature > 0:
        logits = logits / temperature
    if params.top_p < 1:
        logits = top_p_filter(logits, params.top_p)
    if params.top_k_enabled:
        logits = top_k_filter(logits, params.top_k)
    probs = softmax_in(logits, params.torch_confidence_dtype)
    if temperature == 0:
        confidence, x0 = probs.max(dim=-1)
        return probs, confidence, x0
    x0 = torch.multinomial(probs.float(), 1, generator=request.generator).squeeze(-1)
    return probs, probs.gather(-1, x0[:, None]).squeeze(-1), x0


def _pick(row: Tensor, count: int, request: Request) -> Tensor:
    """The positions to commit from a full-canvas confidence row: top-k, or a draw when alg_temp > 0."""
    if count == 0:
        return row.new_empty(0, dtype=torch.long)
    alg_temp = request.params.alg_temp
    if not alg_temp:
        return torch.topk(row, count).indices
    weights = torch.softmax(row / alg_temp, dim=-1)
    return torch.multinomial(weights.float(), count, generator=request.generator)


def _reveal_fraction(request: Request) -> Tensor:
    """1 - s/t for the request's current step, a float32 scalar as the reference computes it."""
    times = state_of(request, DiffusionTimes)
    t, s = times.timesteps[times.step], times.timesteps[times.step + 1]
    return 1 - s / t


def _reveal_count(request: Request, masked: int) -> int:
    if _last_step(request):
        return masked
    # float32 arithmetic, then truncation, exactly as the reference: int(n_masked * (1 - s/t))
    return int(torch.tensor(masked, dtype=torch.float32) * _reveal_fraction(request))


def _last_step(request: Request) -> bool:
    assert request.params.steps is not None
    return state_of(request, DiffusionTimes).step == request.params.steps - 1


def _sampling_key(request: Request) -> tuple[object, ...]:
    """Requests whose proposals one batched op can compute; each sampling request has its own RNG."""
    p = request.params
    return (request.request_id if p.temperature else None, p.top_p, p.top_k, p.confidence_dtype)
