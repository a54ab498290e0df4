"""Batch-1 reference loops ("oracles") of the two published masked-diffusion samplers.

Written from the published algorithms (not copied) as the ground truth the engine must match token for token at
temperature 0; the benchmark times them as "the reference loop": one full forward over the canvas per step, one
request at a time, no cache, no early exit. Sources (digest: /work/shared/reference/dllm.md, sections 1.1, 2.2, 7.2):
- LLaDA: ML-GSAI/LLaDA@b7e6c35:generate.py `generate()` (HEAD); `confidence_dtype=torch.float64` is the pre-f51cb17
  (2025-06-02) float64 confidence softmax, also used by Fast-dLLM and APD.
- Dream: NVlabs/Fast-dLLM@24cc59e:dream/model/generation_utils.py `_sample`, `sample_tokens`, `top_p_logits`,
  `top_k_logits`, with per-row top-k. Dream's right logit shift is applied here; models return unshifted logits.
Deviations: Dream's `Categorical(probs).sample()` becomes `torch.multinomial(probs, 1, generator=...)` (same
distribution; Categorical's silent argmax fallback on a failed simplex check is not reproduced), and with
`confidence_dtype` set Dream's full-row confidence keeps that dtype (published: logits dtype; equal when None).
At T > 0 `generator` (None = torch's global RNG) is drawn from in the published order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _canvas(model: nn.Module, prompt_ids: Sequence[int], mask_id: int, gen_length: int) -> tuple[Tensor, int]:
    device = next(model.parameters()).device
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long, device=device)
    x[0, : len(prompt)] = prompt
    return x, len(prompt)


def _transfer_counts(masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: `masked // steps` per step, the remainder going to the earliest steps."""
    base, remainder = divmod(masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def _gumbel_noisy(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """argmax of exp(l) / (-log u)^T is a sample at temperature T; float64 on purpose (arXiv 2409.02908).
    At T == 0 the logits themselves come back (the same tensor: the EOS/EoT quirk relies on that aliasing)."""
    if temperature == 0:
        return logits
    l64 = logits.to(torch.float64)
    u = torch.rand(l64.shape, dtype=torch.float64, generator=generator, device=l64.device)
    return l64.exp() / (-torch.log(u)) ** temperature


def llada_reference(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    mask_id: int,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    eos_id: int | None = None,
    eot_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    confidence_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """LLaDA `generate()` for one prompt; returns the gen_length ids after the prompt."""
    if min(steps, gen_length, block_length) <= 0 or temperature < 0:
        raise ValueError("steps, gen_length and block_length must be positive and temperature >= 0")
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks}")
    if remasking not in LLADA_REMASKING:
        raise ValueError(f"remasking must be one of {LLADA_REMASKING}, got {remasking!r}")
    if (logits_eos_inf or confidence_eos_eot_inf) and eos_id is None:
        raise ValueError("logits_eos_inf and confidence_eos_eot_inf need eos_id")
    if confidence_eos_eot_inf and eot_id is None:
        raise ValueError("confidence_eos_eot_inf needs eot_id")
    steps_per_block = steps // num_blocks

    with torch.inference_mode():
        x, p = _canvas(model, prompt_ids, mask_id, gen_length)
        prompt_index = x != mask_id
        for block in range(num_blocks):
            block_end = p + (block + 1) * block_length
            in_block = x[0, block_end - block_length : block_end]
            for k in _transfer_counts(int((in_block == mask_id).sum()), steps_per_block):
                mask_index = x == mask_id  # (1, L)
                if cfg_scale > 0:
                    unconditional = x.masked_fill(prompt_index, mask_id)
                    cond, uncond = model(torch.cat([x, unconditional])).logits.chunk(2)
                    logits = uncond + (cfg_scale + 1) * (cond - uncond)
                else:
                    logits = model(x).logits  # (1, L, V)
                if logits_eos_inf:
                    assert eos_id is not None
                    logits[:, :, eos_id] = -torch.inf
                noisy = _gumbel_noisy(logits, temperature, generator)
                x0 = noisy.argmax(-1)  # (1, L)
                if confidence_eos_eot_inf:
                    assert eos_id is not None and eot_id is not None
                    # HEAD's chained `noisy[eos] = logits[eot] = -inf`: at T == 0 both hit the same tensor.
                    noisy[:, :, eos_id] = -torch.inf
                    logits[:, :, eot_id] = -torch.inf
                if remasking == "low_confidence":
                    probs = logits.softmax(-1) if confidence_dtype is None else logits.to(confidence_dtype).softmax(-1)
                    x0_p = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (1, L)
                else:
                    x0_p = torch.rand(x0.shape, generator=generator, device=x0.device)
                x0_p[:, block_end:] = -torch.inf
                x0 = torch.where(mask_index, x0, x)
                confidence = torch.where(mask_index, x0_p, -torch.inf)
                chosen = torch.topk(confidence[0], k).indices  # full-row call: its tie order is the reference
                x[0, chosen] = x0[0, chosen]
    return x[0, p:].tolist()


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest prefix (by descending logit) whose probability mass exceeds top_p; always the best one."""
    sorted_logits, order = logits.sort(-1, descending=True)
    mass = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = torch.zeros_like(mass, dtype=torch.bool)
    drop_sorted[..., 1:] = mass[..., :-1] > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def _top_k(logits: Tensor, top_k: int) -> Tensor:
    kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def _dream_sample_tokens(
    logits: Tensor,
    alg: str,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    confidence_dtype: torch.dtype | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Dream's `sample_tokens` on (n, V) logits: (confidence (n,), token ids (n,))."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k is not None:
        logits = _top_k(logits, top_k)
    probs = logits.softmax(-1) if confidence_dtype is None else logits.to(confidence_dtype).softmax(-1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values  # the same values as the published full descending sort
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)  # negative entropy: higher = surer
    return confidence, x0


def dream_reference(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    mask_id: int,
    steps: int,
    gen_length: int,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    confidence_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Dream `_sample` for one prompt; returns the gen_length ids after the prompt."""
    if steps <= 0 or gen_length <= 0 or temperature < 0:
        raise ValueError("steps and gen_length must be positive and temperature >= 0")
    if alg not in DREAM_ALGS:
        raise ValueError(f"alg must be one of {DREAM_ALGS}, got {alg!r}")

    def sample_tokens(rows: Tensor) -> tuple[Tensor, Tensor]:
        return _dream_sample_tokens(rows, alg, temperature, top_p, top_k, confidence_dtype, generator)

    with torch.inference_mode():
        x, p = _canvas(model, prompt_ids, mask_id, gen_length)
        timesteps = torch.linspace(1, eps, steps + 1, device=x.device)  # float32, as published
        for i in range(steps):
            last = i == steps - 1
            mask_index = x == mask_id  # (1, L)
            logits = model(x).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # row i now scores position i
            mask_logits = logits[mask_index]  # (n_masked, V)
            t, s = timesteps[i], timesteps[i + 1]
            if alg == "origin":
                p_transfer = 1 if last else 1 - s / t
                chosen = torch.rand(mask_logits.size(0), generator=generator, device=x.device) < p_transfer
                x0 = torch.full_like(chosen, mask_id, dtype=torch.long)
                if chosen.any():
                    x0[chosen] = sample_tokens(mask_logits[chosen])[1]
                x[mask_index] = x0
                continue
            confidence, x0 = sample_tokens(mask_logits)
            num_mask = mask_index.sum() / 1  # a float32 tensor: the count is floored in float32 arithmetic
            n = int(num_mask) if last else int(num_mask * (1 - s / t))
            if n == 0:
                continue
            full_confidence = torch.full(x.shape, -torch.inf, dtype=confidence.dtype, device=x.device)
            full_confidence[mask_index] = confidence
            if alg_temp is None or alg_temp == 0:
                chosen = torch.topk(full_confidence[0], n).indices
            else:
                weights = (full_confidence[0] / alg_temp).softmax(-1)
                chosen = torch.multinomial(weights, n, generator=generator)
            proposal = torch.full_like(x, mask_id)
            proposal[mask_index] = x0
            x[0, chosen] = proposal[0, chosen]
    return x[0, p:].tolist()
