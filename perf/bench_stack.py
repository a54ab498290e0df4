"""What the serving stack costs next to the engine, on the same prompts and settings.

    python perf/bench_stack.py [--model vdiff-demo] [--per-family 10] [--rounds 3]
                               [--concurrency 1 16] [--out perf/results/stack_cpu]

Three paths answer the same held-out chat prompts (10 per family: 60) at temperature 0:
(a) the in-process `Engine`; (b) the `vdiff` ensemble over gRPC streaming, sent the prompt's token
ids as the proxy sends them (`vdiff_client.triton`); (c) the OpenAI chat endpoint, non-streaming,
through httpx. `vdiff` runs on free loopback ports in float32 with one torch thread and
max_num_seqs 16; path (a) runs in this process with one torch thread while the server idles.
Each round runs every decoding setting (the default schedule, threshold 0.95) and concurrency
through the three paths in turn; a path keeps `concurrency` requests in flight until every prompt
is answered. Reported: tokens/s (answer tokens over wall time) and the p50 request latency as
medians over rounds, and the ratios b/a, c/b, c/a taken within each round, then their median,
since this shared machine's speed drifts between rounds. Every path's text must equal the
engine's; the count of equal answers is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from bench_load import wait_healthy

from vdiff.serve.launcher import free_loopback_address

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 32
SETTINGS: dict[str, dict[str, Any]] = {"default": {}, "threshold-0.95": {"threshold": 0.95}}
PATHS = ("engine", "ensemble", "openai")
Answer = tuple[str, int, float]  # text, answer tokens, seconds from send to the last byte


def start_vdiff(model: str, log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """`vdiff` as a user starts it; (process, HTTP URL, Triton's gRPC address)."""
    http, triton = free_loopback_address().http_port, free_loopback_address()
    command = [sys.executable, "-m", "vdiff.serve.cli", "--model", model, "--host", "127.0.0.1",
               "--port", str(http), "--dtype", "float32", "--torch-num-threads", "1",
               "--max-num-seqs", "16", "--max-queue-size", "64", "--disable-uvicorn-access-log",
               "--triton-http-port", str(triton.http_port), "--triton-grpc-port", str(triton.grpc_port),
               "--triton-metrics-port", str(triton.metrics_port)]  # fmt: skip
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


async def ensemble_answers(
    grpc: str, prompts: list[list[int]], fields: dict[str, Any], concurrency: int
) -> list[Answer]:
    """Path (b): the `vdiff` ensemble, streaming, with the prompt's ids (as the proxy sends them)."""
    from vdiff_client.triton import TritonBackend

    backend = TritonBackend(grpc)

    async def one(index: int) -> Answer:
        values = {"input_ids": prompts[index], "stream": True, "exclude_input_in_output": True,
                  "max_tokens": MAX_TOKENS, "temperature": 0.0, **fields}  # fmt: skip
        sent, text, tokens = time.perf_counter(), [], 0
        async for delta in backend.generate(f"bench-{index}-{sent}", values):
            text.append(delta.text)
            tokens += delta.new_tokens
        return "".join(text), tokens, time.perf_counter() - sent

    return await closed_loop(len(prompts), concurrency, one)


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
            started = time.perf_counter()
            answers = asyncio.run(ensemble_answers(grpc, prompts, fields, count))
            runs["ensemble"] = figures(answers, time.perf_counter() - started, reference)
            started = time.perf_counter()
            answers = asyncio.run(openai_answers(url, questions, fields, count))
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
            "b/a": round(ratio("ensemble", "engine"), 2), "c/b": round(ratio("openai", "ensemble"), 2),
            "c/a": round(ratio("openai", "engine"), 2),
            "same_text": min(min(run["ensemble"]["same_text"], run["openai"]["same_text"]) for run in runs),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], prompts: int) -> str:
    lines = [
        "| decoding, concurrency | tok/s a / b / c | p50 ms a / b / c | b/a | c/b | c/a | same text |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        speeds = " / ".join(f"{r[f'{p}_tokens_per_s']:.0f}" for p in PATHS)
        latencies = " / ".join(f"{r[f'{p}_p50_ms']:.1f}" for p in PATHS)
        lines.append(f"| {r['setting']}, {r['concurrency']} | {speeds} | {latencies} | {r['b/a']:.2f} | "
                     f"{r['c/b']:.2f} | {r['c/a']:.2f} | {r['same_text']}/{prompts} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vdiff-demo")
    parser.add_argument("--per-family", type=int, default=10, help="held-out problems per family (six)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/stack_cpu")
    args = parser.parse_args(argv)

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
    rows = summary(rounds)
    report = {"setup": {"model": args.model, "prompts": len(prompts), "rounds": args.rounds,
                        "max_tokens": MAX_TOKENS, "dtype": "float32", "torch_threads": 1,
                        "command": "python perf/bench_stack.py " + " ".join(argv or sys.argv[1:])},
              "rows": rows, "rounds": rounds}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, len(prompts)))
    print(markdown(rows, len(prompts)))


if __name__ == "__main__":
    main()
