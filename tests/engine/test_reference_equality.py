"""At temperature 0 and batch 1 the engine gives the published samplers' tokens.

The oracles in tests/oracles.py are straightforward loops written from the published algorithms
(one full forward per step, no early exit). With early exit on, the engine is compared up to and
including the first stop token; with full_canvas it must reproduce the whole canvas.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fast_dllm_oracles import fast_dllm_reference

from oracles import dream_reference, llada_reference
from vdiff import LLM, SamplingParams

PROMPT = [17, 42, 99, 7, 256, 31, 5]


def first_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Tokens up to and including the first stop token (all of them when there is none)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


def engine_tokens(llm: LLM, **params: Any) -> list[int]:
    return llm.generate([PROMPT], SamplingParams(**params))[0].token_ids


LLADA_CASES = [
    {"max_tokens": 32, "steps": 32, "block_length": 32},
    {"max_tokens": 32, "steps": 16, "block_length": 8},
    {"max_tokens": 24, "steps": 12, "block_length": 8},
    {"max_tokens": 32, "steps": 8, "block_length": 32},
    {"max_tokens": 16, "steps": 16, "block_length": 4, "cfg_scale": 1.5},
    {"max_tokens": 32, "steps": 32, "block_length": 16, "logits_eos_inf": True},
    {"max_tokens": 32, "steps": 32, "block_length": 16, "confidence_eos_eot_inf": True},
    {"max_tokens": 32, "steps": 16, "block_length": 16, "confidence_dtype": "float64"},
    {"max_tokens": 16, "steps": 16, "block_length": 8, "algorithm": "random", "seed": 7},
]


@pytest.mark.parametrize("case", LLADA_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("early_exit", [True, False], ids=["early-exit", "whole-canvas"])
def test_llada_matches_published_generate(llada_llm: LLM, case: dict[str, Any], early_exit: bool) -> None:
    special = llada_llm.tokenizer.special
    seed = case.get("seed")
    expected = llada_reference(
        llada_llm.model,
        PROMPT,
        mask_id=special.mask,
        steps=case["steps"],
        gen_length=case["max_tokens"],
        block_length=case["block_length"],
        cfg_scale=case.get("cfg_scale", 0.0),
        remasking=case.get("algorithm", "low_confidence"),
        eos_id=special.eos,
        eot_id=special.eot,
        logits_eos_inf=case.get("logits_eos_inf", False),
        confidence_eos_eot_inf=case.get("confidence_eos_eot_inf", False),
        confidence_dtype=torch.float64 if case.get("confidence_dtype") == "float64" else None,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )
    got = engine_tokens(llada_llm, temperature=0.0, full_canvas=not early_exit, **case)
    assert got == (first_stop(expected, set(special.stop_ids)) if early_exit else expected)


@pytest.mark.parametrize("algorithm", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [24, 10])
@pytest.mark.parametrize("early_exit", [True, False], ids=["early-exit", "whole-canvas"])
def test_dream_matches_published_sampler(dream_llm: LLM, algorithm: str, steps: int, early_exit: bool) -> None:
    special = dream_llm.tokenizer.special
    expected = dream_reference(
        dream_llm.model,
        PROMPT,
        mask_id=special.mask,
        steps=steps,
        gen_length=24,
        alg=algorithm,
        generator=torch.Generator().manual_seed(11),  # origin reveals positions at random even at T=0
    )
    got = engine_tokens(
        dream_llm, max_tokens=24, steps=steps, algorithm=algorithm, temperature=0.0, seed=11, full_canvas=not early_exit
    )
    assert got == (first_stop(expected, set(special.stop_ids)) if early_exit else expected)


# The tiny random models' confidences sit near 1/vocab (0.02-0.05), so these thresholds and factors
# commit anywhere from one token per step to a whole block at once.
PARALLEL_CASES = [
    {"threshold": 0.9},
    {"threshold": 0.03},
    {"threshold": 0.02, "block_length": 16},
    {"factor": 1.0},
    {"factor": 2.95},
    {"factor": 10.0, "block_length": 4},
    {"threshold": 0.5, "algorithm": "random", "seed": 5},
]


@pytest.mark.parametrize("case", PARALLEL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_parallel_decoding_matches_fast_dllm(llm: LLM, case: dict[str, Any]) -> None:
    """Threshold and factor rules at batch 1: Fast-dLLM's tokens and its forward count, for both families."""
    case = {"block_length": 8, "algorithm": "low_confidence", **case}
    seed = case.get("seed")
    expected, nfe = fast_dllm_reference(
        llm.model,
        PROMPT,
        mask_id=llm.tokenizer.special.mask,
        gen_length=32,
        block_length=case["block_length"],
        threshold=case.get("threshold"),
        factor=case.get("factor"),
        remasking=case["algorithm"],
        logits_shift=llm.model.logits_shift,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )
    out = llm.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0.0, full_canvas=True, **case))[0]
    assert (out.token_ids, out.nfe) == (expected, nfe)


def test_early_exit_stops_at_the_first_stop_token_the_reference_would_keep(llada_llm: LLM) -> None:
    """A stop token in the middle of the reference answer: the engine stops there, with fewer forwards."""
    special = llada_llm.tokenizer.special
    expected = llada_reference(llada_llm.model, PROMPT, mask_id=special.mask, steps=32, gen_length=32, block_length=8)
    stop = expected[len(expected) // 2]
    out = llada_llm.generate([PROMPT], SamplingParams(max_tokens=32, steps=32, block_length=8, stop_token_ids=[stop]))
    assert out[0].token_ids == first_stop(expected, {stop, *special.stop_ids})
    assert out[0].finish_reason == "stop"
    assert out[0].nfe < 32
