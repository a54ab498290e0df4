"""Adaptive Parallel Decoding inside continuous batching.

Tokens and rounds equal a batch-1 loop of APD's published `apd_sample` (tests/apd_oracle.py), on
random tiny models of both families with a random tiny verifier and on the trained demo model
with its trained verifier; R = 1 accepts whole lookaheads; requests at different cursors and with
different strategies share batches; caches go with their requests.
"""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from apd_oracle import apd_reference

from conftest import write_verifier
from vdiff import LLM, SamplingParams
from vdiff.decoding.apd import Draft
from vdiff.models import ModelLoadError
from vdiff.training.demo_task import held_out_set
from vdiff.verifier import VerifierRound, VerifierState

PROMPT = [17, 42, 99, 7, 256, 31, 5]


@pytest.fixture(scope="module")
def demo_llm(dtype: str) -> LLM:
    return LLM(model="vdiff-demo", verifier="vdiff-demo-ar", dtype=dtype, max_num_seqs=16)


@pytest.fixture(scope="module")
def demo_llm_f32() -> LLM:
    """The demo pair in float32, where the batched verifier's claims are stated."""
    return LLM(model="vdiff-demo", verifier="vdiff-demo-ar", dtype="float32", max_num_seqs=16)


def chat_prompts(llm: LLM, count: int) -> list[list[int]]:
    template = llm.tokenizer.apply_chat_template
    return [llm.tokenizer.encode(template([{"role": "user", "content": p.question}])) for p in held_out_set(count)]


def reference(llm: LLM, prompt: list[int], gen_length: int, stop_ids: set[int], **apd: Any) -> tuple[list[int], int]:
    return apd_reference(
        llm.model, llm.engine.verifier.model, prompt, gen_length=gen_length,
        mask_id=llm.tokenizer.special.mask, stop_ids=stop_ids, **apd,
    )  # fmt: skip


CASES = [
    {"mixture_weight": 0.7},
    {"mixture_weight": 0.5, "kv_window": 4, "max_lookahead": 6},
    {"mixture_weight": 0.9, "max_lookahead": 5},
    {"mixture_weight": 0.7, "kv_window": 2},
    {"mixture_weight": 0.0, "kv_window": 8, "max_lookahead": 8},  # the verifier alone judges
]


def apd_params(case: dict[str, Any], **more: Any) -> SamplingParams:
    fields = {f"apd_{k}": v for k, v in case.items()}
    return SamplingParams(algorithm="apd", **{"temperature": 0.0, **fields, **more})


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_apd_matches_the_published_loop_on_tiny_models(llm: LLM, case: dict[str, Any]) -> None:
    expected, rounds = reference(llm, PROMPT, 24, set(), **case)
    out = llm.generate([PROMPT], apd_params(case, max_tokens=24, full_canvas=True))[0]
    assert (out.token_ids, out.nfe) == (expected, rounds)
    assert rounds < 24 or case["mixture_weight"] < 0.7  # some round accepted more than one token


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["plain", "window-lookahead", "window"])
def test_apd_matches_the_published_loop_on_the_demo_models(demo_llm: LLM, case: dict[str, Any]) -> None:
    stop_ids = set(demo_llm.tokenizer.special.stop_ids)
    rounds_total = tokens_total = 0
    for prompt in chat_prompts(demo_llm, 2):
        expected, rounds = reference(demo_llm, prompt, 40, stop_ids, **case)
        out = demo_llm.generate([prompt], apd_params(case, max_tokens=40))[0]
        assert (out.token_ids, out.nfe) == (expected, rounds), demo_llm.tokenizer.decode(prompt)
        rounds_total, tokens_total = rounds_total + rounds, tokens_total + len(expected)
    assert tokens_total >= 2 * rounds_total  # the trained pair accepts several tokens a round


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 1.3, "top_p": 0.9, "top_k": 20}]
)
@pytest.mark.parametrize("lookahead", [None, 4, 5])
def test_mixture_weight_one_accepts_every_lookahead(llm: LLM, sampling: dict[str, Any], lookahead: int | None) -> None:
    """R = 1: the mixture is the draft model's own choice, so every round commits its whole window."""
    params = apd_params({"mixture_weight": 1.0, "max_lookahead": lookahead, "kv_window": 3}, max_tokens=24)
    out = llm.generate([PROMPT], params.replace(full_canvas=True, seed=5, **sampling))[0]
    assert len(out.token_ids) == 24
    assert out.nfe == (1 if lookahead is None else math.ceil(24 / lookahead))


