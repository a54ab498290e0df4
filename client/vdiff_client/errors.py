"""Errors as vLLM's server returns them: OpenAI's nested body, `code` = the HTTP status.

Validation problems are 400 (never FastAPI's 422), an unknown model 404, a full server 503 with
Retry-After, anything unexpected 500. The same body goes into an SSE `data:` event when a stream
has already started.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
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
VALIDATOR_CHAIN = re.compile(r"function-\w+\[[^\]]*?, (\w+)\]")  # function-after[_check(), TextPart]


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
    if len(errors) == 1 and (problem := body_problem(errors[0])):
        return problem, "body"
    items = []
    for error in errors[:MAX_LISTED_ERRORS]:
        location = ".".join(readable_location_part(part) for part in error.get("loc", ()))
        items.append(f"{location}: {error.get('msg', '')} ({error.get('type', 'invalid')})")
    count = len(errors)
    head = f"{count} validation error{'s' if count != 1 else ''}"
    first = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else None
    return f"{head}: " + "; ".join(items), first


def readable_location_part(part: Any) -> str:
    """pydantic names a union member by its validator chain; keep the type's name."""
    return VALIDATOR_CHAIN.sub(r"\1", str(part))


def body_problem(error: Mapping[str, Any]) -> str | None:
    """A plain sentence for a body that is not a JSON object at all (pydantic's words name no field)."""
    location, kind = tuple(error.get("loc", ())), error.get("type")
    if kind == "json_invalid":
        position = f": character {location[1]}" if len(location) > 1 else ""
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}{position}"
    if location != ("body",):
        return None
    if kind == "missing":
        return "the request body is empty; send a JSON object"
    if kind in ("model_attributes_type", "dict_type"):
        return f"the request body must be a JSON object, got {json_type(error.get('input'))}"
    return None


def json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def unreadable_body_message(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a body ("There was an error parsing the body" says nothing)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8: {cause.reason} at byte {cause.start}"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON: it is nested too deeply"
    if isinstance(cause, ValueError):  # e.g. an integer of more digits than Python converts
        return f"the request body is not valid JSON: {cause}"
    return None


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
        message = unreadable_body_message(error.__cause__) if error.status_code == 400 else None
        return APIError(error.status_code, message or str(error.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(error).__name__}").response()
