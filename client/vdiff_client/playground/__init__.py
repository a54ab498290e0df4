"""GET /playground: a browser page that streams a chat request with `stream_canvas` and draws its
denoising steps, and a compare view of two settings side by side.

Three static files ship in this package (no CDN, no build step). The page is public, like
/health: it holds no secret, and the API calls it makes carry the key typed into it, so
APIKeyMiddleware (which guards /v1 and a few named paths) leaves it alone. `--no-playground`
leaves these routes out (404).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

PAGE = "index.html"
# the files under /playground/ and their content types (starlette adds `; charset=utf-8`)
ASSETS = {"playground.css": "text/css", "playground.js": "text/javascript"}
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated on each load: a new server's page shows at once
    "X-Content-Type-Options": "nosniff",
    # the page talks to this server only and runs no inline code; no frame may hold its key field
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}


def static_file(body: bytes, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    """A handler that answers `body`, or 304 when the browser's copy (its ETag) is current."""
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = HEADERS | {"ETag": etag}

    async def serve(request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    return serve


def add_playground(app: FastAPI) -> None:
    """The page at /playground (its script and stylesheet are relative to it: /playground/NAME)."""
    folder = resources.files(__name__)
    page = static_file((folder / PAGE).read_bytes(), "text/html")
    app.add_api_route("/playground", page, methods=["GET"], include_in_schema=False)
    for name, media_type in ASSETS.items():
        handler = static_file((folder / name).read_bytes(), media_type)
        app.add_api_route(f"/playground/{name}", handler, methods=["GET"], include_in_schema=False)
