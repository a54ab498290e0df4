"""Per-request sampling parameters, validated where they enter, and the model's defaults for them.

`SamplingParams` keeps vLLM's field names for what both worlds share (`max_tokens`, `temperature`,
`top_p`, `top_k`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`) and adds the diffusion fields of
the published samplers under their reference names, plus `full_canvas` (the published samplers'
whole canvas, EOS padding included). A field left at None takes the model's
default: generation_config.json where it has one, then the family's published default
(`SamplingDefaults`). What an algorithm accepts beyond that is checked by its decoding strategy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

CONFIDENCE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # the logits dtype, as the published samplers compute it
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
CACHE_MODES = ("none", "prefix", "dual")  # Fast-dLLM's approximate KV caches (vdiff/kv_cache.py)
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # generation length: canvas positions after the prompt
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # vLLM's meaning: max_tokens real tokens. EOS, end of turn and pad are banned from the
    # sampler (-inf logits, as LLaDA's logits_eos_inf bans EOS), so none of them can end the answer
    ignore_eos: bool = False
    # decode every canvas position as the published samplers do and return all of them: the EOS
    # padding the model writes after its answer is kept in the ids (the text skips special tokens)
    # and does not stop the request (what ignore_eos meant before it followed vLLM)
    full_canvas: bool = False
    # diffusion fields, named as in LLaDA's generate() and Dream's diffusion_generate()
    steps: int | None = None
    block_length: int | None = None
    algorithm: str | None = None
    cfg_scale: float = 0.0
    alg_temp: float | None = None
    eps: float | None = None
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    confidence_dtype: str = "auto"
    # Fast-dLLM's parallel decoding (LLaDA's algorithms): instead of a fixed number per step, commit
    # every masked position of the block whose confidence reaches `threshold`, or as many as the
    # `factor` rule admits; always at least the most confident one. None: the fixed schedule.
    threshold: float | None = None
    factor: float | None = None
    cache: str = "none"  # refresh at each block start, then feed the block and suffix (prefix) or the block (dual)
    # APD (algorithm "apd", with a verifier; the APD code's flag names): R, the weight of the
    # diffusion model in the mixture that judges its drafts (higher: faster); W, how many positions
    # before the cursor each round recomputes, the rest read from a cache (None: no cache); M, how
    # many masked positions after the cursor a round drafts and the model sees (None: all).
    apd_mixture_weight: float | None = None
    apd_kv_window: int | None = None
    apd_max_lookahead: int | None = None
    # report every denoising step's commits (vdiff/canvas_stream.py); off: nothing is recorded
    stream_canvas: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _validate(self)

    @property
    def torch_confidence_dtype(self) -> torch.dtype | None:
        return CONFIDENCE_DTYPES[self.confidence_dtype]

    @property
    def apd_fields(self) -> dict[str, object]:
        """The APD fields that are set."""
        fields = ("apd_mixture_weight", "apd_kv_window", "apd_max_lookahead")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _validate(p: SamplingParams) -> None:
    _check_int("max_tokens", p.max_tokens, minimum=1, optional=True)
    _check_number("temperature", p.temperature, "a number >= 0", lambda v: v >= 0, optional=True)
    _check_number("top_p", p.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
    _check_int("top_k", p.top_k, minimum=-1)
    _check_int("seed", p.seed, minimum=0, maximum=_MAX_SEED, optional=True)
    for text in p.stop:
        if not isinstance(text, str) or not text:
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {p.stop!r}")
    for token in p.stop_token_ids:
        _check_int("stop_token_ids", token, minimum=0)
    _check_bool("ignore_eos", p.ignore_eos)
    _check_bool("full_canvas", p.full_canvas)
    _check_bool("stream_canvas", p.stream_canvas)
    _check_int("steps", p.steps, minimum=1, optional=True)
    _check_int("block_length", p.block_length, minimum=1, optional=True)
    _check_algorithm(p.algorithm)
    _check_number("cfg_scale", p.cfg_scale, "a number >= 0", lambda v: v >= 0)
    _check_number("alg_temp", p.alg_temp, "a number >= 0", lambda v: v >= 0, optional=True)
    _check_number("eps", p.eps, "in (0, 1)", lambda v: 0 < v < 1, optional=True)
    _check_bool("logits_eos_inf", p.logits_eos_inf)
    _check_bool("confidence_eos_eot_inf", p.confidence_eos_eot_inf)
    if p.confidence_dtype not in CONFIDENCE_DTYPES:
        raise ValueError(f"confidence_dtype must be one of {sorted(CONFIDENCE_DTYPES)}, got {p.confidence_dtype!r}")
    _check_number("threshold", p.threshold, "in (0, 1]", lambda v: 0 < v <= 1, optional=True)
    _check_number("factor", p.factor, "a number > 0", lambda v: v > 0, optional=True)
    if p.cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {list(CACHE_MODES)}, got {p.cache!r}")
    _check_number("apd_mixture_weight", p.apd_mixture_weight, "in [0, 1]", lambda v: 0 <= v <= 1, optional=True)
    _check_int("apd_kv_window", p.apd_kv_window, minimum=1, optional=True)
    _check_int("apd_max_lookahead", p.apd_max_lookahead, minimum=1, optional=True)
    if p.threshold is not None and p.factor is not None:
        raise ValueError("threshold and factor are two rules for the same choice; set one of them")


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {bounds}, got {value}")


def _check_number(name: str, value: object, allowed: str, ok: Callable[[float], bool], optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {allowed.removeprefix('a number ')}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_algorithm(name: str | None) -> None:
    from vdiff.decoding import algorithm_names  # the registry owns the names; imported late to avoid a cycle

    if name is not None and name not in algorithm_names():
        raise ValueError(f"algorithm must be one of {algorithm_names()}, got {name!r}")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a field left at None becomes for one model: generation_config.json, then the family's defaults."""

    algorithm: str
    max_tokens: int = 128  # LLaDA generate() gen_length
    temperature: float = 0.0
    steps: int | None = None  # None: one step per generated token (LLaDA's published 128 / 128)
    block_length: int | None = None  # LLaDA's algorithms; None: 32 tokens (or max_tokens when fewer)
    eps: float = 1e-3  # Dream's DreamGenerationConfig
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    # Fast-dLLM's parallel rules as a default (generation_config keys "threshold" and "factor"):
    # they apply to the default algorithm when a request picks neither steps nor a rule itself
    threshold: float | None = None
    factor: float | None = None

    @classmethod
    def for_model(cls, model_type: str, generation_config: Mapping[str, Any]) -> SamplingDefaults:
        family = cls(algorithm="origin") if model_type == "Dream" else cls(algorithm="low_confidence")
        return family.updated(generation_config)

    def updated(self, generation_config: Mapping[str, Any]) -> SamplingDefaults:
        known = {
            "alg": "algorithm",
            "max_new_tokens": "max_tokens",
            "temperature": "temperature",
            "steps": "steps",
            "block_length": "block_length",
            "eps": "eps",
            "alg_temp": "alg_temp",
            "top_p": "top_p",
            "top_k": "top_k",
            "threshold": "threshold",
            "factor": "factor",
        }
        found = {ours: generation_config[theirs] for theirs, ours in known.items() if theirs in generation_config}
        found = {key: value for key, value in found.items() if value is not None}
        if "threshold" in found and "factor" in found:
            raise ValueError("generation_config sets both threshold and factor; they are two rules for one choice")
        return dataclasses.replace(self, **found)

    def apply(self, params: SamplingParams, prompt_len: int, max_sequence_length: int) -> SamplingParams:
        """Fill the fields every algorithm reads; the strategy fills its own (steps, block_length, eps, alg_temp).

        An unset max_tokens is capped to the room the model has left after the prompt.
        """
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(self.max_tokens, max_sequence_length - prompt_len))
        changes: dict[str, Any] = {
            "max_tokens": max_tokens,
            "algorithm": params.algorithm or self.algorithm,
            "temperature": self.temperature if params.temperature is None else params.temperature,
        }
        if params.top_p == 1.0 and self.top_p is not None:
            changes["top_p"] = self.top_p
        if params.top_k == 0 and self.top_k is not None:
            changes["top_k"] = self.top_k
        return params.replace(**changes)


def as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    """One SamplingParams per prompt, vLLM style: None, one for all, or a list of the same length."""
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"sampling_params has {len(params)} entries for {count} prompts")
    return params
