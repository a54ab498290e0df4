"""What the serving stack costs next to the engine, on the same prompts and settings.

    cd perf && python bench_stack.py [--model vdiff-demo] [--per-family 10] [--rounds 3]
                                     [--concurrency 1 16] [--baseline CHECKOUT]
                                     [--out results/stack_cpu]

Four paths answer the same held-out chat prompts (10 per family: 60) at temperature 0:
(a) the in-process `Engine`; (b) the `vdiff` ensemble (tokenizer, denoiser, detokenizer) over gRPC
streaming, sent the prompt's token ids (`vdiff_client.triton`); (d) `diffusion_denoise` alone over
gRPC streaming, the route the proxy takes; (c) the OpenAI chat endpoint, non-streaming, through
httpx. `vdiff` runs on free loopback ports in float32 with one torch thread and max_num_seqs 16;
path (a) runs in this process with one torch thread while the server idles. Each round runs every
decoding setting (the default schedule, threshold 0.95) and concurrency through the paths in
turn; a path keeps `concurrency` requests in flight until every prompt is answered. Reported:
tokens/s (answer tokens over wall time) and the p50 request latency as medians over rounds, the
ratios b/a, d/a, c/a taken within each round, then their median (this shared machine's speed
drifts between rounds), and the latency the stack adds at p50 (c - a) and the proxy's own share
of it (c - d). Every path's text must equal the engine's; the count of equal answers is recorded.

The long-answer case: one answer of 512 tokens, one token settling per step (steps = 512), with a
stop string that never matches (so the text held back for stop strings is exercised). It reports
the engine's text work per step (`settle`: stop checks and detokenization) for the first and the
last 64 tokens, in this checkout and, with `--baseline`, in another one (a separate process whose
`vdiff` is imported from it); and the OpenAI endpoint streaming the same answer: the gap between
chunks over the first and the last 64 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from bench_load import wait_healthy

from vdiff.serve.cli import triton_port_flags
from vdiff.serve.launcher import free_loopback_address

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 32
SETTINGS: dict[str, dict[str, Any]] = {"default": {}, "threshold-0.95": {"threshold": 0.95}}
PATHS = ("engine", "ensemble", "denoiser", "openai")
LETTERS = {"engine": "a", "ensemble": "b", "denoiser": "d", "openai": "c"}
LONG_TOKENS = 512
LONG_EDGE = 64  # tokens at each end of the long answer that are compared
LONG_PROMPT = "Spell the word hippopotamus, then count to nine."
LONG_FIELDS = {"steps": LONG_TOKENS, "block_length": 32, "ignore_eos": True, "stop": ["never in this answer"]}
T = TypeVar("T")
Answer = tuple[str, int, float]  # text, answer tokens, seconds from send to the last byte


LOOP = asyncio.new_event_loop()  # one loop for every client: grpc.aio binds its poller to the first


def run(work: Awaitable[T]) -> T:
    return LOOP.run_until_complete(work)


def start_vdiff(model: str, log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """`vdiff` as a user starts it; (process, HTTP URL, Triton's gRPC address)."""
    http, triton = free_loopback_address().http_port, free_loopback_address()
    command = [sys.executable, "-m", "vdiff.serve.cli", "--model", model, "--host", "127.0.0.1",
               "--port", str(http), "--dtype", "float32", "--torch-num-threads", "1",
               "--max-num-seqs", "16", "--max-queue-size", "64", "--disable-uvicorn-access-log",
               *triton_port_flags(triton)]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{http}", triton.grpc_target


def engine_answers(engine: Any, prompts: list[list[int]], fields: dict[str, Any], concurrency: int) -> list[Answer]:
    """Path (a): a closed loop of `concurrency` requests on the bare engine."""
    from vdiff import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **fields)
    answers: list[Answer | None] = [None] * len(prompts)
    waiting, running = list(range(len(prompts))), {}
    while waiting or running:
        while waiting and len(running) < concurrency:
            index = waiting.pop(0)
            running[engine.add_request(prompts[index], params)] = (index, time.perf_counter())
        for output in engine.step():
            if output.finished:
                index, sent = running.pop(output.request_id)
                answers[index] = (output.text, len(output.token_ids), time.perf_counter() - sent)
    return [a for a in answers if a is not None]


