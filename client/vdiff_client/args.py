"""`vllm serve`'s flags, as the `vdiff` command and `vdiff-proxy` take them.

Flags that mean something for a Triton-served diffusion model are implemented; the GPU-engine
flags of vLLM (parallelism, memory, caching, LoRA, ...) are accepted so that vLLM command lines,
Helm values and KServe `args` keep working, and each one given is reported once as ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from vdiff_client.config import RequestLimits
from vdiff_client.timeouts import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    h11_protocol,
)

# vLLM flags accepted and ignored: (names, takes a value)
IGNORED_FLAGS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("--tensor-parallel-size", "-tp"), True),
    (("--pipeline-parallel-size", "-pp"), True),
    (("--data-parallel-size", "-dp"), True),
    (("--gpu-memory-utilization",), True),
    (("--quantization", "-q"), True),
    (("--kv-cache-dtype",), True),
    (("--block-size",), True),
    (("--swap-space",), True),
    (("--cpu-offload-gb",), True),
    (("--max-logprobs",), True),
    (("--max-num-queued-tokens",), True),
    (("--tokenizer-mode",), True),
    (("--revision",), True),
    (("--tokenizer-revision",), True),
    (("--hf-token",), True),
    (("--download-dir",), True),
    (("--load-format",), True),
    (("--config",), True),
    (("--uds",), True),
    (("--h11-max-header-count",), True),  # uvicorn has no such limit to set
    (("--middleware",), True),
    (("--log-config-file",), True),
    (("--api-server-count", "-asc"), True),
    (("--disable-access-log-for-endpoints",), True),
    (("--chat-template-content-format",), True),
    (("--tool-call-parser",), True),
    (("--reasoning-parser",), True),
    (("--sse-keep-alive-interval",), True),
    (("--distributed-executor-backend",), True),
    (("--max-seq-len-to-capture",), True),
    (("--speculative-config",), True),
    (("--compilation-config", "-O"), True),
    (("--override-generation-config",), True),
    (("--limit-mm-per-prompt",), True),
    (("--lora-modules",), True),
    (("--max-lora-rank",), True),
    (("--enable-prefix-caching",), False),
    (("--no-enable-prefix-caching",), False),
    (("--enable-chunked-prefill",), False),
    (("--no-enable-chunked-prefill",), False),
    (("--enforce-eager",), False),
    (("--disable-log-stats",), False),
    (("--enable-auto-tool-choice",), False),
    (("--return-tokens-as-token-ids",), False),
    (("--enable-prompt-tokens-details",), False),
    (("--enable-server-load-tracking",), False),
    (("--enable-log-outputs",), False),
    (("--enable-ssl-refresh",), False),
    (("--log-error-stack",), False),
    (("--headless",), False),
    (("--enable-lora",), False),
    (("--enable-sleep-mode",), False),
    (("--disable-custom-all-reduce",), False),
    (("--disable-frontend-multiprocessing",), False),
    (("--async-scheduling",), False),
)


def json_list(text: str) -> tuple[str, ...]:
    """CORS lists are JSON strings in vLLM (`--allowed-origins '["https://a.example"]'`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return tuple(value)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("model_tag", nargs="?", default=None, help="the model (overrides --model), as in `vllm serve`")
    model.add_argument(
        "--model", default=default_model, help=f"model directory, Hub id or shipped name ({default_model})"
    )
    model.add_argument(
        "--served-model-name", nargs="+", default=None, help="names the API accepts; the first is reported"
    )
    model.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's)")
    model.add_argument("--trust-remote-code", action="store_true")
    model.add_argument("--max-model-len", default=None, help="context length (2048, 4k, 4K); default: the model's")
    model.add_argument("--generation-config", default="auto", help="auto (the model's), vllm, or a directory")
    model.add_argument("--chat-template", default=None, help="a template file or the template text")
    model.add_argument("--response-role", default="assistant", help="role of chat answers (add_generation_prompt)")


def add_frontend_arguments(parser: argparse.ArgumentParser) -> None:
    http = parser.add_argument_group("OpenAI server")
    http.add_argument("--host", default=None, help="address to bind (default: every interface)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", nargs="+", default=None, help="keys for /v1 (also VLLM_API_KEY)")
    http.add_argument("--root-path", default="", help="path prefix when behind a path-based proxy")
    http.add_argument("--allowed-origins", type=json_list, default=("*",))
    http.add_argument("--allowed-methods", type=json_list, default=("*",))
    http.add_argument("--allowed-headers", type=json_list, default=("*",))
    http.add_argument("--allow-credentials", action="store_true")
    http.add_argument("--ssl-keyfile", default=None)
    http.add_argument("--ssl-certfile", default=None)
    http.add_argument("--ssl-ca-certs", default=None)
    http.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE))
    http.add_argument("--ssl-ciphers", default=None)
    http.add_argument("--uvicorn-log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug", "trace"])  # fmt: skip
    http.add_argument("--disable-uvicorn-access-log", action="store_true")
    http.add_argument("--enable-request-id-headers", action="store_true", help="echo X-Request-Id on responses")
    http.add_argument("--disable-fastapi-docs", action="store_true")
    http.add_argument("--enable-force-include-usage", action="store_true", help="usage chunk on every stream")
    http.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                      help="serve GET /tokenizer_info: the tokenizer's configuration and chat template")  # fmt: skip
    http.add_argument("--trust-request-chat-template", action="store_true",
                      help="accept a chat_template in requests (off: 400, as in vLLM)")  # fmt: skip
    http.add_argument("--no-playground", action="store_true",
                      help="do not serve the browser playground at /playground (404)")  # fmt: skip
    http.add_argument("--enable-log-requests", action="store_true")
    http.add_argument("--disable-log-requests", action="store_true", help="deprecated in vLLM; the default")
    http.add_argument("--max-log-len", type=int, default=None)
    http.add_argument("--h11-max-incomplete-event-size", type=positive_int, default=4 * 1024 * 1024,
                      help="largest request head in bytes; beyond it: 400")  # fmt: skip
    add_timeout_arguments(parser)
    limits = parser.add_argument_group("rate limits (per API key, or per client address without keys)")
    limits.add_argument("--rate-limit-rpm", type=positive_int, default=None,
                        help="generation requests per minute; over it: 429 + Retry-After (default: off)")  # fmt: skip
    limits.add_argument("--rate-limit-tpm", type=positive_int, default=None,
                        help="tokens per minute: prompt + max_tokens, settled to real use (default: off)")  # fmt: skip
    add_limit_arguments(parser)


