"""The request inputs of `vdiff` and `diffusion_denoise`, and their parsing into SamplingParams.

Inputs carry the TensorRT-LLM ensemble names, so existing Triton clients, genai-perf and the Triton
OpenAI frontend work unchanged, plus the diffusion fields. Each input is one row of `OPTIONS`: a new
sampling knob is a new row here and the matching entries in the two config.pbtxt files (a test
checks that the three agree). Every problem raises InvalidInputError naming the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vdiff.bounds import RequestBounds
from vdiff.sampling_params import SamplingParams


class InvalidInputError(ValueError):
    """A request input that cannot be served; the message names the input."""


@dataclass(frozen=True)
class Option:
    name: str  # the input's name on the ensemble and on diffusion_denoise
    triton_type: str  # config.pbtxt data_type
    field: str | None  # the SamplingParams field it sets; None for options of the stream itself


OPTIONS = (
    Option("max_tokens", "TYPE_INT32", "max_tokens"),
    Option("temperature", "TYPE_FP32", "temperature"),
    Option("top_p", "TYPE_FP32", "top_p"),
    Option("top_k", "TYPE_INT32", "top_k"),
    Option("seed", "TYPE_UINT64", "seed"),
    Option("stop_words", "TYPE_STRING", "stop"),
    Option("stop_token_ids", "TYPE_INT32", "stop_token_ids"),
    Option("ignore_eos", "TYPE_BOOL", "ignore_eos"),  # max_tokens real tokens, as vLLM's, for benchmarks
    Option("steps", "TYPE_INT32", "steps"),
    Option("block_length", "TYPE_INT32", "block_length"),
    Option("algorithm", "TYPE_STRING", "algorithm"),
    Option("cfg_scale", "TYPE_FP32", "cfg_scale"),
    Option("alg_temp", "TYPE_FP32", "alg_temp"),
    Option("threshold", "TYPE_FP32", "threshold"),
    Option("factor", "TYPE_FP32", "factor"),
    Option("cache", "TYPE_STRING", "cache"),
    Option("apd_mixture_weight", "TYPE_FP32", "apd_mixture_weight"),
    Option("apd_kv_window", "TYPE_INT32", "apd_kv_window"),
    Option("apd_max_lookahead", "TYPE_INT32", "apd_max_lookahead"),
    Option("full_canvas", "TYPE_BOOL", "full_canvas"),  # the whole canvas, EOS padding included
    Option("stream_canvas", "TYPE_BOOL", "stream_canvas"),  # every step's commits (canvas_events)
    Option("stream", "TYPE_BOOL", None),
    Option("exclude_input_in_output", "TYPE_BOOL", None),
    # The counts are always returned; the flags exist because the Triton OpenAI frontend sends them.
    Option("return_num_input_tokens", "TYPE_BOOL", None),
    Option("return_num_output_tokens", "TYPE_BOOL", None),
)
LIST_OPTIONS = frozenset({"stop_words", "stop_token_ids"})  # dims [-1]; every other option is one value


@dataclass(frozen=True)
class StreamOptions:
    stream: bool = False  # False: one response when the request finishes
    echo: bool = False  # put the prompt text before the first text delta


def parse_options(inputs: Mapping[str, np.ndarray], bounds: RequestBounds) -> tuple[SamplingParams, StreamOptions]:
    """SamplingParams and stream options from the request's tensors (absent inputs take defaults).

    Every value that sizes work is checked within `bounds`, list sizes before they become tuples.
    """
    _check_list_sizes(inputs, bounds)
    values = {option.name: _value(option, inputs[option.name]) for option in OPTIONS if option.name in inputs}
    fields = {o.field: values[o.name] for o in OPTIONS if o.field is not None and o.name in values}
    try:
        params = SamplingParams(**fields)
    except ValueError as error:
        raise InvalidInputError(name_inputs(str(error))) from None
    _check_bounds(params, bounds)
    stream = StreamOptions(stream=values.get("stream", False), echo=not values.get("exclude_input_in_output", True))
    return params, stream


def prompt_ids(
    inputs: Mapping[str, np.ndarray], encode: Callable[[str], list[int]], bounds: RequestBounds
) -> list[int]:
    """The prompt: `input_ids` as sent (each id checked against the vocabulary), else `text_input` encoded.

    Lengths are checked before the work they size: a text too long for the model is not tokenized.
    """
    if "input_ids" not in inputs:
        ids = encode(bounded_text(inputs, bounds))
        _check_prompt_length("text_input", len(ids), bounds)
        return ids
    if "text_input" in inputs:
        raise InvalidInputError("send the prompt as 'text_input' or as 'input_ids', not both")
    return input_ids(inputs, bounds)


def bounded_text(inputs: Mapping[str, np.ndarray], bounds: RequestBounds) -> str:
    """`text_input`, refused when it holds more characters than a prompt's tokens can."""
    text = text_input(inputs)
    if len(text) > bounds.max_prompt_chars:
        raise InvalidInputError(
            f"input 'text_input' holds {len(text)} characters, more than the "
            f"{bounds.max_prompt_tokens} tokens the model's max_sequence_length "
            f"({bounds.max_sequence_length}) leaves for a prompt can hold"
        )
    return text


