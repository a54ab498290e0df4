"""From an OpenAI request to the `vdiff` ensemble's inputs, with vLLM's checks and messages.

Everything is checked here, before a request reaches Triton: vLLM's `SamplingParams` rules (same
messages), the context length, and features the diffusion sampler does not have. A request that
sets one of those gets a 400 naming it rather than an answer that silently ignored it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdiff_client.config import ProxyConfig
from vdiff_client.errors import bad_request, not_supported
from vdiff_client.protocol import SamplingFields

SEEDS = 2**63  # the engine takes seeds in [0, 2**63 - 1]; vLLM's requests allow any int64
MAX_TEMPERATURE = 2


@dataclass(frozen=True)
class Unsupported:
    field: str
    what: str
    is_set: Callable[[Any], bool]


def _truthy(value: Any) -> bool:
    return bool(value)


UNSUPPORTED = (
    Unsupported("logprobs", "logprobs", lambda v: v not in (None, False)),
    Unsupported("top_logprobs", "top_logprobs", _truthy),
    Unsupported("prompt_logprobs", "prompt_logprobs", lambda v: v is not None),
    Unsupported("suffix", "suffix", lambda v: v is not None),
    Unsupported("tools", "tools (function calling)", _truthy),
    Unsupported("tool_choice", "tool_choice", lambda v: v not in (None, "none")),
    Unsupported("response_format", "response_format other than text", lambda v: v is not None and v.type != "text"),
    Unsupported("logit_bias", "logit_bias", _truthy),
    Unsupported("use_beam_search", "beam search", _truthy),
    Unsupported("best_of", "best_of > 1", lambda v: v is not None and v > 1),
    Unsupported("min_p", "min_p", _truthy),
    Unsupported("repetition_penalty", "repetition_penalty other than 1", lambda v: v not in (None, 1, 1.0)),
    Unsupported("presence_penalty", "presence_penalty", _truthy),
    Unsupported("frequency_penalty", "frequency_penalty", _truthy),
    Unsupported("min_tokens", "min_tokens", _truthy),
    Unsupported("include_stop_str_in_output", "include_stop_str_in_output", _truthy),
    Unsupported("skip_special_tokens", "skip_special_tokens=false", lambda v: v is False),
    Unsupported("truncate_prompt_tokens", "truncate_prompt_tokens", lambda v: v is not None),
    Unsupported("allowed_token_ids", "allowed_token_ids", _truthy),
    Unsupported("bad_words", "bad_words", _truthy),
    Unsupported("guided_json", "guided decoding (guided_json)", lambda v: v is not None),
    Unsupported("guided_regex", "guided decoding (guided_regex)", lambda v: v is not None),
    Unsupported("guided_choice", "guided decoding (guided_choice)", lambda v: v is not None),
    Unsupported("guided_grammar", "guided decoding (guided_grammar)", lambda v: v is not None),
    Unsupported("structured_outputs", "structured_outputs", lambda v: v is not None),
)


def check_supported(request: SamplingFields) -> None:
    for rule in UNSUPPORTED:
        if hasattr(request, rule.field) and rule.is_set(getattr(request, rule.field)):
            raise not_supported(rule.what, rule.field)


def check_sampling(request: SamplingFields, max_tokens: int | None, defaults: dict[str, Any]) -> None:
    """vLLM's `SamplingParams._verify_args` rules and messages."""
    if request.stream_options is not None and not request.stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    if request.n < 1:
        raise bad_request(f"n must be at least 1, got {request.n}.", "n")
    temperature = request.temperature
    if temperature is not None and (not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE):
        raise bad_request(f"temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}.", "temperature")
    if request.top_p is not None and not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        raise bad_request(f"top_p must be in (0, 1], got {request.top_p}.", "top_p")
    if request.top_k is not None and request.top_k < -1:
        raise bad_request(f"top_k must be 0 (disable), or at least 1, got {request.top_k}.", "top_k")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if any(not stop for stop in request.stop_strings()):
        raise bad_request("stop cannot contain an empty string.", "stop")
    if request.n > 1 and _temperature(request, defaults) < 1e-5:
        raise bad_request(f"n must be 1 when using greedy sampling, got {request.n}.", "n")
    for name in ("cfg_scale", "alg_temp"):
        value = getattr(request, name)
        if value is not None and not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number, got {value}.", name)
    if request.threshold is not None and not (math.isfinite(request.threshold) and 0 < request.threshold <= 1):
        raise bad_request(f"threshold must be in (0, 1], got {request.threshold}.", "threshold")
    if request.factor is not None and not (math.isfinite(request.factor) and request.factor > 0):
        raise bad_request(f"factor must be a finite number > 0, got {request.factor}.", "factor")
    if request.threshold is not None and request.factor is not None:
        raise bad_request("threshold and factor are two rules for the same choice; set one of them.", "factor")
    weight = request.apd_mixture_weight
    if weight is not None and not (math.isfinite(weight) and 0 <= weight <= 1):
        raise bad_request(f"apd_mixture_weight must be in [0, 1], got {weight}.", "apd_mixture_weight")


