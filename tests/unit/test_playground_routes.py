"""GET /playground and its assets, without a browser: public under --api-key, content types,
no-cache, ETags, --no-playground. The page itself runs in tests/browser/test_playground.py."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vdiff.assets import DEFAULT_MODEL
from vdiff.models.checkpoint import resolve_model_dir
from vdiff.serve.cli import openai_parser
from vdiff_client.cli import proxy_config
from vdiff_client.config import ProxyConfig
from vdiff_client.server import build_app
from vdiff_client.tokenizer import ProxyTokenizer

TYPES = {
    "/playground": "text/html; charset=utf-8",
    "/playground/playground.css": "text/css; charset=utf-8",
    "/playground/playground.js": "text/javascript; charset=utf-8",
}


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def keyed_config(demo_dir: Path) -> ProxyConfig:
    """What `vdiff --api-key secret` builds (Triton is never reached: no request generates)."""
    args = openai_parser().parse_args(["--api-key", "secret"])
    return proxy_config(args, str(demo_dir), "127.0.0.1:1", None)


def client_for(config: ProxyConfig) -> TestClient:
    tokenizer = ProxyTokenizer.load(config.tokenizer, False, None, config.max_model_len, False)
    return TestClient(build_app(config, tokenizer))  # no `with`: the lifespan's backend watch stays off


def test_the_page_and_its_assets_are_public_with_their_types_and_no_cache(keyed_config: ProxyConfig) -> None:
    client = client_for(keyed_config)
    assert client.get("/v1/models").status_code == 401  # the key still guards the API
    for path, content_type in TYPES.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-content-type-options"] == "nosniff"
        again = client.get(path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    assert client.get("/playground/", follow_redirects=False).status_code in (307, 308)
    assert client.get("/playground/missing.js").status_code == 404


def test_every_file_the_page_names_is_served(keyed_config: ProxyConfig) -> None:
    """Its script and stylesheet, relative to /playground; nothing from another origin."""
    client = client_for(keyed_config)
    page = client.get("/playground").text
    names = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "playground/playground.js" in names and "playground/playground.css" in names
    for name in names:
        if name.startswith("data:"):
            continue
        assert "//" not in name, f"the page loads {name} from elsewhere"
        assert client.get(f"/{name}").status_code == 200, name


def test_no_playground_turns_the_routes_off(demo_dir: Path) -> None:
    args = openai_parser().parse_args(["--no-playground"])  # the `vdiff` command's parser
    config = proxy_config(args, str(demo_dir), "127.0.0.1:1", None)
    assert config.playground is False
    assert proxy_config(openai_parser().parse_args([]), str(demo_dir), "127.0.0.1:1", None).playground
    client = client_for(config)
    for path in TYPES:
        assert client.get(path).status_code == 404, path
    assert client_for(replace(config, playground=True)).get("/playground").status_code == 200
