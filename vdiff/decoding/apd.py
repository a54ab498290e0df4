"""Adaptive Parallel Decoding (APD; Israel, Van den Broeck, Grover, arXiv 2506.00413;
danielmisrael/apd dream/generation_utils.py `apd_sample`), for both model families.

A request decodes left to right from a cursor, the first masked position. Each round:
1. the diffusion model scores the window [left, right): right = cursor + M (the lookahead; the
   masks after it are not in its input at all, and nothing attends to them), left = 0 without a
   KV window W, else W - 1 positions before the previous cursor, the earlier positions read from
   the request's cache (stale since they were last fed, as in APD's code);
2. it drafts every masked position of the window from its marginals at once;
3. the verifier scores the drafts left to right (vdiff/verifier.py), and the mixture
   R * diffusion logits + (1 - R) * verifier logits (the diffusion logits cut to the verifier's
   vocabulary) judges them: the round accepts the longest prefix of drafts that equal the
   mixture's choice, and always the first draft.
A batch holds requests at different cursors, and every request accepts its own number of tokens.

Temperature. At 0 a draft is the diffusion model's argmax and the mixture's choice is its argmax:
exactly APD's code. Above 0 both are drawn with the same Gumbel noise g per position and token
(the paper's Algorithm 1 coupling): draft = argmax(filter(diffusion logits / T) + g), choice =
argmax(filter(mixture / T) + g), with top_p and top_k as the filter, so each is a temperature-T
sample of its own distribution, and the two agree wherever the mixture leaves the draft's winner
in place. (APD's code divides the logits by T and also raises the noise to T, and judges against
the noiseless mixture argmax.) With R = 1 the mixture is the diffusion model itself, so every
round accepts its whole lookahead at any temperature and filter.

Drafts are never the mask id (a committed mask could not be told from a masked position) and
come from the vocabulary both models share (the rows past it are padding the verifier cannot read).
With ignore_eos they are never an end token either: the runner bans those (-inf, made finite here
as the other bans are), and so does the mixture, where it matters at R = 0: the verifier alone,
which knows no ban, would choose. Committed tokens are always drafts; the verifier decides how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vdiff.canvas import Commits
from vdiff.decoding.base import DecodingStrategy, StrategyState, register, state_of
from vdiff.decoding.ops import commit, span_candidates, top_k_filter, top_p_filter
from vdiff.kv_cache import Window
from vdiff.verifier import Verifier, VerifierRound, VerifierState

if TYPE_CHECKING:
    from vdiff.request import Request
    from vdiff.runner import StepBatch
    from vdiff.sampling_params import SamplingDefaults, SamplingParams

DEFAULT_MIXTURE_WEIGHT = 0.7  # the APD README's demo setting (R = 0.7, W = 16, M = 100)


@dataclass
class APDProgress(StrategyState):
    """Where a request is in APD's left-to-right rounds."""

    cursor: int  # the first masked position; everything before it is final
    stop_ids: Tensor  # (S,) the request's stop token ids, where drafts stop being judged
    accepted: int = 0  # tokens the last round accepted
    drafted: Tensor | None = None  # (m,) the last round's judged drafts, from the cursor it started at
    verifier: VerifierState = field(default_factory=VerifierState)  # the verifier's cache of it


@register
class AdaptiveParallelDecoding(DecodingStrategy):
    name = "apd"
    needs_verifier = True

    def resolve(self, params: SamplingParams, defaults: SamplingDefaults) -> SamplingParams:
        foreign = {
            "steps": params.steps is not None,
            "block_length": params.block_length is not None,
            "threshold": params.threshold is not None,
            "factor": params.factor is not None,
            "cache": params.cache != "none",
            "cfg_scale": params.cfg_scale > 0,
            "eps": params.eps is not None,
            "alg_temp": params.alg_temp is not None,
            "logits_eos_inf": params.logits_eos_inf,
            "confidence_eos_eot_inf": params.confidence_eos_eot_inf,
            "confidence_dtype": params.confidence_dtype != "auto",
        }
        for name, used in foreign.items():
            if used:
                hint = "; its cache is apd_kv_window" if name == "cache" else ""
                raise ValueError(f"{name} does not apply to algorithm 'apd', which decodes left to right{hint}")
        weight = params.apd_mixture_weight
        return params.replace(apd_mixture_weight=DEFAULT_MIXTURE_WEIGHT if weight is None else weight)

    def gen_length(self, params: SamplingParams) -> int:
        assert params.max_tokens is not None
        return params.max_tokens

    def start(self, request: Request) -> APDProgress:
        stop_ids = torch.tensor(sorted(request.stop_ids), dtype=torch.long, device=request.generator.device)
        return APDProgress(cursor=request.prompt_len, stop_ids=stop_ids)

    def span(self, request: Request) -> tuple[int, int]:
        """The lookahead the round drafts."""
        return state_of(request, APDProgress).cursor, _lookahead_end(request)

    def drafts(self, request: Request) -> tuple[int, list[int]] | None:
        progress = state_of(request, APDProgress)
        if progress.drafted is None:
            return None
        return progress.cursor - progress.accepted, progress.drafted.tolist()

    def window(self, request: Request) -> Window:
        length, right = request.canvas_len, _lookahead_end(request)
        kv_window = request.params.apd_kv_window
        if kv_window is None or request.kv is None:
            return Window(0, right, length, right)
        progress = state_of(request, APDProgress)
        # W - 1 positions before the previous cursor, so the tokens accepted since are fed fresh;
        # left < cursor, so a shifted family's scoring row for the cursor is fed already
        left = max(progress.cursor - kv_window - progress.accepted + 1, 0)
        return Window(left, right, length, right, reads=progress.cursor)

    def keeps_cache(self, params: SamplingParams) -> bool:
        return params.apd_kv_window is not None

    def feeds_windows(self, params: SamplingParams) -> bool:
        return params.apd_kv_window is not None or params.apd_max_lookahead is not None

    def step(self, batch: StepBatch, rows: list[int]) -> Commits:
        requests = [batch.requests[r] for r in rows]
        verifier = batch.verifier
        assert verifier is not None, "the engine refuses APD requests without a verifier"
        spans = [(state_of(r, APDProgress).cursor, _lookahead_end(r)) for r in requests]
        candidates = span_candidates(batch.input_ids, rows, requests, spans)
        logits = batch.logits_at(candidates)  # (N, V)
        drafts = [_draft(verifier, request, logits[seg]) for _, request, seg in candidates.segments()]
        verified = verifier.score([
            VerifierRound(state_of(r, APDProgress).verifier, r.canvas[:cursor], draft.judged)
            for r, (cursor, _), draft in zip(requests, spans, drafts, strict=True)
        ])  # fmt: skip
        picks = []
        for (_, request, seg), (cursor, _), draft, scores in zip(
            candidates.segments(), spans, drafts, verified, strict=True
        ):
            accepted = _judge(request, draft, scores, batch.end_ids)
            verifier.accept(state_of(request, APDProgress).verifier, cursor, accepted)
            picks.append(candidates.cols[seg][:accepted])
        for request, pick, draft in zip(requests, picks, drafts, strict=True):
            progress = state_of(request, APDProgress)
            progress.drafted = draft.judged  # past the first stop token nothing is judged
            progress.accepted = len(pick)
            progress.cursor += progress.accepted
            request.schedule_done = progress.cursor == request.canvas_len
        return commit(candidates, torch.cat([d.tokens for d in drafts]), picks)


