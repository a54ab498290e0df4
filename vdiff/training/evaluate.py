"""Held-out accuracy of the demo models, decoded the way they are served.

The diffusion model is judged through the real offline engine (`vdiff.LLM`) with the
checkpoint's own decoding defaults; the verifier greedily through transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vdiff.llm import LLM
from vdiff.sampling_params import SamplingParams


def llada_replies(
    model_dir: Path, questions: Sequence[str], params: SamplingParams, device: str = "cpu", max_num_seqs: int = 64
) -> list[str]:
    llm = LLM(model=str(model_dir), device=device, dtype="float32", max_num_seqs=max_num_seqs)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    return [output.text for output in llm.chat(conversations, params)]


@torch.no_grad()
def ar_replies(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy replies of a transformers causal LM, left-padded so every prompt ends where generation starts."""
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    encoded = tokenizer(
        prompts, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False
    )
    encoded = encoded.to(model.device)
    was_training = model.training
    model.eval()
    generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)  # (B, P + new)
    model.train(was_training)
    return list(tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True))


def format_accuracy(accuracy: dict[str, float]) -> str:
    return " ".join(f"{family} {100 * value:.0f}" for family, value in accuracy.items())