def add_timeout_arguments(parser: argparse.ArgumentParser) -> None:
    """How long a client may take to send its request (timeouts.py); past it the connection ends."""
    timeouts = parser.add_argument_group("client timeouts (slow or stalled clients)")
    timeouts.add_argument("--timeout-keep-alive", type=positive_int, default=DEFAULT_KEEP_ALIVE_S,
                          help="seconds an idle kept-alive connection stays open "
                          "(5, vLLM's)")  # fmt: skip
    timeouts.add_argument("--header-timeout", type=positive_float, default=DEFAULT_HEADER_TIMEOUT_S,
                          help="seconds to send a request's headers, from the connection or the "
                          "request's first byte; past it: 408 and the connection closed "
                          "(10 s: headers take milliseconds, even on slow links)")  # fmt: skip
    timeouts.add_argument("--body-timeout", type=positive_float, default=DEFAULT_BODY_TIMEOUT_S,
                          help="seconds to send a request's body once its headers are in; past "
                          "it: 408 and the connection closed, so a drain never waits for it "
                          "(30 s: a 2 MB body, the default limit, at 67 KB/s)")  # fmt: skip


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """What one request may ask for (`RequestLimits`); beyond it: 413 for the body, else 400 naming the flag."""
    default = RequestLimits()
    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-request-body-bytes", type=positive_int, default=default.max_body_bytes,
                        help="largest request body, chunked or not (TGI's --payload-limit)")  # fmt: skip
    limits.add_argument("--max-n", type=positive_int, default=default.max_n, help="largest n")
    limits.add_argument("--max-prompts", type=positive_int, default=default.max_prompts,
                        help="most prompts in one /v1/completions request")  # fmt: skip
    limits.add_argument("--max-tokens-limit", type=positive_int, default=default.max_tokens,
                        help="largest max_tokens (default: the context length)")  # fmt: skip
    limits.add_argument("--max-steps", type=positive_int, default=default.max_steps,
                        help="most denoising steps (default: the context length)")  # fmt: skip
    limits.add_argument("--max-stop-sequences", type=positive_int, default=default.max_stop_sequences,
                        help="most stop strings, and most stop_token_ids")  # fmt: skip
    limits.add_argument("--max-stop-length", type=positive_int, default=default.max_stop_length,
                        help="longest stop string, in characters")  # fmt: skip


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(
        max_body_bytes=args.max_request_body_bytes,
        max_n=args.max_n,
        max_prompts=args.max_prompts,
        max_tokens=args.max_tokens_limit,
        max_steps=args.max_steps,
        max_stop_sequences=args.max_stop_sequences,
        max_stop_length=args.max_stop_length,
    )


