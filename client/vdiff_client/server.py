"""The OpenAI-compatible HTTP server: vLLM's routes, middleware and conventions over `TritonBackend`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from vdiff_client import __version__
from vdiff_client.calls import Call, Drain, DrainMiddleware, bearer_token, route_path
from vdiff_client.capacity import CapacityGate
from vdiff_client.chat import ChatServing, messages_size, render_messages
from vdiff_client.completions import CompletionServing
from vdiff_client.config import ProxyConfig
from vdiff_client.errors import install_error_handlers
from vdiff_client.health import BackendWatch, HealthCheck
from vdiff_client.limits import BodySizeLimit
from vdiff_client.metrics import ProxyMetrics, instrument_http
from vdiff_client.playground import add_playground
from vdiff_client.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from vdiff_client.ratelimit import RateLimiter, RateLimitMiddleware
from vdiff_client.responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse
from vdiff_client.timeouts import DEFAULT_BODY_TIMEOUT_S, BodyReadTimeout
from vdiff_client.tokenizer import ProxyTokenizer
from vdiff_client.triton import TritonBackend

log = logging.getLogger("vdiff_client")
T = TypeVar("T")


@dataclass(frozen=True)
class HTTPSettings:
    """Frontend options that shape the app itself (the rest go to uvicorn)."""

    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str = ""
    disable_docs: bool = False
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # --body-timeout


async def require_json(request: Request) -> None:
    """vLLM answers a non-JSON body with 400, not 415. Async: FastAPI runs a plain function
    dependency on a worker thread, a hop per request."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise RequestValidationError(
            [
                {
                    "loc": ("header", "content-type"),
                    "msg": "Unsupported Media Type: Only 'application/json' is allowed",
                    "type": "content_type",
                }
            ]  # fmt: skip
        )


class ClientGone(Exception):
    pass


async def until_disconnect(raw: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the client hangs up first; then cancel it (its Triton requests end too)."""
    task = asyncio.ensure_future(work)

    async def hang_up() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hang_up())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone


# vLLM guards only path prefixes (GUARDED_PREFIX = /v1, /v2, /inference, /cohere in
# vllm/entrypoints/serve/utils/server_utils.py, commit 0753ceeb9cb7; /v1 alone in the older
# entrypoints/openai/server_utils.py, commit 029329a8eded), so its /tokenize and /detokenize answer
# without a key, as its security guide lists (PR #58028, which would guard them, is still open).
# Here they need the key: they run the tokenizer and the chat template on whatever a client sends.
GUARDED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


class APIKeyMiddleware:
    """`--api-key`: /v1 routes, /tokenize, /detokenize and /tokenizer_info need
    `Authorization: Bearer <key>`; health, version, metrics and CORS preflight stay open."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or not self._protected(scope)
            or self._allowed(scope)
        ):
            await self.app(scope, receive, send)
            return
        await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)

    def _protected(self, scope: Scope) -> bool:
        path = route_path(scope)
        return path.startswith("/v1") or path in GUARDED_PATHS

    def _allowed(self, scope: Scope) -> bool:
        token = bearer_token(scope)
        if token is None:
            return False
        digest = hashlib.sha256(token.encode()).digest()
        return any(secrets.compare_digest(digest, known) for known in self.digests)


