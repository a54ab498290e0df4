"""`vdiff-proxy`: the OpenAI server alone, in front of a Triton that already serves the repository.

    vdiff-proxy --triton-url 127.0.0.1:8101 --model /models/LLaDA-8B-Instruct --port 8000

(`vdiff --model X` starts Triton and this server together.) `ProxyServer` runs uvicorn without
its own signal handling: the first SIGTERM/SIGINT starts the app's drain (calls.py), which stops
the server once requests in flight are done; a second one stops it at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from vdiff_client.args import (
    add_frontend_arguments,
    add_ignored_arguments,
    add_model_arguments,
    api_keys,
    ignored_flags_given,
    request_limits,
    uvicorn_options,
)
from vdiff_client.calls import ABORT_GRACE_S, Drain
from vdiff_client.config import ProxyConfig
from vdiff_client.health import BackendWatch
from vdiff_client.ratelimit import RateLimits
from vdiff_client.server import HTTPSettings, build_app
from vdiff_client.tokenizer import ProxyTokenizer, model_max_length, parse_max_model_len

log = logging.getLogger("vdiff_client")


class ProxyServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, watch: BackendWatch | None = None) -> None:
        super().__init__(config)
        self.drain = drain  # the app's; a signal starts it, and once drained it stops this server
        self.backend_watch = watch  # the app's pings of the denoiser (`vdiff` exits when it dies)
        drain.on_drained = lambda: setattr(self, "should_exit", True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are handled by the caller (see `serve_until_signal`)


def resolve_max_model_len(requested: str | None, model_dir: str) -> int:
    """--max-model-len, never above what the model allows (as vLLM refuses it)."""
    allowed = model_max_length(model_dir)
    if requested is None:
        if allowed is None:
            raise ValueError(f"{model_dir}/config.json names no sequence length; pass --max-model-len")
        return allowed
    length = parse_max_model_len(requested)
    if allowed is not None and length > allowed:
        raise ValueError(f"--max-model-len {length} is larger than the model's maximum length {allowed}")
    return length


def proxy_config(args: argparse.Namespace, model_dir: str, triton_url: str, metrics_url: str | None) -> ProxyConfig:
    model = args.model_tag or args.model
    return ProxyConfig(
        triton_url=triton_url,
        triton_metrics_url=metrics_url,
        model=model,
        model_dir=model_dir,
        tokenizer=args.tokenizer or model_dir,
        served_model_names=tuple(args.served_model_name or [model]),
        max_model_len=resolve_max_model_len(args.max_model_len, model_dir),
        api_keys=api_keys(args),
        trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        response_role=args.response_role,
        generation_config=args.generation_config,
        enable_force_include_usage=args.enable_force_include_usage,
        enable_request_id_headers=args.enable_request_id_headers,
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        playground=not args.no_playground,
        enable_log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
        rate_limits=RateLimits(args.rate_limit_rpm, args.rate_limit_tpm),
        limits=request_limits(args),
        shutdown_timeout_s=args.exit_timeout,
    )


def http_settings(args: argparse.Namespace) -> HTTPSettings:
    return HTTPSettings(
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        root_path=args.root_path,
        disable_docs=args.disable_fastapi_docs,
        body_timeout_s=args.body_timeout,
    )


def build_proxy(args: argparse.Namespace, model_dir: str, triton_url: str, metrics_url: str | None) -> FastAPI:
    for flag in ignored_flags_given(args):
        log.warning("%s is accepted for vLLM compatibility and ignored", flag)
    config = proxy_config(args, model_dir, triton_url, metrics_url)
    tokenizer = ProxyTokenizer.load(
        config.tokenizer,
        config.trust_remote_code,
        config.chat_template,
        config.max_model_len,
        config.trust_request_chat_template,
    )
    return build_app(config, tokenizer, http_settings(args))


def make_server(app: FastAPI, args: argparse.Namespace) -> ProxyServer:
    """uvicorn for `app`; the drain has already waited for requests when uvicorn's own shutdown starts."""
    options = uvicorn_options(args)
    config = uvicorn.Config(app, timeout_graceful_shutdown=int(ABORT_GRACE_S), **options.kwargs())
    return ProxyServer(config, app.state.drain, app.state.backend_watch)


@contextlib.contextmanager
def stop_on_signals(server: ProxyServer, on_first: str) -> Iterator[None]:
    """First SIGTERM/SIGINT: drain (new requests 503, /health 503, requests in flight finish), then
    stop; a second one: stop now."""
    signalled = False

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal signalled
        if signalled or server.should_exit:
            server.should_exit = server.force_exit = True
            return
        signalled = True
        print(on_first, file=sys.stderr, flush=True)
        server.drain.begin_threadsafe()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdiff-proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-url", default="127.0.0.1:8101", help="Triton's gRPC address")
    parser.add_argument("--triton-metrics-url", default=None, help="Triton's /metrics (engine gauges)")
    parser.add_argument("--shutdown-timeout", dest="exit_timeout", type=int, default=30,
                        help="seconds requests in flight get to finish on SIGTERM")  # fmt: skip
    add_model_arguments(parser, default_model="")
    add_frontend_arguments(parser)
    add_ignored_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = args.model_tag or args.model
    if not model:
        parser.error("--model is required: the model directory the Triton server serves")
    app = build_proxy(args, model, args.triton_url, args.triton_metrics_url)
    server = make_server(app, args)
    with stop_on_signals(server, f"stopping: draining requests in flight (up to {args.exit_timeout} s)"):
        server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
