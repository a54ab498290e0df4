"""Deep health: `/health` is 200 only when the model the proxy sends requests to (the denoiser) is
ready *and* runs a one-step request, and the denoiser answers its liveness pings.

A readiness flag alone misses a wedged engine thread or a dead stub process; a probe request does not.
The result is cached (a few seconds when healthy, one second when not; a request that finds Triton
unreachable ends a healthy period at once) and probes never overlap, so
a load balancer polling every second costs at most one tiny request per cache period. A full engine
is alive: a refusal with the code `capacity` counts as healthy, or a busy replica would flap out
of the pool under load.

A dead denoiser stub is worse than a slow probe: Triton still reports its model ready, requests in
flight never hear from it again and new ones may hang. `BackendWatch` pings it every second; a
failed ping turns /health to 503 at once, and a second failure in a row declares the backend
dead: its listeners end the calls in flight with 503 (and make `vdiff` exit non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from vdiff_client.codes import ErrorCode
from vdiff_client.triton import TritonBackend, TritonRequestError

log = logging.getLogger(__name__)

PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0  # a dead stub's error takes about 1 s; a wedged one never answers
# worst case from a stub's death to on_dead: an interval and two timed-out pings
DEAD_WITHIN_S = PING_INTERVAL_S + 2 * PING_TIMEOUT_S


class BackendWatch:
    """Pings the denoiser; `failure` says why the last ping failed (None while it answers).

    Armed by the first answer: before it, Triton is still loading, which the probe reports.
    """

    def __init__(self, backend: TritonBackend) -> None:
        self.backend = backend
        self.listeners: list[Callable[[str], None]] = []  # told why, once per death
        self.failure: str | None = None
        self.armed = False
        self.dead = False

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # the watch must outlive any one failure, or liveness goes unchecked
                log.exception("the backend watch failed to check the denoiser")
            await asyncio.sleep(PING_INTERVAL_S)

    async def check(self) -> None:
        failure = await self.backend.ping(PING_TIMEOUT_S)
        if failure is not None and self.armed:
            self.failure = failure  # /health is 503 from now
            failure = await self.backend.ping(PING_TIMEOUT_S)  # one more before declaring it dead
        self._record(failure)

    def _record(self, failure: str | None) -> None:
        if failure is None:
            if self.dead:
                log.warning("the denoiser answers again")
            self.armed, self.failure, self.dead = True, None, False
            return
        self.failure = failure
        if self.armed and not self.dead:
            self.dead = True
            log.error("the denoiser stopped answering: %s", failure)
            for listener in self.listeners:
                try:
                    listener(failure)
                except Exception:
                    log.exception("a listener of the backend's death failed")


class HealthCheck:
    def __init__(
        self,
        backend: TritonBackend,
        probe_ids: list[int],
        watch: BackendWatch | None = None,
        healthy_ttl_s: float = 5.0,
        unhealthy_ttl_s: float = 1.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.backend = backend
        self.watch = watch
        # one denoising step on a short prompt: the cheapest request that runs the whole pipeline
        self.probe_values: dict[str, Any] = {
            "input_ids": probe_ids,
            "max_tokens": 1,
            "steps": 1,
            "stream": True,
            "exclude_input_in_output": True,
        }
        self.healthy_ttl_s = healthy_ttl_s
        self.unhealthy_ttl_s = unhealthy_ttl_s
        self.timeout_s = timeout_s
        self._result: tuple[bool, float] | None = None  # (healthy, when)
        self._probe: asyncio.Task[bool] | None = None

    async def healthy(self) -> bool:
        if self.watch is not None and self.watch.failure is not None:
            return False  # the denoiser's last ping failed: no probe could succeed
        cached = self._cached()
        if cached is not None:
            return cached
        if self._probe is None:
            self._probe = asyncio.create_task(self._run_probe())
        return await asyncio.shield(self._probe)  # a caller that hangs up does not cancel the shared probe

    def _cached(self) -> bool | None:
        if self._result is None:
            return None
        healthy, when = self._result
        if healthy and self.backend.last_transport_failure > when:
            return None  # a request has found Triton gone since: look again now
        ttl = self.healthy_ttl_s if healthy else self.unhealthy_ttl_s
        return healthy if time.monotonic() - when < ttl else None

    async def _run_probe(self) -> bool:
        try:
            healthy = await asyncio.wait_for(self._check(), self.timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            log.warning("health probe: no answer from Triton within %g s", self.timeout_s)
            healthy = False
        self._result = (healthy, time.monotonic())
        self._probe = None
        return healthy

    async def _check(self) -> bool:
        if not await self.backend.is_ready():
            log.warning("health probe: Triton's model %r is not ready", self.backend.model)
            return False
        try:
            async for _ in self.backend.generate(f"health-{secrets.token_hex(4)}", self.probe_values):
                pass
        except TritonRequestError as error:
            if error.code is ErrorCode.CAPACITY:  # it answers; it is only full
                return True
            log.warning("health probe failed: %s", error.message)
            return False
        return True
