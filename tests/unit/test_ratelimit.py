"""The rate limiter's buckets on a controlled clock: refill, refusal, Retry-After, settling, headers."""

from __future__ import annotations

import pytest

from vdiff_client.errors import APIError
from vdiff_client.ratelimit import MAX_IDLE_CLIENTS, RateLimiter, RateLimits, client_key, duration_text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rpm: int | None = None, tpm: int | None = None) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(RateLimits(rpm, tpm), clock), clock


def test_a_full_minute_then_one_request_per_refill_interval() -> None:
    limits, clock = limiter(rpm=60)
    for _ in range(60):
        limits.admit_request("a")
    with pytest.raises(APIError) as refused:
        limits.admit_request("a")
    assert refused.value.status == 429 and refused.value.headers() == {"Retry-After": "1"}
    clock.now += 1.0  # 60 per minute: one more each second
    limits.admit_request("a")
    limits.admit_request("b")  # another client has its own budget


def test_retry_after_is_the_wait_for_the_missing_part() -> None:
    limits, clock = limiter(tpm=600)  # 10 tokens per second
    limits.charge_tokens("a", 100, 450)
    with pytest.raises(APIError) as refused:
        limits.charge_tokens("a", 100, 200)  # 50 left, 300 asked: 25 s
    assert refused.value.headers() == {"Retry-After": "25"}
    assert "try again in 25s" in refused.value.message
    clock.now += 25
    limits.charge_tokens("a", 100, 200)


def test_unused_tokens_go_back_once() -> None:
    limits, _ = limiter(tpm=1000)
    charge = limits.charge_tokens("a", 10, 500)
    charge.settle(generated=40)
    charge.settle(generated=0)  # a second settle changes nothing
    assert dict(limits.headers("a"))["x-ratelimit-remaining-tokens"] == str(1000 - 10 - 40)


def test_a_request_above_the_whole_budget_is_refused_even_when_full() -> None:
    limits, _ = limiter(tpm=100)
    with pytest.raises(APIError) as refused:
        limits.charge_tokens("a", 60, 60)
    assert refused.value.status == 429 and "Request too large" in refused.value.message


def test_headers_follow_openai() -> None:
    limits, clock = limiter(rpm=60, tpm=6000)
    limits.admit_request("a")
    limits.charge_tokens("a", 1000, 2000)
    headers = dict(limits.headers("a"))
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "3000",
        "x-ratelimit-reset-tokens": "30s",
    }
    clock.now += 0.25
    assert dict(limits.headers("a"))["x-ratelimit-reset-requests"] == "750ms"


def test_idle_clients_are_forgotten_when_there_are_many() -> None:
    limits, clock = limiter(rpm=10)
    for i in range(MAX_IDLE_CLIENTS):
        limits.admit_request(f"c{i}")
    clock.now += 60  # every budget is full again
    limits.admit_request("newcomer")
    assert set(limits.clients) == {"newcomer"}


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.012, "12ms"), (1.0, "1s"), (8.64, "8.64s"), (360.0, "6m0s"), (61.5, "1m1.5s")]
)
def test_durations_read_like_openai(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_clients_are_keys_when_there_are_keys_else_addresses() -> None:
    assert client_key("secret", "10.0.0.1").startswith("key:") and "secret" not in client_key("secret", None)
    assert client_key(None, "10.0.0.1") == "addr:10.0.0.1"


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="requests_per_minute must be >= 1"):
        RateLimits(requests_per_minute=0)
