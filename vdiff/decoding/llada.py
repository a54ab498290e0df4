"""LLaDA's sampler: ML-GSAI/LLaDA generate.py (HEAD, b7e6c35), one request at a time or many.

The answer is cut into blocks decoded left to right (semi-autoregressive when block_length <
max_tokens). Each block gets steps // num_blocks steps and a fixed number of tokens per step
(the linear schedule). A step proposes x0 for every masked position left of the block end
(greedy at temperature 0, Gumbel-max in float64 above it) and commits the k proposals with the
highest confidence: the softmax probability of x0 (`low_confidence`) or a uniform draw
(`random`). Committed tokens are never re-masked.

With `threshold` or `factor` set (Fast-dLLM's parallel decoding, NVlabs/Fast-dLLM@24cc59e
llada/generate.py; the factor rule as dInfer's get_transfer_index_dynamic has it) the count per
step follows the confidences instead of the schedule, so `steps` does not apply: a step commits
every masked position of the block that its rule admits, at least the most confident one, and a
block ends when it holds no mask.

With `cache` set (Fast-dLLM's approximate KV cache, vdiff/kv_cache.py) the first step of every
block is a full forward that refreshes the request's keys and values; later steps of the block
score only the block and what follows it (`prefix`) or the block alone (`dual`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vdiff.canvas import Commits
from vdiff.decoding.base import DecodingStrategy, StrategyState, refuse_apd_fields, register, state_of
from vdiff.decoding.ops import (
    Candidates,
    commit,
    gumbel_argmax,
    masked_candidates,
    softmax_in,
    top_by_confidence,
    top_k_filter,
    top_p_filter,
    transfer_counts,
)
from vdiff.kv_cache import Window

if TYPE_CHECKING:
    from vdiff.request import Request
    from vdiff.runner import StepBatch
    from vdiff.sampling_params import SamplingDefaults, SamplingParams

DEFAULT_BLOCK_LENGTH = 32  # LLaDA's chat.py and README; semi-AR blocks curb the Instruct model's EOS flood


@dataclass
class BlockSchedule(StrategyState):
    """Where a request is in LLaDA's blocks."""

    block: int = 0  # the block being decoded
    step: int = 0  # steps taken within it
    window_end: int = 0  # canvas positions before this one may be committed in the next step
    transfer_plan: list[int] = field(default_factory=list)  # tokens to commit at each step of the block


def _start_block(request: Request, schedule: BlockSchedule) -> None:
    block = request.params.block_length
    assert block is not None
    schedule.window_end = request.prompt_len + (schedule.block + 1) * block
    schedule.step = 0
    if is_parallel(request.params):
        return  # no plan: the confidences decide each step
    # a block starts all masked (nothing past a window end is ever committed), so the published
    # count of its masks is its length
    schedule.transfer_plan = transfer_counts(block, _steps_per_block(request))


