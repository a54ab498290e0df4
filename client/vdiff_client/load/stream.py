"""Reading one streamed OpenAI answer: SSE framing, then the timings of its chunks.

A chunk delivers when it carries text or when its `continuous_usage_stats` count grew: a diffusion
model's text can lag its tokens (a block that ends inside a multi-byte character shows no text).
TTFT is the time to the first delivering chunk. A chunk usually carries a block of tokens, so each
inter-token latency (ITL) sample is the gap between two consecutive delivering chunks divided by
the tokens the later one brought (1 when the server does not count them).
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]


class SSEDecoder:
    """Splits a text stream into the data payloads of its events (blank-line separated)."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> list[str]:
        self.buffer = (self.buffer + text).replace("\r\n", "\n")  # a CRLF may be split between reads
        *events, self.buffer = self.buffer.split("\n\n")
        return [payload for event in events if (payload := event_data(event)) is not None]


def event_data(event: str) -> str | None:
    """The joined `data:` lines of one event; None for an event of comments (`:` lines) only."""
    lines = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
    return "\n".join(lines) if lines else None


def choice_text(chunk: dict[str, Any]) -> str:
    """The text of a completion or chat chunk's first choice ("" for the role chunk)."""
    choice = chunk["choices"][0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


@dataclass
class StreamResult:
    """What one streamed request measured; times in seconds from the moment the request was sent."""

    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    last_chunk_at: float | None = None
    has_text: bool = False
    e2e: float | None = None
    output_tokens: int | None = None
    counted_tokens: int = 0  # the last continuous usage count, checked against the final usage
    done: bool = False
    error: str | None = None

    @property
    def failure(self) -> str | None:
        """Why the request failed, or None: an error event, no [DONE], or no text at all."""
        if self.error is not None:
            return f"error event: {self.error}"[:200]
        if not self.done:
            return "stream ended without [DONE]"
        if not self.has_text:
            return "no content"
        return None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first delivering chunk (None when nothing came after it)."""
        if self.ttft is None or self.last_chunk_at is None or self.output_tokens is None or not self.chunk_tokens:
            return None
        later_tokens = self.output_tokens - self.chunk_tokens[0]
        return (self.last_chunk_at - self.ttft) / later_tokens if later_tokens > 0 else None


class StreamReader:
    """Decodes the raw body (UTF-8, split anywhere), frames it with `SSEDecoder` and timestamps each
    payload against `started`."""

    def __init__(self, started: float, clock: Clock = time.perf_counter) -> None:
        self.started = started
        self.clock = clock
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = SSEDecoder()
        self.result = StreamResult()
        self.tokens_at_last_chunk = 0

    def feed(self, data: bytes) -> None:
        for payload in self.decoder.feed(self.utf8.decode(data)):
            if not self.result.done:  # anything after [DONE] is ignored
                self.on_payload(payload, self.clock() - self.started)

    def on_payload(self, payload: str, now: float) -> None:
        if payload == "[DONE]":
            self.result.done, self.result.e2e = True, now
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            error = chunk["error"]
            self.result.error = str(error.get("message", error) if isinstance(error, dict) else error)
        elif chunk.get("choices"):
            self.on_choice_chunk(chunk, now)
        elif chunk.get("usage"):  # the include_usage chunk: `choices == []`
            self.result.output_tokens = chunk["usage"]["completion_tokens"]

    def on_choice_chunk(self, chunk: dict[str, Any], now: float) -> None:
        result = self.result
        if chunk.get("usage"):  # continuous_usage_stats: cumulative for this choice
            result.counted_tokens = chunk["usage"]["completion_tokens"]
        text = choice_text(chunk)
        new_tokens = result.counted_tokens - self.tokens_at_last_chunk
        if not text and new_tokens <= 0:
            return  # the role chunk, or nothing new
        self.tokens_at_last_chunk = result.counted_tokens
        result.has_text = result.has_text or bool(text)
        if result.ttft is None:
            result.ttft = now
        else:
            assert result.last_chunk_at is not None
            result.itl.append((now - result.last_chunk_at) / max(new_tokens, 1))
        result.chunk_tokens.append(max(new_tokens, 1))
        result.last_chunk_at = now
