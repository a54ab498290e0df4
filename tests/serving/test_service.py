"""DenoiseService with a real engine and in-process sinks: what the denoiser model sends, without Triton."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import SERVED_DTYPE
from vdiff import LLM, SamplingParams
from vdiff.backend.inputs import StreamOptions
from vdiff.backend.responder import Fail, Send, Update, Watch, coalesced
from vdiff.backend.service import DenoiseService, ServiceError
from vdiff.canvas_stream import CanvasEvent
from vdiff.config import DEFAULT_MAX_STOP_STRINGS, EngineConfig
from vdiff.detokenizer import IncrementalDetokenizer
from vdiff.engine import Engine
from vdiff.tokenizer import Tokenizer
from vdiff_client.codes import ErrorCode


@dataclass
class Collector:
    """A Sink that keeps everything and can be cancelled."""

    updates: list[tuple[Update, bool]] = field(default_factory=list)
    errors: list[tuple[ErrorCode, str]] = field(default_factory=list)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def send(self, update: Update, final: bool) -> None:
        self.updates.append((update, final))
        if final:
            self.done.set()

    def fail(self, code: ErrorCode, message: str) -> None:
        self.errors.append((code, message))
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def text(self) -> str:
        return "".join(u.text for u, _ in self.updates)


@pytest.fixture
def service(tiny_llada: Path) -> DenoiseService:
    engine = Engine(EngineConfig(model=str(tiny_llada), max_num_seqs=2, dtype=SERVED_DTYPE))
    service = DenoiseService(engine, max_queue_size=1)
    service.start()
    yield service
    service.shutdown(timeout=30)


def submit(service: DenoiseService, prompt: str, stream: bool = True, echo: bool = False, **params: object):
    sink = Collector()
    ids = service.engine.tokenizer.encode(prompt)
    service.submit("client-id", ids, prompt, SamplingParams(**params), StreamOptions(stream, echo), sink)
    return sink


def test_streamed_deltas_rebuild_the_offline_text(service: DenoiseService, served_llm: LLM) -> None:
    sink = submit(service, "hello there", max_tokens=40)
    assert sink.done.wait(60)
    expected = served_llm.generate("hello there", SamplingParams(max_tokens=40))[0]
    assert sink.text == expected.text
    assert [i for u, _ in sink.updates for i in u.token_ids] == expected.token_ids
    assert [final for _, final in sink.updates] == [False] * (len(sink.updates) - 1) + [True]
    assert sink.updates[-1][0].finish_reason == expected.finish_reason


def test_without_stream_exactly_one_response_carries_everything(service: DenoiseService, served_llm: LLM) -> None:
    sink = submit(service, "hello", stream=False, echo=True, max_tokens=24)
    assert sink.done.wait(60)
    expected = served_llm.generate("hello", SamplingParams(max_tokens=24))[0]
    assert len(sink.updates) == 1 and sink.updates[0][1]
    assert sink.text == "hello" + expected.text


def test_capacity_is_running_plus_queue(service: DenoiseService) -> None:
    long = {"max_tokens": 400, "ignore_eos": True}
    sinks = [submit(service, f"fill {i}", **long) for i in range(3)]  # max_num_seqs 2 + max_queue_size 1
    with pytest.raises(ServiceError) as refused:
        submit(service, "one more", max_tokens=4)
    assert refused.value.code is ErrorCode.CAPACITY and "at capacity (3 requests in flight" in str(refused.value)
    for sink in sinks:
        sink.cancelled = True
    for sink in sinks:
        assert sink.done.wait(30)
        assert sink.errors == [(ErrorCode.CANCELLED, "the request was cancelled")]
    assert service.in_flight == 0


def test_stop_by_client_id_ends_the_stream_with_abort(service: DenoiseService) -> None:
    sink = submit(service, "stop me", max_tokens=400, ignore_eos=True)
    service.stop("client-id")
    assert sink.done.wait(30)
    assert sink.updates[-1] == (sink.updates[-1][0], True) and sink.updates[-1][0].finish_reason == "abort"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_tokens": 100000}, "input 'max_tokens'"),
        ({"steps": 2**31 - 1}, "input 'steps'"),
        ({"block_length": 2**31 - 1}, "input 'block_length'"),
        ({"stop": ("x",) * (DEFAULT_MAX_STOP_STRINGS + 1)}, "input 'stop_words'"),
        ({"stop_token_ids": (10**6,)}, "input 'stop_token_ids'"),
        ({"algorithm": "origin", "steps": 513}, "max_sequence_length (512)"),
    ],
)
def test_engine_refusals_are_raised_at_submit_and_take_no_slot(
    service: DenoiseService, fields: dict[str, object], named: str
) -> None:
    """Checked on the caller's thread, before the engine thread or its memory is involved."""
    with pytest.raises(ServiceError) as refused:
        submit(service, "x", **fields)
    assert refused.value.code is ErrorCode.INVALID_INPUT and named in str(refused.value)
    assert service.in_flight == 0
    assert submit(service, "x", max_tokens=4).done.wait(30)  # still serving


def test_a_refusal_does_not_wait_for_the_step_in_flight(service: DenoiseService) -> None:
    """The engine's checks run on the submitting thread, not after the engine thread's step."""
    stepping, real_step = threading.Event(), service.engine.step

    def slow_step() -> list:
        if not stepping.is_set():
            stepping.set()
            time.sleep(2.0)  # one long forward, as a large model's is
        return real_step()

    service.engine.step = slow_step  # type: ignore[method-assign]
    busy = submit(service, "keep busy", max_tokens=8)
    assert stepping.wait(30)
    started = time.perf_counter()
    with pytest.raises(ServiceError, match="input 'steps'"):
        submit(service, "x", steps=2**31 - 1)
    assert time.perf_counter() - started < 0.5
    assert busy.done.wait(60)