class LLaDASampler(DecodingStrategy):
    def resolve(self, params: SamplingParams, defaults: SamplingDefaults) -> SamplingParams:
        refuse_apd_fields(params, self.name)
        for name in ("eps", "alg_temp"):
            if getattr(params, name) is not None:
                raise ValueError(f"{name} applies to Dream's algorithms, not to {self.name!r}")
        if params.cache != "none" and params.cfg_scale > 0:
            raise ValueError("cfg_scale does not combine with cache: the unconditional canvas would need its own")
        params = self._default_rule(params, defaults)
        max_tokens = _max_tokens(params)
        block = params.block_length or min(defaults.block_length or DEFAULT_BLOCK_LENGTH, max_tokens)
        num_blocks = math.ceil(max_tokens / block)
        if is_parallel(params):
            if params.steps is not None:
                raise ValueError("steps does not apply with threshold or factor: the confidences decide the steps")
            # "auto" is the published computation, and Fast-dLLM takes its confidences in float64
            dtype = "float64" if params.confidence_dtype == "auto" else params.confidence_dtype
            return params.replace(block_length=block, confidence_dtype=dtype)
        steps = params.steps or defaults.steps or num_blocks * block
        if steps % num_blocks:
            raise ValueError(
                f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks}: max_tokens "
                f"{max_tokens} in blocks of block_length {block})"
            )
        return params.replace(block_length=block, steps=steps)

    def _default_rule(self, params: SamplingParams, defaults: SamplingDefaults) -> SamplingParams:
        """The checkpoint's parallel rule, for its own algorithm, when the request chose no pace.

        A request that sets steps asks for the fixed schedule, one that sets threshold or factor
        for its own rule; either way the default rule stays out.
        """
        no_rule = defaults.threshold is None and defaults.factor is None
        chose_pace = params.steps is not None or is_parallel(params)
        if no_rule or chose_pace or self.name != defaults.algorithm:
            return params
        return params.replace(threshold=defaults.threshold, factor=defaults.factor)

    def gen_length(self, params: SamplingParams) -> int:
        block = params.block_length
        assert block is not None
        return math.ceil(_max_tokens(params) / block) * block

    def start(self, request: Request) -> BlockSchedule:
        schedule = BlockSchedule()
        _start_block(request, schedule)
        return schedule

    def window(self, request: Request) -> Window:
        mode, length = request.params.cache, request.canvas_len
        schedule = state_of(request, BlockSchedule)
        if mode == "none" or schedule.step == 0:  # no cache, or the refresh at the block start
            return Window(0, length, length)
        block = request.params.block_length
        assert block is not None
        block_start = schedule.window_end - block
        return Window(block_start, length if mode == "prefix" else schedule.window_end, length)

    def span(self, request: Request) -> tuple[int, int]:
        """The block in work."""
        block, end = request.params.block_length, state_of(request, BlockSchedule).window_end
        assert block is not None
        return end - block, end

    def step(self, batch: StepBatch, rows: list[int]) -> Commits:
        commits = []
        for group in _by_confidence_dtype(batch, rows):
            requests = [batch.requests[r] for r in group]
            ends = [state_of(r, BlockSchedule).window_end for r in requests]
            candidates = masked_candidates(batch.input_ids, group, requests, ends)
            logits = batch.logits_at(candidates)  # (N, V)
            x0 = self._propose(_proposal_logits(logits, candidates), candidates)
            confidence = self.confidence(logits, x0, candidates, batch)
            picks = top_by_confidence(confidence, candidates, commit_counts(confidence, candidates))
            commits.append(commit(candidates, x0, picks))
            # the candidates are the masks of each request's current block (earlier blocks are done)
            for request, masked, pick in zip(requests, candidates.counts, picks, strict=True):
                self._advance(request, masked - len(pick))
        return Commits.join(commits)

    @abstractmethod
    def confidence(self, logits: Tensor, x0: Tensor, candidates: Candidates, batch: StepBatch) -> Tensor:
        """(N,) the score by which each step commits its k best proposals."""

    def _propose(self, logits: Tensor, candidates: Candidates) -> Tensor:
        x0 = logits.argmax(dim=-1)  # (N,) greedy; rows sampled at temperature > 0 are replaced below
        if not any(r.params.temperature for r in candidates.requests):
            return x0
        for _, request, seg in candidates.segments():
            params = request.params
            if params.temperature:
                x0[seg] = gumbel_argmax(_filtered(logits[seg], params), params.temperature, request.generator)
        return x0

    def _advance(self, request: Request, masks_left: int) -> None:
        """Count the step; a block ends with its plan, or under a parallel rule with its last mask."""
        schedule = state_of(request, BlockSchedule)
        schedule.step += 1
        plan_done = schedule.step >= len(schedule.transfer_plan)
        if not (masks_left == 0 if is_parallel(request.params) else plan_done):
            return
        schedule.block += 1
        if schedule.window_end >= request.canvas_len:
            request.schedule_done = True
        else:
            _start_block(request, schedule)


@register
class LowConfidence(LLaDASampler):
    name = "low_confidence"

    def confidence(self, logits: Tensor, x0: Tensor, candidates: Candidates, batch: StepBatch) -> Tensor:
        if any(r.params.confidence_eos_eot_inf for r in candidates.requests):
            for _, request, seg in candidates.segments():
                if request.params.confidence_eos_eot_inf:
                    _ban_end_tokens(logits[seg], request.params.temperature, batch)
        probs = softmax_in(logits, candidates.requests[0].params.torch_confidence_dtype)  # (N, V)
        return probs.gather(-1, x0[:, None]).squeeze(-1)