@dataclass(frozen=True)
class Draft:
    """One request's drafts for a round and what judging them needs."""

    tokens: Tensor  # (n,)
    judged: Tensor  # (m,) the drafts up to and including the first stop token, m <= n
    # (m, V) the judged drafts' float32 diffusion logits, the mask id, rows past the verifier's
    # and (ignore_eos) end tokens banned, and the Gumbel noise drafts and choices share above
    # temperature 0
    logits: Tensor
    noise: Tensor | None

    @classmethod
    def of(cls, tokens: Tensor, logits: Tensor, noise: Tensor | None, stop_ids: Tensor) -> Draft:
        """Drafts after a stop token can never be needed: accepting them would accept the stop
        token, which ends the answer. The verifier is causal, so its scores up to the stop token
        do not depend on them either; leaving them out changes no decision. Only the judged rows
        are kept (copied when fewer), since every APD request's drafts are held until judged."""
        stops = torch.isin(tokens, stop_ids).nonzero()
        if not len(stops):
            return cls(tokens, tokens, logits, noise)
        count = int(stops[0]) + 1
        return cls(tokens, tokens[:count], logits[:count].clone(), None if noise is None else noise[:count].clone())


def _lookahead_end(request: Request) -> int:
    lookahead, cursor = request.params.apd_max_lookahead, state_of(request, APDProgress).cursor
    return request.canvas_len if lookahead is None else min(cursor + lookahead, request.canvas_len)


def _draft(verifier: Verifier, request: Request, logits: Tensor) -> Draft:
    """Draft the request's lookahead from its (n, V) logits."""
    never = torch.finfo(torch.float32).min  # finite: R = 0 must not make 0 * inf
    logits = logits.float().clamp_(min=never)  # ignore_eos's banned end tokens come as -inf
    logits[:, request.mask_id] = never
    logits[:, verifier.vocab_size :] = never  # rows past the shared vocabulary (padding) the verifier cannot read
    noise = _gumbel(logits.shape, request) if request.params.temperature else None
    stop_ids = state_of(request, APDProgress).stop_ids
    return Draft.of(_draw(logits, noise, request.params), logits, noise, stop_ids)


def _judge(request: Request, draft: Draft, verified: Tensor, end_ids: Tensor) -> int:
    """How many drafts the mixture of diffusion and (n, V') verifier logits accepts: the longest
    prefix of drafts equal to the mixture's choice, and at least one. With ignore_eos the mixture
    never chooses an end token, which no draft can be (at R = 0 the drafts' ban is not in it)."""
    params = request.params
    verified = verified.float()
    width = min(draft.logits.shape[-1], verified.shape[-1])
    weight = params.apd_mixture_weight
    assert weight is not None
    mixture = weight * draft.logits[:, :width] + (1 - weight) * verified[:, :width]
    if params.ignore_eos:
        mixture[:, end_ids[end_ids < width]] = torch.finfo(torch.float32).min
    choice = _draw(mixture, None if draft.noise is None else draft.noise[:, :width], params)
    agree = draft.judged == choice
    agree[0] = True  # every round commits at least one token
    return int(agree.long().cumprod(0).sum())


def _gumbel(shape: torch.Size, request: Request) -> Tensor:
    """(n, V) standard Gumbel noise in float64 from the request's generator."""
    generator = request.generator
    uniform = torch.rand(shape, dtype=torch.float64, device=generator.device, generator=generator)
    return -torch.log(-torch.log(uniform))


def _draw(logits: Tensor, noise: Tensor | None, params: SamplingParams) -> Tensor:
    """(n,) argmax at temperature 0; else a temperature-T, top-p/top-k sample driven by `noise`."""
    if noise is None or not params.temperature:
        return logits.argmax(dim=-1)
    scaled = logits / params.temperature
    if params.top_p < 1:
        scaled = top_p_filter(scaled, params.top_p)
    if params.top_k_enabled:
        scaled = top_k_filter(scaled, params.top_k)
    return (scaled.double() + noise).argmax(dim=-1)