async def closed_loop(count: int, concurrency: int, one: Callable[[int], Awaitable[Answer]]) -> list[Answer]:
    """`concurrency` workers answering prompts 0..count-1; answers in prompt order."""
    answers: list[Answer | None] = [None] * count
    queue = iter(range(count))

    async def worker() -> None:
        for index in queue:
            answers[index] = await one(index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [a for a in answers if a is not None]


async def triton_answers(
    grpc: str, model: str, prompts: list[list[int]], fields: dict[str, Any], concurrency: int
) -> list[Answer]:
    """Paths (b) and (d): `model` over gRPC, streaming, with the prompt's ids (as the proxy sends them)."""
    from vdiff_client.triton import TritonBackend

    backend = TritonBackend(grpc, model=model)

    async def one(index: int) -> Answer:
        values = {"input_ids": prompts[index], "stream": True, "exclude_input_in_output": True,
                  "max_tokens": MAX_TOKENS, "temperature": 0.0, **fields}  # fmt: skip
        sent, text, tokens = time.perf_counter(), [], 0
        async for delta in backend.generate(f"bench-{index}-{sent}", values):
            text.append(delta.text)
            tokens += delta.new_tokens
        return "".join(text), tokens, time.perf_counter() - sent

    try:
        return await closed_loop(len(prompts), concurrency, one)
    finally:
        await backend.close()  # its channel belongs to this event loop


async def openai_answers(url: str, questions: list[str], fields: dict[str, Any], concurrency: int) -> list[Answer]:
    """Path (c): the OpenAI chat endpoint, non-streaming."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]

        async def one(index: int) -> Answer:
            body = {"model": model, "messages": [{"role": "user", "content": questions[index]}],
                    "max_tokens": MAX_TOKENS, "temperature": 0.0, **fields}  # fmt: skip
            sent = time.perf_counter()
            reply = (await http.post(f"{url}/v1/chat/completions", json=body)).raise_for_status().json()
            content = reply["choices"][0]["message"]["content"]
            return content, reply["usage"]["completion_tokens"], time.perf_counter() - sent

        return await closed_loop(len(questions), concurrency, one)


def settle_times(model: str) -> dict[str, Any]:
    """The engine's text work per step along one long answer, in whichever `vdiff` is imported."""
    import torch

    import vdiff.engine as engine_module
    from vdiff import EngineConfig, SamplingParams

    torch.set_num_threads(1)
    engine = engine_module.Engine(EngineConfig(model=model, dtype="float32"))
    real_settle, spent = engine_module.settle, []

    def timed(request: Any, final: int, tokenizer: Any) -> Any:
        settled, started = len(request.output_ids), time.perf_counter()
        result = real_settle(request, final, tokenizer)
        if result is not None:
            spent.append((settled, time.perf_counter() - started))
        return result

    engine_module.settle = timed
    params = SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0, logits_eos_inf=True, **LONG_FIELDS)
    engine.add_request(engine.tokenizer.encode(LONG_PROMPT), params)
    while engine.has_unfinished():
        engine.step()
    return edges([(at, 1e6 * seconds) for at, seconds in spent])


def edges(samples: list[tuple[int, float]]) -> dict[str, Any]:
    """Median of the samples (position, value) over the first and the last LONG_EDGE positions."""
    first = statistics.median(v for at, v in samples if at < LONG_EDGE)
    last = statistics.median(v for at, v in samples if at >= LONG_TOKENS - LONG_EDGE)
    return {"first_us": round(first, 1), "last_us": round(last, 1), "last_over_first": round(last / first, 2),
            "samples": len(samples)}  # fmt: skip


