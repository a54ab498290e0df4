"""Continuous batching: a request's tokens do not depend on who shares its forward passes."""

from __future__ import annotations

import pytest

from vdiff import LLM, Engine, EngineConfig, SamplingParams
from vdiff.outputs import RequestOutput


def neighbours(llm: LLM) -> list[tuple[list[int], SamplingParams]]:
    """Seven requests with other prompt lengths, schedules and algorithms than the one under test."""
    dream = llm.engine.defaults.algorithm == "origin"
    algorithms = ["entropy", "origin", "topk_margin", "maskgit_plus"] if dream else ["low_confidence", "random"]
    out = []
    for i in range(7):
        prompt = [(13 * i + j) % 300 + 1 for j in range(3 + 5 * i)]
        params = SamplingParams(
            max_tokens=8 + 4 * i,
            steps=8 + 4 * i,
            algorithm=algorithms[i % len(algorithms)],
            temperature=0.0 if i % 3 else 0.8,
            seed=i,
            cfg_scale=0.0 if dream or i % 2 else 1.0,
        )
        out.append((prompt, params))
    return out


def run(
    llm: LLM, requests: list[tuple[list[int], SamplingParams]], delays: list[int] | None = None
) -> dict[str, list[int]]:
    """Run to completion, adding request i after delays[i] engine steps; final token ids by request id."""
    engine = llm.engine
    delays = delays or [0] * len(requests)
    finals: dict[str, list[int]] = {}
    pending = sorted(range(len(requests)), key=lambda i: delays[i])
    steps = 0
    while pending or engine.has_unfinished():
        while pending and delays[pending[0]] <= steps:
            i = pending.pop(0)
            engine.add_request(requests[i][0], requests[i][1], request_id=f"r{i}")
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output.token_ids
        steps += 1
    return finals


TARGETS = {
    "llada": [
        SamplingParams(max_tokens=32, steps=32, block_length=8),
        SamplingParams(max_tokens=20, steps=10, block_length=10, cfg_scale=0.5),
    ],
    "dream": [
        SamplingParams(max_tokens=24, steps=24, algorithm="entropy"),
        SamplingParams(max_tokens=16, steps=8, algorithm="origin", seed=3),
    ],
}


@pytest.mark.parametrize("target", [0, 1])
def test_request_alone_equals_request_among_seven_others(llm: LLM, target: int) -> None:
    family = "dream" if llm.engine.defaults.algorithm == "origin" else "llada"
    params = TARGETS[family][target].replace(temperature=0.0, ignore_eos=True)
    prompt = [5, 77, 123, 9, 64, 200, 18, 33, 2]
    alone = run(llm, [(prompt, params)])["r0"]
    crowd = [(prompt, params), *neighbours(llm)]
    together = run(llm, crowd)["r0"]
    joined_late = run(llm, crowd, delays=[3, 0, 0, 1, 2, 5, 7, 9])["r0"]
    assert together == alone
    assert joined_late == alone
    assert len(alone) == params.max_tokens


def test_max_num_seqs_caps_the_running_set_and_admits_in_arrival_order(tiny_llada) -> None:
    engine = Engine(EngineConfig(model=str(tiny_llada), max_num_seqs=2))
    for i in range(5):
        engine.add_request(
            [3, 4, 5 + i], SamplingParams(max_tokens=8, steps=8 - 4 * (i == 0), ignore_eos=True), f"q{i}"
        )
    finished_order: list[str] = []
    while engine.has_unfinished():
        assert len(engine.scheduler.running) <= 2
        outputs: list[RequestOutput] = engine.step()
        assert len(engine.scheduler.running) <= 2
        finished_order += [o.request_id for o in outputs if o.finished]
    assert finished_order == ["q0", "q1", "q2", "q3", "q4"]


def test_every_running_request_shares_one_forward(llada_llm: LLM) -> None:
    engine = llada_llm.engine
    calls = []
    forward = engine.model.forward

    def counting_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0].shape)
        return forward(*args, **kwargs)

    engine.model.forward = counting_forward
    try:
        for i in range(4):
            engine.add_request(
                [1 + i] * (3 + i), SamplingParams(max_tokens=8, steps=8, block_length=8, ignore_eos=True)
            )
        while engine.has_unfinished():
            engine.step()
    finally:
        del engine.model.forward
    assert [tuple(shape) for shape in calls] == [(4, 14)] * 8  # 4 canvases, longest 6 + 8, for each of 8 steps
