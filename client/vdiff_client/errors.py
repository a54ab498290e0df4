"""Errors as vLLM's server returns them: OpenAI's nested body, `code` = the HTTP status.

Validation problems are 400 (never FastAPI's 422), an unknown model 404, a full server 503 with
Retry-After, anything unexpected 500. The same body goes into an SSE `data:` event when a stream
has already started.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from vdiff_client.responses import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
MAX_LISTED_ERRORS = 10


class APIError(Exception):
    """An error answer: the status, the message a user reads, and the field it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s  # when to retry a 429 or 503 (default RETRY_AFTER_S)

    def body(self) -> ErrorResponse:
        kind = ERROR_TYPES.get(self.status) or HTTPStatus(self.status).phrase.replace(" ", "")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.status))

    def headers(self) -> dict[str, str]:
        if self.status not in (429, 503):
            return {}
        return {"Retry-After": str(self.retry_after_s or RETRY_AFTER_S)}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers())


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def not_supported(what: str, param: str) -> APIError:
    return APIError(400, f"{what} is not supported by vdiff's diffusion models", param)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", "model")


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one message (at most 10 listed) and the dotted path of the first."""
    items = []
    for error in errors[:MAX_LISTED_ERRORS]:
        location = ".".join(str(part) for part in error.get("loc", ()))
        items.append(f"{location}: {error.get('msg', '')} ({error.get('type', 'invalid')})")
    count = len(errors)
    head = f"{count} validation error{'s' if count != 1 else ''}"
    first = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else None
    return f"{head}: " + "; ".join(items), first


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error.errors())
        return APIError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(error).__name__}").response()