@register
class RandomRemasking(LLaDASampler):
    name = "random"

    def confidence(self, logits: Tensor, x0: Tensor, candidates: Candidates, batch: StepBatch) -> Tensor:
        # one uniform per canvas position, as the reference draws them, read at the candidates
        parts = [
            torch.rand(r.canvas_len, device=logits.device, generator=r.generator)[candidates.cols[seg]]
            for _, r, seg in candidates.segments()
        ]
        return torch.cat(parts)


def is_parallel(params: SamplingParams) -> bool:
    return params.threshold is not None or params.factor is not None


def _proposal_logits(logits: Tensor, candidates: Candidates) -> Tensor:
    """The logits x0 is drawn from: for parallel rules and cached windows, never the mask id itself.

    A trained model never predicts the mask token, but a committed mask would stay a candidate:
    a parallel block, which ends only when no mask is left, would never end, and a cached window
    could not score it again once its block is behind. Confidences still come from the raw logits.
    """
    guarded = [is_parallel(r.params) or r.params.cache != "none" for r in candidates.requests]
    if not any(guarded):
        return logits
    out = logits.clone()
    mask_id = candidates.requests[0].mask_id
    for (_, _, seg), guard in zip(candidates.segments(), guarded, strict=True):
        if guard:
            out[seg, mask_id] = float("-inf")
    return out


def commit_counts(confidence: Tensor, candidates: Candidates) -> list[int]:
    """Tokens each request commits this step: its schedule's count, or what its parallel rule admits."""
    counts = []
    for _, request, seg in candidates.segments():
        params = request.params
        if params.threshold is not None:
            counts.append(threshold_count(confidence[seg], params.threshold))
        elif params.factor is not None:
            counts.append(factor_count(confidence[seg], params.factor))
        else:
            schedule = state_of(request, BlockSchedule)
            counts.append(schedule.transfer_plan[schedule.step])
    return counts


def threshold_count(confidence: Tensor, threshold: float) -> int:
    """Fast-dLLM: every candidate whose confidence reaches the threshold, and at least the best one."""
    return max(1, int((confidence >= threshold).sum()))


def factor_count(confidence: Tensor, factor: float) -> int:
    """Fast-dLLM's factor rule: the n-th most confident (1-based) passes at 1 - factor / (n + 1).

    The count is the first failing rank, the best one always passing; as in the published code, a
    failure at the last rank still commits every candidate.
    """
    ordered = confidence.sort(descending=True).values  # (n,)
    ranks = torch.arange(1, len(ordered) + 1, device=ordered.device, dtype=torch.float64)
    bars = 1 - factor / (ranks + 1)
    bars[0] = -1
    failing = (ordered.to(torch.float64) < bars).nonzero()
    first = int(failing[0]) if len(failing) else len(ordered)
    return len(ordered) if first >= len(ordered) - 1 else first


def _ban_end_tokens(logits: Tensor, temperature: float | None, batch: StepBatch) -> None:
    """`confidence_eos_eot_inf` as the reference behaves, after x0 is chosen.

    Its chained assignment sets EOS to -inf in the noisy logits and EoT in the logits. At
    temperature 0 those are one tensor, so both lose all confidence; above 0 only EoT does.
    """
    if not temperature:
        logits[:, batch.eos_id] = float("-inf")
    if batch.eot_id is not None:
        logits[:, batch.eot_id] = float("-inf")


def _filtered(logits: Tensor, params: SamplingParams) -> Tensor:
    if params.top_p < 1:
        logits = top_p_filter(logits, params.top_p)
    return top_k_filter(logits, params.top_k) if params.top_k_enabled else logits


def _by_confidence_dtype(batch: StepBatch, rows: list[int]) -> Iterator[list[int]]:
    groups: dict[str, list[int]] = {}
    for row in rows:
        groups.setdefault(batch.requests[row].params.confidence_dtype, []).append(row)
    yield from groups.values()


def _steps_per_block(request: Request) -> int:
    steps, block = request.params.steps, request.params.block_length
    assert steps is not None and block is not None
    return steps // (request.gen_length // block)


def _max_tokens(params: SamplingParams) -> int:
    assert params.max_tokens is not None, "SamplingDefaults.apply sets max_tokens"
    return params.max_tokens
