"""The error codes vdiff's pieces share: the denoiser, the tokenizer model, the proxy, the health probe.

Over gRPC streaming Triton 2.51 passes on only an error's message, not its status, and an ensemble
puts its own words before a step's message. So every error a vdiff model sends starts with its
code in brackets, `[vdiff:capacity] the server is at capacity (...)`, and `read_error` finds it
wherever the message was wrapped. The code, never the sentence, decides the HTTP status, the
Triton error kind and the reason a refusal is counted under. Sentences may change; codes may not.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class ErrorCode(enum.Enum):
    INVALID_INPUT = "invalid_input"  # the client's request cannot be served as sent
    CAPACITY = "capacity"  # the engine holds as many requests as it may: retry later
    SHUTDOWN = "shutdown"  # the server is stopping or stopped: retry on another replica
    UNAVAILABLE = "unavailable"  # the backend does not answer (threads stopped, Triton gone)
    CANCELLED = "cancelled"  # the client went away
    INTERNAL = "internal"  # a fault on the server's side

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def triton_kind(self) -> str:
        """The name of the `pb_utils.TritonError` code a Python-backend model sends it with."""
        return _TRITON_KIND[self]

    @property
    def is_refusal(self) -> bool:
        """Refused for the server's state, not the request's content: counted as a rejection."""
        return self in (ErrorCode.CAPACITY, ErrorCode.SHUTDOWN, ErrorCode.UNAVAILABLE)


_HTTP_STATUS = {
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.CAPACITY: 503,
    ErrorCode.SHUTDOWN: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.CANCELLED: 499,  # nginx's "client closed request"; nobody is left to read it
    ErrorCode.INTERNAL: 500,
}
_TRITON_KIND = {
    ErrorCode.INVALID_INPUT: "INVALID_ARG",
    ErrorCode.CAPACITY: "UNAVAILABLE",
    ErrorCode.SHUTDOWN: "UNAVAILABLE",
    ErrorCode.UNAVAILABLE: "UNAVAILABLE",
    ErrorCode.CANCELLED: "CANCELLED",
    ErrorCode.INTERNAL: "INTERNAL",
}
_TAG = re.compile(r"\[vdiff:([a-z_]+)\] ")


@dataclass(frozen=True)
class CodedError:
    """An error as it crossed a boundary: its code (None: untagged, from Triton itself) and words."""

    code: ErrorCode | None
    message: str


def tagged(code: ErrorCode, message: str) -> str:
    """The message as a vdiff model sends it."""
    return f"[vdiff:{code.value}] {message}"


def read_error(message: str) -> CodedError:
    """The code of a message from a vdiff model, and the message after the tag (and any wrapping)."""
    found = _TAG.search(message)
    if found is None:
        return CodedError(None, message)
    try:
        code = ErrorCode(found.group(1))
    except ValueError:
        return CodedError(None, message)
    return CodedError(code, message[found.end() :])
