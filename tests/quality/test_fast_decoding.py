"""Fast decoding keeps the demo model's answers: the CI guard of the fast-decoding targets.

The 70-problem held-out sample (10 per family) through one engine with the verifier loaded,
float32. Each fast configuration, the checkpoint's own default among them, may lose at most the
problems it loses today (LOST, measured on the shipped models: none loses any; the default and
APD with W 4 answer one more) plus one, against one token per step, and must take at least 2x
fewer forwards per generated token (it takes 18-27x fewer). The
350-problem figures and the speeds are in perf/results/quality_vdiff-demo.md.
"""

from __future__ import annotations

from typing import Any

import pytest

from vdiff import LLM, SamplingParams
from vdiff.training.demo_task import Problem, accuracy_by_family, held_out_set

FAST: dict[str, dict[str, Any]] = {
    "default": {},  # the checkpoint's generation_config: a parallel rule
    "threshold-0.9": {"threshold": 0.9},
    "threshold-0.9+prefix": {"threshold": 0.9, "cache": "prefix"},
    "threshold-0.9+dual": {"threshold": 0.9, "cache": "dual"},
    "apd-R0.7": {"algorithm": "apd", "apd_mixture_weight": 0.7},
    "apd-R0.7-W4": {"algorithm": "apd", "apd_mixture_weight": 0.7, "apd_kv_window": 4},
}
LOST = {
    "default": 0,
    "threshold-0.9": 0,
    "threshold-0.9+prefix": 0,
    "threshold-0.9+dual": 0,
    "apd-R0.7": 0,
    "apd-R0.7-W4": 0,
}


@pytest.fixture(scope="module")
def sample() -> list[Problem]:
    return held_out_set(per_family=10)


@pytest.fixture(scope="module")
def llm(sample: list[Problem]) -> LLM:
    return LLM(dtype="float32", max_num_seqs=len(sample), verifier="vdiff-demo-ar")


def run(llm: LLM, sample: list[Problem], **params: Any) -> tuple[dict[str, float], float]:
    """Accuracy per family (and mean) and forwards per generated token."""
    outputs = llm.chat([[{"role": "user", "content": p.question}] for p in sample], SamplingParams(**params))
    accuracy = accuracy_by_family(sample, [o.text for o in outputs])
    return accuracy, sum(o.nfe for o in outputs) / sum(len(o.token_ids) for o in outputs)


@pytest.fixture(scope="module")
def one_per_step(llm: LLM, sample: list[Problem]) -> tuple[dict[str, float], float]:
    """The fixed schedule at one token per step over the whole canvas: the accuracy to keep."""
    return run(llm, sample, steps=llm.engine.defaults.max_tokens)


def test_the_default_is_a_parallel_rule(llm: LLM) -> None:
    assert llm.engine.defaults.threshold is not None or llm.engine.defaults.factor is not None


@pytest.mark.parametrize("name", FAST)
def test_fast_decoding_keeps_the_one_token_per_step_accuracy(
    llm: LLM, sample: list[Problem], one_per_step: tuple[dict[str, float], float], name: str
) -> None:
    accuracy, nfe_per_token = run(llm, sample, **FAST[name])
    lost = round((one_per_step[0]["mean"] - accuracy["mean"]) * len(sample))
    assert lost <= LOST[name] + 1, (accuracy, one_per_step[0])
    assert nfe_per_token * 2 <= one_per_step[1], (nfe_per_token, one_per_step[1])  # at least 2x fewer
