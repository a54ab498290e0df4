"""The canvas stream through a real `vdiff` serving the demo model: over SSE (the `openai` client
ignores it), in whole responses, over gRPC from the `vdiff` ensemble; and with the option off,
the SSE bytes are what they were before the canvas stream existed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from clients import stream_infer
from command_harness import served_vdiff
from conftest import ROOT
from vdiff import LLM, SamplingParams
from vdiff.canvas_stream import replay
from vdiff.serve.launcher import ServerAddress

QUESTION = [{"role": "user", "content": "Count from 3 to 9"}]
ONE_PER_STEP = {"max_tokens": 24, "steps": 24, "block_length": 8}
# the events are compared bit for bit (their probabilities too) with the offline engine's: both pin
# the dtype, float32, which is also what "auto" gives the demo model on every CPU (a narrow model)
DTYPE = "float32"
# captured from the server at 9e83d6b, before the canvas stream, with "created" set to 0
GOLDEN = ROOT / "tests" / "data" / "sse"
GOLDEN_BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": (
        "chat/completions",
        {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "stream_options": {"include_usage": True}},
    ),
    "chat_steps": ("chat/completions", {"messages": QUESTION, **ONE_PER_STEP}),
    "completion": ("completions", {"prompt": "Spell cat", "max_tokens": 24, "steps": 24}),
}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[int, ServerAddress]]:
    with served_vdiff(None, "--dtype", DTYPE) as running:
        yield running


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(dtype=DTYPE)  # the shipped demo model, as `vdiff` serves it


def chat_events(llm: LLM, **fields: Any) -> tuple[str, list[dict[str, Any]]]:
    (out,) = llm.chat(QUESTION, SamplingParams(temperature=0, stream_canvas=True, **fields))
    return out.text, [event.to_json() for event in out.canvas]


def golden_body(name: str, port: int, extra: dict[str, Any]) -> str:
    path, body = GOLDEN_BODIES[name]
    if name == "completion":  # the chat prompt's ids, so that the demo model answers
        messages = [{"role": "user", "content": body["prompt"]}]
        tokenized = httpx.post(f"http://127.0.0.1:{port}/tokenize", json={"messages": messages}, timeout=30)
        body = body | {"prompt": tokenized.json()["tokens"]}
    full = {"model": "vdiff-demo", "temperature": 0, "stream": True, **body, **extra}
    headers = {"X-Request-Id": f"golden-{name}"}
    text = httpx.post(f"http://127.0.0.1:{port}/v1/{path}", json=full, headers=headers, timeout=60).text
    return re.sub(r'"created":\d+', '"created":0', text)


@pytest.mark.parametrize("name", sorted(GOLDEN_BODIES))
def test_without_stream_canvas_the_sse_bytes_are_unchanged(served: tuple[int, ServerAddress], name: str) -> None:
    port, _ = served
    expected = (GOLDEN / f"{name}.txt").read_text()
    assert golden_body(name, port, {}) == expected
    assert golden_body(name, port, {"stream_canvas": False}) == expected


def test_sse_chunks_carry_each_step_beside_the_deltas(served: tuple[int, ServerAddress], offline: LLM) -> None:
    """The `openai` client reads the stream as usual; each chunk's choice carries its steps, and
    they are the offline engine's events exactly (the same model, dtype and machine, alone)."""
    port, _ = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
    stream = client.chat.completions.create(
        model="vdiff-demo",
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        stream=True,
        max_tokens=ONE_PER_STEP["max_tokens"],
        extra_body={"stream_canvas": True, "steps": 24, "block_length": 8},
    )
    text, events = "", []
    for chunk in stream:
        (choice,) = chunk.choices
        text += choice.delta.content or ""
        events += (choice.model_extra or {}).get("canvas", [])
    expected_text, expected_events = chat_events(offline, **ONE_PER_STEP)
    assert text == expected_text == "3 4 5 6 7 8 9"
    assert events == expected_events and len(events) > 3
    answer = offline.tokenizer.encode(expected_text)
    assert replay(events)[: len(answer)] == answer


def test_a_whole_response_carries_every_step(served: tuple[int, ServerAddress], offline: LLM) -> None:
    port, _ = served
    body = {"model": "vdiff-demo", "messages": QUESTION, "temperature": 0, "stream_canvas": True}
    chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).json()
    (choice,) = chat["choices"]
    assert (choice["message"]["content"], choice["canvas"]) == chat_events(offline)
    plain = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", json=body | {"stream_canvas": False}, timeout=60
    ).json()
    assert "canvas" not in plain["choices"][0]


def test_the_triton_ensemble_returns_the_steps_as_an_output(served: tuple[int, ServerAddress], offline: LLM) -> None:
    _, triton = served
    prompt = offline.tokenizer.apply_chat_template(QUESTION)
    values = {"text_input": prompt, "max_tokens": 24, "steps": 24, "block_length": 8, "temperature": 0.0}
    result = stream_infer(triton.grpc_target, values | {"stream_canvas": True})
    assert result.error is None, result.error
    events = [e for r in result.responses if r["canvas_events"] for e in json.loads(r["canvas_events"])]
    assert result.text == "3 4 5 6 7 8 9"
    assert events == chat_events(offline, **ONE_PER_STEP)[1]
    plain = stream_infer(triton.grpc_target, values)
    assert plain.text == result.text and all(r["canvas_events"] == "" for r in plain.responses)
    whole = stream_infer(triton.grpc_target, values | {"stream": False, "stream_canvas": True})
    (response,) = whole.responses
    assert json.loads(response["canvas_events"]) == events


def test_the_golden_files_are_the_streams_they_claim() -> None:
    """Each golden stream is well-formed SSE ending in [DONE] (a truncated capture would make the
    byte comparison vacuous)."""
    for name in GOLDEN_BODIES:
        text = (GOLDEN / f"{name}.txt").read_text()
        assert text.endswith("data: [DONE]\n\n") and text.count("data: {") >= 2, name
        assert "canvas" not in text
    assert Path(GOLDEN / "chat_steps.txt").read_text().count('"content":') >= 3