def test_apd_streams_several_tokens_a_step(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(PROMPT, apd_params({"mixture_weight": 1.0, "max_lookahead": 6}, max_tokens=24, full_canvas=True))
    deltas = []
    while engine.has_unfinished():
        deltas += [len(o.new_token_ids) for o in engine.step()]
    assert deltas == [6, 6, 6, 6]


def mixed_batch() -> list[tuple[list[int], SamplingParams]]:
    """APD at different settings and temperatures beside the schedule, threshold, cache and CFG."""
    settings = [
        apd_params({"mixture_weight": 0.7}),
        SamplingParams(algorithm="low_confidence", steps=24, block_length=8, cache="dual"),
        apd_params({"mixture_weight": 0.5, "kv_window": 4, "max_lookahead": 6}),
        SamplingParams(algorithm="low_confidence", steps=24, block_length=8, cfg_scale=1.0),
        apd_params({"mixture_weight": 0.8, "max_lookahead": 5}, temperature=0.7, top_p=0.9, seed=3),
        SamplingParams(algorithm="low_confidence", threshold=0.03, block_length=8),
        apd_params({"mixture_weight": 0.9, "kv_window": 2}, temperature=1.0, seed=4),
    ]
    out = []
    for i, params in enumerate(settings):
        prompt = [(11 * i + j) % 300 + 1 for j in range(2 + 4 * i)]
        out.append((prompt, params.replace(max_tokens=24, full_canvas=True, temperature=params.temperature or 0.0)))
    return out


def test_every_request_of_a_mixed_batch_equals_itself_alone(invariant_llm: LLM) -> None:
    requests = mixed_batch()
    together = invariant_llm.generate([p for p, _ in requests], [s for _, s in requests])
    for (prompt, params), output in zip(requests, together, strict=True):
        alone = invariant_llm.generate([prompt], params)[0]
        assert (output.token_ids, output.nfe) == (alone.token_ids, alone.nfe), params


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["plain", "window-lookahead"])
def test_sixteen_in_flight_decode_as_each_alone_in_float32(demo_llm_f32: LLM, case: dict[str, Any]) -> None:
    """One verifier forward per step for all APD requests (packed, at different cursors and cache
    lengths, some in their first round) gives each request the tokens and rounds of its batch-1 loop."""
    prompts = chat_prompts(demo_llm_f32, 4)  # 24 problems, six families: 16 in flight, then the rest
    params = apd_params(case, max_tokens=40)
    together = demo_llm_f32.generate(prompts, params)
    for prompt, output in zip(prompts, together, strict=True):
        alone = demo_llm_f32.generate([prompt], params)[0]
        assert (output.token_ids, output.nfe) == (alone.token_ids, alone.nfe), demo_llm_f32.tokenizer.decode(prompt)


@torch.no_grad()
def test_a_packed_verifier_forward_scores_each_round_as_alone(demo_llm_f32: LLM) -> None:
    """Rounds with caches of different lengths and rounds without one, in one forward: each gets the
    logits and the cache it gets alone (float32, to reduction-order rounding)."""
    verifier = demo_llm_f32.engine.verifier
    assert verifier is not None and verifier.packs
    prompts = [torch.tensor(p) for p in chat_prompts(demo_llm_f32, 1)[:5]]
    generator = torch.Generator().manual_seed(0)

    def drafts(count: int) -> torch.Tensor:
        return torch.randint(3, 90, (count,), generator=generator)

    rounds = []
    for i, prompt in enumerate(prompts):
        state, context = VerifierState(), prompt
        if i < 3:  # a round already accepted 1 + i tokens: this one continues from a cache
            first = drafts(6)
            verifier.score([VerifierRound(state, prompt, first)])
            verifier.accept(state, len(prompt), 1 + i)
            context = torch.cat([prompt, first[: 1 + i]])
        rounds.append(VerifierRound(state, context, drafts(2 + 2 * i)))
    copies = [VerifierRound(copied(r.state), r.context, r.drafts) for r in rounds]
    alone = [verifier.score([r])[0] for r in copies]
    packed = verifier.score(rounds)
    for one, many, r, c in zip(alone, packed, rounds, copies, strict=True):
        assert many.shape == one.shape == (len(r.drafts), verifier.vocab_size)
        torch.testing.assert_close(many, one, rtol=0, atol=1e-5 * float(one.abs().max()))
        assert torch.equal(many.argmax(-1), one.argmax(-1))
        verifier.accept(r.state, len(r.context), 1)
        verifier.accept(c.state, len(c.context), 1)
        for (k, v), (k1, v1) in zip(r.state.layers, c.state.layers, strict=True):
            assert k.shape == k1.shape == (1, k.shape[1], len(r.context) + 1, k.shape[3])
            torch.testing.assert_close(k, k1, rtol=0, atol=1e-5 * float(k1.abs().max()))
            torch.testing.assert_close(v, v1, rtol=0, atol=1e-5 * float(v1.abs().max()))


def copied(state: VerifierState) -> VerifierState:
    logits = None if state.next_logits is None else state.next_logits.clone()
    return VerifierState([(k.clone(), v.clone()) for k, v in state.layers], logits)