def input_ids(inputs: Mapping[str, np.ndarray], bounds: RequestBounds) -> list[int]:
    """`input_ids` as sent, its size checked before it becomes a list and each id after."""
    array = np.asarray(inputs["input_ids"])
    if not array.size:
        raise InvalidInputError("input 'input_ids' is empty; diffusion decoding needs at least one prompt token")
    _check_prompt_length("input_ids", array.size, bounds)
    ids = [int(i) for i in array.reshape(-1)]
    for index, token in enumerate(ids):
        if not 0 <= token < bounds.vocab_size:
            raise InvalidInputError(
                f"input 'input_ids'[{index}]: token id {token} is out of vocabulary "
                f"(ids run from 0 to {bounds.vocab_size - 1})"
            )
    return ids


def _check_prompt_length(name: str, tokens: int, bounds: RequestBounds) -> None:
    if tokens > bounds.max_prompt_tokens:
        raise InvalidInputError(
            f"input '{name}': the prompt holds {tokens} tokens; the model's max_sequence_length "
            f"({bounds.max_sequence_length}) leaves room for at most {bounds.max_prompt_tokens}"
        )


def _check_list_sizes(inputs: Mapping[str, np.ndarray], bounds: RequestBounds) -> None:
    strings = np.asarray(inputs["stop_words"]).size if "stop_words" in inputs else 0
    token_ids = np.asarray(inputs["stop_token_ids"]).size if "stop_token_ids" in inputs else 0
    try:
        bounds.check_stop_counts(strings, token_ids)
    except ValueError as error:
        raise InvalidInputError(name_inputs(str(error))) from None


def _check_bounds(params: SamplingParams, bounds: RequestBounds) -> None:
    try:
        bounds.check_params(params)
    except ValueError as error:
        raise InvalidInputError(name_inputs(str(error))) from None


def text_input(inputs: Mapping[str, np.ndarray], name: str = "text_input") -> str:
    if name not in inputs:
        raise InvalidInputError(f"input '{name}' is required (or the prompt's token ids as 'input_ids')")
    text = _one(name, inputs[name])
    if not isinstance(text, bytes | str):
        raise InvalidInputError(f"input '{name}' must be a string, got {type(text).__name__}")
    decoded = _decode(name, text)
    if not decoded:
        raise InvalidInputError(f"input '{name}' is empty; diffusion decoding needs at least one prompt token")
    return decoded


def _value(option: Option, array: np.ndarray) -> Any:
    if option.name in LIST_OPTIONS:
        if option.triton_type == "TYPE_STRING":
            return _strings(option.name, array)
        return tuple(int(item) for item in np.asarray(array).reshape(-1))
    value = _one(option.name, array)
    kind = option.triton_type
    if kind == "TYPE_STRING":
        return _decode(option.name, value)
    if kind == "TYPE_BOOL":
        return bool(value)
    if kind == "TYPE_FP32":
        number = float(value)
        if not math.isfinite(number):
            raise InvalidInputError(f"input '{option.name}' must be a finite number, got {number}")
        return number
    return int(value)


def _one(name: str, array: np.ndarray) -> Any:
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidInputError(f"input '{name}' must hold exactly one value, got {flat.size}")
    return flat[0].item() if hasattr(flat[0], "item") else flat[0]


def _strings(name: str, array: np.ndarray) -> tuple[str, ...]:
    texts = tuple(_decode(name, item) for item in np.asarray(array).reshape(-1))
    for index, text in enumerate(texts):
        if not text:
            raise InvalidInputError(f"input '{name}'[{index}] is an empty string")
    return texts


def _decode(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        raise InvalidInputError(f"input '{name}' must be a string, got {type(value).__name__}")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"input '{name}' is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def name_inputs(message: str) -> str:
    """SamplingParams names its fields; say which input that is where the names differ.

    The engine's prompt checks ("prompt_token_ids[3] is the mask token id ...") are about `input_ids`;
    clients read the status from this wording, so an unnamed message would look like a server fault.
    """
    if message.startswith(("prompt_token_ids", "prompt is empty")):
        return f"input 'input_ids': {message}"
    for option in OPTIONS:
        if option.field is not None and option.field != option.name and message.startswith(option.field + " "):
            return f"input '{option.name}': {message}"
    field = message.split(" ", 1)[0]
    return f"input '{field}': {message}" if any(o.name == field for o in OPTIONS) else message
