"""Bad input stops at the door: body size, per-request caps, and JSON values no model can take.

Each check runs before a request costs anything (tokenizing, Triton streams) and answers 4xx
with OpenAI's error body and a message naming the field and the limit. Three reasons to check
here rather than downstream: the denoiser's inputs are INT32, so a huge `steps` or `top_k` would
wrap or overflow on the way; `n` and a prompt batch become one Triton request each, so an
unbounded count is unbounded work; and Python's json accepts NaN, Infinity and lone UTF-16
surrogates, which are not JSON values and break the tokenizer.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdiff_client.config import RequestLimits
from vdiff_client.errors import APIError, bad_request

if TYPE_CHECKING:
    from vdiff_client.protocol import SamplingFields

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json decodes "\\ud800" escapes to these
INT32_MAX = 2**31 - 1  # the denoiser's integer inputs are INT32
FLOAT32_MAX = 3.4028234663852886e38  # and its real-valued ones FP32
FLAGS = {
    "n": "--max-n",
    "prompt": "--max-prompts",
    "max_tokens": "--max-tokens-limit",
    "steps": "--max-steps",
    "stop": "--max-stop-sequences",
    "stop_token_ids": "--max-stop-sequences",
}


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {max_bytes} bytes")


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, else counted as chunks arrive.

    A chunked body has no Content-Length, so the count is what holds; the error is raised from
    `receive`, where FastAPI's body reading passes HTTPExceptions on to the error handlers.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if declared_length(scope) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = BodyTooLarge(self.max_bytes)
        await APIError(error.status_code, error.detail).response()(scope, receive, send)


def declared_length(scope: Scope) -> int:
    """The Content-Length header's value; 0 when absent or unreadable (the count still applies)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def check_limits(request: SamplingFields, max_tokens: int | None, limits: RequestLimits, max_model_len: int) -> None:
    """The caps of `limits` (each message names its flag), then what the denoiser's inputs can carry."""
    check_at_most("n", request.n, limits.max_n)
    if limits.max_tokens is not None:
        check_at_most("max_tokens", max_tokens, limits.max_tokens)
    check_at_most("steps", request.steps, limits.max_steps or max_model_len)
    check_stops(request, limits)
    check_input_ranges(request, max_model_len)


def check_input_ranges(request: SamplingFields, max_model_len: int) -> None:
    """Values an INT32 input would wrap and an FP32 one would turn into inf, refused before they travel."""
    for name in ("steps", "block_length", "apd_kv_window", "apd_max_lookahead"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise bad_request(f"{name} must be at least 1, got {value}.", name)
    for name in ("apd_kv_window", "apd_max_lookahead"):  # steps and block_length have their own, tighter caps
        value = getattr(request, name)
        if value is not None and value > INT32_MAX:
            raise bad_request(f"{name} must be at most {INT32_MAX}, got {value}.", name)
    if request.block_length is not None and request.block_length > max_model_len:  # no such block fits anyway
        raise bad_request(
            f"block_length must be at most the context length ({max_model_len}), got {request.block_length}.",
            "block_length",
        )
    if request.top_k is not None and request.top_k > INT32_MAX:
        raise bad_request(f"top_k must be at most {INT32_MAX}, got {request.top_k}.", "top_k")
    for name in ("cfg_scale", "alg_temp", "threshold", "factor", "apd_mixture_weight"):
        value = getattr(request, name)
        if value is not None and abs(value) > FLOAT32_MAX:
            raise bad_request(f"{name} must be at most {FLOAT32_MAX:.4g} in size, got {value}.", name)


def check_stops(request: SamplingFields, limits: RequestLimits) -> None:
    stops = request.stop_strings()
    check_at_most("stop", len(stops), limits.max_stop_sequences, "the number of stop sequences")
    stop_ids = len(request.stop_token_ids or ())
    check_at_most("stop_token_ids", stop_ids, limits.max_stop_sequences, "the number of stop_token_ids")
    longest = max(stops, key=len, default="")
    if len(longest) > limits.max_stop_length:
        raise bad_request(
            f"stop strings must be at most {limits.max_stop_length} characters (this server's --max-stop-length), "
            f"got one of {len(longest)}.",
            "stop",
        )


def check_at_most(param: str, value: int | None, limit: int, what: str | None = None) -> None:
    if value is not None and value > limit:
        raise bad_request(
            f"{what or param} must be at most {limit} (this server's {FLAGS[param]}), got {value}.",
            param,
        )


def refuse_non_json_values(body: Any) -> None:
    """NaN, ±Infinity and lone surrogates anywhere in a parsed body object: 400 naming where.

    Walked with a stack, not recursion: json refuses bodies nested past Python's recursion
    limit, but a recursive walk of one nested nearly that deep would still fail here.
    """
    if not isinstance(body, dict):
        return  # pydantic says what a body must be
    stack: list[tuple[str, Any]] = [(str(key), item) for key, item in body.items()]
    while stack:
        path, value = stack.pop()
        if LONE_SURROGATE.search(path):  # before any message quotes the path: it could not be encoded
            raise bad_request("a field name holds a lone UTF-16 surrogate, which is not a character")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad_request(f"{path} must be a finite number, got {value} (JSON has no NaN or Infinity)", path)
        if isinstance(value, str) and LONE_SURROGATE.search(value):
            raise bad_request(f"{path} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a character", path)
        if isinstance(value, dict):
            stack.extend((f"{path}.{key}", item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