def _temperature(request: SamplingFields, defaults: dict[str, Any]) -> float:
    if request.temperature is not None:
        return request.temperature
    return float(defaults.get("temperature", 0.0))  # the diffusion families default to greedy


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's two context-length messages."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages.",
            "messages",
        )
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {prompt_len} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt_len}).",
            "max_tokens",
        )


PACE = ("steps", "threshold", "factor")  # how many tokens a step commits: one choice, three ways


def defaults_for(request: SamplingFields, defaults: dict[str, Any]) -> dict[str, Any]:
    """The generation config's defaults that apply to this request, as the engine applies its own:
    a request that picks its pace (or APD, or another algorithm than the file's) keeps it, and a
    default parallel rule replaces the file's step count."""
    values = dict(defaults)
    chose_pace = any(getattr(request, name) is not None for name in PACE)
    # a file without "alg" leaves the family's algorithm, which the file's rule belongs to
    other_algorithm = request.algorithm not in (None, values.get("algorithm", request.algorithm))
    if chose_pace or request.algorithm == "apd":
        for name in PACE:
            values.pop(name, None)
    elif other_algorithm:
        values.pop("threshold", None)
        values.pop("factor", None)
    elif "threshold" in values or "factor" in values:
        values.pop("steps", None)
    if request.algorithm == "apd":
        for name in ("block_length", "alg_temp", "cfg_scale"):  # nor blocks, Dream's or guidance's knobs
            values.pop(name, None)
    return values


def ensemble_values(
    request: SamplingFields, prompt_ids: list[int], max_tokens: int | None, sample: int, config: ProxyConfig
) -> dict[str, Any]:
    """The ensemble inputs for choice `sample` of this prompt; unset fields are left to the model."""
    values: dict[str, Any] = {"input_ids": prompt_ids, "stream": True, "exclude_input_in_output": True}
    if config.sends_defaults():
        values |= defaults_for(request, config.sampling_defaults)
    chosen = {
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "steps": request.steps,
        "block_length": request.block_length,
        "algorithm": request.algorithm,
        "cfg_scale": request.cfg_scale,
        "alg_temp": request.alg_temp,
        "threshold": request.threshold,
        "factor": request.factor,
        "cache": request.cache,
        "apd_mixture_weight": request.apd_mixture_weight,
        "apd_kv_window": request.apd_kv_window,
        "apd_max_lookahead": request.apd_max_lookahead,
    }
    values |= {name: value for name, value in chosen.items() if value is not None}
    if request.seed is not None:
        # n samples from one seed must differ; a negative seed maps into the engine's range
        values["seed"] = (request.seed + sample) % SEEDS
    if request.stop_strings():
        values["stop_words"] = request.stop_strings()
    if request.stop_token_ids:
        values["stop_token_ids"] = request.stop_token_ids
    if request.ignore_eos:
        values["ignore_eos"] = True
    if request.full_canvas:
        values["full_canvas"] = True
    if request.stream_canvas:
        values["stream_canvas"] = True
    return values
