"""The model's tokenizer on the proxy side (no torch): chat templates, prompt counts, /tokenize.

The proxy tokenizes every prompt itself, as vLLM's frontend does: that is how it checks the
context length before anything is queued, and the ids it counted are the ids it sends (the
ensemble's `input_ids`), so usage numbers and limits agree with what the engine runs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from vdiff_client.errors import APIError, bad_request

log = logging.getLogger(__name__)
T = TypeVar("T")

# config.json keys that bound the sequence (LLaDA, then Qwen2/Dream and other HF names)
LENGTH_KEYS = ("max_sequence_length", "max_position_embeddings", "n_positions", "max_seq_len")
UNTRUSTED_TEMPLATE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)  # vLLM's words
# client input (characters or ids) short enough to take milliseconds: 0.75 us a character, measured
SHORT_INPUT = 8_192
# input short enough to tokenize on the event loop (about 0.2 ms): a hop to a thread and back costs
# as much, and the tokenizer holds the GIL either way; a typical chat turn is this short
INLINE_INPUT = 256
LONG_LANE_NICE = 10  # on a contended core, about a tenth of what a normal thread gets
MAX_LONG_WAITING = 8  # long jobs queued or running; past it: 503, not an unbounded queue


class ProxyTokenizer:
    def __init__(self, hf: Any, max_model_len: int, trust_request_chat_template: bool = False) -> None:
        self.hf = hf
        self.max_model_len = max_model_len
        # a request's own template runs unbounded Jinja here (memory, time): vLLM refuses it by default too
        self.trust_request_chat_template = trust_request_chat_template
        # Tokenizing a megabyte takes a second: on the event loop, every request would wait.
        # Two lanes of one thread each: a chat's short prompt never queues behind megabytes,
        # and long inputs take at most one core, at a low priority: the engine beside the
        # proxy and the event loop come first.
        self._short_lane = ThreadPoolExecutor(1, "tokenize-short")
        self._long_lane = ThreadPoolExecutor(1, "tokenize-long", lower_thread_priority)
        self._long_waiting = 0  # long jobs queued or running

    @classmethod
    def load(
        cls,
        source: str,
        trust_remote_code: bool,
        chat_template: str | None,
        max_model_len: int,
        trust_request_chat_template: bool = False,
    ) -> ProxyTokenizer:
        hf = _auto_tokenizer(source, trust_remote_code)
        if chat_template is not None:
            hf.chat_template = read_template(chat_template)
        return cls(hf, max_model_len, trust_request_chat_template)

    @functools.cached_property
    def vocab_size(self) -> int:
        return len(self.hf)  # not free: counts the added tokens each time

    @functools.cached_property
    def longest_token_chars(self) -> int:
        return longest_token_chars(self.hf)

    async def run(self, size: int, work: Callable[[], T]) -> T:
        """`work` (tokenizer calls on `size` characters or ids of client input), off the event loop
        unless it is very short.

        Work still queued when its request is cancelled (a client hung up) never runs.
        """
        if size <= INLINE_INPUT:
            return work()
        loop = asyncio.get_running_loop()
        if size <= SHORT_INPUT:
            return await loop.run_in_executor(self._short_lane, work)
        if self._long_waiting >= MAX_LONG_WAITING:  # each holds a body of up to 2 MB meanwhile
            raise APIError(503, f"{self._long_waiting} long inputs are waiting to be tokenized; retry later")
        self._long_waiting += 1
        try:
            return await loop.run_in_executor(self._long_lane, work)
        finally:
            self._long_waiting -= 1

    def close(self) -> None:
        """End the lanes' threads; work still queued is dropped."""
        for lane in (self._short_lane, self._long_lane):
            lane.shutdown(wait=False, cancel_futures=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._backend is not None:  # what hf.encode runs, without its batch padding machinery
            fast: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
            return fast
        ids: list[int] = self.hf.encode(text, add_special_tokens=add_special_tokens)
        return ids

    @functools.cached_property
    def _backend(self) -> Any:
        """A fast tokenizer's Rust tokenizer, unpadded and untruncated as hf.encode leaves it."""
        if not getattr(self.hf, "is_fast", False) or getattr(self.hf, "split_special_tokens", False):
            return None
        backend = self.hf.backend_tokenizer
        backend.no_truncation()
        backend.no_padding()
        return backend

    def encode_prompt(
        self,
        text: str,
        add_special_tokens: bool,
        param: str = "messages",
    ) -> list[int]:
        """`encode`, but a text too long for the context is refused untokenized.

        Tokenizing megabytes takes seconds, so the bound comes from the text's length: it holds
        at least len(text) / longest_token_chars tokens.
        """
        self.check_prompt_chars(text, param)
        return self.encode(text, add_special_tokens)

    def check_prompt_chars(self, text: str, param: str = "messages") -> None:
        fewest_tokens = -(-len(text) // self.longest_token_chars)
        if fewest_tokens >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"at least {fewest_tokens} input tokens ({len(text)} characters). Please reduce the length of "
                "the input messages.",
                param,
            )

    def check_id_count(self, ids: Sequence[int], param: str) -> None:
        """No id list longer than the context: it could be no model's input or output."""
        if len(ids) > self.max_model_len:
            raise bad_request(
                f"{param} must hold at most {self.max_model_len} token ids "
                f"(this model's context length), got {len(ids)}.",
                param,
            )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        strs: list[str] = self.hf.convert_ids_to_tokens(list(ids))
        return strs

    def info(self) -> dict[str, Any]:
        """What GET /tokenizer_info answers, as vLLM does: the tokenizer's init_kwargs as JSON
        (added tokens as their text), without the paths of its files on this server, plus its
        class and the chat template in use."""
        config = {key: _as_json(value) for key, value in dict(getattr(self.hf, "init_kwargs", {}) or {}).items()
                  if key not in FILE_KWARGS}  # fmt: skip
        config["tokenizer_class"] = type(self.hf).__name__
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, str):
            config["chat_template"] = template
        return config

    def check_ids(self, ids: Sequence[int], param: str = "prompt") -> None:
        vocab_size = self.vocab_size  # len() of a transformers tokenizer is not free: once per list
        for token in ids:
            if not 0 <= token < vocab_size:
                raise bad_request(
                    f"Token id {token} is out of vocabulary ({param}: ids run from 0 to {vocab_size - 1})", param
                )

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool = False,
        template: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        if template is not None and not self.trust_request_chat_template:
            raise bad_request(UNTRUSTED_TEMPLATE, "chat_template")
        if template is None and not isinstance(getattr(self.hf, "chat_template", None), str):
            raise bad_request("this model's tokenizer has no chat template; start the server with --chat-template")
        if add_generation_prompt and continue_final_message:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true")
        try:
            text: str = self.hf.apply_chat_template(
                list(messages),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=template,  # the text itself: a request must not name a file to read
                **dict(template_kwargs or {}),
            )
        except Exception as error:  # jinja raises its own types; every one is a problem with this request
            raise bad_request(f"the chat template could not render these messages: {error}", "messages") from None
        return text


