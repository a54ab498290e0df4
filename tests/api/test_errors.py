"""Every refusal: status, OpenAI's nested error body, and a server that keeps serving afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from proxy_harness import SERVED, Proxy

LONG = "word " * 5000


def post(proxy: Proxy, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{proxy.v1}{path}", json=body, timeout=60, **kwargs)


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED[0], "prompt": "hi", "max_tokens": 4} | fields


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | fields


BAD_REQUESTS = [
    ("/completions", completion(stream_options={"include_usage": True}), "Stream options can only be defined when"),
    ("/completions", completion(prompt=""), "Either prompt or prompt_embeds must be provided and non-empty."),
    ("/completions", completion(prompt=[]), "Either prompt or prompt_embeds must be provided"),
    ("/completions", completion(n=0), "n must be at least 1"),
    ("/completions", completion(temperature=-1), "temperature must be in [0, 2]"),
    ("/completions", completion(temperature=3), "temperature must be in [0, 2]"),
    ("/completions", completion(top_p=0), "top_p must be in (0, 1]"),
    ("/completions", completion(top_k=-2), "top_k must be 0 (disable), or at least 1"),
    ("/completions", completion(max_tokens=0), "max_tokens must be at least 1"),
    ("/completions", completion(stop=["ok", ""]), "stop cannot contain an empty string"),
    ("/completions", completion(n=2, temperature=0), "n must be 1 when using greedy sampling"),
    ("/completions", completion(seed=2**63), "less_than_equal"),
    ("/completions", completion(seed=-(2**63) - 1), "greater_than_equal"),
    ("/completions", completion(max_tokens="many"), "max_tokens"),
    ("/completions", completion(logprobs=1), "logprobs is not supported"),
    ("/completions", completion(suffix="x"), "suffix is not supported"),
    ("/completions", completion(prompt=[1, 10**9]), "Token id 1000000000 is out of vocabulary"),
    ("/completions", completion(prompt=LONG), "This model's maximum context length is"),
    ("/completions", completion(max_tokens=100000), "'max_tokens' or 'max_completion_tokens' is too large: 100000"),
    ("/completions", completion(steps=7, max_tokens=32, block_length=8), "steps (7) must be a multiple"),
    ("/completions", completion(algorithm="fastest"), "algorithm must be one of"),
    ("/completions", completion(repetition_penalty=1.2), "repetition_penalty other than 1 is not supported"),
    ("/chat/completions", chat(logprobs=True), "logprobs is not supported"),
    ("/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools (function calling)"),
    ("/chat/completions", chat(response_format={"type": "json_object"}), "response_format other than text"),
    ("/chat/completions", chat(messages=[]), "messages must hold at least one message"),
    ("/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only text parts"),
    ("/chat/completions", chat(max_completion_tokens=0), "max_tokens must be at least 1"),
    ("/chat/completions", {"model": SERVED[0]}, "messages"),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD_REQUESTS)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_400_with_the_openai_body(
    proxy: Proxy, path: str, body: Any, message: str, stream: bool
) -> None:
    if stream and "stream_options" in body:
        pytest.skip("stream_options is valid with stream=true")
    response = post(proxy, path, body | {"stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert message in error["message"]


def test_unknown_model_is_404_and_the_client_raises(proxy: Proxy) -> None:
    response = post(proxy, "/completions", completion(model="gpt-5"))
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `gpt-5` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    client = openai.OpenAI(base_url=proxy.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])


def test_wrong_content_type_and_malformed_json_are_400(proxy: Proxy) -> None:
    form = httpx.post(f"{proxy.v1}/completions", data={"prompt": "hi"}, timeout=30)
    assert form.status_code == 400 and "Only 'application/json' is allowed" in form.json()["error"]["message"]
    broken = httpx.post(
        f"{proxy.v1}/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "BadRequestError"


def test_unknown_fields_are_ignored_and_the_server_still_serves(proxy: Proxy) -> None:
    response = post(proxy, "/chat/completions", chat(some_future_field={"x": 1}, messages=[
        {"role": "user", "content": "hi", "extra_key": True}]))  # fmt: skip
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
