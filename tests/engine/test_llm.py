"""The offline API: vLLM's shape over the engine."""

from __future__ import annotations

import pytest

from conftest import EngineFactory
from vdiff import LLM, SamplingParams


def test_generate_takes_text_ids_and_dicts_and_keeps_prompt_order(engines: EngineFactory, dtype: str) -> None:
    llada_llm = engines("llada", dtype, True)  # batch-invariant: equal rows of one batch give equal tokens
    params = SamplingParams(max_tokens=8, steps=8, full_canvas=True)
    text = "hello world"
    ids = llada_llm.tokenizer.encode(text)
    outputs = llada_llm.generate([text, ids, {"prompt_token_ids": ids}, [7, 8, 9]], params)
    assert [o.prompt for o in outputs] == [text, None, None, None]
    assert outputs[0].prompt_token_ids == ids
    assert outputs[0].token_ids == outputs[1].token_ids == outputs[2].token_ids  # same prompt, greedy
    assert outputs[3].token_ids != outputs[0].token_ids
    for out in outputs:
        assert (len(out.token_ids), out.finish_reason, out.nfe) == (8, "length", 8)
        assert out.text == llada_llm.tokenizer.decode(out.token_ids)
        assert out.outputs[0].text == out.text  # the vLLM spelling


def test_a_single_prompt_and_per_prompt_params(llada_llm: LLM) -> None:
    (single,) = llada_llm.generate([1, 2, 3], SamplingParams(max_tokens=4, steps=4))
    assert single.prompt_token_ids == [1, 2, 3]
    two = llada_llm.generate(["a", "b"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=8, full_canvas=True)])
    assert len(two[1].token_ids) == 8
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llada_llm.generate(["a", "b"], [SamplingParams()])


def test_chat_applies_the_template(dream_llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    params = SamplingParams(max_tokens=8, steps=8, seed=1, full_canvas=True)
    (reply,) = dream_llm.chat(messages, params)
    templated = dream_llm.tokenizer.apply_chat_template(messages)
    assert reply.prompt == templated and "<|im_start|>assistant" in templated
    assert reply.token_ids == dream_llm.generate(templated, params)[0].token_ids
    assert len(dream_llm.chat([messages, messages], params)) == 2


def test_model_and_tokenizer_are_exposed(llm: LLM) -> None:
    assert llm.model is llm.engine.model
    assert llm.tokenizer.special.mask == llm.model.mask_token_id or llm.model.mask_token_id is None


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "prompt is empty"),
        ([1, 10**9], r"prompt_token_ids\[1\] = 1000000000 is not a token id"),
        ({"ids": [1]}, "needs 'prompt_token_ids'"),
    ],
)
def test_bad_prompts_are_refused_and_nothing_is_left_queued(llada_llm: LLM, prompt: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llada_llm.generate(["fine", prompt], SamplingParams(max_tokens=4))  # type: ignore[list-item]
    llada_llm.engine.step()  # delivers the withdrawn request's abort notice
    assert not llada_llm.engine.has_unfinished()


def test_prompt_holding_the_mask_token_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="is the mask token id"):
        llm.generate([[1, llm.tokenizer.special.mask, 2]])


def test_too_long_a_request_names_max_tokens(llada_llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"max_tokens \(600, 608 canvas positions\).*max_sequence_length \(512\)"):
        llada_llm.generate([[1, 2]], SamplingParams(max_tokens=600, block_length=32))
