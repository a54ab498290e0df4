"""Driving an engine step by step, with requests that join while others run."""

from __future__ import annotations

from vdiff import LLM, Engine, SamplingParams
from vdiff.outputs import RequestOutput

Requests = list[tuple[list[int], SamplingParams]]


def run_joining(llm: LLM | Engine, requests: Requests, delays: list[int] | None = None) -> dict[str, RequestOutput]:
    """Run to completion, adding request i (id "r{i}") after delays[i] engine steps; final
    outputs by id."""
    engine = llm.engine if isinstance(llm, LLM) else llm
    delays = delays or [0] * len(requests)
    finals: dict[str, RequestOutput] = {}
    pending = sorted(range(len(requests)), key=lambda i: delays[i])
    steps = 0
    while pending or engine.has_unfinished():
        while pending and delays[pending[0]] <= steps:
            i = pending.pop(0)
            engine.add_request(requests[i][0], requests[i][1], request_id=f"r{i}")
        finals |= {output.request_id: output for output in engine.step() if output.finished}
        steps += 1
    return finals
