"""The request limits without a server: flags, body counting, JSON hygiene, cheap prompt bounds, templates."""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from vdiff.serve.cli import openai_parser
from vdiff_client.args import add_frontend_arguments, request_limits
from vdiff_client.config import RequestLimits
from vdiff_client.errors import APIError, install_error_handlers, validation_message
from vdiff_client.limits import BodySizeLimit, check_limits, refuse_non_json_values
from vdiff_client.protocol import CompletionRequest
from vdiff_client.tokenizer import ProxyTokenizer


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_n must be >= 1, got 0"):
        RequestLimits(max_n=0)


def test_limit_flags_reach_request_limits_for_both_commands() -> None:
    flags = ["--max-request-body-bytes", "1000", "--max-n", "3", "--max-prompts", "4", "--max-tokens-limit", "5",
             "--max-steps", "6", "--max-stop-sequences", "7", "--max-stop-length", "8"]  # fmt: skip
    expected = RequestLimits(1000, 3, 4, 5, 6, 7, 8)
    proxy = argparse.ArgumentParser()
    add_frontend_arguments(proxy)  # vdiff-proxy's flags
    assert request_limits(proxy.parse_args(flags)) == expected
    assert request_limits(openai_parser().parse_args(flags)) == expected
    assert request_limits(openai_parser().parse_args([])) == RequestLimits()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 129}, "n must be at most 128 (this server's --max-n), got 129."),
        ({"max_tokens": 9}, "max_tokens must be at most 8 (this server's --max-tokens-limit), got 9."),
        ({"steps": 0}, "steps must be at least 1, got 0."),
        ({"steps": 513}, "steps must be at most 512 (this server's --max-steps), got 513."),
        ({"block_length": -(2**63) - 1}, "block_length must be at least 1"),
        ({"block_length": 513}, "block_length must be at most the context length (512), got 513."),
        ({"top_k": 2**31}, "top_k must be at most 2147483647, got 2147483648."),
        ({"cfg_scale": -1e39}, "cfg_scale must be at most 3.403e+38 in size, got -1e+39."),
        ({"stop": ["x"] * 65}, "the number of stop sequences must be at most 64"),
        ({"stop_token_ids": [1] * 65}, "the number of stop_token_ids must be at most 64"),
        ({"stop": "x" * 1025}, "stop strings must be at most 1024 characters (this server's --max-stop-length)"),
    ],
)
def test_caps_and_input_ranges_name_the_field(fields: dict[str, Any], message: str) -> None:
    request = CompletionRequest(**({"prompt": "x", "max_tokens": 4} | fields))
    with pytest.raises(APIError, match=re.escape(message)) as refused:
        check_limits(request, request.max_tokens, RequestLimits(max_tokens=8), max_model_len=512)
    assert refused.value.param == next(iter(fields))
    check_limits(CompletionRequest(prompt="x", n=128, steps=512, stop=["x"] * 64), 8, RequestLimits(), 512)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"a": [{"b": float("-inf")}]}, "a[0].b must be a finite number, got -inf"),
        ({"messages": [{"content": "x\ud800"}]}, "messages[0].content holds a lone UTF-16 surrogate"),
        ({"x": {"\udfff": 1}}, "a field name holds a lone UTF-16 surrogate"),
    ],
)
def test_values_json_cannot_hold_are_refused_with_their_path(body: dict[str, Any], message: str) -> None:
    with pytest.raises(APIError, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        refuse_non_json_values(body)
    assert refused.value.status == 400


def test_deep_bodies_and_ordinary_values_pass() -> None:
    deep: list[Any] = []
    for _ in range(5000):  # deeper than the recursion limit: the walk uses a stack
        deep = [deep]
    refuse_non_json_values({"prompt": deep, "temperature": 1e308, "stop": ["\U0001f600"], "n": 2**70})
    refuse_non_json_values([float("nan")])  # not an object: pydantic's to refuse


@pytest.mark.parametrize(
    ("errors", "message"),
    [
        ([{"type": "missing", "loc": ("body",)}], "the request body is empty; send a JSON object"),
        ([{"type": "model_attributes_type", "loc": ("body",), "input": []}],
         "the request body must be a JSON object, got an array"),
        ([{"type": "json_invalid", "loc": ("body", 7), "ctx": {"error": "Expecting value"}}],
         "the request body is not valid JSON: Expecting value: character 7"),
        ([{"type": "string_type", "loc": ("body", "x", "list[function-after[_check(), TextPart]]"), "msg": "bad"}],
         "1 validation error: body.x.list[TextPart]: bad (string_type)"),
    ],
)  # fmt: skip
def test_validation_messages_say_what_the_body_is(errors: list[dict[str, Any]], message: str) -> None:
    assert validation_message(errors)[0] == message


def body_app(max_bytes: int) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    return app


async def post(app: FastAPI, content: bytes | AsyncIterator[bytes]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post("/echo", content=content)


async def chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_over_the_limit_get_413_chunked_or_not(chunked: bool) -> None:
    app = body_app(max_bytes=100)
    over = chunks(3, 40) if chunked else b"x" * 120
    refused = asyncio.run(post(app, over))
    assert refused.status_code == 413
    assert refused.json()["error"]["message"] == "the request body is larger than this server's limit of 100 bytes"
    within = asyncio.run(post(app, chunks(2, 50) if chunked else b"x" * 100))
    assert within.status_code == 200 and within.json() == {"size": 100}


class FakeHF:
    """Just enough of a transformers tokenizer: a vocabulary whose longest entry has 4 characters."""

    chat_template = "server template"

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "abcd": 1}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [0] * len(text)

    def apply_chat_template(self, messages: list[Any], **options: Any) -> str:
        return str(options["chat_template"] or self.chat_template)


def test_a_text_too_long_for_the_context_is_refused_before_tokenizing() -> None:
    tokenizer = ProxyTokenizer(FakeHF(), max_model_len=10)
    assert len(tokenizer.encode_prompt("x" * 36, False)) == 36  # at least 9 tokens: may fit
    with pytest.raises(APIError, match="at least 10 input tokens \\(37 characters\\)"):
        tokenizer.encode_prompt("x" * 37, False)


def test_a_request_template_needs_trust_and_is_never_a_file(tmp_path: Any) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    with pytest.raises(APIError, match="--trust-request-chat-template is not set"):
        ProxyTokenizer(FakeHF(), 10).render_chat([], True, template=str(secret))
    trusting = ProxyTokenizer(FakeHF(), 10, trust_request_chat_template=True)
    assert trusting.render_chat([], True, template=str(secret)) == str(secret)
    assert trusting.render_chat([], True) == "server template"
