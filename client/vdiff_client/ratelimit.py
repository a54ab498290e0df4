"""Per-client rate limits: requests and tokens per minute, with OpenAI's `x-ratelimit-*` headers.

A client is its API key when the server has keys, else its address. Each budget is a token bucket
that holds one minute's allowance and refills continuously, so a client may burst up to the limit
and then gets a steady limit/60 per second. A generation request takes one request at admission and,
once its prompt is tokenized, an estimate of its tokens (prompt + the most it may generate); what it
did not generate goes back to the bucket when it ends, so the token budget tracks real usage.
Over budget: 429 with Retry-After (seconds until the budget covers the request) and the headers.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdiff_client.calls import Call, bearer_token, route_path
from vdiff_client.errors import APIError

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
WINDOW_S = 60.0
MAX_IDLE_CLIENTS = 4096  # past this many tracked clients, the ones with full budgets are forgotten


@dataclass(frozen=True)
class RateLimits:
    requests_per_minute: int | None = None  # None: no limit
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class Bucket:
    """`limit` units per minute; starts full."""

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.per_second = limit / WINDOW_S
        self.level = float(limit)
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` (at most the limit) is available; 0: now."""
        return max(0.0, (amount - self.level) / self.per_second)

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self.level = min(self.limit, self.level + amount)

    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.limit - self.level) / self.per_second

    def is_full(self) -> bool:
        return self.level >= self.limit


class ClientBudget:
    def __init__(self, limits: RateLimits, now: float) -> None:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        self.requests = Bucket(rpm, now) if rpm is not None else None
        self.tokens = Bucket(tpm, now) if tpm is not None else None

    def buckets(self) -> list[tuple[str, Bucket]]:
        return [(kind, b) for kind, b in (("requests", self.requests), ("tokens", self.tokens)) if b is not None]


class TokenCharge:
    """What a request took from its client's token budget: its prompt tokens and the most it may
    generate; `settle` gives back what it did not generate."""

    def __init__(self, bucket: Bucket | None, prompt_tokens: int, max_generated: int) -> None:
        self.bucket = bucket
        self.prompt_tokens = prompt_tokens
        self.max_generated = max_generated
        self.settled = False

    @property
    def estimate(self) -> int:
        return self.prompt_tokens + self.max_generated

    def settle(self, generated: int) -> None:
        if self.bucket is not None and not self.settled:
            self.bucket.give_back(max(0, self.max_generated - generated))
        self.settled = True


class RateLimiter:
    """Every client's budgets. Runs on the server's event loop only (no locking)."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.clients: dict[str, ClientBudget] = {}

    def budget(self, client: str) -> ClientBudget:
        now = self.clock()
        budget = self.clients.get(client)
        if budget is None:
            self._forget_idle_clients(now)
            budget = self.clients[client] = ClientBudget(self.limits, now)
        for _, bucket in budget.buckets():
            bucket.refill(now)
        return budget

    def admit_request(self, client: str) -> None:
        """One request from `client`, or 429."""
        bucket = self.budget(client).requests
        if bucket is None:
            return
        _check(bucket, 1, "requests")
        bucket.take(1)

    def charge_tokens(self, client: str, prompt_tokens: int, max_generated: int) -> TokenCharge:
        """Take a request's prompt and most generated tokens from `client`'s budget, or 429."""
        charge = TokenCharge(self.budget(client).tokens, prompt_tokens, max_generated)
        if charge.bucket is not None:
            _check(charge.bucket, charge.estimate, "tokens")
            charge.bucket.take(charge.estimate)
        return charge

    def headers(self, client: str) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-limit/remaining/reset headers for each budget that is set."""
        headers = []
        for kind, bucket in self.budget(client).buckets():
            headers += [
                (f"x-ratelimit-limit-{kind}", str(bucket.limit)),
                (f"x-ratelimit-remaining-{kind}", str(bucket.remaining())),
                (f"x-ratelimit-reset-{kind}", duration_text(bucket.reset_s())),
            ]
        return headers

    def _forget_idle_clients(self, now: float) -> None:
        if len(self.clients) < MAX_IDLE_CLIENTS:
            return
        for client, budget in list(self.clients.items()):
            for _, bucket in budget.buckets():
                bucket.refill(now)
            if all(bucket.is_full() for _, bucket in budget.buckets()):
                del self.clients[client]


def _check(bucket: Bucket, amount: int, kind: str) -> None:
    """429 unless `amount` is available now (OpenAI answers a request above the whole budget with 429 too)."""
    if amount > bucket.limit:
        raise APIError(
            429,
            f"Request too large: it may use {amount} {kind} and the limit is {bucket.limit} {kind} per minute. "
            "Shorten the prompt or lower max_tokens.",
            retry_after_s=int(WINDOW_S),
        )
    wait = bucket.wait_for(amount)
    if wait > 0:
        raise APIError(
            429,
            f"Rate limit reached for {kind}: limit {bucket.limit} per minute, remaining {bucket.remaining()}, "
            f"requested {amount}. Please try again in {duration_text(wait)}.",
            retry_after_s=max(1, math.ceil(wait)),
        )


def client_key(api_key: str | None, address: str | None) -> str:
    """A client's identity: a digest of its API key (not the key itself), else its address."""
    if api_key:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return f"addr:{address or '?'}"


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: `12ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


class RateLimitMiddleware:
    """Names each /v1 call's client, admits generation requests against the request budget (or 429s
    them) and puts the client's `x-ratelimit-*` headers on every /v1 response."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, keyed: bool, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.limiter = limiter
        self.keyed = keyed  # the server checks API keys: budgets are per key, not per address
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call: Call | None = scope.get("state", {}).get("call")
        if call is None or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        call.client = client = self._client(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.encode(), v.encode()) for k, v in self.limiter.headers(client)]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        if scope["method"] == "POST" and route_path(scope) in GENERATION_PATHS:
            try:
                self.limiter.admit_request(client)
            except APIError as error:
                self.on_reject("rate_limit_requests")
                await error.response()(scope, receive, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)

    def _client(self, scope: Scope) -> str:
        api_key = bearer_token(scope) if self.keyed else None  # the middleware before checked it
        address = scope.get("client")
        return client_key(api_key, address[0] if address else None)
