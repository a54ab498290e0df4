"""Hostile input, one case per class: a 4xx with OpenAI's body and a message naming the problem, never a
5xx or a hang, and a server that answers a normal request afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy_harness import SERVED, Proxy, proxy_config, running_proxy
from triton_harness import Server
from vdiff_client.config import RequestLimits

JSON = {"content-type": "application/json"}
PLAIN = (("content-type", "text/plain"),)
HI = [{"role": "user", "content": "hi"}]


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED[0], "prompt": "hi", "max_tokens": 4} | fields


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED[0], "messages": HI, "max_tokens": 4} | fields


@dataclass(frozen=True)
class Case:
    """`body` is JSON, or raw bytes where STREAM (if present) becomes true or false."""

    name: str
    path: str
    body: dict[str, Any] | bytes
    message: str
    status: int = 400
    headers: tuple[tuple[str, str], ...] = tuple(JSON.items())

    def variants(self) -> list[bytes]:
        if isinstance(self.body, dict):
            return [json.dumps(self.body | {"stream": stream}).encode() for stream in (False, True)]
        if b"STREAM" in self.body:
            return [self.body.replace(b"STREAM", flag) for flag in (b"false", b"true")]
        return [self.body]


def literal(fields: str, head: str = '"prompt": "hi", "max_tokens": 4') -> bytes:
    """A body with what json.dumps never writes (NaN, lone surrogates), in both stream modes."""
    return ("{" + head + ", " + fields + ', "stream": STREAM}').encode()


C, CHAT, MSG = "/v1/completions", "/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}]'
ONE_MB = 1_000_000
# fmt: off
CASES = [
    # JSON has no NaN or Infinity; Python's json parses them anyway
    Case("nan", C, literal('"temperature": NaN'), "temperature must be a finite number"),
    Case("-inf", C, literal('"top_p": -Infinity'), "top_p must be a finite number"),
    Case("1e999", C, literal('"cfg_scale": 1e999'), "cfg_scale must be a finite number, got inf"),
    Case("nan in a map", C, literal('"logit_bias": {"7": NaN}'), "logit_bias.7 must be a finite number"),
    Case("nan, unknown field", C, literal('"x": {"y": [1, NaN]}'), "x.y[1] must be a finite number"),
    Case("nan, chat", CHAT, literal('"temperature": NaN', MSG), "temperature must be a finite number"),
    # huge, negative, beyond the INT32 inputs of the denoiser
    Case("max_tokens 2**70", C, completion(max_tokens=2**70), "'max_tokens' or 'max_completion_tokens' is too large"),
    Case("max_tokens 1e308", C, completion(max_tokens=1e308), "body.max_tokens"),
    Case("max_tokens -1", C, completion(max_tokens=-1), "max_tokens must be at least 1"),
    Case("n 2**70", C, completion(n=2**70, temperature=1.0), "n must be at most 128 (this server's --max-n), got 1180"),
    Case("n -1", C, completion(n=-1), "n must be at least 1"),
    Case("steps 2**70", C, completion(steps=2**70), "steps must be at most 512 (this server's --max-steps)"),
    Case("steps 2**31", C, completion(steps=2**31), "steps must be at most 512"),
    Case("steps -1", C, completion(steps=-1), "steps must be at least 1, got -1"),
    Case("block_length -2**63", C, completion(block_length=-(2**63)), "block_length must be at least 1, got -92233"),
    Case("block_length 2**70", C, completion(block_length=2**70), "block_length must be at most the context length"),
    Case("top_k 2**32 + 5", C, completion(top_k=2**32 + 5), "top_k must be at most 2147483647"),
    Case("cfg_scale 1e308", C, completion(cfg_scale=1e308), "cfg_scale must be at most 3.403e+38 in size"),
    Case("seed 2**70", C, completion(seed=2**70), "less_than_equal"),
    Case("stop_token_ids 2**40", C, completion(stop_token_ids=[2**40]), "out of vocabulary (stop_token_ids"),
    Case("stop_token_ids -1", C, completion(stop_token_ids=[-1]), "Token id -1 is out of vocabulary (stop_token_ids"),
    Case("5000 digits", C, b'{"max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON: Exceeds the limit (4300 digits)"),
    # stop strings
    Case("65 stop strings", C, completion(stop=[f"s{i}" for i in range(65)]), "stop sequences must be at most 64"),
    Case("1 MB stop string", C, completion(stop="x" * ONE_MB), "stop strings must be at most 1024 characters"),
    Case("65 stop_token_ids", C, completion(stop_token_ids=list(range(65))), "stop_token_ids must be at most 64"),
    # prompts
    Case("129 prompts", C, completion(prompt=["hi"] * 129), "prompts must be at most 128 (this server's --max-"),
    Case("10**5 token ids", C, completion(prompt=[5] * 100_000), "your request has 100000 input tokens"),
    Case("1.5 MB of text", C, completion(prompt="word " * 300_000), "your request has at least"),
    Case("nested lists", C, completion(prompt=[[["a"]]]), "body.prompt"),
    Case("ids and text", C, completion(prompt=[1, "a"]), "body.prompt"),
    Case("an empty id list", C, completion(prompt=[[]]), "Either prompt or prompt_embeds must be provided"),
    Case("the mask token", C, completion(prompt="hi <|mdm_mask|>"), "'input_ids': prompt_token_ids"),
    # bodies that are not one JSON object
    Case("invalid UTF-8", C, b'{"prompt": "\xff\xfe"}', "body is not valid UTF-8: invalid start byte at byte 12"),
    Case("truncated", C, b'{"prompt": "hi", "max_', "the request body is not valid JSON: Unterminated string"),
    Case("empty", C, b"", "the request body is empty; send a JSON object"),
    Case("an array", C, b"[]", "the request body must be a JSON object, got an array"),
    Case("a string", CHAT, b'"x"', "the request body must be a JSON object, got a string"),
    Case("a number", C, b"3", "the request body must be a JSON object, got a number"),
    Case("null", CHAT, b"null", "the request body must be a JSON object, got null"),
    Case("deep nesting", C, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    Case("3 MB", C, completion(junk="x" * 3 * ONE_MB), "larger than this server's limit of 2000000 bytes", 413),
    # text that is not Unicode characters
    Case("surrogate, prompt", C, literal('"prompt": "\\ud800"', '"n": 1'), "prompt holds a lone UTF-16 surrogate"),
    Case("surrogate, chat", CHAT, literal('"messages": [{"role": "user", "content": "a\\udc00"}]', '"n": 1'),
         "messages[0].content holds a lone UTF-16 surrogate"),
    Case("surrogate, stop", C, literal('"stop": ["\\ud800"]'), "stop[0] holds a lone UTF-16 surrogate"),
    Case("surrogate, field name", C, literal('"\\ud800": 1'), "a field name holds a lone UTF-16 surrogate"),
    # wrong content type
    Case("text/plain", C, completion(), "Only 'application/json' is allowed", headers=PLAIN),
    Case("no content type", C, completion(), "Only 'application/json' is allowed", headers=()),
    # odd messages, and templates a request brings
    Case("messages, an object", CHAT, chat(messages={"role": "user"}), "body.messages: Input should be a valid list"),
    Case("no role", CHAT, chat(messages=[{"content": "hi"}]), "body.messages.0.role: Field required"),
    Case("content a number", CHAT, chat(messages=[{"role": "user", "content": 3}]), "content.list[TextPart]"),
    Case("a text part without text", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
         "content part 0 has type 'text' but no 'text' field"),
    Case("10**4 messages", CHAT, chat(messages=HI * 10_000), "your request has at least"),
    Case("a request template", CHAT, chat(chat_template="{{ 'a' * 10**9 }}"), "--trust-request-chat-template is not"),
    Case("a template path", "/tokenize", {"messages": HI, "chat_template": "/etc/passwd"}, "--trust-request-chat"),
]
# fmt: on


@pytest.fixture
def still_serving(proxy: Proxy) -> Iterator[Proxy]:
    yield proxy
    answer = httpx.post(f"{proxy.v1}/completions", json=completion(), timeout=60)
    assert answer.status_code == 200, answer.text
    assert httpx.get(f"{proxy.url}/health", timeout=60).status_code == 200


def assert_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and (status != 400 or error["type"] == "BadRequestError")
    assert message in error["message"], error["message"]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_a_4xx_naming_the_problem(still_serving: Proxy, case: Case) -> None:
    for body in case.variants():
        response = httpx.post(still_serving.url + case.path, content=body, headers=dict(case.headers), timeout=60)
        assert_error(response, case.status, case.message)


def test_a_chunked_body_over_the_limit_is_413(still_serving: Proxy) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}'

    response = httpx.post(f"{still_serving.v1}/completions", content=chunks(), headers=JSON, timeout=60)
    assert_error(response, 413, "larger than this server's limit of 2000000 bytes")


def test_a_negative_seed_is_served_and_reproducible(still_serving: Proxy) -> None:
    body = completion(seed=-5, temperature=1.0, max_tokens=8)
    first, second = (httpx.post(f"{still_serving.v1}/completions", json=body, timeout=60) for _ in range(2))
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]


SMALL = RequestLimits(
    max_body_bytes=4096, max_n=2, max_prompts=2, max_tokens=8, max_steps=16, max_stop_sequences=2, max_stop_length=5
)


@pytest.fixture(scope="module")
def small(triton_server: Server, tiny_llada: Path) -> Iterator[Proxy]:
    with running_proxy(proxy_config(tiny_llada, triton_server.grpc, None, limits=SMALL)) as proxy:
        yield proxy


# fmt: off
@pytest.mark.parametrize(("body", "status", "message"), [
    (completion(junk="x" * 5000), 413, "limit of 4096 bytes"),
    (completion(n=3, temperature=1.0), 400, "n must be at most 2 (this server's --max-n), got 3"),
    (completion(prompt=["a", "b", "c"]), 400, "the number of prompts must be at most 2 (this server's --max-prompts)"),
    (completion(max_tokens=9), 400, "max_tokens must be at most 8 (this server's --max-tokens-limit), got 9"),
    (completion(steps=17), 400, "steps must be at most 16 (this server's --max-steps), got 17"),
    (completion(stop=["a", "b", "c"]), 400, "stop sequences must be at most 2 (this server's --max-stop-sequences)"),
    (completion(stop="abcdef"), 400, "at most 5 characters (this server's --max-stop-length), got one of 6"),
])
# fmt: on
def test_configured_limits_name_their_flag(small: Proxy, body: dict[str, Any], status: int, message: str) -> None:
    assert_error(httpx.post(f"{small.v1}/completions", json=body, timeout=60), status, message)
    within = completion(n=2, temperature=1.0, max_tokens=8, steps=8, stop=["abcde", "b"], prompt=["a", "b"])
    assert httpx.post(f"{small.v1}/completions", json=within, timeout=60).status_code == 200
