"""The proxy's only contact with Triton: gRPC streaming requests to the `vdiff` ensemble.

One request = one bidirectional stream with one request on it. The proxy always asks for a
streamed answer (a response per growth of the stable prefix), even for a non-streaming HTTP
request: that is what lets a cancellation reach the engine between denoising steps. When the
caller stops early (client disconnect, error), the stream is cancelled and a stop order naming the
request id goes straight to the denoiser, which ends the request at its next step, queued or not.

Triton 2.51 passes on only the message of a model's error over gRPC streaming (no status), so the
status and, for a refusal, its reason are read back from the denoiser's own wording (`request_error`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

log = logging.getLogger(__name__)

NUMPY_TYPES = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}
# the denoiser's words for a full or stopping server (vdiff/backend/service.py) -> why it refused
REFUSAL_PHRASES = {
    "the server is at capacity": "capacity",
    "the server is shutting down": "shutdown",
    "the server shut down": "shutdown",
}
ENSEMBLE_PREFIX = "in ensemble '"
# no request has this id, so the stop order ends nothing
PING_REQUEST_ID = f"vdiff-liveness-ping-{secrets.token_hex(8)}"
STOP_TIMEOUT_S = 5.0  # a stop order to a dead denoiser gets no answer: give up, do not pile up
# gRPC codes that mean "Triton is not there (now)": the client should retry, maybe elsewhere
UNREACHABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class TritonRequestError(Exception):
    """An HTTP status and message; a 503 also says why (capacity, shutdown, unavailable)."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or ("unavailable" if status == 503 else None)


def request_error(message: str) -> TritonRequestError:
    """The error for a Triton error message: 503 full or stopping, 400 invalid input, else 500."""
    if message.startswith(ENSEMBLE_PREFIX) and "', " in message:
        message = message.split("', ", 1)[1]
    for phrase, reason in REFUSAL_PHRASES.items():
        if phrase in message:
            return TritonRequestError(503, message, reason)
    if message.startswith(("input '", "send the prompt", "exclude_input_in_output")):
        return TritonRequestError(400, message)
    return TritonRequestError(500, message)


def transport_error(error: grpc.RpcError | InferenceServerException) -> TritonRequestError:
    """A failed call to Triton itself (down, restarting, unreachable): 503 so clients retry."""
    if isinstance(error, InferenceServerException):
        code, details = error.status() or "", error.message() or ""
        unreachable = any(f"StatusCode.{c.name}" == code for c in UNREACHABLE_CODES)
    else:
        code, details = str(error.code()), str(error.details())
        unreachable = error.code() in UNREACHABLE_CODES
    if unreachable:
        return TritonRequestError(503, f"the inference server is unavailable ({details}); retry later")
    return TritonRequestError(500, f"the inference server failed: {code} {details}".strip())


@dataclass(frozen=True)
class Delta:
    """One ensemble response: a text delta and counts."""

    text: str
    prompt_tokens: int
    new_tokens: int  # tokens whose text is in this delta
    nfe: int  # the request's denoising steps so far
    finish_reason: str | None  # set on the last response
    queue_time: float | None = None  # seconds the engine kept it waiting; None until it ran


class TritonBackend:
    def __init__(self, url: str, ensemble: str = "vdiff", denoiser: str = "diffusion_denoise") -> None:
        self.url = url
        self.ensemble = ensemble
        self.denoiser = denoiser
        self._client: grpcclient.InferenceServerClient | None = None
        self._input_types: dict[str, str] = {}
        self._stops: set[asyncio.Task[None]] = set()
        self.last_transport_failure = float("-inf")  # time.monotonic() of the last failed call to Triton

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        # created on first use, inside the server's event loop (grpc.aio binds to the running loop)
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    async def is_ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.ensemble, client_timeout=2.0))
        except InferenceServerException:
            return False

    async def generate(self, request_id: str, values: Mapping[str, Any]) -> AsyncIterator[Delta]:
        """The ensemble's responses for one request; raises TritonRequestError on an error response."""
        try:
            inputs = await self._tensors(values)
        except (grpc.RpcError, InferenceServerException) as unreachable:
            raise self._transport_failed(unreachable) from unreachable
        done = asyncio.Event()

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.ensemble, "inputs": inputs, "request_id": request_id}
            await done.wait()  # keep the stream open until the last response

        stream = self.client.stream_infer(one_request())
        finished = False
        try:
            async for result, error in stream:
                if error is not None:
                    finished = True
                    raise request_error(error.message())
                delta = _delta(result)
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
            raise TritonRequestError(503, "Triton closed the stream before the request finished; retry later")
        except grpc.RpcError as failure:
            finished = True  # the connection is gone: no stop order can reach the denoiser either
            raise self._transport_failed(failure) from failure
        finally:
            done.set()
            if not finished:
                stream.cancel()
                self._send_stop(request_id)

    def _transport_failed(self, error: grpc.RpcError | InferenceServerException) -> TritonRequestError:
        self.last_transport_failure = time.monotonic()
        return transport_error(error)

    def _send_stop(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._stop(request_id))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _stop(self, request_id: str) -> None:
        """Tell the denoiser to end `request_id` at its next step (its slot is free after it)."""
        try:
            error = await asyncio.wait_for(self._order_stop(request_id), STOP_TIMEOUT_S)
            if error is not None:
                log.warning("stop order for %s failed: %s", request_id, error)
        except (InferenceServerException, grpc.RpcError, asyncio.TimeoutError, asyncio.CancelledError) as error:
            log.warning("stop order for %s not delivered: %s", request_id, error or "no answer")

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

    async def _tensors(self, values: Mapping[str, Any]) -> list[grpcclient.InferInput]:
        """[1, n] tensors typed as the ensemble declares its inputs (read from Triton once)."""
        if not self._input_types:
            metadata = await self.client.get_model_metadata(self.ensemble, as_json=True)
            self._input_types = {i["name"]: i["datatype"] for i in metadata["inputs"]}
        tensors = []
        for name, value in values.items():
            kind = self._input_types[name]
            items = list(value) if isinstance(value, list | tuple) else [value]
            if kind == "BYTES":
                items = [item.encode("utf-8") for item in items]
            array = np.array([items], dtype=NUMPY_TYPES[kind])
            tensor = grpcclient.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    async def close(self) -> None:
        if self._stops:
            await asyncio.wait(self._stops, timeout=2)
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

    finish = one("finish_reason").decode("utf-8")
    queue_time = float(one("queue_time"))
    return Delta(
        text=one("text_output").decode("utf-8"),
        prompt_tokens=int(one("num_input_tokens")),
        new_tokens=int(one("num_output_tokens")),
        nfe=int(one("step_index")),
        finish_reason=finish or None,
        queue_time=queue_time if queue_time >= 0 else None,
    )
