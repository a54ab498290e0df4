"""SamplingParams refuses every bad value at construction, naming the field; defaults resolve per model."""

from __future__ import annotations

from typing import Any

import pytest

from vdiff import SamplingParams
from vdiff.decoding import get_strategy
from vdiff.sampling_params import SamplingDefaults

INVALID: list[tuple[str, Any]] = [
    ("max_tokens", 0),
    ("max_tokens", 2.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", 1.0),
    ("seed", -1),
    ("seed", 2**64),
    ("stop", [""]),
    ("stop", [3]),
    ("stop_token_ids", [-5]),
    ("ignore_eos", "yes"),
    ("full_canvas", "yes"),
    ("steps", 0),
    ("block_length", -4),
    ("algorithm", "greedy"),
    ("cfg_scale", -1.0),
    ("alg_temp", -0.5),
    ("eps", 0.0),
    ("eps", 1.0),
    ("logits_eos_inf", 1),
    ("confidence_eos_eot_inf", None),
    ("confidence_dtype", "float8"),
    ("threshold", 0.0),
    ("threshold", 1.2),
    ("factor", -1.0),
    ("factor", float("inf")),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_valid_values_are_kept_and_stop_is_normalised() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=-1, seed=0, stop="###", stop_token_ids=[3])
    assert params.stop == ("###",) and params.stop_token_ids == (3,)
    assert not params.top_k_enabled
    with pytest.raises(AttributeError):
        params.max_tokens = 3  # type: ignore[misc]


def test_dream_defaults_come_from_generation_config() -> None:
    defaults = SamplingDefaults.for_model("Dream", {"alg": "entropy", "steps": 64, "temperature": 0.2, "top_p": 0.95})
    params = defaults.apply(SamplingParams(max_tokens=32), prompt_len=4, max_sequence_length=2048)
    params = get_strategy(params.algorithm or "").resolve(params, defaults)
    assert (params.algorithm, params.steps, params.temperature, params.top_p, params.eps) == (
        "entropy",
        64,
        0.2,
        0.95,
        1e-3,
    )


def test_explicit_values_win_over_generation_config() -> None:
    defaults = SamplingDefaults.for_model("Dream", {"alg": "entropy", "steps": 64, "temperature": 0.2})
    params = defaults.apply(SamplingParams(max_tokens=16, temperature=0.0, algorithm="origin"), 4, 2048)
    assert (params.algorithm, params.temperature) == ("origin", 0.0)


def test_llada_family_defaults() -> None:
    defaults = SamplingDefaults.for_model("llada", {"eos_token_id": 1})
    params = defaults.apply(SamplingParams(), prompt_len=10, max_sequence_length=100)
    params = get_strategy("low_confidence").resolve(params, defaults)
    assert (params.max_tokens, params.block_length, params.steps, params.temperature) == (90, 32, 96, 0.0)


def test_llada_block_length_comes_from_generation_config() -> None:
    defaults = SamplingDefaults.for_model("llada", {"block_length": 40, "steps": 40, "max_new_tokens": 40})
    params = defaults.apply(SamplingParams(), prompt_len=10, max_sequence_length=100)
    params = get_strategy("low_confidence").resolve(params, defaults)
    assert (params.max_tokens, params.block_length, params.steps) == (40, 40, 40)  # one block, as trained
    short = get_strategy("low_confidence").resolve(SamplingParams(max_tokens=8), defaults)
    assert short.block_length == 8  # never a block longer than the answer asked for
    explicit = get_strategy("low_confidence").resolve(SamplingParams(max_tokens=40, block_length=8), defaults)
    assert explicit.block_length == 8


def test_a_parallel_rule_in_generation_config_is_the_default_pace() -> None:
    config = {"block_length": 72, "max_new_tokens": 72, "threshold": 0.9}
    defaults = SamplingDefaults.for_model("llada", config)
    low_confidence = get_strategy("low_confidence")
    default = low_confidence.resolve(defaults.apply(SamplingParams(), 10, 200), defaults)
    assert (default.threshold, default.factor, default.steps, default.block_length) == (0.9, None, None, 72)
    # a request that picks its own pace keeps it: the schedule, or another rule
    schedule = low_confidence.resolve(defaults.apply(SamplingParams(steps=72), 10, 200), defaults)
    assert (schedule.threshold, schedule.steps) == (None, 72)
    factor = low_confidence.resolve(defaults.apply(SamplingParams(factor=1.0), 10, 200), defaults)
    assert (factor.threshold, factor.factor) == (None, 1.0)
    # another algorithm than the checkpoint's keeps the fixed schedule
    random = get_strategy("random").resolve(defaults.apply(SamplingParams(), 10, 200), defaults)
    assert (random.threshold, random.steps) == (None, 72)


def test_generation_config_with_both_rules_is_refused() -> None:
    with pytest.raises(ValueError, match="both threshold and factor"):
        SamplingDefaults.for_model("llada", {"threshold": 0.9, "factor": 1.0})


@pytest.mark.parametrize(
    ("algorithm", "fields", "message"),
    [
        (
            "low_confidence",
            {"max_tokens": 64, "block_length": 16, "steps": 6},
            r"steps \(6\) must be a multiple of the number of blocks \(4",
        ),
        ("low_confidence", {"eps": 0.01}, "eps applies to Dream"),
        ("random", {"alg_temp": 0.5}, "alg_temp applies to Dream"),
        ("entropy", {"block_length": 8}, "block_length applies to LLaDA"),
        ("origin", {"confidence_eos_eot_inf": True}, "confidence_eos_eot_inf applies to LLaDA"),
        ("entropy", {"threshold": 0.9}, "threshold applies to LLaDA's algorithms"),
        ("maskgit_plus", {"factor": 1.0}, "factor applies to LLaDA's algorithms"),
        ("low_confidence", {"threshold": 0.9, "steps": 32}, "steps does not apply with threshold or factor"),
    ],
)
def test_algorithm_refuses_fields_it_cannot_honour(algorithm: str, fields: dict[str, Any], message: str) -> None:
    defaults = SamplingDefaults.for_model("llada", {})
    params = defaults.apply(SamplingParams(algorithm=algorithm, **fields), 4, 4096)
    with pytest.raises(ValueError, match=message):
        get_strategy(algorithm).resolve(params, defaults)


def test_threshold_and_factor_are_one_choice() -> None:
    with pytest.raises(ValueError, match="threshold and factor are two rules for the same choice"):
        SamplingParams(threshold=0.9, factor=1.0)


def test_parallel_rules_take_float64_confidences_unless_told_otherwise() -> None:
    defaults = SamplingDefaults.for_model("llada", {"steps": 40})  # a schedule's steps do not apply to them
    strategy = get_strategy("low_confidence")
    resolved = strategy.resolve(defaults.apply(SamplingParams(threshold=0.9), 4, 4096), defaults)
    assert (resolved.confidence_dtype, resolved.steps, resolved.block_length) == ("float64", None, 32)
    explicit = SamplingParams(factor=1.0, confidence_dtype="bfloat16")
    assert strategy.resolve(defaults.apply(explicit, 4, 4096), defaults).confidence_dtype == "bfloat16"
