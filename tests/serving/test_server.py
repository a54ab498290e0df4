"""The model repository on a real tritonserver: streaming, HTTP, concurrency, cancellation, capacity, errors."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from clients import Stream, http_post, read_metric, sse_events, stream_infer
from conftest import DTYPES, EngineFactory
from triton_harness import MAX_NUM_SEQS, MAX_QUEUE_SIZE, Server, start_server
from vdiff import LLM, SamplingParams

PROMPTS = ["hello world", "the quick brown fox", "a", "twelve tokens or so of prompt text here"]


def offline(llm: LLM, prompt: Any, **params: Any) -> Any:
    return llm.generate(prompt, SamplingParams(**params))[0]


def wait_for(condition: Any, timeout: float) -> float:
    """Seconds until condition() held; fails after timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def running(server: Server) -> float:
    return read_metric(server.metrics, "vdiff:num_requests_running")


def waiting(server: Server) -> float:
    return read_metric(server.metrics, "vdiff:num_requests_waiting")


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 24},
        {"max_tokens": 32, "steps": 16, "block_length": 8},
        {"max_tokens": 16, "algorithm": "random", "temperature": 0.0, "seed": 3},
        {"max_tokens": 20, "stop": ["u"]},
        {"max_tokens": 32, "block_length": 8, "threshold": 0.03},
        {"max_tokens": 24, "block_length": 8, "factor": 2.95},
        {"max_tokens": 32, "block_length": 8, "threshold": 0.03, "cache": "dual"},
        {"max_tokens": 24, "steps": 12, "block_length": 8, "cache": "prefix"},
        {"max_tokens": 24, "algorithm": "apd", "apd_mixture_weight": 0.9},
        {"max_tokens": 24, "algorithm": "apd", "apd_mixture_weight": 0.5, "apd_kv_window": 4, "apd_max_lookahead": 6},
    ],
    ids=[
        "default",
        "blocks",
        "random-remasking",
        "stop-words",
        "threshold",
        "factor",
        "dual-cache",
        "prefix-cache",
        "apd",
        "apd-window-lookahead",
    ],  # fmt: skip
)
def test_grpc_stream_equals_offline_engine(triton_server: Server, served_llm: LLM, params: dict[str, Any]) -> None:
    for prompt in PROMPTS:
        expected = offline(served_llm, prompt, **params)
        values = {k if k != "stop" else "stop_words": v for k, v in params.items()}
        result = stream_infer(triton_server.grpc, {"text_input": prompt} | values)
        assert result.error is None
        assert result.text == expected.text
        assert sum(r["num_output_tokens"] for r in result.responses) == len(expected.token_ids)
        assert result.finish_reason == expected.finish_reason
        assert all(r["num_input_tokens"] == len(served_llm.tokenizer.encode(prompt)) for r in result.responses)
        steps = [r["step_index"] for r in result.responses]
        assert steps == sorted(steps) and steps[-1] == expected.nfe


def test_token_id_prompt_and_stop_token_ids_equal_offline_engine(triton_server: Server, served_llm: LLM) -> None:
    ids = served_llm.tokenizer.encode(PROMPTS[0])
    free_run = offline(served_llm, {"prompt_token_ids": ids}, max_tokens=24)
    stop_id = free_run.token_ids[3]
    expected = offline(served_llm, {"prompt_token_ids": ids}, max_tokens=24, stop_token_ids=[stop_id])
    result = stream_infer(triton_server.grpc, {"input_ids": ids, "max_tokens": 24, "stop_token_ids": [stop_id]})
    assert result.error is None
    assert result.text == expected.text and result.finish_reason == expected.finish_reason == "stop"
    assert sum(r["num_output_tokens"] for r in result.responses) == len(expected.token_ids) <= 4  # with the stop id


def test_http_generate_returns_one_response(triton_server: Server, served_llm: LLM) -> None:
    status, body = http_post(f"{triton_server.http}/v2/models/vdiff/generate", {"text_input": "hi", "max_tokens": 16})
    assert status == 200
    response = json.loads(body)
    expected = offline(served_llm, "hi", max_tokens=16)
    assert response["text_output"] == expected.text
    assert response["num_output_tokens"] == len(expected.token_ids)
    assert response["finish_reason"] == "length"


def test_http_generate_stream_sends_deltas(triton_server: Server, served_llm: LLM) -> None:
    body = {"text_input": "hello world", "max_tokens": 24, "stream": True}
    status, text = http_post(f"{triton_server.http}/v2/models/vdiff/generate_stream", body)
    assert status == 200
    events = sse_events(text)
    expected = offline(served_llm, "hello world", max_tokens=24)
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == expected.text
    assert [e["finish_reason"] for e in events] == [""] * (len(events) - 1) + ["length"]


