"""The proxy's only contact with Triton: gRPC streaming requests to `diffusion_denoise`.

The proxy tokenizes and checks a request itself, so it sends the prompt's ids straight to the
denoiser, as TensorRT-LLM's OpenAI frontend sends them to its model: the ensemble's tokenizer and
detokenizer steps would add two Python-backend executions to every request and every response.
The denoiser takes the ensemble's inputs and answers with its outputs (a text delta per response,
decoded as tokens settle), so any model of that shape can stand in (`TritonBackend(model=...)`).

Every request goes on one long-lived gRPC stream (vdiff_client/grpc_stream.py). The proxy always
asks for a streamed answer (a response per growth of the stable prefix), even for a non-streaming
HTTP request, so that its metrics time the first token and the tokens after it as vLLM's do. When
the caller stops early (client disconnect, error), a stop order naming the request id follows it
on the same stream, and the denoiser ends the request at its next step, queued or not.

Over gRPC streaming Triton 2.51 passes on only an error's message, so vdiff's models tag their
messages with an error code (vdiff_client/codes.py); the code decides the HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferResult
from tritonclient.utils import InferenceServerException

from vdiff_client.codes import ErrorCode, read_error
from vdiff_client.grpc_stream import SharedStream, infer_request

log = logging.getLogger(__name__)

NUMPY_TYPES = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}
# no request has this id, so the stop order ends nothing
PING_REQUEST_ID = f"vdiff-liveness-ping-{secrets.token_hex(8)}"
STOP_ORDER = {"stop": ("BOOL", np.array([[True]]))}  # the request's id says which request it ends
# gRPC codes that mean "Triton is not there (now)": the client should retry, maybe elsewhere
UNREACHABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class TritonRequestError(Exception):
    """An error code and message; the code gives the HTTP status and, for a refusal, its reason."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return self.code.http_status

    @property
    def reason(self) -> str | None:
        """Why the server refused it (capacity, shutdown, unavailable); None for other errors."""
        return self.code.value if self.code.is_refusal else None


def request_error(message: str) -> TritonRequestError:
    """The error for a model's error message: its code, or INTERNAL for one vdiff did not tag."""
    coded = read_error(message)
    return TritonRequestError(coded.code or ErrorCode.INTERNAL, coded.message)


def transport_error(error: grpc.RpcError | InferenceServerException) -> TritonRequestError:
    """A failed call to Triton itself (down, restarting, unreachable): 503 so clients retry."""
    if isinstance(error, InferenceServerException):
        code, details = error.status() or "", error.message() or ""
        unreachable = any(f"StatusCode.{c.name}" == code for c in UNREACHABLE_CODES)
    else:
        code, details = str(error.code()), str(error.details())
        unreachable = error.code() in UNREACHABLE_CODES
    if unreachable:
        message = f"the inference server is unavailable ({details}); retry later"
        return TritonRequestError(ErrorCode.UNAVAILABLE, message)
    return TritonRequestError(ErrorCode.INTERNAL, f"the inference server failed: {code} {details}".strip())


@dataclass(frozen=True)
class Delta:
    """One response: a text delta and counts."""

    text: str
    prompt_tokens: int
    new_tokens: int  # tokens whose text is in this delta
    nfe: int  # the request's denoising steps so far
    finish_reason: str | None  # set on the last response
    queue_time: float | None = None  # seconds the engine kept it waiting; None until it ran
    stop_reason: int | str | None = None  # on the last response: the stop token id or string
    # with stream_canvas: the denoising steps since the previous response (vdiff/canvas_stream.py)
    canvas: list[dict[str, Any]] | None = None