def build_app(
    config: ProxyConfig,
    tokenizer: ProxyTokenizer,
    http: HTTPSettings | None = None,
    backend: TritonBackend | None = None,
) -> FastAPI:
    http = http or HTTPSettings()
    backend = backend or TritonBackend(config.triton_url, config.denoiser, config.denoiser)
    metrics = ProxyMetrics(config.model_name, config.max_model_len, config.triton_metrics_url)
    limiter = RateLimiter(config.rate_limits) if config.rate_limits.enabled else None
    drain = Drain(config.shutdown_timeout_s)
    watch = BackendWatch(backend)
    watch.listeners.append(drain.abort_all)
    drain.backend_failure = lambda: watch.failure if watch.dead else None
    health_check = HealthCheck(backend, tokenizer.encode("ping", False) or [0], watch)
    capacity = CapacityGate(backend)
    completions = CompletionServing(config, backend, tokenizer, metrics, limiter, capacity)
    chat = ChatServing(config, backend, tokenizer, metrics, limiter, capacity)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.bind(asyncio.get_running_loop())
        watching = asyncio.create_task(watch.run())
        yield
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await backend.close()
        tokenizer.close()

    docs = not http.disable_docs
    app = FastAPI(
        title="vdiff",
        version=__version__,
        root_path=http.root_path,
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.backend = backend
    app.state.drain = drain
    app.state.backend_watch = watch
    install_error_handlers(app)
    # added innermost first: metrics see every answer, auth runs before the drain and the budgets
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_body_bytes)
    if limiter is not None:
        keyed = bool(config.api_keys)
        app.add_middleware(RateLimitMiddleware, limiter=limiter, keyed=keyed, on_reject=metrics.rejected)
    app.add_middleware(DrainMiddleware, drain=drain, on_reject=metrics.rejected)
    if config.api_keys:
        app.add_middleware(APIKeyMiddleware, keys=config.api_keys)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(http.allowed_origins),
        allow_credentials=http.allow_credentials,
        allow_methods=list(http.allowed_methods),
        allow_headers=list(http.allowed_headers),
    )
    if config.enable_request_id_headers:
        app.middleware("http")(echo_request_id)
    # inside the HTTP metrics, so that a body's 408 is counted as what the client got
    app.add_middleware(BodyReadTimeout, timeout_s=http.body_timeout_s)
    instrument_http(app, metrics.registry)

    async def health() -> Response:
        """503 while draining (load balancers stop routing here) or when the probe fails."""
        healthy = not drain.draining and await health_check.healthy()
        return Response(status_code=200 if healthy else 503)

    async def ping() -> Response:
        """Liveness: 200 while the denoiser answers the watch's pings, draining or not (a drain
        must never be cut short by a restart), 503 before its first answer and after a missed one."""
        alive = watch.armed and watch.failure is None
        return Response(status_code=200 if alive else 503)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ping", ping, methods=["GET", "POST"])

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    async def prometheus() -> Response:
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/metrics/", prometheus, methods=["GET"], include_in_schema=False)

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=name, root=config.model, max_model_len=config.max_model_len)
                 for name in config.served_model_names]  # fmt: skip
        return ModelList(data=cards)

    @app.post("/v1/completions", dependencies=[Depends(require_json)], response_model=None)
    async def create_completion(request: CompletionRequest, raw: Request) -> Any:
        log_request(config, raw, "completion", request)
        return await answer(raw, completions.create(request, call_of(raw), raw.headers.get("x-request-id", "")))

    @app.post("/v1/chat/completions", dependencies=[Depends(require_json)], response_model=None)
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Any:
        log_request(config, raw, "chat", request)
        return await answer(raw, chat.create(request, call_of(raw), raw.headers.get("x-request-id", "")))

    json_body = [Depends(require_json)]

    @app.post("/tokenize", dependencies=json_body, response_model=TokenizeResponse)
    async def tokenize(request: TokenizeRequest) -> Response:
        completions.check_model(request.model)
        return Response(await tokenize_request(tokenizer, request), media_type="application/json")

    @app.post("/detokenize", dependencies=json_body, response_model=DetokenizeResponse)
    async def detokenize(request: DetokenizeRequest) -> Response:
        """At most max_model_len ids, checked and decoded off the event loop."""
        completions.check_model(request.model)
        tokenizer.check_id_count(request.tokens, "tokens")

        def decoded() -> str:
            tokenizer.check_ids(request.tokens, "tokens")
            return DetokenizeResponse(prompt=tokenizer.decode(request.tokens)).model_dump_json()

        body = await tokenizer.run(len(request.tokens), decoded)
        return Response(body, media_type="application/json")

    if config.enable_tokenizer_info_endpoint:  # vLLM registers it only with the flag, too

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> JSONResponse:
            return JSONResponse(tokenizer.info())

    if config.playground:  # public: the page holds no secret, its API calls carry the key typed in
        add_playground(app)
    return app


def call_of(raw: Request) -> Call:
    """The call DrainMiddleware opened for this /v1 request."""
    call: Call = raw.state.call
    return call


async def answer(raw: Request, work: Awaitable[Any]) -> Any:
    """A JSON body, or an SSE stream when the handler returned chunks."""
    try:
        result = await until_disconnect(raw, work)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the work was cancelled
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    if isinstance(result, BaseModel):  # serialized by pydantic at once, not field by field by FastAPI
        return Response(result.model_dump_json(by_alias=True), media_type="application/json")
    return result


async def tokenize_request(tokenizer: ProxyTokenizer, request: TokenizeRequest) -> str:
    """The /tokenize answer as JSON, built off the event loop (megabytes with token_strs).

    Its prompt has the completions' bound: a text that must exceed max_model_len tokens is
    refused untokenized.
    """
    messages = request.messages
    if messages is None:
        tokenizer.check_prompt_chars(request.prompt or "", "prompt")

    def tokenized() -> str:
        if messages is not None:
            text = render_messages(tokenizer, request, messages)
            ids = tokenizer.encode_prompt(text, bool(request.add_special_tokens))
        else:
            special = True if request.add_special_tokens is None else request.add_special_tokens
            ids = tokenizer.encode(request.prompt or "", special)
        answer = TokenizeResponse(
            count=len(ids),
            max_model_len=tokenizer.max_model_len,
            tokens=ids,
            token_strs=tokenizer.token_strs(ids) if request.return_token_strs else None,
        )
        return answer.model_dump_json()

    size = len(request.prompt or "") if messages is None else messages_size(messages)
    return await tokenizer.run(size, tokenized)


async def echo_request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """--enable-request-id-headers: the client's X-Request-Id, or a new one, on every response."""
    response = await call_next(request)
    response.headers["X-Request-Id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
    return response


def log_request(config: ProxyConfig, raw: Request, kind: str, request: Any) -> None:
    if not config.enable_log_requests:
        return
    text = request.model_dump_json(exclude_unset=True)
    if config.max_log_len is not None:
        text = text[: config.max_log_len]
    log.info("%s request from %s: %s", kind, raw.client.host if raw.client else "?", text)