# init_kwargs that are paths on the server: vLLM drops vocab_file and merges_file; the others too
FILE_KWARGS = frozenset({"vocab_file", "merges_file", "tokenizer_file", "name_or_path", "special_tokens_map_file"})


def _as_json(value: Any) -> Any:
    """A tokenizer setting as JSON: an AddedToken as its text, containers item by item, anything
    else JSON cannot hold as its string."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, Mapping):
        return {str(key): _as_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def longest_token_chars(hf: Any) -> int:
    """The longest vocabulary entry: no token stands for more characters of text than its entry has."""
    return max((len(token) for token in hf.get_vocab()), default=1)


def lower_thread_priority() -> None:
    """LONG_LANE_NICE for the calling thread (on Linux a thread has its own nice value)."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LONG_LANE_NICE)
        except OSError as error:  # a sandbox may forbid it; the lane still works at normal priority
            log.warning("could not lower the long tokenizer lane's priority: %s", error)


def model_max_length(model_dir: str) -> int | None:
    """The sequence length the model's config.json allows, or None when it names none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return next((int(config[key]) for key in LENGTH_KEYS if isinstance(config.get(key), int)), None)


def parse_max_model_len(text: str) -> int:
    """vLLM's human-readable sizes: 2048, 1k (1000), 1K (1024), 25.6k."""
    units = {"k": 1000, "m": 1000**2, "g": 1000**3, "K": 1024, "M": 1024**2, "G": 1024**3}
    value = text.strip()
    scale = units.get(value[-1:], 1)
    number = value[:-1] if scale != 1 else value
    try:
        length = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"--max-model-len must be an integer or a size like 4k or 4K, got {text!r}") from None
    if length < 1:
        raise ValueError(f"--max-model-len must be at least 1, got {text!r}")
    return length


def read_template(template: str) -> str:
    """--chat-template takes a file path or the template text itself, as in vLLM."""
    path = Path(template)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:
        pass  # a long inline template is not a valid path on every filesystem
    return template


def _auto_tokenizer(source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as error:
        # Dream ships a custom tokenizer class around a plain tokenizer.json; load that directly.
        if not (Path(source) / "tokenizer.json").is_file():
            raise
        log.warning("%s: %s; loading tokenizer.json as a PreTrainedTokenizerFast", source, error)
        return PreTrainedTokenizerFast.from_pretrained(source)
