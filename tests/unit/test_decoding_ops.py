"""The schedule arithmetic, filters and parallel-decoding rules of the strategies, against the published numbers."""

from __future__ import annotations

import pytest
import torch

from vdiff.decoding.dream import DiffusionTimes, _reveal_count
from vdiff.decoding.llada import factor_count, threshold_count
from vdiff.decoding.ops import top_k_filter, top_p_filter, transfer_counts


def test_llada_transfer_counts_give_the_remainder_to_the_earliest_steps() -> None:
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(32, 32) == [1] * 32
    assert transfer_counts(3, 5) == [1, 1, 1, 0, 0]


class _Step:
    """The fields of a Request that Dream's reveal count reads."""

    def __init__(self, steps: int, eps: float) -> None:
        from vdiff import SamplingParams

        self.request_id = "schedule"
        self.params = SamplingParams(steps=steps, eps=eps)
        self.state = DiffusionTimes(torch.linspace(1, eps, steps + 1))


def dream_schedule(length: int, steps: int) -> list[int]:
    request, masked, counts = _Step(steps, 1e-3), length, []
    for i in range(steps):
        request.state.step = i
        counts.append(_reveal_count(request, masked))  # type: ignore[arg-type]
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


@pytest.mark.parametrize(
    ("confidence", "threshold", "count"),
    [([0.95, 0.2, 0.91, 0.9], 0.9, 3), ([0.5, 0.4], 0.9, 1), ([0.9], 0.9, 1), ([0.3, 0.99, 0.99], 0.99, 2)],
)
def test_threshold_commits_what_reaches_it_and_at_least_one(
    confidence: list[float], threshold: float, count: int
) -> None:
    assert threshold_count(torch.tensor(confidence), threshold) == count


@pytest.mark.parametrize(
    ("confidence", "factor", "count"),
    [
        ([0.2], 1.0, 1),  # a lone candidate always goes
        ([0.9, 0.7, 0.1, 0.05], 1.0, 2),  # bars -1, 2/3, 3/4, 4/5: rank 2 passes, rank 3 fails
        ([0.9, 0.6, 0.1, 0.05], 1.0, 1),  # rank 2 fails (0.6 < 2/3)
        ([0.9, 0.6, 0.55, 0.05], 2.0, 4),  # bars -1, 1/3, 1/2, 3/5: fails at the last rank, so all
        ([0.99, 0.9, 0.85, 0.1, 0.05], 1.0, 3),  # ranks 1-3 pass (0.9 >= 2/3, 0.85 >= 3/4), rank 4 fails
        ([0.99, 0.9, 0.1], 1.0, 3),  # the failure is at the last rank: the published code commits all
        ([0.99, 0.98, 0.97], 1.0, 3),  # nothing fails
    ],
)
def test_factor_rule_counts_as_the_published_loop(confidence: list[float], factor: float, count: int) -> None:
    assert factor_count(torch.tensor(confidence)[torch.randperm(len(confidence))], factor) == count
