"""Schema-driven fuzzing over real HTTP: request bodies that mix valid fields with hostile values, and raw bytes.

Every answer must be below 500 (a 4xx with OpenAI's error body), none may hang (the client times out), and
the server must be healthy afterwards. Bounded and reproducible for CI: a fixed example budget, derandomized,
no example database. Valid values are kept small (max_tokens <= 8, steps <= 8, at most 2 x 2 choices) so that
bodies that do generate are quick and never exceed the test server's 8 slots (a full server's 503 is not a
bad-input bug).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients import sse_events
from proxy_harness import SERVED, Proxy

TIMEOUT_S = 30  # a hang, not a slow answer: the slowest valid body here takes well under a second
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip

# integers stay tiny or extreme: a mid-sized `n` or prompt list would be valid and only fill the server
EXTREME_INTS = st.sampled_from([-(2**63) - 1, -(2**31) - 1, -1, 0, 129, 513, 2**31 - 1, 2**32 + 5, 2**63, 2**70])
EXTREME_FLOATS = st.sampled_from([-1e308, -0.0, 5e-324, 0.5, 3.0, 1e308])
SCALARS = st.none() | st.booleans() | st.integers(-2, 2) | EXTREME_INTS | EXTREME_FLOATS | st.text(max_size=12)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=6), inner, max_size=2),
    max_leaves=6,
)  # fmt: skip


NUMBERS = st.one_of(EXTREME_INTS, EXTREME_FLOATS, st.integers(-2, 2))
HOSTILE = st.one_of(NUMBERS, NUMBERS, JSON_VALUES)
NUMERIC_FIELDS = ["max_tokens", "max_completion_tokens", "n", "top_k", "seed", "steps", "block_length",
                  "temperature", "top_p", "cfg_scale", "alg_temp", "threshold", "factor", "best_of", "logprobs",
                  "priority", "apd_mixture_weight", "apd_kv_window", "apd_max_lookahead"]  # fmt: skip
TEXT = st.text(max_size=24)
IDS = st.lists(st.integers(0, 389), min_size=1, max_size=8)  # the tiny vocabulary has 390 ids
PROMPTS = st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=2), IDS, st.lists(IDS, min_size=1, max_size=2))
# each field's valid values, small enough to generate in well under a second
SAMPLING = {
    "model": st.sampled_from([SERVED[0], SERVED[1], ""]),
    "max_tokens": st.integers(1, 8),
    "n": st.sampled_from([1, 1, 2]),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 389), max_size=3),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "steps": st.integers(1, 8),
    "block_length": st.sampled_from([4, 8]),
    "algorithm": st.sampled_from(["low_confidence", "random", "apd"]),
    "cfg_scale": st.floats(0, 2),
    "threshold": st.floats(0.01, 1),
    "factor": st.floats(0.1, 10),
    "cache": st.sampled_from(["none", "prefix", "dual"]),
    "apd_mixture_weight": st.floats(0, 1),
    "apd_kv_window": st.integers(1, 8),
    "apd_max_lookahead": st.integers(1, 8),
    "user": TEXT,
}
COMPLETION = SAMPLING | {"prompt": PROMPTS, "echo": st.booleans(), "suffix": st.none()}
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"])}, optional={"text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "wizard"])},
    optional={"content": st.one_of(TEXT, st.lists(PART, max_size=2), st.none()), "name": TEXT},
)
CHAT = SAMPLING | {
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_completion_tokens": st.integers(1, 8),
    "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(),
    "echo": st.booleans(),
    "chat_template_kwargs": st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2),
}
UNKNOWN_FIELDS = st.dictionaries(st.text(min_size=1, max_size=10), JSON_VALUES, max_size=2)


def bodies(fields: dict[str, st.SearchStrategy[Any]], *required: str) -> st.SearchStrategy[Any]:
    """A valid body (some fields, `required` always) with up to two fields set to extremes or anything,
    plus unknown fields; one time in ten any JSON value at all."""
    others = {name: value for name, value in fields.items() if name not in required}
    valid = st.fixed_dictionaries({name: fields[name] for name in required}, optional=others)
    broken = st.dictionaries(st.sampled_from(sorted(fields)), HOSTILE, max_size=2)
    objects = st.builds(lambda body, bad, extra: extra | body | bad, valid, broken, UNKNOWN_FIELDS)
    return st.integers(0, 9).flatmap(lambda roll: JSON_VALUES if roll == 0 else objects)


LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", '"\\ud800"', '"a\\udfffb"', "9" * 5000, "[" * 3000]
JSON = "application/json"
CONTENT_TYPES = ["application/json; charset=utf-8", "text/plain", "", "application/x-json",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]  # fmt: skip


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """Bytes no JSON encoder writes: non-JSON literals in a field, cut-off bodies, random bytes; any content type."""
    valid = json.dumps({"model": SERVED[0], "prompt": "hi", "max_tokens": 4, "stream": draw(st.booleans())})
    field = draw(st.sampled_from(["temperature", "top_p", "max_tokens", "n", "steps", "stop", "prompt", "x"]))
    body = draw(st.one_of(
        st.sampled_from(LITERALS).map(lambda literal: (valid[:-1] + f', "{field}": {literal}}}').encode()),
        st.integers(0, len(valid)).map(lambda cut: valid[:cut].encode()),
        st.binary(max_size=64),
        st.binary(min_size=1, max_size=8).map(lambda noise: valid[:-2].encode() + noise + b"}"),
    ))  # fmt: skip
    return body, draw(st.sampled_from(CONTENT_TYPES) if draw(st.integers(0, 3)) == 0 else st.just(JSON))


def check_answer(response: httpx.Response) -> None:
    """Below 500; errors in OpenAI's body; a stream ends with [DONE] and reports no server error in-band."""
    assert response.status_code < 500, response.text[:1000]
    if response.status_code >= 400:
        assert response.json()["error"]["code"] == response.status_code
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
        errors = [event["error"] for event in sse_events(response.text.replace("data: [DONE]", "")) if "error" in event]
        assert all(error["code"] < 500 for error in errors), errors


