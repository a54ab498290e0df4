"""Request lifecycle through the engine: streaming, seeds, abort, stop strings, length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import EngineFactory
from vdiff import LLM, Engine, EngineConfig, SamplingParams
from vdiff.outputs import GenerationOutput, RequestOutput

PROMPT = [11, 22, 33, 44, 55]


def drain(engine: Engine) -> list[RequestOutput]:
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return outputs


def test_streamed_deltas_add_up_to_the_final_output(llm: LLM) -> None:
    engine = llm.engine
    request_id = engine.add_request(PROMPT, SamplingParams(max_tokens=24, steps=12, full_canvas=True))
    outputs = [o for o in drain(engine) if o.request_id == request_id]
    streamed = [token for o in outputs for token in o.new_token_ids]
    final = outputs[-1]
    assert final.finished and final.finish_reason == "length"
    assert streamed == final.token_ids and len(final.token_ids) == 24
    assert all(not o.finished for o in outputs[:-1])
    assert [o.nfe for o in outputs] == sorted(o.nfe for o in outputs)
    assert final.text == llm.tokenizer.decode(final.token_ids)


@pytest.mark.parametrize("algorithm", ["low_confidence", "random", "origin", "entropy"])
def test_same_seed_same_tokens_at_temperature_above_zero(engines: EngineFactory, dtype: str, algorithm: str) -> None:
    """A seed fixes the tokens whoever shares the batch (batch-invariant mode, in which that holds
    bit for bit on every machine), and another seed gives others."""
    llm = engines("dream" if algorithm in ("origin", "entropy") else "llada", dtype, True)
    params = SamplingParams(max_tokens=16, steps=16, temperature=0.9, top_p=0.95, algorithm=algorithm, full_canvas=True)
    first = llm.generate([PROMPT], params.replace(seed=1234))[0].token_ids
    crowded = llm.generate([PROMPT, [9] * 12, [4, 5]], params.replace(seed=1234))[0].token_ids
    other = llm.generate([PROMPT], params.replace(seed=99))[0].token_ids
    assert first == crowded
    assert first != other


def test_unseeded_requests_follow_the_engine_seed(tiny_dream: Path) -> None:
    params = SamplingParams(max_tokens=16, steps=16, temperature=1.0, full_canvas=True)
    runs = [LLM(model=tiny_dream, seed=5).generate([PROMPT, PROMPT], params) for _ in range(2)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
    assert runs[0][0].token_ids != runs[0][1].token_ids  # each request draws its own seed


def test_abort_mid_generation_frees_the_slot(tiny_llada: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_llada), max_num_seqs=1))
    first = engine.add_request(PROMPT, SamplingParams(max_tokens=32, steps=32, full_canvas=True))
    second = engine.add_request(PROMPT, SamplingParams(max_tokens=8, steps=8, full_canvas=True))
    for _ in range(3):
        engine.step()
    assert [r.request_id for r in engine.scheduler.running] == [first]
    assert engine.abort(first)
    assert not engine.abort(first)  # already gone
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == first]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].nfe == 3
    assert [r.request_id for r in engine.scheduler.running] == [second]
    finals = [o for o in drain(engine) if o.finished]
    assert [(o.request_id, o.finish_reason, o.nfe) for o in finals] == [(second, "length", 8)]


def test_abort_of_a_waiting_request(tiny_llada: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_llada), max_num_seqs=1))
    engine.add_request(PROMPT, SamplingParams(max_tokens=8, steps=8), "running")
    engine.add_request(PROMPT, SamplingParams(max_tokens=8, steps=8), "waiting")
    engine.step()
    assert engine.abort("waiting")
    finals = {o.request_id: o for o in drain(engine) if o.finished}
    assert finals["waiting"].finish_reason == "abort" and finals["waiting"].nfe == 0
    assert finals["running"].finish_reason in ("stop", "length")


def test_stop_string_cuts_the_text_and_finishes_with_stop(llm: LLM) -> None:
    params = SamplingParams(max_tokens=32, steps=32, full_canvas=True, seed=0)  # Dream's origin reveals at random
    full = llm.generate([PROMPT], params)[0]
    text = full.text
    clean = [i for i in range(1, len(text) - 2) if "\ufffd" not in text[i : i + 2]]  # random bytes decode to U+FFFD
    stop = text[clean[len(clean) // 2] : clean[len(clean) // 2] + 2]
    cut = llm.generate([PROMPT], params.replace(stop=[stop, "never-in-this-text"]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    assert stop in llm.tokenizer.decode(cut.token_ids)
    assert stop not in llm.tokenizer.decode(cut.token_ids[:-1])  # ids end with the token completing it
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_stop_token_ids_end_with_stop_reason(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, steps=24, full_canvas=True, seed=0)
    full = llm.generate([PROMPT], params)[0].token_ids
    stop = full[10]
    out = llm.generate([PROMPT], params.replace(stop_token_ids=[stop]))[0]
    assert out.token_ids == full[: full.index(stop) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_ends_the_answer_unless_full_canvas(llada_llm: LLM) -> None:
    """Banning EOS everywhere but one position is not possible from outside, so use EoT-free runs:
    find a seed whose answer holds the end-of-turn token and check the cut."""
    special = llada_llm.tokenizer.special
    params = SamplingParams(max_tokens=32, steps=32, temperature=1.5, full_canvas=True)
    for seed in range(60):
        full = llada_llm.generate([PROMPT], params.replace(seed=seed))[0].token_ids
        hits = [i for i, t in enumerate(full) if t in special.stop_ids]
        if hits:
            break
    else:
        pytest.fail("no seed in 60 produced a stop token from the tiny model")
    stopped = llada_llm.generate([PROMPT], params.replace(seed=seed, full_canvas=False))[0]
    assert stopped.token_ids == full[: hits[0] + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", None)


SEEDS = range(4)
HEAD_ROWS = ("model.transformer.ff_out.weight", "lm_head.weight")  # LLaDA's and Dream's output rows


def end_tokens(llm: LLM) -> set[int]:
    special = llm.tokenizer.special
    return {*special.stop_ids, special.pad}


@pytest.fixture(scope="module", params=["llada", "dream"])
def eos_prone_llm(request: pytest.FixtureRequest, tiny_pairs: dict[str, tuple[Path, Path]]) -> LLM:
    """A tiny model (float32, batch-invariant, with its verifier) whose end tokens' output rows
    are scaled 100 times: wherever a hidden state leans towards one, it wins, so answers end within
    a few tokens, as a trained model's do, where the random model alone rarely writes one."""
    model, verifier = tiny_pairs[request.param]
    llm = LLM(model=model, verifier=str(verifier), dtype="float32", batch_invariant=True)
    weights = dict(llm.model.named_parameters())
    head = next(weights[name] for name in HEAD_ROWS if name in weights)
    with torch.no_grad():
        head[sorted(end_tokens(llm))] *= 100
    return llm


