"""One gRPC stream to Triton that carries every generation request of the proxy.

Opening a gRPC stream per request cost the proxy about a millisecond of its event loop per request
(the call's setup, its request-writing task, its half-close), as long as the engine's own work on a
short answer under fast decoding. Triton's stream takes any number of requests and tags each
response (errors included) with its request's id, so one long-lived stream serves them all: a
request is one message out, its responses are routed back by id.

A request cannot be cancelled alone on a shared stream, so an early end is a stop order sent on
the same stream: Triton hands a stream's requests to the model in order, so the order never
overtakes the request it stops. When the stream fails (Triton restarted, the connection dropped),
each request on it ends with that failure and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

log = logging.getLogger(__name__)

Response: TypeAlias = Any  # service_pb2.ModelStreamInferResponse (tritonclient has no type hints)


@dataclass(eq=False)
class Link:
    """One open stream: its outgoing messages and the requests waiting for its responses."""

    outbox: asyncio.Queue[service_pb2.ModelInferRequest | None] = field(default_factory=asyncio.Queue)
    inboxes: dict[str, asyncio.Queue[Response | BaseException]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class SharedStream:
    def __init__(self, url: str) -> None:
        self.url = url
        self._channel: grpc.aio.Channel | None = None
        self._link: Link | None = None

    def open(self, request: service_pb2.ModelInferRequest) -> asyncio.Queue[Response | BaseException]:
        """Send `request`; its responses (or the stream's failure) arrive on the returned queue."""
        link = self._live_link()
        if request.id in link.inboxes:
            raise ValueError(f"request id {request.id!r} is already in flight on this stream")
        inbox: asyncio.Queue[Response | BaseException] = asyncio.Queue()
        link.inboxes[request.id] = inbox
        link.outbox.put_nowait(request)
        return inbox

    def close(self, request_id: str) -> None:
        """No more responses are wanted for `request_id` (finished, or given up on)."""
        if self._link is not None:
            self._link.inboxes.pop(request_id, None)

    def send(self, request: service_pb2.ModelInferRequest) -> None:
        """Send a request whose responses nobody reads (a stop order)."""
        self._live_link().outbox.put_nowait(request)

    async def aclose(self) -> None:
        link, self._link = self._link, None
        if link is not None and link.reader is not None:
            link.outbox.put_nowait(None)
            link.reader.cancel()
            await asyncio.gather(link.reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _live_link(self) -> Link:
        if self._link is None or self._link.reader is None or self._link.reader.done():
            if self._channel is None:  # bound to the running loop, so made on first use
                self._channel = grpc.aio.insecure_channel(self.url)
            link = Link()
            call = service_pb2_grpc.GRPCInferenceServiceStub(self._channel).ModelStreamInfer(_messages(link))
            link.reader = asyncio.get_running_loop().create_task(self._read(call, link))
            self._link = link
        return self._link

    async def _read(self, call: AsyncIterator[Response], link: Link) -> None:
        failure: BaseException = ConnectionError("Triton closed the stream")
        try:
            async for response in call:
                inbox = link.inboxes.get(response.infer_response.id)
                if inbox is not None:
                    inbox.put_nowait(response)
                elif response.error_message and not response.infer_response.id:
                    log.warning("an error for no request on the shared stream: %s", response.error_message)
        except grpc.RpcError as error:
            failure = error
        except asyncio.CancelledError:
            failure = ConnectionError("the stream was closed")
            raise
        finally:
            if self._link is link:
                self._link = None
            for inbox in link.inboxes.values():
                inbox.put_nowait(failure)
            link.inboxes.clear()


async def _messages(link: Link) -> AsyncIterator[service_pb2.ModelInferRequest]:
    while (message := await link.outbox.get()) is not None:
        yield message


Tensors = Mapping[str, tuple[str, np.ndarray]]  # input name -> (Triton datatype, array)


def infer_request(model: str, request_id: str, tensors: Tensors) -> service_pb2.ModelInferRequest:
    """A request of `model` with these inputs, their contents raw (as tritonclient sends them)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, (datatype, array) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(_raw(datatype, array))
    return request


def _raw(datatype: str, array: np.ndarray) -> bytes:
    if datatype != "BYTES":
        return array.tobytes()
    serialized = serialize_byte_tensor(array)
    return serialized.item() if serialized.size > 0 else b""
