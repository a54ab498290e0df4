"""Locust users for an OpenAI-compatible server: chat and completions, streamed or not, plus /v1/models.

    locust -f client/vdiff_client/load/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000

Closed loop: each user sends its next request as soon as the last one ends. Locust times a streamed
request only up to its headers, so TTFT, ITL, TPOT, e2e, output tokens and tokens/s are custom
events (`request_type="LLM"`, see `results.METRIC_UNITS`). 429 and 503 are rejections, not failures:
counted by status (`request_type="REJECTED"`), after which the user waits the Retry-After.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task
from locust.clients import ResponseContextManager
from locust.env import Environment
from requests import RequestException

from vdiff_client.load.options import SAMPLES_OPTION, add_load_options, api_key, remote_host_refusal
from vdiff_client.load.results import Tally
from vdiff_client.load.stream import StreamReader, StreamResult

REJECTED_STATUSES = (429, 503)
ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
TALLY = Tally()
logger = logging.getLogger("vdiff.load")


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    add_load_options(parser)
    parser.add_argument(SAMPLES_OPTION, default="", help="write the raw samples here as JSON when Locust quits")


@events.init.add_listener
def refuse_remote_hosts(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # used as a library: the caller chose the host
        return
    if refusal := remote_host_refusal(environment.host, options.allow_remote):
        logger.error(refusal)
        sys.exit(2)


@events.test_start.add_listener
def mark_start(**_: Any) -> None:
    TALLY.started = time.time()


@events.test_stop.add_listener
def mark_stop(**_: Any) -> None:
    TALLY.stopped = time.time()


@events.quitting.add_listener
def write_samples(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and options.samples_out:
        TALLY.write(Path(options.samples_out))


def prompt_of(options: Any) -> str:
    """--prompt, or --prompt-words words of it (repeated as needed) to set the prompt length."""
    if options.prompt_words <= 0:
        return str(options.prompt)
    words = options.prompt.split() or ["word"]
    return " ".join(words[i % len(words)] for i in range(options.prompt_words))


def request_body(kind: str, model: str, stream: bool, options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": options.max_tokens, "temperature": options.temperature}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt_of(options)}]
    else:
        body["prompt"] = prompt_of(options)
    if options.ignore_eos:
        body["ignore_eos"] = True
    body |= json.loads(options.extra_body)  # diffusion fields: steps, block_length, algorithm, ...
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    return body


def record(metric: str, value: float, length: int = 0) -> None:
    """One custom sample: kept raw for the report and shown by Locust as an LLM row."""
    TALLY.add(metric, value)
    events.request.fire(request_type="LLM", name=metric, response_time=value, response_length=length, exception=None)


def record_answer(e2e_s: float, output_tokens: int | None) -> None:
    record("e2e", e2e_s * 1000)
    if output_tokens is not None:
        record("output_tokens", output_tokens, output_tokens)
        if e2e_s > 0:
            record("tokens_per_s", output_tokens / e2e_s)


def record_stream(result: StreamResult) -> None:
    assert result.ttft is not None and result.e2e is not None
    record("ttft", result.ttft * 1000)
    for gap in result.itl:
        record("itl", gap * 1000)
    for tokens in result.chunk_tokens:
        record("chunk_tokens", tokens, tokens)
    if (tpot := result.tpot) is not None:
        record("tpot", tpot * 1000)
    record_answer(result.e2e, result.output_tokens)
    if result.output_tokens is not None and result.counted_tokens not in (0, result.output_tokens):
        TALLY.usage_mismatches += 1
        counted, final = result.counted_tokens, result.output_tokens
        logger.warning("continuous usage counted %d tokens, the final usage %d", counted, final)


def answer_tokens(kind: str, answer: dict[str, Any]) -> int | None:
    """The completion tokens of a whole (non-streamed) answer, or None when it has no text."""
    choice = answer["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    return int(answer["usage"]["completion_tokens"]) if text else None


def retry_after_s(response: ResponseContextManager) -> float:
    try:
        return float(response.headers.get("retry-after", 1))
    except ValueError:
        return 1.0


class OpenAIUser(HttpUser):
    """One closed-loop client. `HttpUser` (requests) hands out each chunk of a chunked response as it
    arrives; FastHttpUser's `iter_content` waits for whole `chunk_size` reads, which would skew TTFT."""

    model = ""  # resolved once from --model or /v1/models, shared by all users
    options: Any
    pause_s = 0.0  # set by a rejection: the Retry-After to honour before the next request

    def on_start(self) -> None:
        self.options = self.environment.parsed_options
        if key := api_key(self.options):
            self.client.headers["Authorization"] = f"Bearer {key}"
        if not OpenAIUser.model:
            OpenAIUser.model = self.options.model or self.first_listed_model()

    def first_listed_model(self) -> str:
        response = self.client.get("/v1/models", name="models", timeout=30)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])

    @task
    def one_request(self) -> None:
        """Picks what to send from the shares and weights given on the command line."""
        options, draw = self.options, random.random()
        kind = random.choices(list(ROUTES), weights=[options.chat_weight, options.completion_weight])[0]
        if draw < options.models_share:
            self.list_models()
        elif draw < options.models_share + options.non_stream_share:
            self.send_whole(kind)
        else:
            self.send_streamed(kind)
        if self.pause_s:
            time.sleep(self.pause_s)
            self.pause_s = 0.0

    def list_models(self) -> None:
        with self.client.get("/v1/models", name="models", catch_response=True) as response:
            TALLY.requests["models"] += 1
            self.judge_status(response)

    def send_streamed(self, kind: str) -> None:
        name = f"{kind}_stream"
        body = request_body(kind, OpenAIUser.model, True, self.options)
        started = time.perf_counter()
        with self.post(name, ROUTES[kind], body, stream=True) as response:
            TALLY.requests[name] += 1
            try:
                if self.judge_status(response):
                    self.read_stream(response, StreamReader(started))
            finally:
                response.close()  # a stream left unread would hold its connection

    def read_stream(self, response: ResponseContextManager, reader: StreamReader) -> None:
        try:
            for piece in response.iter_content(chunk_size=None):
                reader.feed(piece)
        except (RequestException, ValueError, LookupError, TypeError) as error:  # broken connection, bad payload
            self.fail(response, f"{type(error).__name__}: {error}"[:200])
            return
        if failure := reader.result.failure:
            self.fail(response, failure)
        else:
            record_stream(reader.result)

    def send_whole(self, kind: str) -> None:
        body = request_body(kind, OpenAIUser.model, False, self.options)
        started = time.perf_counter()
        with self.post(kind, ROUTES[kind], body, stream=False) as response:
            TALLY.requests[kind] += 1
            if not self.judge_status(response):
                return
            e2e = time.perf_counter() - started
            try:
                tokens = answer_tokens(kind, response.json())
            except (ValueError, LookupError, TypeError) as error:  # not the OpenAI body
                self.fail(response, f"bad answer: {type(error).__name__}: {error}"[:200])
                return
            if tokens is None:
                self.fail(response, "no content")
            else:
                record_answer(e2e, tokens)

    def post(self, name: str, path: str, body: dict[str, Any], stream: bool) -> ResponseContextManager:
        timeout = self.options.request_timeout
        return self.client.post(path, json=body, name=name, stream=stream, catch_response=True, timeout=timeout)

    def judge_status(self, response: ResponseContextManager) -> bool:
        """True for a 200; a 429/503 is a rejection, anything else (0: no connection) a failure."""
        if response.status_code == 200:
            return True
        if response.status_code in REJECTED_STATUSES:
            self.reject(response)
        else:
            self.fail(response, f"HTTP {response.status_code}" if response.status_code else "no response")
        return False

    def reject(self, response: ResponseContextManager) -> None:
        status, wait = str(response.status_code), retry_after_s(response)
        response.success()  # not a failure: a full server is meant to say "later"
        TALLY.rejections[status] += 1
        TALLY.retry_after.append(wait)
        elapsed_ms = response.elapsed.total_seconds() * 1000
        events.request.fire(request_type="REJECTED", name=f"HTTP {status}", response_time=elapsed_ms,
                            response_length=0, exception=None)  # fmt: skip
        self.pause_s = min(wait, self.options.retry_after_cap)

    def fail(self, response: ResponseContextManager, reason: str) -> None:
        TALLY.failures[reason] += 1
        response.failure(reason)
