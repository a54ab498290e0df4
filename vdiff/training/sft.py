"""Batches and losses: LLaDA's SFT objective for the diffusion model, next-token loss for the verifier.

LLaDA SFT (GUIDELINES.md of ML-GSAI/LLaDA): the prompt is never noised; every answer token
(the answer padded with EOS to a fixed length, so the model learns where answers end) is
replaced by the mask token with probability p_mask = (1 - eps) * t + eps, t ~ U(0, 1) per
sequence; the loss is the cross-entropy on masked positions divided by p_mask, summed per
sequence, normalised by the answer length and averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_FLOOR = 1e-3  # LLaDA's eps: even t = 0 masks some tokens, so every example teaches something

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class SFTBatch:
    input_ids: Tensor  # (B, L) prompt + fixed-length answer, right-padded with EOS
    answer: Tensor  # (B, L) True on the answer region (answer + its EOS pads), never on padding
    keep: Tensor  # (B, L) True on real tokens; padding is masked on the key side, as the engine does


def sft_batch(prompts: Sequence[list[int]], answers: Sequence[list[int]], answer_len: int, eos: int) -> SFTBatch:
    """Prompt ids + answer ids padded with EOS to `answer_len`, rows right-padded to the longest."""
    rows, regions = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        if len(answer) > answer_len:
            raise ValueError(f"an answer of {len(answer)} tokens does not fit the answer length {answer_len}")
        rows.append(prompt + answer + [eos] * (answer_len - len(answer)))
        regions.append((len(prompt), len(prompt) + answer_len))
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), eos, dtype=torch.long)
    answer_region = torch.zeros_like(input_ids, dtype=torch.bool)
    keep = torch.zeros_like(answer_region)
    for i, (row, (start, end)) in enumerate(zip(rows, regions, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        answer_region[i, start:end] = True
        keep[i, : len(row)] = True
    return SFTBatch(input_ids, answer_region, keep)


def stratified_times(batch: int, generator: torch.Generator) -> Tensor:
    """(B,) t ~ U(0, 1) per row, one draw in each of B equal strata (same law, lower loss variance)."""
    strata = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    return strata[torch.randperm(batch, generator=generator)]


def llada_sft_loss(model: nn.Module, batch: SFTBatch, mask_id: int, generator: torch.Generator) -> Tensor:
    """The noise is drawn on the CPU generator (the same masks on every device), the model runs where it is."""
    rows, length = batch.input_ids.shape
    t = stratified_times(rows, generator)
    p_mask = ((1 - MASK_FLOOR) * t + MASK_FLOOR)[:, None].expand(rows, length)  # (B, L)
    masked = (torch.rand(rows, length, generator=generator) < p_mask) & batch.answer
    device = next(model.parameters()).device
    noisy = torch.where(masked, mask_id, batch.input_ids).to(device)
    keep = None if bool(batch.keep.all()) else batch.keep.to(device)
    logits = model(noisy, attention_mask=keep).logits  # (B, L, V)
    targets, weights = batch.input_ids[masked].to(device), p_mask[masked].to(device)
    token_loss = F.cross_entropy(logits[masked.to(device)].float(), targets, reduction="none") / weights
    answer_len = batch.answer.sum(dim=1, keepdim=True).expand(rows, length)[masked].to(device)
    return (token_loss / answer_len).sum() / rows


def causal_lm_loss(model: nn.Module, batch: SFTBatch, eos: int) -> Tensor:
    """Next-token loss on the answer and its first EOS only: an AR model stops at that EOS."""
    labels = batch.input_ids.masked_fill(~_answer_through_first_eos(batch, eos), -100)
    device = next(model.parameters()).device
    return model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.keep.long().to(device), labels=labels.to(device)
    ).loss


def _answer_through_first_eos(batch: SFTBatch, eos: int) -> Tensor:
    is_eos = (batch.input_ids == eos) & batch.answer
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # (B, L) an EOS earlier in the answer
    return batch.answer & ~eos_seen_before
