"""The schedule arithmetic and filters the strategies share, against the published numbers."""

from __future__ import annotations

import torch

from vdiff.decoding.dream import _reveal_count
from vdiff.decoding.ops import top_k_filter, top_p_filter, transfer_counts


def test_llada_transfer_counts_give_the_remainder_to_the_earliest_steps() -> None:
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(32, 32) == [1] * 32
    assert transfer_counts(3, 5) == [1, 1, 1, 0, 0]


class _Step:
    """The two fields of a Request that Dream's reveal count reads."""

    def __init__(self, steps: int, eps: float) -> None:
        from vdiff import SamplingParams

        self.params = SamplingParams(steps=steps, eps=eps)
        self.timesteps = torch.linspace(1, eps, steps + 1)
        self.step = 0


def dream_schedule(length: int, steps: int) -> list[int]:
    state, masked, counts = _Step(steps, 1e-3), length, []
    for i in range(steps):
        state.step = i
        counts.append(_reveal_count(state, masked))  # type: ignore[arg-type]
        masked -= counts[-1]
    return counts


def test_dream_schedule_matches_the_published_float32_arithmetic() -> None:
    """dllm.md 2.2: steps == length gives [0, 1, ..., 1, 2]; 128 steps over 256 give [1, 2, ..., 2, 3]."""
    assert dream_schedule(256, 256) == [0] + [1] * 254 + [2]
    assert dream_schedule(256, 128) == [1] + [2] * 126 + [3]
    assert dream_schedule(256, 64) == [3] + [4] * 62 + [5]


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_first() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False]]
    assert (top_p_filter(logits, 0.1) > torch.finfo(torch.float32).min).tolist() == [[True, False, False, False]]


def test_top_k_keeps_k_tokens() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert (top_k_filter(logits, 2) > torch.finfo(torch.float32).min).tolist() == [[False, True, True, False]]
