"""Batch-1 loops of Fast-dLLM's parallel decoding and approximate-cache samplers (dllm.md section 3.1).

Written from NVlabs/Fast-dLLM@24cc59e llada/generate.py (`generate`, `generate_with_prefix_cache`,
`generate_with_dual_cache`, threshold mode) and the factor rule of inclusionAI/dInfer's
`get_transfer_index_dynamic`; not copied. The ground truth for the engine's threshold, factor and
cache tests; shared helpers come from tests/oracles.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oracles import _canvas, _gumbel_noisy, _transfer_counts


def _factor_keep(sorted_confidence: list[float], factor: float) -> int:
    """dInfer's loop, as written: rank n (1-based) needs 1 - factor / (n + 1); rank 1 always passes."""
    bars = [-1.0] + [1 - factor / (n + 1) for n in range(2, len(sorted_confidence) + 1)]
    top_i = 0
    for top_i in range(len(bars)):
        if sorted_confidence[top_i] < bars[top_i]:
            break
    if top_i == 0 or top_i == len(bars) - 1:
        top_i += 1
    return top_i


def fast_dllm_reference(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    mask_id: int,
    gen_length: int,
    block_length: int,
    threshold: float | None = None,
    factor: float | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    logits_shift: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Fast-dLLM's `generate()` without cache, in threshold or factor mode: (the gen_length ids, NFE).

    Each forward scores the canvas; the current block's masked positions are ranked by float64
    confidence; the rule keeps a prefix of that ranking (at least one); the block ends when no mask
    is left in it. `logits_shift=1` applies Dream's right shift (Fast-dLLM's Dream loop).
    Deviation: x0 is never the mask id (trained models never predict it; with a random model a
    committed mask would keep its block open forever). Confidences come from the raw logits.
    """
    if (threshold is None) == (factor is None):
        raise ValueError("set exactly one of threshold and factor")
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    nfe = 0
    with torch.inference_mode():
        x, p = _canvas(model, prompt_ids, mask_id, gen_length)
        for block in range(gen_length // block_length):
            block_end = p + (block + 1) * block_length
            while bool((x[0, block_end - block_length : block_end] == mask_id).any()):
                nfe += 1
                mask_index = x == mask_id
                mask_index[:, block_end:] = False
                logits = model(x).logits  # (1, L, V)
                if logits_shift:
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # row i now scores position i
                proposals = logits.clone()
                proposals[..., mask_id] = -torch.inf  # see the deviation in the docstring
                x0 = _gumbel_noisy(proposals, temperature, generator).argmax(-1)  # (1, L)
                if remasking == "low_confidence":
                    x0_p = logits.to(torch.float64).softmax(-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
                else:
                    x0_p = torch.rand(x0.shape, generator=generator, device=x0.device)
                confidence = torch.where(mask_index, x0_p, -torch.inf)[0]  # (L,)
                order = torch.topk(confidence, int(mask_index.sum())).indices
                ranked = confidence[order].tolist()
                if threshold is not None:
                    keep = 1 + sum(1 for c in ranked[1:] if c >= threshold)
                else:
                    assert factor is not None
                    keep = _factor_keep(ranked, factor)
                chosen = order[:keep]
                x[0, chosen] = x0[0, chosen]
    return x[0, p:].tolist(), nfe


def fast_dllm_cached_reference(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    mask_id: int,
    gen_length: int,
    block_length: int,
    cache: str,
    steps: int | None = None,
    threshold: float | None = None,
    logits_shift: int = 0,
) -> tuple[list[int], int]:
    """Fast-dLLM's `generate_with_prefix_cache` / `generate_with_dual_cache` at temperature 0: (ids, NFE).

    Per block: one full forward refreshes the cache (and commits); each later step feeds the block
    and the rest of the canvas (prefix) or the block alone (dual), one position earlier for a
    shifted family, until the block holds no mask. The commit count is the fixed schedule's
    (`steps`) or the threshold rule's; confidences in float64. The cache is vdiff's own
    (vdiff/kv_cache.py), driven here one request at a time; its arithmetic is checked separately.
    Deviations: a refresh that completes its block is not followed by Fast-dLLM's empty forward,
    and x0 is never the mask id (as in `fast_dllm_reference`).
    """
    from vdiff.kv_cache import BatchKV, RequestKV, Window

    if cache not in ("prefix", "dual") or (steps is None) == (threshold is None):
        raise ValueError("cache is prefix or dual, and exactly one of steps and threshold is set")
    num_blocks = gen_length // block_length
    nfe = 0
    with torch.inference_mode():
        x, p = _canvas(model, prompt_ids, mask_id, gen_length)
        length = x.shape[1]
        kv = RequestKV()
        for block in range(num_blocks):
            start, end = p + block * block_length, p + (block + 1) * block_length
            plan = None if steps is None else _transfer_counts(block_length, steps // num_blocks)
            step = 0
            while bool((x[0, start:end] == mask_id).any()):
                fed_start = 0 if step == 0 else start - logits_shift
                fed_end = length if step == 0 or cache == "prefix" else end
                window = Window(fed_start, fed_end, length)
                positions = torch.arange(fed_start, fed_end, device=x.device)[None]
                logits = model(x[:, fed_start:fed_end], position_ids=positions, kv=BatchKV([kv], [window])).logits
                nfe += 1
                masked = (x[0, start:end] == mask_id).nonzero().squeeze(1) + start  # canvas positions
                rows = (masked - logits_shift).clamp_min(0) - fed_start
                scores = logits[0, rows]  # (n, V)
                x0 = scores.masked_fill(
                    torch.arange(scores.shape[-1], device=scores.device) == mask_id, -torch.inf
                ).argmax(-1)
                confidence = scores.to(torch.float64).softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
                ranked = torch.topk(confidence, len(masked)).indices
                if plan is not None:
                    keep = plan[step]
                else:
                    assert threshold is not None
                    keep = max(1, int((confidence >= threshold).sum()))
                chosen = ranked[:keep]
                x[0, masked[chosen]] = x0[chosen]
                step += 1
    return x[0, p:].tolist(), nfe