class TritonBackend:
    def __init__(self, url: str, model: str = "diffusion_denoise", denoiser: str = "diffusion_denoise") -> None:
        self.url = url
        self.model = model  # what generation requests go to: the denoiser, or the `vdiff` ensemble
        self.denoiser = denoiser  # where stop orders and liveness pings go
        self._client: grpcclient.InferenceServerClient | None = None
        self._input_types: dict[str, str] = {}
        self.stream = SharedStream(url)  # every generation request, and the stop orders that end them early
        self.last_transport_failure = float("-inf")  # time.monotonic() of the last failed call to Triton

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        # created on first use, inside the server's event loop (grpc.aio binds to the running loop)
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    async def is_ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model, client_timeout=2.0))
        except InferenceServerException:
            return False

    async def generate(self, request_id: str, values: Mapping[str, Any]) -> AsyncIterator[Delta]:
        """The model's responses for one request; raises TritonRequestError on an error response."""
        try:
            request = infer_request(self.model, request_id, await self._tensors(values))
        except (grpc.RpcError, InferenceServerException) as unreachable:
            raise self._transport_failed(unreachable) from unreachable
        responses = self.stream.open(request)
        finished = False
        try:
            while not finished:
                response = await responses.get()
                if isinstance(response, BaseException):
                    finished = True  # the stream is gone: no stop order could go on it either
                    raise self._stream_failed(response) from response
                if response.error_message:
                    finished = True
                    raise request_error(response.error_message)
                delta = _delta(InferResult(response.infer_response))
                finished = delta.finish_reason is not None
                yield delta
        finally:
            self.stream.close(request_id)
            if not finished:  # the denoiser ends it at its next step
                self.stream.send(infer_request(self.denoiser, request_id, STOP_ORDER))

    def _stream_failed(self, failure: BaseException) -> TritonRequestError:
        if isinstance(failure, grpc.RpcError):
            return self._transport_failed(failure)
        self.last_transport_failure = time.monotonic()
        message = f"Triton closed the stream before the request finished ({failure}); retry later"
        return TritonRequestError(ErrorCode.UNAVAILABLE, message)

    def _transport_failed(self, error: grpc.RpcError | InferenceServerException) -> TritonRequestError:
        self.last_transport_failure = time.monotonic()
        return transport_error(error)

    async def ping(self, timeout_s: float) -> str | None:
        """None when the denoiser answers within `timeout_s`; else why it did not.

        The ping is a stop order for no request: the denoiser's execute() answers it at once,
        without the engine, so a slow step never looks like a dead backend. Triton reports a
        dead stub's model ready, and requests to it wait forever or fail after a second.
        """
        try:
            return await asyncio.wait_for(self._order_stop(PING_REQUEST_ID), timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            return f"no answer from {self.denoiser!r} within {timeout_s:g} s"
        except (grpc.RpcError, InferenceServerException) as failure:
            return f"Triton is unreachable: {failure}"

    async def _order_stop(self, request_id: str) -> str | None:
        """Send a stop order for `request_id`; None when the denoiser accepts it, else why not."""
        async for _, error in self.client.stream_infer(self._stop_order(request_id)):
            return None if error is None else error.message()
        return "Triton closed the stream without an answer"

    async def _stop_order(self, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """The one request of a stream that asks the denoiser to end `request_id`."""
        stop = grpcclient.InferInput("stop", [1, 1], "BOOL")
        stop.set_data_from_numpy(np.array([[True]]))
        yield {"model_name": self.denoiser, "inputs": [stop], "request_id": request_id}

    async def _tensors(self, values: Mapping[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
        """[1, n] arrays typed as the model declares its inputs (read from Triton once)."""
        if not self._input_types:
            metadata = await self.client.get_model_metadata(self.model, as_json=True)
            self._input_types = {i["name"]: i["datatype"] for i in metadata["inputs"]}
        tensors = {}
        for name, value in values.items():
            kind = self._input_types[name]
            items = list(value) if isinstance(value, list | tuple) else [value]
            if kind == "BYTES":
                items = [item.encode("utf-8") for item in items]
            tensors[name] = (kind, np.array([items], dtype=NUMPY_TYPES[kind]))
        return tensors

    async def close(self) -> None:
        await self.stream.aclose()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def denoiser_config(self) -> dict[str, Any]:
        """The denoiser's config as Triton loaded it (parameters, instance groups)."""
        reply = await self.client.get_model_config(self.denoiser, as_json=True, client_timeout=5.0)
        config: dict[str, Any] = reply.get("config", {})
        return config


def _delta(result: Any) -> Delta:
    def one(name: str) -> Any:
        return result.as_numpy(name).reshape(-1)[0]

    def optional_json(name: str) -> Any:
        """A JSON output's value; None when it is "" or the model lacks it (a custom ensemble)."""
        array = result.as_numpy(name)
        text = array.reshape(-1)[0].decode("utf-8") if array is not None else ""
        return json.loads(text) if text else None

    finish = one("finish_reason").decode("utf-8")
    queue_time = float(one("queue_time"))
    return Delta(
        text=one("text_output").decode("utf-8"),
        prompt_tokens=int(one("num_input_tokens")),
        new_tokens=int(one("num_output_tokens")),
        nfe=int(one("step_index")),
        finish_reason=finish or None,
        queue_time=queue_time if queue_time >= 0 else None,
        stop_reason=optional_json("stop_reason"),
        canvas=optional_json("canvas_events"),
    )