def test_echo_puts_the_prompt_first(triton_server: Server, served_llm: LLM) -> None:
    values = {"text_input": "hello", "max_tokens": 8, "exclude_input_in_output": False}
    result = stream_infer(triton_server.grpc, values)
    assert result.text == "hello" + offline(served_llm, "hello", max_tokens=8).text


@pytest.fixture(scope="module", params=DTYPES)
def invariant_server(
    request: pytest.FixtureRequest, tiny_llada: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """A second tritonserver, in batch-invariant mode (config parameter batch_invariant), per dtype."""
    dtype = str(request.param)
    process = start_server(
        tiny_llada,
        tmp_path_factory.mktemp(f"triton-invariant-{dtype}"),
        dtype=dtype,
        batch_invariant="true",
        max_num_seqs=str(MAX_NUM_SEQS),
        max_queue_size=str(MAX_QUEUE_SIZE),
    )
    yield Server(process.config.address, process), dtype
    process.stop()
    process.wait(60)


def test_eight_concurrent_streams_equal_each_prompt_alone(
    invariant_server: tuple[Server, str], engines: EngineFactory
) -> None:
    """Eight streams at once, sharing forwards in every combination the scheduler makes, each equal
    to the offline engine running its prompt alone: batch-invariant mode, in float32 and bfloat16."""
    server, dtype = invariant_server
    alone = engines("llada", dtype, True)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(2 * MAX_NUM_SEQS)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: stream_infer(server.grpc, {"text_input": p, "max_tokens": 32}), prompts))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.error is None
        assert result.text == offline(alone, prompt, max_tokens=32).text


LONG = {"max_tokens": 480, "ignore_eos": True, "stream": True}  # still running when the test acts


def test_cancelling_an_ensemble_stream_frees_its_slot(triton_server: Server) -> None:
    stream = Stream(triton_server.grpc)
    stream.send("vdiff", {"text_input": "cancel me"} | LONG)
    outputs, final, error = stream.next_response()
    assert error is None and not final
    wait_for(lambda: running(triton_server) == 1, timeout=2.0)  # metrics reach Triton every 0.25 s
    stream.cancel()
    assert wait_for(lambda: running(triton_server) == 0, timeout=1.0) < 1.0


def test_cancelling_a_direct_denoiser_stream_frees_its_slot(triton_server: Server, served_llm: LLM) -> None:
    stream = Stream(triton_server.grpc)
    stream.send("diffusion_denoise", {"input_ids": served_llm.tokenizer.encode("cancel me too")} | LONG)
    assert stream.next_response()[2] is None
    wait_for(lambda: running(triton_server) == 1, timeout=2.0)  # metrics reach Triton every 0.25 s
    stream.cancel()
    assert wait_for(lambda: running(triton_server) == 0, timeout=1.0) < 1.0


def test_stop_by_request_id_ends_the_stream(triton_server: Server) -> None:
    stream = Stream(triton_server.grpc)
    stream.send("vdiff", {"text_input": "stop me"} | LONG, request_id="job-17")
    assert stream.next_response()[2] is None
    stopped = stream_infer(triton_server.grpc, {"stop": True}, model="diffusion_denoise", request_id="job-17")
    assert stopped.error is None
    rest = stream.collect(timeout=10)
    stream.close()
    assert rest.error is None
    assert rest.finish_reason == "abort"
    assert wait_for(lambda: running(triton_server) == 0, timeout=1.0) < 1.0


def test_requests_past_capacity_are_refused_at_once(triton_server: Server) -> None:
    streams = [Stream(triton_server.grpc) for _ in range(MAX_NUM_SEQS + MAX_QUEUE_SIZE)]
    try:
        for i, stream in enumerate(streams):
            stream.send("vdiff", {"text_input": f"fill {i}"} | LONG, request_id=f"fill-{i}")
        # separate connections arrive in any order: wait until all of them are in the engine
        wait_for(lambda: (running(triton_server), waiting(triton_server)) == (MAX_NUM_SEQS, MAX_QUEUE_SIZE), 10.0)
        refused = stream_infer(triton_server.grpc, {"text_input": "one more", "max_tokens": 8})
        # The model answers UNAVAILABLE, but Triton 2.51 passes on only the message: gRPC streaming
        # has no status field, and /generate turns every model error into HTTP 400 (/infer would
        # give 503, but refuses decoupled models). The OpenAI proxy maps the message to 503.
        assert refused.error is not None and "the server is at capacity" in refused.error.message()
        status, body = http_post(f"{triton_server.http}/v2/models/vdiff/generate", {"text_input": "x", "max_tokens": 4})
        assert status == 400 and "the server is at capacity" in json.loads(body)["error"]
    finally:
        for stream in streams:
            stream.cancel()
    wait_for(lambda: running(triton_server) == 0, timeout=5.0)


