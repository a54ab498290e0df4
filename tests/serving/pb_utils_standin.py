"""A stand-in for `triton_python_backend_utils`, enough to run the model.py files in-process.

It implements the calls those files make with the same names and semantics as the Python backend
of Triton 2.51, and records what was sent so tests can read it. The real-server tests cover the
real module.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from vdiff.serve.repository import SOURCE, read_parameters

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._tensors, self._error = output_tensors or [], error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def outputs(self) -> dict[str, np.ndarray]:
        return {t.name(): t.as_numpy() for t in self._tensors}

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceRequest:
    """BLS: records each request executed, answers with one empty response."""

    executed: list[InferenceRequest] = []

    def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[Tensor], **kw: Any) -> None:
        self.model_name, self.inputs, self.request_id = model_name, inputs, kw.get("request_id", "")

    def exec(self, decoupled: bool = False) -> Any:
        InferenceRequest.executed.append(self)
        return iter([InferenceResponse()])


class Logger:
    lines: list[str] = []

    @staticmethod
    def log_info(message: str) -> None:
        Logger.lines.append(message)

    log_warn = log_error = log_verbose = log_info


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = range(3)

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name, self.kind = name, kind

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> _Metric:  # noqa: N802
        return _Metric()


class _Metric:
    def __init__(self) -> None:
        self.total, self.observations = 0.0, []

    def increment(self, value: float) -> None:
        self.total += value

    def set(self, value: float) -> None:
        self.total = value

    def observe(self, value: float) -> None:
        self.observations.append(value)

    def value(self) -> float:
        return self.total


class Sender:
    """A response sender that keeps what it is sent."""

    def __init__(self) -> None:
        self.responses: list[tuple[InferenceResponse | None, int]] = []
        self.cancelled = False
        self.closed = threading.Event()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        assert not self.closed.is_set(), "sent after the final flag"
        self.responses.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.closed.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


class Request:
    def __init__(self, inputs: dict[str, np.ndarray], request_id: str = "", cancelled: bool = False) -> None:
        self._inputs = [Tensor(name, array) for name, array in inputs.items()]
        self._id, self._cancelled = request_id, cancelled
        self.sender = Sender()

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._id

    def is_cancelled(self) -> bool:
        return self._cancelled

    def get_response_sender(self) -> Sender:
        return self.sender


def load_model(name: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch, **overrides: str) -> Any:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", sys.modules[__name__])
    spec = importlib.util.spec_from_file_location(f"{name}_model", SOURCE / name / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parameters = read_parameters((SOURCE / name / "config.pbtxt").read_text()) | {"model": str(model_dir)} | overrides
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": name, "model_version": "1"})
    return model


def text(value: str) -> np.ndarray:
    return np.array([[value.encode()]], dtype=np.object_)


def scalar(value: Any, dtype: Any) -> np.ndarray:
    return np.array([[value]], dtype=dtype)
