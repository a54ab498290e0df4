"""The canvas stream (vdiff/canvas_stream.py) on every decoding strategy: replaying a request's
events rebuilds the canvas it ended with, each event says what its step did, and a request that
does not ask for the stream reports exactly what it reported before (float32, tiny models)."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import EngineFactory
from vdiff import SamplingParams
from vdiff.canvas_stream import replay
from vdiff.engine import Engine
from vdiff.outputs import RequestOutput
from vdiff.request import Request

PROMPT = "a b c"
LLADA = {"steps": 8, "max_tokens": 16, "block_length": 8}
PARALLEL = {"max_tokens": 16, "block_length": 8}  # threshold and factor decide the steps
# family -> label -> sampling fields; every algorithm, rule, cache, guidance and APD's options
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "llada": {
        "low_confidence": {**LLADA, "algorithm": "low_confidence"},
        "random at T 0.8": {**LLADA, "algorithm": "random", "temperature": 0.8, "seed": 3},
        "threshold": {**PARALLEL, "threshold": 0.3},
        "factor": {**PARALLEL, "factor": 1.0},
        "prefix cache": {**PARALLEL, "threshold": 0.3, "cache": "prefix"},
        "dual cache": {**LLADA, "cache": "dual"},
        "cfg": {**LLADA, "cfg_scale": 1.0},
        "apd": {"algorithm": "apd", "max_tokens": 16, "apd_mixture_weight": 0.7},
        "apd window": {"algorithm": "apd", "max_tokens": 16, "apd_kv_window": 4, "apd_max_lookahead": 6},
    },
    "dream": {
        alg: {"algorithm": alg, "steps": 8, "max_tokens": 16, "temperature": 0.0}
        for alg in ("origin", "maskgit_plus", "topk_margin", "entropy")
    }
    | {"apd": {"algorithm": "apd", "max_tokens": 16, "apd_mixture_weight": 0.9}},
}
CASES = [(family, label) for family, labels in SETTINGS.items() for label in labels]


def run(engine: Engine, params: SamplingParams) -> tuple[Request, list[RequestOutput]]:
    """The request as it ended, and its outputs in order."""
    request_id = engine.add_request(PROMPT, params)
    (request,) = [r for r in engine.scheduler.waiting if r.request_id == request_id]
    outputs = []
    while not request.is_finished:
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return request, outputs


@pytest.mark.parametrize(("family", "label"), CASES, ids=[f"{f}-{label}" for f, label in CASES])
def test_replaying_the_events_rebuilds_the_final_canvas(engines: EngineFactory, family: str, label: str) -> None:
    engine = engines(family, "float32").engine
    request, outputs = run(engine, SamplingParams(**SETTINGS[family][label], stream_canvas=True))
    events = [event.to_json() for output in outputs for event in output.canvas]
    final = request.canvas[request.prompt_len :].tolist()
    assert replay(events) == final
    assert [e["step"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["nfe"] == request.nfe and events[-1]["masks"] == final.count(request.mask_id)
    start = events[0]["start"]
    assert (start["prompt_len"], start["length"], start["mask_id"]) == (
        request.prompt_len,
        request.canvas_len,
        request.mask_id,
    )
    assert all("start" not in e for e in events[1:])
    for event in events:
        low, high = event["span"]
        for commit in event["commits"]:
            assert low <= commit["pos"] < high and 0.0 <= commit["conf"] <= 1.0
            assert commit["text"] == engine.tokenizer.decode([commit["id"]], skip_special_tokens=False)
        if request.params.algorithm == "apd":
            drafts = event["apd"]["drafts"]
            accepted = event["apd"]["accepted"]
            assert accepted == len(event["commits"]) >= 1
            assert [(d["pos"], d["id"]) for d in drafts[:accepted]] == [(c["pos"], c["id"]) for c in event["commits"]]
        else:
            assert "apd" not in event


def test_without_the_option_the_outputs_are_what_they_were(engines: EngineFactory) -> None:
    """Off by default: no events, and the same outputs step for step as a request that streams
    its canvas has apart from them (that one also reports the steps that settled nothing)."""
    engine = engines("llada", "float32").engine
    params = SamplingParams(**SETTINGS["llada"]["low_confidence"])
    _, plain = run(engine, params)
    _, streamed = run(engine, params.replace(stream_canvas=True))
    assert all(not output.canvas for output in plain)
    assert len(streamed) > len(plain) and all(output.canvas for output in streamed)

    def news(outputs: list[RequestOutput]) -> list[tuple[Any, ...]]:
        fields = ("new_token_ids", "new_text", "token_ids", "text", "nfe", "finish_reason", "stop_reason")
        kept = [o for o in outputs if o.new_token_ids or o.finished]
        return [tuple(getattr(o, name) for name in fields) for o in kept]

    assert news(streamed) == news(plain)


def test_the_offline_api_returns_every_event(engines: EngineFactory) -> None:
    llm = engines("llada", "float32")
    params = SamplingParams(**SETTINGS["llada"]["threshold"], stream_canvas=True)
    (out,) = llm.generate(PROMPT, params)
    (plain,) = llm.generate(PROMPT, params.replace(stream_canvas=False))
    events = [event.to_json() for event in out.canvas]
    assert len(events) == out.nfe and plain.canvas == () and plain.token_ids == out.token_ids
    assert replay(events)[: len(out.token_ids)] == out.token_ids


def test_stream_canvas_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="stream_canvas"):
        SamplingParams(stream_canvas="yes")  # type: ignore[arg-type]
