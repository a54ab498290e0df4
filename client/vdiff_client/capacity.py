"""How many sequences the denoiser can ever hold, and the proxy's own share of them in flight.

The denoiser refuses a request past `max_num_seqs` running plus `max_queue_size` waiting
(vdiff/backend/service.py), but it hears of a request only when its streams arrive: a request
of n × prompts choices is tokenized and opens that many streams before the first refusal comes
back. The proxy reads both parameters from the denoiser's config in Triton, once, and answers
before any of that work:

- n × prompts beyond the capacity can never run: 400, before anything is tokenized;
- a request that fits, but not beside the proxy's own choices in flight: 503 with Retry-After.

An admitted request holds its slots until it ends, however it ends. The denoiser's own refusal
still stands behind this gate: other clients may send to Triton directly, and the health probe
takes a slot for a moment without reserving it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.utils import InferenceServerException

from vdiff_client.errors import APIError, bad_request
from vdiff_client.triton import TritonBackend

log = logging.getLogger(__name__)

# BackendSettings' defaults (vdiff/backend/settings.py): what an empty or `${...}` value means
DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_QUEUE_SIZE = 32
RETRY_READ_S = 5.0


@dataclass(frozen=True)
class EngineCapacity:
    max_num_seqs: int
    max_queue_size: int
    instances: int = 1  # each instance of the denoiser runs its own engine

    @property
    def sequences(self) -> int:
        return (self.max_num_seqs + self.max_queue_size) * self.instances

    def __str__(self) -> str:
        per_engine = f"max_num_seqs {self.max_num_seqs} running + max_queue_size {self.max_queue_size} waiting"
        if self.instances > 1:
            per_engine = f"{self.instances} instances x ({per_engine})"
        return f"{self.sequences} ({per_engine})"

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> EngineCapacity:
        """From the denoiser's config as Triton loaded it (`get_model_config(..., as_json=True)`)."""
        raw = config.get("parameters", {})
        parameters = {key: value.get("string_value", "") for key, value in raw.items()}
        groups = config.get("instance_group") or [{}]
        return cls(
            _parameter(parameters, "max_num_seqs", DEFAULT_MAX_NUM_SEQS),
            _parameter(parameters, "max_queue_size", DEFAULT_MAX_QUEUE_SIZE),
            sum(int(group.get("count", 1)) for group in groups),
        )


def _parameter(parameters: Mapping[str, str], name: str, default: int) -> int:
    text = parameters.get(name, "").strip()
    return int(text) if text and not text.startswith("${") else default


def sequences_text(n: int, prompts: int) -> str:
    if prompts == 1:
        return f"n = {n} sequences"
    return f"n × prompts = {n} × {prompts} = {n * prompts} sequences"


class Reservation:
    """The slots of one request's choices; releasing twice releases once."""

    def __init__(self, gate: CapacityGate, sequences: int) -> None:
        self._gate = gate
        self.sequences = sequences

    def release(self) -> None:
        self._gate.in_flight -= self.sequences
        self.sequences = 0


class CapacityGate:
    """One per server: completions and chat draw on the same slots."""

    def __init__(self, backend: TritonBackend) -> None:
        self._backend = backend
        self.in_flight = 0  # sequences of the proxy's admitted requests
        self._capacity: EngineCapacity | None = None
        self._reading: asyncio.Task[EngineCapacity | None] | None = None
        self._failed_at = float("-inf")  # time.monotonic() of the last failed read

    async def reserve(self, n: int, prompts: int) -> Reservation:
        """Slots for n × prompts choices, or a refusal: 400 if they never fit, 503 if not now."""
        sequences = n * prompts
        capacity = await self.capacity()
        if capacity is not None and sequences > capacity.sequences:
            raise bad_request(
                f"{sequences_text(n, prompts)} exceeds this server's capacity of {capacity}; "
                "send fewer choices or prompts per request",
                "n",
            )
        if capacity is not None and self.in_flight + sequences > capacity.sequences:
            raise APIError(
                503,
                f"the server is at capacity: requests in flight hold {self.in_flight} of its "
                f"{capacity.sequences} sequences and this one needs {sequences}; retry later",
            )
        self.in_flight += sequences
        return Reservation(self, sequences)

    async def capacity(self) -> EngineCapacity | None:
        """Read from Triton once; None while it cannot tell (the denoiser's check still holds).

        A failed read is retried after RETRY_READ_S, not by every request meanwhile.
        """
        if self._capacity is None and time.monotonic() - self._failed_at >= RETRY_READ_S:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.get_running_loop().create_task(self._read())
            self._capacity = await asyncio.shield(self._reading)  # a hang-up does not end the read
        return self._capacity

    async def _read(self) -> EngineCapacity | None:
        try:
            capacity = EngineCapacity.from_model_config(await self._backend.denoiser_config())
        except (InferenceServerException, grpc.RpcError, ValueError, TypeError) as error:
            if self._failed_at == float("-inf"):
                log.warning("the denoiser's capacity is unknown for now: %s", error)
            self._failed_at = time.monotonic()
            return None
        log.info("the denoiser holds %s sequences", capacity)
        return capacity
