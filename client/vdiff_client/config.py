"""`ProxyConfig`: everything the OpenAI server needs to know, typed, frozen and checked once."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdiff_client.ratelimit import RateLimits

# vLLM's defaults for unset sampling fields (`--generation-config vllm`)
VLLM_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
# generation_config.json keys -> the ensemble inputs they default
GENERATION_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "steps": "steps",
    "block_length": "block_length",
    "alg": "algorithm",
    "alg_temp": "alg_temp",
    "cfg_scale": "cfg_scale",
    "max_new_tokens": "max_tokens",
    "threshold": "threshold",  # Fast-dLLM's rules, as the default pace of the default algorithm
    "factor": "factor",
}


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; beyond it the proxy answers 4xx before any work starts.

    The body limit is TGI's `--payload-limit`, n's is OpenAI's; stop sequences go well past
    OpenAI's four, as vLLM clients send more. None: the context length is the bound.
    """

    max_body_bytes: int = 2_000_000
    max_n: int = 128
    max_prompts: int = 128  # prompts in one /v1/completions batch
    max_tokens: int | None = None  # None: the context length is the only bound
    max_steps: int | None = None  # None: the context length (more steps than canvas positions commit nothing)
    max_stop_sequences: int = 64  # stop strings, and separately stop_token_ids
    max_stop_length: int = 1024  # characters of one stop string

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class ProxyConfig:
    triton_url: str  # host:port of Triton's gRPC endpoint
    model: str  # the model as given (path, Hub id or shipped name): /v1/models' `root`
    tokenizer: str  # a directory the proxy's tokenizer loads
    served_model_names: tuple[str, ...]
    max_model_len: int
    triton_metrics_url: str | None = None  # Triton's /metrics, for the engine's running/waiting gauges
    api_keys: tuple[str, ...] = ()
    trust_remote_code: bool = False
    chat_template: str | None = None
    trust_request_chat_template: bool = False  # let requests bring their own chat_template (unbounded Jinja)
    response_role: str = "assistant"
    generation_config: str = "auto"  # auto: the model's (applied by the engine); vllm; or a directory
    model_dir: str | None = None  # where the model's generation_config.json is, for `auto`
    enable_force_include_usage: bool = False
    enable_request_id_headers: bool = False
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info, as vLLM serves it with the flag
    playground: bool = True  # GET /playground, the browser page (off: --no-playground)
    enable_log_requests: bool = False
    max_log_len: int | None = None
    rate_limits: RateLimits = RateLimits()  # per API key, or per address without keys
    limits: RequestLimits = RequestLimits()  # per request: body size, n, prompts, steps, stop strings
    shutdown_timeout_s: float = 30.0  # how long requests in flight may finish after SIGTERM
    denoiser: str = "diffusion_denoise"

    def __post_init__(self) -> None:
        if not self.served_model_names or any(not name for name in self.served_model_names):
            raise ValueError("served_model_names must hold at least one non-empty name")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys must not contain an empty key")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        _ = self.sampling_defaults  # a --generation-config directory without the file fails here, at start-up

    @property
    def model_name(self) -> str:
        """The name responses and metrics carry: the first served name."""
        return self.served_model_names[0]

    def sends_defaults(self) -> bool:
        """`auto` leaves the model's defaults to the engine, which reads the same file."""
        return self.generation_config != "auto"

    @functools.cached_property
    def sampling_defaults(self) -> dict[str, Any]:
        """The defaults of unset sampling fields, as ensemble inputs (from `generation_config`)."""
        if self.generation_config == "vllm":
            return dict(VLLM_SAMPLING_DEFAULTS)
        folder = self.model_dir if self.generation_config == "auto" else self.generation_config
        if folder is None:
            return {}
        path = Path(folder) / "generation_config.json"
        if not path.is_file():
            if self.generation_config != "auto":
                raise ValueError(f"--generation-config {folder}: there is no generation_config.json there")
            return {}
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {name: raw[key] for key, name in GENERATION_CONFIG_KEYS.items() if raw.get(key) is not None}