INVALID = [
    ({"max_tokens": 8}, "'text_input' is required"),
    ({"text_input": "", "max_tokens": 8}, "'text_input' is empty"),
    ({"text_input": "x", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"text_input": "x", "max_tokens": 100000}, "exceeds the model's max_sequence_length"),
    ({"text_input": "x", "algorithm": "fastest"}, "algorithm must be one of"),
    ({"text_input": "x", "max_tokens": 32, "block_length": 8, "steps": 6}, "steps (6) must be a multiple"),
    ({"text_input": "x", "temperature": float("inf")}, "'temperature' must be a finite number"),
    ({"text_input": "x", "temperature": float("nan")}, "'temperature' must be a finite number"),
    ({"text_input": "x", "top_p": 1.5}, "top_p must be"),
    ({"text_input": "x", "stop_words": ["ok", ""]}, "'stop_words'[1] is an empty string"),
    ({"text_input": "x", "threshold": 1.5}, "threshold must be a finite number in (0, 1]"),
    ({"text_input": "x", "threshold": 0.9, "steps": 8}, "steps does not apply with threshold or factor"),
    ({"text_input": "x", "algorithm": "apd", "apd_mixture_weight": 1.5}, "apd_mixture_weight must be a finite number"),
    ({"text_input": "x", "algorithm": "apd", "steps": 8}, "steps does not apply to algorithm 'apd'"),
    ({"text_input": "x", "apd_kv_window": 0}, "apd_kv_window must be an integer >= 1, got 0"),
    ({"text_input": "x", "cache": "triple"}, "cache must be one of ['none', 'prefix', 'dual']"),
]


@pytest.mark.parametrize(("values", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_inputs_get_invalid_arg_naming_the_input(triton_server: Server, values: dict, message: str) -> None:
    result = stream_infer(triton_server.grpc, values)
    assert result.error is not None and message in result.error.message()


# JSON has no inf or nan
JSON_INVALID = [case for case in INVALID if all(math.isfinite(v) for v in case[0].values() if isinstance(v, float))]


@pytest.mark.parametrize(("values", "message"), JSON_INVALID, ids=[m for _, m in JSON_INVALID])
def test_invalid_http_request_gets_400(triton_server: Server, values: dict, message: str) -> None:
    status, body = http_post(f"{triton_server.http}/v2/models/vdiff/generate", values)
    assert status == 400
    assert message in json.loads(body)["error"]


def test_server_still_serves_after_every_failure(triton_server: Server, served_llm: LLM) -> None:
    for values, _ in INVALID:
        stream_infer(triton_server.grpc, values)
    result = stream_infer(triton_server.grpc, {"text_input": "still here", "max_tokens": 12})
    assert result.error is None
    assert result.text == offline(served_llm, "still here", max_tokens=12).text


def settled_metric(server: Server, name: str) -> float:
    """A counter once earlier requests' counts have reached Triton (flushed every 0.25 s)."""
    value = read_metric(server.metrics, name)
    while True:
        time.sleep(0.3)
        value, previous = read_metric(server.metrics, name), value
        if value == previous:
            return value


def test_custom_metrics_are_exported(triton_server: Server) -> None:
    tokens = "vdiff:generation_tokens_total"
    before = settled_metric(triton_server, tokens)
    stream_infer(triton_server.grpc, {"text_input": "count me", "max_tokens": 16})
    wait_for(lambda: read_metric(triton_server.metrics, tokens) - before == 16, timeout=2.0)
    for name in (
        "vdiff:nfe_total",
        "vdiff:prompt_tokens_total",
        "vdiff:tokens_per_nfe_count",
        "vdiff:denoising_step_seconds_count",
        "vdiff:time_to_first_token_seconds_count",
        "vdiff:e2e_request_latency_seconds_count",
    ):
        assert read_metric(triton_server.metrics, name) > 0, name
    assert read_metric(triton_server.metrics, "vdiff:num_requests_waiting") == 0


def test_a_stream_finishing_during_other_traffic_is_not_disturbed(triton_server: Server, served_llm: LLM) -> None:
    """A cancelled neighbour must not change another request's tokens (they share every forward)."""
    neighbour = Stream(triton_server.grpc)
    neighbour.send("vdiff", {"text_input": "neighbour"} | LONG)
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.append(stream_infer(triton_server.grpc, {"text_input": "mine", "max_tokens": 24}))
    )
    worker.start()
    time.sleep(0.05)
    neighbour.cancel()
    worker.join(60)
    assert results[0].text == offline(served_llm, "mine", max_tokens=24).text