@pytest.fixture(scope="module")
def tiny_pairs(
    tiny_llada: Path, tiny_llada_verifier: Path, tiny_dream: Path, tiny_dream_verifier: Path
) -> dict[str, tuple[Path, Path]]:
    return {"llada": (tiny_llada, tiny_llada_verifier), "dream": (tiny_dream, tiny_dream_verifier)}


def hot_runs(llm: LLM, algorithm: str | None, **flags: bool) -> list[GenerationOutput]:
    """32 tokens at temperature 1.5 (one per step where steps apply), one request per seed."""
    steps = None if algorithm == "apd" else 32
    params = SamplingParams(max_tokens=32, steps=steps, temperature=1.5, algorithm=algorithm)
    params = params.replace(**flags)
    return llm.generate([PROMPT] * len(SEEDS), [params.replace(seed=s) for s in SEEDS])


@pytest.mark.parametrize("algorithm", [None, "apd"])
def test_full_canvas_keeps_the_end_tokens(eos_prone_llm: LLM, algorithm: str | None) -> None:
    """The answers that stop at an end token are the start of the full canvases (batch-invariant:
    the stopping requests leave the batch early, which must not move a token)."""
    llm, ends = eos_prone_llm, end_tokens(eos_prone_llm)
    stopping = hot_runs(llm, algorithm)
    assert all(o.finish_reason == "stop" and len(o.token_ids) < 32 for o in stopping)
    canvases = hot_runs(llm, algorithm, full_canvas=True)
    for canvas, answer in zip(canvases, stopping, strict=True):
        assert (len(canvas.token_ids), canvas.finish_reason) == (32, "length")
        assert canvas.token_ids[: len(answer.token_ids)] == answer.token_ids
        assert answer.token_ids[-1] in ends


@pytest.mark.parametrize("algorithm", [None, "apd"])
def test_ignore_eos_gives_only_real_tokens(eos_prone_llm: LLM, algorithm: str | None) -> None:
    """vLLM's ignore_eos, which benchmark clients count on: max_tokens tokens and not one end
    token, from a model that ends every one of these answers early without it."""
    assert all(o.finish_reason == "stop" for o in hot_runs(eos_prone_llm, algorithm))
    banned = hot_runs(eos_prone_llm, algorithm, ignore_eos=True)
    for out in banned:
        assert (len(out.token_ids), out.finish_reason) == (32, "length")
        assert not end_tokens(eos_prone_llm) & set(out.token_ids)
    both = hot_runs(eos_prone_llm, algorithm, ignore_eos=True, full_canvas=True)  # nothing to keep
    assert [o.token_ids for o in both] == [o.token_ids for o in banned]


def test_ignore_eos_on_the_demo_model_gives_tokens_a_client_counts() -> None:
    """The trained model ends this answer after two or three characters; with ignore_eos it writes
    16 real ones, and re-tokenizing the text (what genai-perf counts) finds all 16."""
    llm = LLM(model="vdiff-demo", dtype="float32")
    tokenizer = llm.engine.tokenizer
    special = {*tokenizer.hf.all_special_ids, *tokenizer.hf.added_tokens_decoder}
    messages = [{"role": "user", "content": "What is 46 + 95?"}]
    params = SamplingParams(max_tokens=16, temperature=0.0, threshold=0.95)
    assert llm.chat(messages, params)[0].finish_reason == "stop"
    (out,) = llm.chat(messages, params.replace(ignore_eos=True))
    assert (len(out.token_ids), out.finish_reason) == (16, "length")
    assert not special & set(out.token_ids)
    assert len(tokenizer.encode(out.text)) == 16


def test_max_tokens_not_a_multiple_of_block_length_is_rounded_up_then_cut(llada_llm: LLM) -> None:
    engine = llada_llm.engine
    request_id = engine.add_request(PROMPT, SamplingParams(max_tokens=10, block_length=4, steps=6, full_canvas=True))
    request = engine._requests[request_id]
    assert request.gen_length == 12  # three blocks of four
    final = [o for o in drain(engine) if o.request_id == request_id][-1]
    assert final.finish_reason == "length"
    assert len(final.token_ids) == 10


def test_duplicate_request_id_is_refused(llada_llm: LLM) -> None:
    engine = llada_llm.engine
    engine.add_request(PROMPT, SamplingParams(max_tokens=4), "same")
    with pytest.raises(ValueError, match="request_id 'same' is already in use"):
        engine.add_request(PROMPT, SamplingParams(max_tokens=4), "same")
    drain(engine)