def test_drafts_after_a_stop_token_are_not_verified() -> None:
    eos = 97
    tokens = torch.tensor([5, 6, eos, 8, eos, 9])
    draft = Draft.of(tokens, torch.arange(6.0)[:, None].expand(6, 128), None, torch.tensor([eos, 98]))
    assert draft.judged.tolist() == [5, 6, eos]
    assert draft.logits.shape == (3, 128) and draft.logits[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert Draft.of(tokens[:2], torch.zeros(2, 128), None, torch.tensor([eos])).judged.tolist() == [5, 6]


def remember_caches(running: list[Any], held: list[weakref.ref[Any]]) -> None:
    for request in running:
        verifier = getattr(request.state, "verifier", None)  # APD's progress holds the verifier's cache
        for state in (request.kv, verifier):
            if state is not None and all(ref() is not state for ref in held):
                held.append(weakref.ref(state))


def test_finish_and_abort_free_the_verifier_and_diffusion_caches(llm: LLM) -> None:
    engine = llm.engine
    held: list[weakref.ref[Any]] = []
    params = apd_params({"mixture_weight": 0.7, "kv_window": 4, "max_lookahead": 6}, max_tokens=16, full_canvas=True)
    for i in range(200):
        engine.add_request([5 + i % 50, 9, 13], params, request_id=f"apd{i}")
    aborted = 0
    while engine.has_unfinished():
        engine.step()
        remember_caches(engine.scheduler.running, held)
        if aborted < 20 and engine.scheduler.running:  # abort some mid-answer, caches held
            assert engine.abort(engine.scheduler.running[-1].request_id)
            aborted += 1
    gc.collect()
    assert len(held) >= 2 * 180 and aborted == 20
    assert [ref for ref in held if ref() is not None] == []
    assert not engine._requests


def test_apd_needs_a_verifier(tiny_llada: Path) -> None:
    llm = LLM(model=tiny_llada)
    with pytest.raises(ValueError, match="algorithm 'apd' needs an autoregressive verifier: start the engine with"):
        llm.generate([PROMPT], SamplingParams(algorithm="apd"))
    assert not llm.engine.has_unfinished()


def test_a_verifier_with_another_vocabulary_is_refused(tiny_llada: Path) -> None:
    with pytest.raises(ModelLoadError, match="verifier 'vdiff-demo-ar' does not share the model's tokenizer: token"):
        LLM(model=tiny_llada, verifier="vdiff-demo-ar")


def test_the_models_own_added_tokens_may_fall_on_rows_the_verifier_leaves_unused(llm: LLM) -> None:
    """As Dream's mask token (151666) falls on a row Qwen2.5-0.5B's tokenizer leaves undefined."""
    verifier = llm.engine.verifier
    verifier.check_vocabulary({"a": 0, "b": 1}, {"a": 0, "b": 1, "<|mask|>": 2})
    with pytest.raises(ModelLoadError, match="token 'c' is id 1 for the diffusion model, the verifier has it as None"):
        verifier.check_vocabulary({"a": 0, "b": 1}, {"a": 0, "c": 1})
    with pytest.raises(ModelLoadError, match="token 'b' is id 2 for the diffusion model, the verifier has it as 1"):
        verifier.check_vocabulary({"a": 0, "b": 1}, {"a": 0, "b": 2})


def test_a_canvas_longer_than_the_verifiers_context_is_refused(tiny_llada: Path, tmp_path: Path) -> None:
    llm = LLM(model=tiny_llada, verifier=str(write_verifier(tiny_llada, tmp_path / "short", max_positions=16)))
    with pytest.raises(ValueError, match=r"exceeds the verifier's max_position_embeddings \(16\)"):
        llm.generate([PROMPT], SamplingParams(algorithm="apd", max_tokens=24))
    assert not llm.engine.has_unfinished()
    assert len(llm.generate([PROMPT], SamplingParams(algorithm="apd", max_tokens=8))[0].token_ids) <= 8


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"algorithm": "apd", "steps": 8}, "steps does not apply to algorithm 'apd'"),
        (
            {"algorithm": "apd", "cache": "dual"},
            "cache does not apply to algorithm 'apd', .*its cache is apd_kv_window",
        ),
        ({"algorithm": "apd", "block_length": 8}, "block_length does not apply to algorithm 'apd'"),
        ({"algorithm": "apd", "threshold": 0.9}, "threshold does not apply to algorithm 'apd'"),
        ({"algorithm": "low_confidence", "apd_kv_window": 4}, "apd_kv_window applies to algorithm 'apd', not"),
        ({"algorithm": "entropy", "apd_mixture_weight": 0.5}, "apd_mixture_weight applies to algorithm 'apd'"),
    ],
)
def test_fields_apd_cannot_honour_are_refused(llm: LLM, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([PROMPT], SamplingParams(**fields))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("apd_mixture_weight", 1.5, "apd_mixture_weight must be a finite number in \\[0, 1\\], got 1.5"),
        ("apd_mixture_weight", float("nan"), "apd_mixture_weight must be a finite number"),
        ("apd_kv_window", 0, "apd_kv_window must be an integer >= 1, got 0"),
        ("apd_max_lookahead", 2.5, "apd_max_lookahead must be an integer >= 1, got 2.5"),
    ],
)
def test_invalid_apd_fields_name_themselves(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
