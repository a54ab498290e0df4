"""The OpenAI server in a thread of the test process, in front of the session's real tritonserver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from vdiff.serve.launcher import free_loopback_address
from vdiff_client.calls import Drain
from vdiff_client.cli import ProxyServer
from vdiff_client.config import ProxyConfig
from vdiff_client.server import HTTPSettings, build_app
from vdiff_client.tokenizer import ProxyTokenizer, model_max_length

SERVED = ("tiny-llada", "tiny-alias")


@dataclass(frozen=True)
class Proxy:
    url: str  # http://127.0.0.1:PORT
    config: ProxyConfig
    drain: Drain  # what SIGTERM starts in a real server (tests start it directly)

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def proxy_config(model: Path, triton_grpc: str, metrics_url: str | None, **changes: Any) -> ProxyConfig:
    settings: dict[str, Any] = {
        "triton_url": triton_grpc,
        "triton_metrics_url": metrics_url,
        "model": str(model),
        "model_dir": str(model),
        "tokenizer": str(model),
        "served_model_names": SERVED,
        "max_model_len": model_max_length(str(model)) or 512,
    }
    return ProxyConfig(**(settings | changes))


@contextmanager
def running_proxy(
    config: ProxyConfig,
    http: HTTPSettings | None = None,
    server_options: dict[str, Any] | None = None,
) -> Iterator[Proxy]:
    """`server_options`: uvicorn.Config's, e.g. `uvicorn_options(args).kwargs()` of real flags."""
    tokenizer = ProxyTokenizer.load(
        config.tokenizer, False, config.chat_template, config.max_model_len, config.trust_request_chat_template
    )
    app = build_app(config, tokenizer, http)
    port = free_loopback_address().http_port
    options = (server_options or {}) | {"host": "127.0.0.1", "port": port, "log_level": "warning"}
    server = ProxyServer(uvicorn.Config(app, **options), app.state.drain)
    thread = threading.Thread(target=server.run, name="proxy", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the proxy did not start"
        time.sleep(0.05)
    try:
        yield Proxy(f"http://127.0.0.1:{port}", config, app.state.drain)
    finally:
        server.should_exit = True
        thread.join(30)
