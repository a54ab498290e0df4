"""Completions and chat through the real stack (OpenAI server -> tritonserver -> engine) with the `openai` client."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from proxy_harness import SERVED, Proxy
from vdiff import LLM, SamplingParams


@pytest.fixture(scope="module")
def client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key="unused", max_retries=0)


def offline_text(llm: LLM, prompt: str, **params: object) -> str:
    return llm.generate(prompt, SamplingParams(**params))[0].text  # type: ignore[arg-type]


def test_completion_equals_the_offline_engine_with_exact_usage(client: openai.OpenAI, served_llm: LLM) -> None:
    prompt = "Hello there"
    result = client.completions.create(model=SERVED[0], prompt=prompt, max_tokens=5, temperature=0)
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == SERVED[0]
    assert len(result.choices) == 1 and result.choices[0].finish_reason == "length"
    assert result.choices[0].text == offline_text(served_llm, prompt, max_tokens=5, temperature=0.0)
    prompt_tokens = len(served_llm.tokenizer.encode(prompt))
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt_tokens, 5)
    assert result.usage.total_tokens == prompt_tokens + 5


def test_parallel_decoding_fields_reach_the_engine(client: openai.OpenAI, served_llm: LLM) -> None:
    prompt = "Hello there"
    for rule in ({"threshold": 0.03}, {"factor": 2.95}, {"threshold": 0.03, "cache": "prefix"}, {"cache": "dual"}):
        fields = {"block_length": 8, "ignore_eos": True, **rule}
        result = client.completions.create(model=SERVED[0], prompt=prompt, max_tokens=16, extra_body=fields)
        assert result.choices[0].text == offline_text(served_llm, prompt, max_tokens=16, temperature=0.0, **fields)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVED[0], prompt=prompt, max_tokens=4, extra_body={"threshold": 2.0})
    assert caught.value.body["param"] == "threshold" and "threshold must be in (0, 1]" in caught.value.message


def test_apd_fields_reach_the_engine(client: openai.OpenAI, served_llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    for setting in (
        {"apd_mixture_weight": 0.9},
        {"apd_mixture_weight": 0.5, "apd_kv_window": 4, "apd_max_lookahead": 6},
    ):
        fields = {"algorithm": "apd", "ignore_eos": True, **setting}
        result = client.chat.completions.create(model=SERVED[0], messages=messages, max_tokens=16, extra_body=fields)
        expected = served_llm.chat([messages], SamplingParams(max_tokens=16, temperature=0.0, **fields))[0]
        assert result.choices[0].message.content == expected.outputs[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVED[0], prompt="hi", max_tokens=4, extra_body={"apd_mixture_weight": 2.0})
    assert caught.value.body["param"] == "apd_mixture_weight" and "must be in [0, 1], got 2.0" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVED[0], prompt="hi", max_tokens=4, extra_body={"apd_kv_window": 2**40})
    assert caught.value.body["param"] == "apd_kv_window" and "must be at most 2147483647" in caught.value.message


def test_every_served_name_and_no_name_are_accepted(proxy: Proxy, client: openai.OpenAI) -> None:
    alias = client.completions.create(model=SERVED[1], prompt="hi", max_tokens=2)
    assert alias.model == SERVED[0]
    raw = httpx.post(f"{proxy.v1}/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert raw.status_code == 200 and raw.json()["model"] == SERVED[0]
    assert [m.id for m in client.models.list().data] == list(SERVED)


def test_stream_joins_to_the_non_streamed_text(client: openai.OpenAI) -> None:
    kwargs = {"model": SERVED[0], "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["length"] and chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_token_id_prompts_batches_and_n(client: openai.OpenAI, served_llm: LLM) -> None:
    ids = served_llm.tokenizer.encode("Hello there")
    by_ids = client.completions.create(model=SERVED[0], prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=SERVED[0], prompt="Hello there", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=SERVED[0], prompt=["same", "same"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == batch.choices[1].text
    many = client.completions.create(model=SERVED[0], prompt=["a", "b"], n=2, max_tokens=4, temperature=1.0, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage is not None and many.usage.completion_tokens == 16


def test_streamed_n_gives_each_choice_one_finish(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(model=SERVED[0], prompt="x", n=3, max_tokens=8, temperature=0.9, stream=True)
    )
    assert all(len(c.choices) == 1 for c in chunks)
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert finished == [0, 1, 2]


def test_stop_strings_and_echo(client: openai.OpenAI, served_llm: LLM) -> None:
    free = offline_text(served_llm, "Hello", max_tokens=16, temperature=0.0)
    stop = free.strip()[:1] or "u"
    expected = offline_text(served_llm, "Hello", max_tokens=16, temperature=0.0, stop=[stop])
    result = client.completions.create(model=SERVED[0], prompt="Hello", max_tokens=16, temperature=0, stop=stop)
    assert result.choices[0].text == expected and stop not in expected
    assert result.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model=SERVED[0], prompt="Hello", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")
    streamed = list(
        client.completions.create(model=SERVED[0], prompt="Hello", max_tokens=4, temperature=0, echo=True, stream=True)
    )
    assert streamed[0].choices[0].text.startswith("Hello")
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_stop_reason_names_the_stop_string_or_token_that_ended_the_choice(
    client: openai.OpenAI, served_llm: LLM
) -> None:
    """vLLM's stop_reason: the matched stop string, the stop token id, None for length (or EOS),
    whole and in the stream's last chunk, in completions and chat."""
    free = served_llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0.0))[0]
    stop, token = free.text.strip()[:1] or "u", free.token_ids[0]
    asks: list[tuple[dict[str, object], object]] = [
        ({"stop": [stop]}, stop),
        ({"extra_body": {"stop_token_ids": [token]}}, token),
        ({}, None),
    ]
    for fields, reason in asks:
        whole = client.completions.create(model=SERVED[0], prompt="Hello", max_tokens=16, temperature=0, **fields)
        assert whole.choices[0].finish_reason == ("length" if reason is None else "stop")
        assert whole.choices[0].model_extra["stop_reason"] == reason  # type: ignore[index]
        chunks = list(
            client.completions.create(
                model=SERVED[0], prompt="Hello", max_tokens=16, temperature=0, stream=True, **fields
            )
        )
        assert chunks[-1].choices[0].model_extra["stop_reason"] == reason  # type: ignore[index]
    messages = [{"role": "user", "content": "Hello"}]
    first = served_llm.chat(messages, SamplingParams(max_tokens=16, temperature=0.0))[0].token_ids[0]
    chat = client.chat.completions.create(model=SERVED[0], messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"stop_token_ids": [first]})  # fmt: skip
    assert chat.choices[0].finish_reason == "stop"
    assert chat.choices[0].model_extra["stop_reason"] == first  # type: ignore[index]


