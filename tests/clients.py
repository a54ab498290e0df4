"""Small real clients for the tests: gRPC streaming (tritonclient), HTTP generate, SSE, metrics."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from vdiff.backend.inputs import LIST_OPTIONS, OPTIONS

NUMPY_TYPES = {"TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_}
TRITON_TYPES = {"TYPE_INT32": "INT32", "TYPE_FP32": "FP32", "TYPE_UINT64": "UINT64", "TYPE_BOOL": "BOOL"}
INPUT_TYPES = {option.name: option.triton_type for option in OPTIONS} | {
    "text_input": "TYPE_STRING",
    "input_ids": "TYPE_INT32",
    "stop": "TYPE_BOOL",
}


def grpc_inputs(values: dict[str, Any]) -> list[grpcclient.InferInput]:
    """Tensors of shape [1, 1] (or [1, n] for lists), typed as the model declares them."""
    tensors = []
    for name, value in values.items():
        kind = INPUT_TYPES[name]
        items = value if isinstance(value, list | tuple) else [value]
        if name not in LIST_OPTIONS and name != "input_ids":
            assert len(items) == 1
        if kind == "TYPE_STRING":
            array = np.array([[item.encode() if isinstance(item, str) else item for item in items]], dtype=np.object_)
            tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
        else:
            array = np.array([items], dtype=NUMPY_TYPES[kind])
            tensor = grpcclient.InferInput(name, list(array.shape), TRITON_TYPES[kind])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


@dataclass
class StreamResult:
    responses: list[dict[str, Any]] = field(default_factory=list)
    error: InferenceServerException | None = None

    @property
    def text(self) -> str:
        return "".join(r["text_output"] for r in self.responses if "text_output" in r)

    @property
    def finish_reason(self) -> str:
        return self.responses[-1]["finish_reason"] if self.responses else ""


class Stream:
    """One gRPC bidirectional stream with one request on it."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, model: str, values: dict[str, Any], request_id: str = "") -> None:
        self.client.async_stream_infer(
            model, grpc_inputs(values), request_id=request_id, enable_empty_final_response=True
        )

    def next_response(self, timeout: float = 60) -> tuple[dict[str, Any] | None, bool, Any]:
        """(outputs or None, final, error) of the next response."""
        result, error = self.events.get(timeout=timeout)
        if error is not None:
            return None, True, error
        final = result.get_response().parameters["triton_final_response"].bool_param
        outputs = {o.name: _value(result.as_numpy(o.name)) for o in result.get_response().outputs}
        return (outputs or None), final, None

    def collect(self, timeout: float = 60) -> StreamResult:
        collected = StreamResult()
        while True:
            outputs, final, error = self.next_response(timeout)
            if error is not None:
                collected.error = error
                return collected
            if outputs is not None:
                collected.responses.append(outputs)
            if final:
                return collected

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def stream_infer(
    url: str, values: dict[str, Any], model: str = "vdiff", request_id: str = "", timeout: float = 60
) -> StreamResult:
    stream = Stream(url)
    try:
        stream.send(model, {"stream": True} | values, request_id)
        return stream.collect(timeout)
    finally:
        stream.close()


def _value(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.dtype == np.object_:
        texts = [item.decode() for item in flat]
        return texts[0] if len(texts) == 1 else texts
    return flat.tolist() if flat.size != 1 else flat[0].item()


def http_post(url: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sse_events(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a text/event-stream body (`data: {...}` lines)."""
    return [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes that mention `text` (a work directory: what outlived a server)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if text in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


def backend_stub(workdir: Path, model: str) -> psutil.Process:
    """The Python backend stub that runs `model` for the server rendered under `workdir`."""
    marker = f"{workdir}/model_repository/{model}/"
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "triton_python_backend_stub" in cmdline and marker in cmdline:
            return process
    raise AssertionError(f"no backend stub for {model} under {workdir}")


def read_metric(metrics_url: str, name: str) -> float:
    """The value of an unlabelled-or-single-series metric (0 when absent)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0