def baseline_settle_times(checkout: Path, model: str) -> dict[str, Any]:
    """`settle_times` with `vdiff` imported from another checkout (ahead of the installed one)."""
    path = f"{checkout}:{checkout / 'client'}"
    command = [sys.executable, __file__, "--settle-times-only", "--model", model]
    output = subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def long_answer_model(work: Path) -> Path:
    """A tiny random LLaDA with room for the long answer (the demo model's canvas is 128 long)."""
    out = work / "tiny-long"
    command = [sys.executable, str(ROOT / "tools/make_tiny_model.py"), "--arch", "llada", "--out", str(out),
               "--max-len", str(2 * LONG_TOKENS)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return out


async def streamed_gaps(url: str) -> dict[str, Any]:
    """The OpenAI endpoint streaming the long answer: gaps between chunks, by answer position."""
    async with httpx.AsyncClient(timeout=600) as http:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "prompt": LONG_PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                **LONG_FIELDS}  # fmt: skip
        arrivals = [(0, time.perf_counter())]  # (tokens so far, seconds) at the request, then each chunk
        async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
            async for line in reply.raise_for_status().aiter_lines():
                if line.startswith("data: {") and (chunk := json.loads(line[len("data: ") :]))["choices"]:
                    arrivals.append((chunk["usage"]["completion_tokens"], time.perf_counter()))
    return slopes(arrivals)


def slopes(arrivals: list[tuple[int, float]], edge: int = 2 * LONG_EDGE) -> dict[str, Any]:
    """Microseconds per token over the first and the last `edge` tokens of a stream. Tokens settle
    block by block (32 a block here), so the spans are several blocks long."""

    def at(tokens: int) -> tuple[int, float]:  # the first chunk with at least `tokens`
        return next((n, t) for n, t in arrivals if n >= tokens)

    (n0, t0), (n1, t1) = arrivals[0], at(edge)
    (n2, t2), (n3, t3) = at(LONG_TOKENS - edge), arrivals[-1]
    first, last = 1e6 * (t1 - t0) / (n1 - n0), 1e6 * (t3 - t2) / (n3 - n2)
    return {"first_us": round(first, 1), "last_us": round(last, 1), "last_over_first": round(last / first, 2),
            "samples": len(arrivals)}  # fmt: skip


def long_answer(work: Path, baseline: Path | None) -> dict[str, Any]:
    """Text work per step along a 512-token answer, and the gaps of its stream through `vdiff`."""
    model = long_answer_model(work)
    long = {"engine text work per step, this checkout": settle_times(str(model))}
    if baseline is not None:
        long[f"engine text work per step, {baseline}"] = baseline_settle_times(baseline, str(model))
    server, url, _ = start_vdiff(str(model), work / "vdiff-long.log")
    try:
        wait_healthy(url, server)
        long["OpenAI stream, time per token between chunks"] = run(streamed_gaps(url))
    finally:
        server.terminate()
        server.wait(60)
    return long


def figures(answers: list[Answer], seconds: float, reference: list[Answer]) -> dict[str, Any]:
    return {
        "tokens_per_s": sum(tokens for _, tokens, _ in answers) / seconds,
        "p50_ms": 1000 * statistics.median(latency for _, _, latency in answers),
        "same_text": sum(a[0] == r[0] for a, r in zip(answers, reference, strict=True)),
    }