def test_usage_chunks(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=SERVED[0], prompt="hi", max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 8
    assert all(c.usage is None for c in chunks[:-1])
    continuous = list(
        client.chat.completions.create(
            model=SERVED[0],
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in continuous[1:] if c.usage is not None]
    assert counts == sorted(counts) and counts[-1] == 8


def test_chat_stream_starts_with_the_role_and_joins_to_the_answer(client: openai.OpenAI, served_llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    whole = client.chat.completions.create(model=SERVED[0], messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert whole.id.startswith("chatcmpl-") and whole.choices[0].message.role == "assistant"
    expected = served_llm.chat(messages, SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage is not None and whole.usage.completion_tokens == len(expected.token_ids)
    chunks = list(
        client.chat.completions.create(model=SERVED[0], messages=messages, max_tokens=12, temperature=0, stream=True)  # type: ignore[arg-type]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]


def test_chat_content_parts_and_max_completion_tokens(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=SERVED[0], messages=[{"role": "user", "content": "hello"}], max_completion_tokens=6, temperature=0
    )
    parts = client.chat.completions.create(
        model=SERVED[0],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        max_tokens=6,
        temperature=0,
    )
    assert plain.choices[0].message.content == parts.choices[0].message.content
    assert plain.usage is not None and plain.usage.completion_tokens <= 6


def test_raw_sse_framing(proxy: Proxy) -> None:
    body = {"model": SERVED[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{proxy.v1}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1])
    first = json.loads(events[0][len("data: ") :])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    completion = {"model": SERVED[0], "prompt": "hi", "max_tokens": 4, "stream": True}
    chunks = httpx.post(f"{proxy.v1}/completions", json=completion, timeout=60).text.split("\n\n")
    assert all('"usage":null' in chunk for chunk in chunks if chunk.startswith("data: {"))


def test_tokenize_and_detokenize(proxy: Proxy, tiny_llada: Path, served_llm: LLM) -> None:
    ids = served_llm.tokenizer.encode("hello world")
    answer = httpx.post(f"{proxy.url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert (
        answer["tokens"] == ids
        and answer["count"] == len(ids)
        and answer["max_model_len"] == proxy.config.max_model_len
    )
    chat = httpx.post(f"{proxy.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    back = httpx.post(f"{proxy.url}/detokenize", json={"tokens": ids}).json()
    assert back == {"prompt": "hello world"}