@pytest.fixture(scope="module")
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=TIMEOUT_S) as http:
        yield http


@FUZZ
@given(body=bodies(COMPLETION, "prompt"))
def test_completions_never_fail_on_bad_input(client: httpx.Client, body: Any) -> None:
    check_answer(client.post("/v1/completions", json=body))


@FUZZ
@given(body=bodies(CHAT, "messages", "max_completion_tokens"))  # else the model's 128 tokens: slow
def test_chat_never_fails_on_bad_input(client: httpx.Client, body: Any) -> None:
    check_answer(client.post("/v1/chat/completions", json=body))


@settings(FUZZ, max_examples=150)
@given(field=st.sampled_from(NUMERIC_FIELDS), value=NUMBERS, chat=st.booleans(), stream=st.booleans())
def test_extreme_numbers_in_numeric_fields(
    client: httpx.Client, field: str, value: Any, chat: bool, stream: bool
) -> None:
    """One field at a time on an otherwise valid body: reaches the checks that a mostly-broken body never does."""
    body = {"model": SERVED[0], "max_tokens": 4, "temperature": 1.0, "stream": stream}  # n > 1 allowed
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    check_answer(client.post("/v1/chat/completions" if chat else "/v1/completions", json=body | {field: value}))


@FUZZ
@given(raw=raw_bodies(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]))
def test_raw_bytes_never_fail(client: httpx.Client, raw: tuple[bytes, str], path: str) -> None:
    content, content_type = raw
    check_answer(client.post(path, content=content, headers={"content-type": content_type} if content_type else {}))


def test_the_server_is_healthy_after_fuzzing(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    answer = client.post("/v1/completions", json={"model": SERVED[0], "prompt": "hi", "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