def test_shutdown_lets_running_requests_finish_and_refuses_new_ones(tiny_llada: Path) -> None:
    service = DenoiseService(Engine(EngineConfig(model=str(tiny_llada), dtype=SERVED_DTYPE)), max_queue_size=4)
    service.start()
    sink = submit(service, "finish me", max_tokens=64, ignore_eos=True)
    service.shutdown(timeout=60)
    assert sink.updates[-1][0].finish_reason == "length" and sink.updates[-1][1]
    with pytest.raises(ServiceError, match="shutting down") as refused:
        submit(service, "too late", max_tokens=4)
    assert refused.value.code is ErrorCode.SHUTDOWN


def test_text_deltas_never_split_a_character(tiny_llada: Path) -> None:
    """Read a token at a time, held back at a trailing U+FFFD, deltas rebuild multi-byte text exactly."""
    tokenizer = Tokenizer.load(tiny_llada)
    text = "naïve café — 日本語 ✓ done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the tiny BPE splits these characters into byte pieces
    decoder, pieces = IncrementalDetokenizer(), []
    for k in range(1, len(ids) + 1):
        shown = len(decoder.shown)
        decoder.extend(tokenizer, ids[:k], final=k == len(ids))
        assert "\ufffd" not in decoder.shown[shown:]
        pieces.append(decoder.shown[shown:])
    assert "".join(pieces) == text


def test_a_broken_sender_ends_only_its_own_request(service: DenoiseService, served_llm: LLM) -> None:
    class Broken(Collector):
        def send(self, update: Update, final: bool) -> None:
            raise RuntimeError("the client's stream is gone")

    broken, neighbour = Broken(), Collector()
    ids = service.engine.tokenizer.encode("x")
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    service.submit("", ids, "", params, StreamOptions(stream=True), broken)
    service.submit("", ids, "", params, StreamOptions(stream=True), neighbour)
    assert neighbour.done.wait(30)
    assert neighbour.errors == [] and neighbour.updates[-1][0].finish_reason == "length"
    expected = served_llm.generate("x", params)[0]
    assert neighbour.text == expected.text
    assert service.in_flight == 0


def test_queued_responses_of_a_request_go_out_as_one() -> None:
    """When the sends fall behind, each request's queued deltas are joined, in order, and nothing
    crosses an error or another request's responses."""
    a, b = Collector(), Collector()

    def update(key: str, ids: list[int], text: str, step: int, finish: str = "") -> Update:
        return Update(key, ids, text, 3, step, -1.0 if step == 1 else 0.5, finish)

    queued = [
        Watch("a", a),
        Send("a", a, update("a", [1], "x", 1), False),
        Send("b", b, update("b", [7], "p", 2), False),
        Send("a", a, update("a", [2, 3], "yz", 2), False),
        Send("a", a, update("a", [4], "!", 3, "stop"), True),
        Fail("b", b, ErrorCode.CANCELLED, "the request was cancelled"),
    ]
    sent = coalesced(queued)
    assert [type(m).__name__ for m in sent] == ["Watch", "Send", "Send", "Fail"]
    joined = sent[1]
    assert isinstance(joined, Send) and joined.final
    assert (joined.update.token_ids, joined.update.text) == ([1, 2, 3, 4], "xyz!")
    assert (joined.update.step_index, joined.update.queue_time, joined.update.finish_reason) == (3, 0.5, "stop")
    assert coalesced([Send("b", b, update("b", [7], "p", 2), False), *queued[-1:], *queued[1:2]]) == [
        Send("b", b, update("b", [7], "p", 2), False),
        queued[-1],
        queued[1],
    ]


def test_canvas_events_reach_the_sink_streamed_and_whole(service: DenoiseService, served_llm: LLM) -> None:
    """Streamed: each step's event in the response of its step. Whole: the one response carries
    every step's event. Both are the offline engine's events."""
    params = {"max_tokens": 16, "steps": 8, "block_length": 8, "stream_canvas": True}
    (offline,) = served_llm.generate("hello", SamplingParams(**params))  # type: ignore[arg-type]
    expected = [event.to_json() for event in offline.canvas]
    streamed = submit(service, "hello", **params)
    whole = submit(service, "hello", stream=False, **params)
    assert streamed.done.wait(60) and whole.done.wait(60)
    assert [e.to_json() for u, _ in streamed.updates for e in u.canvas] == expected
    ((only, final),) = whole.updates
    assert final and [e.to_json() for e in only.canvas] == expected
    plain = submit(service, "hello", max_tokens=16, steps=8, block_length=8)
    assert plain.done.wait(60) and all(u.canvas == () for u, _ in plain.updates)


def test_joined_responses_keep_every_canvas_event_in_order() -> None:
    sink = Collector()
    events = [CanvasEvent(step, step, 8 - step, (0, 8), ()) for step in (1, 2, 3)]
    sends = [
        Send("a", sink, Update("a", [], "", 3, i + 1, 0.5, "", "", (event,)), False) for i, event in enumerate(events)
    ]
    (joined,) = coalesced(sends)  # type: ignore[arg-type]
    assert isinstance(joined, Send) and joined.update.canvas == tuple(events)
