"""The error-code contract: every code as vdiff's models send it, and as the proxy reads it back.

The denoiser's model.py runs in-process (the stand-in `triton_python_backend_utils`) and is made
to send each code for real: a bad input, a full engine, a cancelled client, a failing step, a
request after shutdown and a stop order to a service whose threads are gone. Each error response
carries the code's Triton kind, and the proxy's reader (`request_error`) gets the code, its HTTP
status and rejection reason, and the words without the tag. Over the real tritonserver, the
ensemble's wrapping is read through too, and through the real proxy a refusal is counted under
its code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import pb_utils_standin as pb
from clients import Stream, read_metric, stream_infer
from pb_utils_standin import load_model, scalar
from proxy_harness import SERVED, Proxy
from triton_harness import MAX_NUM_SEQS, MAX_QUEUE_SIZE, Server
from vdiff.tokenizer import Tokenizer
from vdiff_client.codes import ErrorCode, read_error, tagged
from vdiff_client.triton import request_error

LONG = {"max_tokens": 480, "ignore_eos": True, "stream": True}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_survives_the_ensembles_wrapping(code: ErrorCode) -> None:
    wrapped = f"in ensemble 'vdiff', {tagged(code, 'what went wrong')}"
    error = request_error(wrapped)
    assert (error.code, error.message, error.status) == (code, "what went wrong", code.http_status)
    assert error.reason == (code.value if code.is_refusal else None)
    assert getattr(pb.TritonError, code.triton_kind) is not None


def test_an_untagged_message_is_an_internal_error() -> None:
    assert read_error("Request for unknown model: 'x' is not found").code is None
    assert request_error("[vdiff:no_such_code] words").status == 500


def denoiser(tiny_llada: Path, monkeypatch: pytest.MonkeyPatch, **parameters: str) -> Any:
    return load_model("diffusion_denoise", tiny_llada, monkeypatch, **parameters)


def request(tiny_llada: Path, max_tokens: int = 8, **inputs: Any) -> pb.Request:
    ids = np.array([Tokenizer.load(tiny_llada).encode("hello")], dtype=np.int32)
    return pb.Request({"input_ids": ids, "max_tokens": scalar(max_tokens, np.int32), **inputs})


def sent_error(sent: pb.Request, timeout: float = 30) -> tuple[int, str]:
    assert sent.sender.closed.wait(timeout)
    response, _ = sent.sender.responses[-1]
    assert response is not None and response.has_error()
    error = response.error()
    return error.code(), error.message()


def assert_reads_as(sent: tuple[int, str], code: ErrorCode) -> None:
    kind, message = sent
    assert kind == getattr(pb.TritonError, code.triton_kind), message
    assert message.startswith(f"[vdiff:{code.value}] ")
    assert request_error(message).code is code and request_error(message).status == code.http_status


def test_the_denoiser_sends_every_code(tiny_llada: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = denoiser(tiny_llada, monkeypatch, max_num_seqs="1", max_queue_size="0")
    try:
        invalid = request(tiny_llada, top_p=scalar(0.0, np.float32))
        running = request(tiny_llada, max_tokens=400, ignore_eos=scalar(True, bool), stream=scalar(True, bool))
        full = request(tiny_llada)
        model.execute([invalid, running, full])
        assert_reads_as(sent_error(invalid), ErrorCode.INVALID_INPUT)
        assert_reads_as(sent_error(full), ErrorCode.CAPACITY)
        running.sender.cancelled = True  # the client went away
        assert_reads_as(sent_error(running), ErrorCode.CANCELLED)

        engine, failing = model.service.engine, request(tiny_llada, max_tokens=64)
        real_step = engine.step

        def fails_once() -> list[Any]:
            engine.step = real_step
            raise RuntimeError("a fault in the step, such as running out of memory")

        engine.step = fails_once
        model.execute([failing])
        assert_reads_as(sent_error(failing), ErrorCode.INTERNAL)
    finally:
        model.finalize()
    late = request(tiny_llada)
    ping = pb.Request({"stop": scalar(True, bool)}, request_id="nobody")
    model.execute([late, ping])
    assert_reads_as(sent_error(late), ErrorCode.SHUTDOWN)
    assert_reads_as(sent_error(ping), ErrorCode.UNAVAILABLE)  # a liveness ping to a stopped service


def test_codes_cross_the_real_server_and_proxy(triton_server: Server, proxy: Proxy) -> None:
    invalid = stream_infer(triton_server.grpc, {"text_input": "x", "max_tokens": 8, "top_p": 0.0})
    assert invalid.error is not None and request_error(invalid.error.message()).code is ErrorCode.INVALID_INPUT
    assert "top_p" in request_error(invalid.error.message()).message
    refusals = f'vdiff:request_rejections_total{{engine="0",model_name="{SERVED[0]}",reason="capacity"}}'
    direct = [Stream(triton_server.grpc) for _ in range(MAX_NUM_SEQS + MAX_QUEUE_SIZE)]
    try:
        for i, stream in enumerate(direct):  # another client of Triton fills the engine
            stream.send("diffusion_denoise", {"input_ids": [5, 6, 7 + i]} | LONG)
        full = stream_infer(triton_server.grpc, {"text_input": "one more", "max_tokens": 8})
        deadline = time.monotonic() + 10
        while full.error is None and time.monotonic() < deadline:  # the streams arrive in any order
            full = stream_infer(triton_server.grpc, {"text_input": "one more", "max_tokens": 8})
        assert full.error is not None and request_error(full.error.message()).code is ErrorCode.CAPACITY
        before = read_metric(f"{proxy.url}/metrics", refusals)
        answer = httpx.post(f"{proxy.v1}/completions", json={"model": SERVED[0], "prompt": "x", "max_tokens": 4})
        assert answer.status_code == 503 and "at capacity" in answer.json()["error"]["message"]
        assert "[vdiff:" not in answer.json()["error"]["message"]
        assert read_metric(f"{proxy.url}/metrics", refusals) == before + 1
    finally:
        for stream in direct:
            stream.cancel()
        in_flight = ("vdiff:num_requests_running", "vdiff:num_requests_waiting")
        deadline = time.monotonic() + 10  # the cancellations reach the engine within a step or two
        while sum(read_metric(triton_server.metrics, name) for name in in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