def one_round(engine: Any, url: str, grpc: str, questions: list[str], prompts: list[list[int]],
              concurrency: list[int]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every (setting, concurrency) through the three paths: {"setting/c": {path: figures}}."""
    results = {}
    for name, fields in SETTINGS.items():
        for count in concurrency:
            started = time.perf_counter()
            reference = engine_answers(engine, prompts, fields, count)
            runs = {"engine": figures(reference, time.perf_counter() - started, reference)}
            for path, model in (("ensemble", "vdiff"), ("denoiser", "diffusion_denoise")):
                started = time.perf_counter()
                answers = run(triton_answers(grpc, model, prompts, fields, count))
                runs[path] = figures(answers, time.perf_counter() - started, reference)
            started = time.perf_counter()
            answers = run(openai_answers(url, questions, fields, count))
            runs["openai"] = figures(answers, time.perf_counter() - started, reference)
            results[f"{name}/{count}"] = runs
            print(name, count, {path: round(run["tokens_per_s"]) for path, run in runs.items()}, flush=True)
    return results


def summary(rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for key in rounds[0]:
        runs = [r[key] for r in rounds]

        def median(path: str, figure: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(run[path][figure] for run in runs)

        def ratio(top: str, bottom: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(run[top]["tokens_per_s"] / run[bottom]["tokens_per_s"] for run in runs)

        setting, concurrency = key.split("/")
        rows.append({
            "setting": setting, "concurrency": int(concurrency),
            **{f"{path}_tokens_per_s": round(median(path, "tokens_per_s"), 1) for path in PATHS},
            **{f"{path}_p50_ms": round(median(path, "p50_ms"), 1) for path in PATHS},
            "b/a": round(ratio("ensemble", "engine"), 2), "d/a": round(ratio("denoiser", "engine"), 2),
            "c/a": round(ratio("openai", "engine"), 2),
            "added_p50_ms": round(median("openai", "p50_ms") - median("engine", "p50_ms"), 2),
            "proxy_p50_ms": round(median("openai", "p50_ms") - median("denoiser", "p50_ms"), 2),
            "same_text": min(run[path]["same_text"] for run in runs for path in PATHS[1:]),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], prompts: int, long: dict[str, Any]) -> str:
    lines = [
        "| decoding, concurrency | tok/s a / b / d / c | p50 ms a / b / d / c | b/a | d/a | c/a "
        "| added p50 ms (c - a, c - d) | same text |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        speeds = " / ".join(f"{r[f'{p}_tokens_per_s']:.0f}" for p in PATHS)
        latencies = " / ".join(f"{r[f'{p}_p50_ms']:.1f}" for p in PATHS)
        lines.append(f"| {r['setting']}, {r['concurrency']} | {speeds} | {latencies} | {r['b/a']:.2f} | "
                     f"{r['d/a']:.2f} | {r['c/a']:.2f} | {r['added_p50_ms']:.1f}, {r['proxy_p50_ms']:.1f} "
                     f"| {r['same_text']}/{prompts} |")  # fmt: skip
    lines += ["", f"Long answer ({LONG_TOKENS} tokens, one per step, a stop string): median per step, "
              f"first {LONG_EDGE} tokens -> last {LONG_EDGE}", ""]  # fmt: skip
    for label, run in long.items():
        lines.append(f"- {label}: {run['first_us']:.0f} -> {run['last_us']:.0f} us ({run['last_over_first']:.2f}x)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vdiff-demo")
    parser.add_argument("--per-family", type=int, default=10, help="held-out problems per family (six)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--baseline", type=Path, help="another checkout: its engine's text work per step too")
    parser.add_argument("--settle-times-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/stack_cpu")
    args = parser.parse_args(argv)
    if args.settle_times_only:
        print(json.dumps(settle_times(args.model)))
        return

    import torch

    from vdiff import EngineConfig
    from vdiff.engine import Engine
    from vdiff.training.demo_task import held_out_set

    torch.set_num_threads(1)
    engine = Engine(EngineConfig(model=args.model, dtype="float32", max_num_seqs=16))
    questions = [problem.question for problem in held_out_set(args.per_family)]
    template = engine.tokenizer.apply_chat_template
    prompts = [engine.tokenizer.encode(template([{"role": "user", "content": q}])) for q in questions]
    with tempfile.TemporaryDirectory() as work:
        server, url, grpc = start_vdiff(args.model, Path(work) / "vdiff.log")
        try:
            wait_healthy(url, server)
            one_round(engine, url, grpc, questions, prompts, [1])  # warm-up, all three paths
            rounds = [one_round(engine, url, grpc, questions, prompts, args.concurrency) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(60)
        long = long_answer(Path(work), args.baseline)
    rows = summary(rounds)
    report = {"setup": {"model": args.model, "prompts": len(prompts), "rounds": args.rounds,
                        "max_tokens": MAX_TOKENS, "dtype": "float32", "torch_threads": 1,
                        "command": "python perf/bench_stack.py " + " ".join(argv or sys.argv[1:])},
              "rows": rows, "long_answer": long, "rounds": rounds}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, len(prompts), long))
    print(markdown(rows, len(prompts), long))


if __name__ == "__main__":
    main()
