"""Approximate KV caches (Fast-dLLM's prefix and dual cache) inside continuous batching.

The cache arithmetic is checked against full forwards (on an unchanged canvas a cached window
must score exactly what a full forward scores), the schedule against a batch-1 loop written from
Fast-dLLM's cached generate functions, and the batching against the same request run alone.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from fast_dllm_oracles import fast_dllm_cached_reference

from conftest import LOGIT_RTOL
from vdiff import LLM, SamplingParams
from vdiff.kv_cache import BatchKV, RequestKV, Window

PROMPT = [17, 42, 99, 7, 256, 31, 5]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_cached_window_of_an_unchanged_canvas_scores_what_a_full_forward_scores(
    llm: LLM, dtype: str, mode: str
) -> None:
    """The refresh runs the full forward's shapes: its logits are the same. The window runs fewer
    rows through each matrix product, whose kernels may round by row count: in float32 within 1e-5,
    in bfloat16 within the default mode's stated tolerance."""
    model = llm.model
    canvas = torch.tensor([PROMPT + [llm.tokenizer.special.mask] * 16])  # (1, 23)
    canvas[0, 9] = 60  # a committed answer token, so the window is not all masks
    length, start, end = canvas.shape[1], 11, 15
    full = model(canvas).logits  # (1, L, V)
    kv = RequestKV()
    refreshed = model(canvas, position_ids=torch.arange(length)[None], kv=BatchKV([kv], [Window(0, length, length)]))
    torch.testing.assert_close(refreshed.logits, full, rtol=0, atol=1e-5)
    window = Window(start, length if mode == "prefix" else end, length)
    positions = torch.arange(window.start, window.end)[None]
    cached = model(canvas[:, window.start : window.end], position_ids=positions, kv=BatchKV([kv], [window]))
    tolerance = 1e-5 if dtype == "float32" else LOGIT_RTOL[dtype] * float(full.abs().max())
    torch.testing.assert_close(cached.logits, full[:, window.start : window.end], rtol=0, atol=tolerance)


CASES = [
    {"cache": "prefix", "steps": 32},
    {"cache": "dual", "steps": 32},
    {"cache": "prefix", "steps": 16},
    {"cache": "dual", "steps": 8},
    {"cache": "prefix", "threshold": 0.03},
    {"cache": "dual", "threshold": 0.03},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_cached_decoding_matches_fast_dllm_loop(llm: LLM, case: dict[str, Any]) -> None:
    expected, nfe = fast_dllm_cached_reference(
        llm.model,
        PROMPT,
        mask_id=llm.tokenizer.special.mask,
        gen_length=32,
        block_length=8,
        logits_shift=llm.model.logits_shift,
        **case,
    )
    params = SamplingParams(
        max_tokens=32,
        block_length=8,
        algorithm="low_confidence",
        temperature=0.0,
        full_canvas=True,
        confidence_dtype="float64",
        **case,
    )
    out = llm.generate([PROMPT], params)[0]
    assert (out.token_ids, out.nfe) == (expected, nfe)


def mixed_batch(llm: LLM) -> list[tuple[list[int], SamplingParams]]:
    """Requests with every cache mode, rule and length, in one batch."""
    out = []
    for i, (cache, rule) in enumerate(
        [("prefix", {"steps": 24}), ("none", {"steps": 12}), ("dual", {"threshold": 0.03}), ("none", {"steps": 6}),
         ("dual", {"steps": 24}), ("prefix", {"factor": 2.95}), ("none", {"threshold": 0.03})]
    ):  # fmt: skip
        prompt = [(11 * i + j) % 300 + 1 for j in range(2 + 4 * i)]
        params = SamplingParams(max_tokens=24, block_length=8, algorithm="low_confidence", temperature=0.0, **rule)
        out.append((prompt, params.replace(cache=cache, full_canvas=True)))
    return out


def test_every_request_of_a_mixed_batch_equals_itself_alone(invariant_llm: LLM) -> None:
    llm = invariant_llm
    requests = mixed_batch(llm)
    together = llm.generate([p for p, _ in requests], [s for _, s in requests])
    for (prompt, params), output in zip(requests, together, strict=True):
        alone = llm.generate([prompt], params)[0]
        assert (output.token_ids, output.nfe) == (alone.token_ids, alone.nfe), params


def test_cache_none_is_exactly_the_baseline_alone_and_among_cached_requests(invariant_llm: LLM) -> None:
    llm = invariant_llm
    baseline = SamplingParams(max_tokens=24, block_length=8, steps=24, algorithm="low_confidence", temperature=0.0)
    alone = llm.generate([PROMPT], baseline.replace(full_canvas=True))[0].token_ids
    explicit = llm.generate([PROMPT], baseline.replace(full_canvas=True, cache="none"))[0].token_ids
    crowd = [(PROMPT, baseline.replace(full_canvas=True, cache="none")), *mixed_batch(llm)]
    among = llm.generate([p for p, _ in crowd], [s for _, s in crowd])[0].token_ids
    assert alone == explicit == among


def test_finish_and_abort_free_every_cache(llada_llm: LLM) -> None:
    engine = llada_llm.engine
    caches: list[weakref.ref[RequestKV]] = []
    params = SamplingParams(max_tokens=16, block_length=8, steps=16, cache="dual", full_canvas=True)
    for i in range(200):
        engine.add_request([5 + i % 50, 9, 13], params, request_id=f"kv{i}")
    aborted = 0
    while engine.has_unfinished():
        engine.step()
        for request in engine.scheduler.running:
            if request.kv is not None and all(ref() is not request.kv for ref in caches):
                caches.append(weakref.ref(request.kv))
        if aborted < 20 and engine.scheduler.running:  # abort some mid-block, cache held
            assert engine.abort(engine.scheduler.running[-1].request_id)
            aborted += 1
    gc.collect()
    assert len(caches) >= 180 and aborted == 20
    assert [ref for ref in caches if ref() is not None] == []
    assert not engine._requests


def test_cache_is_refused_where_it_cannot_apply(llm: LLM) -> None:
    with pytest.raises(ValueError, match="cache must be one of"):
        SamplingParams(cache="triple")
    with pytest.raises(ValueError, match="cfg_scale does not combine with cache"):
        llm.generate([PROMPT], SamplingParams(algorithm="low_confidence", cfg_scale=1.0, cache="prefix"))
    with pytest.raises(ValueError, match="cache applies to LLaDA's algorithms"):
        llm.generate([PROMPT], SamplingParams(algorithm="entropy", cache="dual"))