def add_ignored_arguments(parser: argparse.ArgumentParser, implemented: Collection[str] = ()) -> None:
    """vLLM's flags this command accepts and ignores: all of IGNORED_FLAGS but those `implemented`
    (`vdiff serve` quantizes; the proxy alone, in front of a running Triton, cannot)."""
    group = parser.add_argument_group("accepted for vLLM compatibility and ignored")
    for names, takes_value in IGNORED_FLAGS:
        if names[0] in implemented:
            continue
        dest = "ignored_" + names[0].lstrip("-").replace("-", "_")
        if takes_value:
            group.add_argument(*names, dest=dest, default=None, action="append", help=argparse.SUPPRESS)
        else:
            group.add_argument(*names, dest=dest, action="store_true", help=argparse.SUPPRESS)
    group.description = "  ".join(names[0] for names, _ in IGNORED_FLAGS if names[0] not in implemented)


def ignored_flags_given(args: argparse.Namespace) -> list[str]:
    given = []
    for names, _ in IGNORED_FLAGS:
        value = getattr(args, "ignored_" + names[0].lstrip("-").replace("-", "_"), None)
        if value:
            given.append(names[0])
    return given


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    if args.api_key:
        return tuple(args.api_key)
    env = os.environ.get("VLLM_API_KEY") or os.environ.get("VDIFF_API_KEY")
    return (env,) if env else ()


@dataclass(frozen=True)
class UvicornOptions:
    host: str | None
    port: int
    log_level: str
    access_log: bool
    ssl: dict[str, Any]
    h11_max_incomplete_event_size: int
    timeout_keep_alive: int = DEFAULT_KEEP_ALIVE_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def kwargs(self) -> dict[str, Any]:
        return {
            "host": self.host or "0.0.0.0",
            "port": self.port,
            "log_level": self.log_level,
            "access_log": self.access_log,
            "http": h11_protocol(self.header_timeout_s),
            "h11_max_incomplete_event_size": self.h11_max_incomplete_event_size,
            "timeout_keep_alive": self.timeout_keep_alive,
            **self.ssl,
        }


def uvicorn_options(args: argparse.Namespace) -> UvicornOptions:
    tls = {"ssl_keyfile": args.ssl_keyfile, "ssl_certfile": args.ssl_certfile, "ssl_ca_certs": args.ssl_ca_certs,
           "ssl_cert_reqs": args.ssl_cert_reqs}  # fmt: skip
    if args.ssl_ciphers:
        tls["ssl_ciphers"] = args.ssl_ciphers
    return UvicornOptions(
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        ssl=tls if args.ssl_certfile else {},
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        timeout_keep_alive=args.timeout_keep_alive,
        header_timeout_s=args.header_timeout,
    )
