"""Hypothesis over Triton's gRPC port: the entrance the proxy's checks do not guard.

Each example is a request to the `vdiff` ensemble or straight to `diffusion_denoise`, with every
input typed as config.pbtxt declares it: mostly small valid values, up to two inputs at an
extreme of their type. Every answer must be a finished stream or a refusal that names the
input (what the proxy maps to 400), within the timeout; the denoiser must serve afterwards.
Bounded and reproducible for CI: a fixed example budget, derandomized, no example database.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients import stream_infer
from triton_harness import Server
from vdiff_client.codes import ErrorCode, read_error

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
TIMEOUT_S = 30  # a hang, not a slow answer: valid examples generate at most 8 tokens

INT32 = st.sampled_from([-(2**31), -1, 0, 1, 513, 2**31 - 1])
FP32 = st.sampled_from([float("-inf"), -1.0, 0.0, 1e-45, 0.5, 1.0, 3.0, 3.4e38, float("inf"), float("nan")])
UINT64 = st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1])
TEXT = st.text(max_size=12)
EXTREMES: dict[str, st.SearchStrategy[Any]] = {
    "TYPE_INT32": INT32,
    "TYPE_FP32": FP32,
    "TYPE_UINT64": UINT64,
    "TYPE_BOOL": st.booleans(),
    "TYPE_STRING": st.one_of(TEXT, st.sampled_from(["", "\x00", "x" * 100_000])),
}
VALID: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2, width=32),
    "top_p": st.floats(0.25, 1, width=32),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**64 - 1),
    "stop_words": st.lists(st.text(min_size=1, max_size=6), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 389), max_size=3),
    "ignore_eos": st.booleans(),
    "steps": st.integers(1, 8),
    "block_length": st.sampled_from([4, 8]),
    "algorithm": st.sampled_from(["low_confidence", "random", "origin", "apd"]),
    "cfg_scale": st.floats(0, 2, width=32),
    "threshold": st.floats(0.25, 1, width=32),
    "cache": st.sampled_from(["none", "prefix", "dual"]),
    "apd_kv_window": st.integers(1, 8),
    "apd_max_lookahead": st.integers(1, 8),
    "stream": st.booleans(),
}
LIST_INPUTS = {"stop_words": "TYPE_STRING", "stop_token_ids": "TYPE_INT32"}
TYPES = {"max_tokens": "TYPE_INT32", "temperature": "TYPE_FP32", "top_p": "TYPE_FP32", "top_k": "TYPE_INT32",
         "seed": "TYPE_UINT64", "ignore_eos": "TYPE_BOOL", "steps": "TYPE_INT32", "block_length": "TYPE_INT32",
         "algorithm": "TYPE_STRING", "cfg_scale": "TYPE_FP32", "threshold": "TYPE_FP32", "cache": "TYPE_STRING",
         "apd_kv_window": "TYPE_INT32", "apd_max_lookahead": "TYPE_INT32", "stream": "TYPE_BOOL"}  # fmt: skip


def hostile(name: str) -> st.SearchStrategy[Any]:
    if name not in LIST_INPUTS:
        return EXTREMES[TYPES[name]]
    long = [1] * 200_000 if name == "stop_token_ids" else ["s"] * 500
    return st.one_of(st.lists(EXTREMES[LIST_INPUTS[name]], max_size=3), st.just(long))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(model, inputs): some valid inputs, then up to two at an extreme of their type."""
    model = draw(st.sampled_from(["vdiff", "diffusion_denoise"]))
    optional = {name: value for name, value in VALID.items() if name != "max_tokens"}
    values = draw(st.fixed_dictionaries({"max_tokens": VALID["max_tokens"]}, optional=optional))
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2, unique=True)):
        values[name] = draw(hostile(name))
    if model == "vdiff":
        prompt = {"text_input": draw(st.one_of(st.just("What is 12 + 30?"), EXTREMES["TYPE_STRING"]))}
    else:
        prompt = {"input_ids": draw(st.one_of(st.just([5, 6, 7]), st.lists(INT32, max_size=3)))}
    return model, prompt | values


@FUZZ
@given(request=requests())
def test_grpc_requests_finish_or_are_refused_naming_an_input(
    triton_server: Server, request: tuple[str, dict[str, Any]]
) -> None:
    model, values = request
    result = stream_infer(triton_server.grpc, values, model=model, timeout=TIMEOUT_S)
    if result.error is None:
        last = result.responses[-1]
        assert last["finish_reason"] in ("stop", "length"), last
        return
    message = result.error.message()
    assert read_error(message).code is ErrorCode.INVALID_INPUT, message  # the client's fault: 400


def test_the_denoiser_serves_after_the_grpc_fuzz(triton_server: Server) -> None:
    result = stream_infer(triton_server.grpc, {"text_input": "still here", "max_tokens": 8})
    assert result.error is None and result.finish_reason in ("stop", "length")
