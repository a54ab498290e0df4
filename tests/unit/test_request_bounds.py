"""RequestBounds: every field that sizes work, at and just past its bound, with the field named."""

from __future__ import annotations

import pytest

from vdiff import SamplingParams
from vdiff.bounds import RequestBounds

BOUNDS = RequestBounds(max_sequence_length=512, vocab_size=390, longest_token_chars=4, max_stop_strings=3)


@pytest.mark.parametrize("field", ["steps", "block_length", "apd_kv_window", "apd_max_lookahead"])
def test_position_sized_fields_stop_at_the_models_length(field: str) -> None:
    BOUNDS.check_params(SamplingParams(**{field: 512}))
    with pytest.raises(ValueError, match=rf"^{field} must be at most the model's max_sequence_length \(512\)"):
        BOUNDS.check_params(SamplingParams(**{field: 513}))


def test_stop_lists_are_bounded_by_count_length_and_vocabulary() -> None:
    BOUNDS.check_params(SamplingParams(stop=("a" * 2048,) * 3, stop_token_ids=(389,)))
    with pytest.raises(ValueError, match=r"^stop holds 4 strings; this server takes at most 3"):
        BOUNDS.check_params(SamplingParams(stop=("a",) * 4))
    with pytest.raises(ValueError, match=r"^stop strings must be at most 2048 characters"):
        BOUNDS.check_params(SamplingParams(stop=("a" * 2049,)))
    with pytest.raises(ValueError, match=r"^stop_token_ids must be token ids in \[0, 390\), got 390"):
        BOUNDS.check_params(SamplingParams(stop_token_ids=(390,)))
    with pytest.raises(ValueError, match=r"^stop_token_ids holds 391 ids"):
        BOUNDS.check_stop_counts(0, 391)


def test_a_prompt_leaves_one_canvas_position() -> None:
    BOUNDS.check_prompt_length(511)
    with pytest.raises(ValueError, match=r"^prompt_token_ids holds 512 tokens.*at most 511"):
        BOUNDS.check_prompt_length(512)


def test_a_text_is_refused_from_its_length_when_its_tokens_cannot_fit() -> None:
    """511 tokens of at most 4 characters: a longer text needs more tokens than a prompt may have."""
    BOUNDS.check_prompt_text(511 * 4)
    with pytest.raises(ValueError, match=r"^prompt is 2045 characters"):
        BOUNDS.check_prompt_text(511 * 4 + 1)


@pytest.mark.parametrize("field", ["max_sequence_length", "vocab_size", "longest_token_chars"])
def test_bounds_themselves_are_checked(field: str) -> None:
    values = {"max_sequence_length": 8, "vocab_size": 8, "longest_token_chars": 1} | {field: 0}
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        RequestBounds(**values)
