"""Continuous batching: a request's tokens do not depend on who shares its forward passes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from engine_harness import run_joining

from vdiff import LLM, Engine, EngineConfig, SamplingParams
from vdiff.models import Checkpoint, load_model
from vdiff.models.remote import RemoteCodeModel
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
        if i in (2, 5):  # confidence-threshold and factor rules, which commit a varying number per step
            params = params.replace(algorithm="low_confidence", steps=None, block_length=4)
            params = params.replace(threshold=0.03) if i == 2 else params.replace(factor=2.95)
        out.append((prompt, params))
    return out


TARGETS = {
    "llada": [
        SamplingParams(max_tokens=32, steps=32, block_length=8),
        SamplingParams(max_tokens=20, steps=10, block_length=10, cfg_scale=0.5),
        SamplingParams(max_tokens=32, block_length=8, threshold=0.03),
    ],
    "dream": [
        SamplingParams(max_tokens=24, steps=24, algorithm="entropy"),
        SamplingParams(max_tokens=16, steps=8, algorithm="origin", seed=3),
        SamplingParams(max_tokens=24, block_length=8, algorithm="low_confidence", factor=2.95),
    ],
}


@pytest.mark.parametrize("target", [0, 1, 2])
def test_request_alone_equals_request_among_seven_others(invariant_llm: LLM, target: int) -> None:
    llm = invariant_llm
    family = "dream" if llm.engine.defaults.algorithm == "origin" else "llada"
    params = TARGETS[family][target].replace(temperature=0.0, full_canvas=True)
    prompt = [5, 77, 123, 9, 64, 200, 18, 33, 2]
    alone = run_joining(llm, [(prompt, params)])["r0"].token_ids
    crowd = [(prompt, params), *neighbours(llm)]
    together = run_joining(llm, crowd)["r0"].token_ids
    joined_late = run_joining(llm, crowd, delays=[3, 0, 0, 1, 2, 5, 7, 9])["r0"].token_ids
    assert together == alone
    assert joined_late == alone
    assert len(alone) == params.max_tokens


def test_max_num_seqs_caps_the_running_set_and_admits_in_arrival_order(tiny_llada) -> None:
    engine = Engine(EngineConfig(model=str(tiny_llada), max_num_seqs=2))
    for i in range(5):
        engine.add_request(
            [3, 4, 5 + i], SamplingParams(max_tokens=8, steps=8 - 4 * (i == 0), full_canvas=True), f"q{i}"
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
    forward = engine.model.hidden_states  # the engine's forward: the head runs on the rows read

    def counting_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0].shape)
        return forward(*args, **kwargs)

    engine.model.hidden_states = counting_forward
    try:
        for i in range(4):
            engine.add_request(
                [1 + i] * (3 + i), SamplingParams(max_tokens=8, steps=8, block_length=8, full_canvas=True)
            )
        while engine.has_unfinished():
            engine.step()
    finally:
        del engine.model.hidden_states
    assert [tuple(shape) for shape in calls] == [(4, 14)] * 8  # 4 canvases, longest 6 + 8, for each of 8 steps


def random_request(rng: random.Random, family: str, index: int) -> tuple[list[int], SamplingParams]:
    """One request of any algorithm the family runs: schedules, threshold, factor, caches, CFG, APD;
    at temperature 0 or above it, with a seed."""
    length = rng.choice([8, 16, 24, 32])
    fields: dict[str, object] = {"max_tokens": length, "full_canvas": True, "seed": index}
    fields["temperature"] = rng.choice([0.0, 0.0, 0.8])
    kind = rng.choice(["schedule", "threshold", "factor", "cache", "cfg", "apd", "own"])
    if kind == "apd":
        apd = {"apd_mixture_weight": rng.choice([0.5, 0.9]), "apd_kv_window": rng.choice([None, 2, 4])}
        fields |= apd | {"algorithm": "apd", "apd_max_lookahead": rng.choice([None, 5])}
    elif kind == "own" and family == "dream":
        fields |= {"steps": length // rng.choice([1, 2]), "algorithm": rng.choice(DREAM_ALGORITHMS)}
    else:  # LLaDA's algorithms, which decode either family
        block = rng.choice([b for b in (4, 8) if length % b == 0])
        fields |= {"algorithm": rng.choice(["low_confidence", "random"]), "block_length": block}
        if kind == "threshold":
            fields["threshold"] = rng.choice([0.03, 0.1])
        elif kind == "factor":
            fields["factor"] = 2.95
        else:
            fields["steps"] = length // rng.choice([1, 2])  # blocks are even: a multiple of their count
        if kind == "cache":
            fields["cache"] = rng.choice(["prefix", "dual"])
        if kind == "cfg":
            fields["cfg_scale"] = 1.0
    prompt = [rng.randrange(1, 380) for _ in range(rng.randrange(1, 40))]
    return prompt, SamplingParams(**fields)  # type: ignore[arg-type]


DREAM_ALGORITHMS = ["origin", "maskgit_plus", "topk_margin", "entropy"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_invariant_mode_gives_every_request_its_alone_tokens(invariant_llm: LLM, seed: int) -> None:
    """Random batches of 1 to 8 requests of mixed algorithms, joining at random steps, at
    temperature 0 and above it: each request's tokens and forward count equal its run alone,
    in float32 and in bfloat16 (`dtype` parametrizes the fixture)."""
    llm = invariant_llm
    family = "dream" if llm.engine.defaults.algorithm == "origin" else "llada"
    rng = random.Random(seed)
    size = rng.randint(1, 8)
    requests = [random_request(rng, family, i) for i in range(size)]
    delays = [0] + [rng.randrange(0, 7) for _ in range(size - 1)]
    together = run_joining(llm, requests, delays)
    for i, (prompt, params) in enumerate(requests):
        output = together[f"r{i}"]
        alone = llm.generate([prompt], params)[0]
        assert (output.token_ids, output.nfe) == (alone.token_ids, alone.nfe), params


def test_a_model_running_its_own_code_is_batch_invariant_row_by_row(tiny_llada: Path, dtype: str) -> None:
    """A checkpoint's own modeling code (trust_remote_code) knows no per-row attention or tiles: in
    batch-invariant mode the runner gives it each canvas alone, so batching changes no token."""
    native = load_model(tiny_llada, dtype=dtype, device="cpu")
    remote = RemoteCodeModel(native, Checkpoint.open(tiny_llada).config)  # its own code: the native model
    config = EngineConfig(model=str(tiny_llada), dtype=dtype, max_num_seqs=8, batch_invariant=True)
    engine = Engine(config, model=remote)
    rng = random.Random(7)
    requests = [random_request(rng, "llada", i) for i in range(6)]
    requests = [(p, s) for p, s in requests if s.cache == "none" and s.algorithm != "apd"]  # windows need vdiff's
    together = run_joining(engine, requests, delays=[0, 1, 3, 0, 2, 5][: len(requests)])
    for i, (prompt, params) in enumerate(requests):
        alone = run_joining(engine, [(prompt, params)])["r0"]
        assert (together[f"r{i}"].token_ids, together[f"r{i}"].nfe) == (alone.token_ids, alone.nfe), params
