"""The load options shared by the Locust file and the runner, and the loopback-only rule."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def json_object(text: str) -> str:
    """Checks that --extra-body is a JSON object at parse time, not once per request."""
    try:
        valid = isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return text


# (flag, argparse keywords): the runner forwards each of these to the Locust subprocess unchanged
LOAD_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--model", {"default": "", "help": "model name (default: the first one /v1/models lists)"}),
    ("--api-key", {"default": "", "help": "sent as 'Authorization: Bearer KEY' (or set VDIFF_LOAD_API_KEY)"}),
    ("--max-tokens", {"type": int, "default": 32, "help": "max_tokens of every request"}),
    ("--prompt", {"default": DEFAULT_PROMPT, "help": "the prompt (user message for chat)"}),
    ("--prompt-words", {"type": int, "default": 0, "help": "repeat or cut the prompt to this many words (0: as is)"}),
    ("--temperature", {"type": float, "default": 0.0}),
    ("--extra-body", {"type": json_object, "default": "{}", "help": "JSON object merged into every body"}),
    ("--ignore-eos", {"action": "store_true", "help": "generate exactly --max-tokens tokens (vLLM's ignore_eos)"}),
    ("--chat-weight", {"type": float, "default": 1.0, "help": "relative share of /v1/chat/completions"}),
    ("--completion-weight", {"type": float, "default": 1.0, "help": "relative share of /v1/completions"}),
    ("--non-stream-share", {"type": float, "default": 0.1, "help": "fraction of requests sent without stream"}),
    ("--models-share", {"type": float, "default": 0.02, "help": "fraction of requests that are GET /v1/models"}),
    ("--retry-after-cap", {"type": float, "default": 5.0, "help": "longest wait (s) after a 429/503 Retry-After"}),
    ("--request-timeout", {"type": float, "default": 600.0, "help": "seconds before a request is a failure"}),
    ("--allow-remote", {"action": "store_true", "help": "allow a --host that is not loopback"}),
)
API_KEY_ENV = "VDIFF_LOAD_API_KEY"  # how the runner hands the key to Locust: never on a command line (ps)
NOT_FORWARDED = ("--api-key",)
SAMPLES_OPTION = "--samples-out"  # where the Locust process writes its raw samples (set by the runner)
LOOPBACK_NAMES = ("localhost",)


def add_load_options(parser: Any) -> None:
    """Adds the load options to an argparse (or Locust's configargparse) parser."""
    group = parser.add_argument_group("vdiff load")
    for flag, keywords in LOAD_OPTIONS:
        group.add_argument(flag, **keywords)


def load_option_argv(args: argparse.Namespace) -> list[str]:
    """The command-line form of the load options in `args`, for the Locust subprocess."""
    argv: list[str] = []
    for flag, keywords in LOAD_OPTIONS:
        if flag in NOT_FORWARDED:
            continue
        value = getattr(args, flag[2:].replace("-", "_"))
        if keywords.get("action") == "store_true":
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def api_key(options: Any) -> str:
    """--api-key, else the key the runner passed in the environment."""
    key: str = options.api_key or os.environ.get(API_KEY_ENV, "")
    return key


def is_loopback(url: str) -> bool:
    """True for http(s) URLs on 127.0.0.0/8, ::1 or localhost."""
    host = urlsplit(url if "//" in url else "//" + url).hostname or ""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_host_refusal(url: str | None, allow_remote: bool) -> str | None:
    """The error message for a target this tool must not load, or None when it may."""
    if not url:
        return "no --host given (for example http://127.0.0.1:8000)"
    if is_loopback(url) or allow_remote:
        return None
    return (
        f"refusing to load {url}: only loopback targets (127.0.0.1, ::1, localhost) are allowed; "
        "pass --allow-remote for an endpoint you own"
    )
