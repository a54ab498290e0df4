"""Every value that sizes memory or time is bounded at Triton's own ports, not only at the proxy.

The issue's reproduction: `steps` = 2**31 - 1 sent to the `vdiff` ensemble over gRPC grew the
denoiser's stub by 250 MB/s until the kernel killed it. Each hostile value here goes straight
to `diffusion_denoise` and through the ensemble; each must come back as an error naming the
input within a second, while the stub's memory stays put and a normal request still runs.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from clients import backend_stub, http_post, stream_infer
from triton_harness import Server

INT32_MAX = 2**31 - 1
MAX_SEQUENCE_LENGTH = 512  # the tiny checkpoint's (tools/make_tiny_model.py)

# (inputs, words the error must contain); a prompt is added per route
HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"steps": INT32_MAX}, "input 'steps'"),
    ({"block_length": INT32_MAX}, "input 'block_length'"),
    ({"max_tokens": INT32_MAX}, "input 'max_tokens'"),
    ({"algorithm": "apd", "apd_kv_window": INT32_MAX}, "input 'apd_kv_window'"),
    ({"algorithm": "apd", "apd_max_lookahead": INT32_MAX}, "input 'apd_max_lookahead'"),
    ({"algorithm": "origin", "steps": INT32_MAX}, "input 'steps'"),
    ({"stop_words": ["x"] * 100_000}, "input 'stop_words'"),
    ({"stop_words": ["y" * 5_000_000]}, "input 'stop_words'"),
    ({"stop_token_ids": [7] * 1_000_000}, "input 'stop_token_ids'"),
    ({"stop_token_ids": [INT32_MAX]}, "input 'stop_token_ids'"),
]
LONG_PROMPTS: list[tuple[dict[str, Any], str]] = [
    ({"input_ids": [7] * 1_000_000}, "input 'input_ids'"),
    ({"text_input": "word " * 2_000_000}, "input 'text_input'"),
]


def stub_rss(server: Server, model: str) -> int:
    return int(backend_stub(server.process.config.workdir, model).memory_info().rss)


def timed_error(server: Server, model: str, values: dict[str, Any]) -> tuple[float, str]:
    started = time.perf_counter()
    result = stream_infer(server.grpc, values, model=model)
    elapsed = time.perf_counter() - started
    assert result.error is not None, f"{values.keys()} was served: {result.responses[-1:]}"
    return elapsed, result.error.message()


def routes(values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("diffusion_denoise", {"input_ids": [5, 6, 7]} | values), ("vdiff", {"text_input": "x"} | values)]


@pytest.mark.parametrize(("values", "named"), HOSTILE, ids=[str(sorted(v)) for v, _ in HOSTILE])
def test_hostile_values_are_refused_at_once_on_both_routes(
    triton_server: Server, values: dict[str, Any], named: str
) -> None:
    before = stub_rss(triton_server, "diffusion_denoise")
    for model, sent in routes(values):
        elapsed, message = timed_error(triton_server, model, sent)
        assert named in message, (model, message)
        assert elapsed < 1.0, (model, elapsed)
    assert stub_rss(triton_server, "diffusion_denoise") - before < 50 * 2**20


@pytest.mark.parametrize(("values", "named"), LONG_PROMPTS, ids=["input_ids", "text_input"])
def test_prompts_longer_than_the_model_are_refused_untouched(
    triton_server: Server, values: dict[str, Any], named: str
) -> None:
    model = "vdiff" if "text_input" in values else "diffusion_denoise"
    before = stub_rss(triton_server, model if model == "diffusion_denoise" else "tokenizer")
    elapsed, message = timed_error(triton_server, model, values | {"max_tokens": 4})
    assert named in message and f"max_sequence_length ({MAX_SEQUENCE_LENGTH})" in message
    assert elapsed < 1.0
    after = stub_rss(triton_server, model if model == "diffusion_denoise" else "tokenizer")
    assert after - before < 50 * 2**20


def test_the_server_still_serves_after_the_hostile_values(triton_server: Server) -> None:
    for values, _ in HOSTILE:
        for model, sent in routes(values):
            stream_infer(triton_server.grpc, sent, model=model)
    result = stream_infer(triton_server.grpc, {"text_input": "still here", "max_tokens": 8})
    assert result.error is None and result.finish_reason


def test_the_status_is_invalid_argument(triton_server: Server) -> None:
    """Over HTTP, where Triton 2.51 keeps a model's status, INVALID_ARG is a 400."""
    status, body = http_post(f"{triton_server.http}/v2/models/vdiff/generate", {"text_input": "x", "steps": INT32_MAX})
    assert status == 400 and "input 'steps'" in body
