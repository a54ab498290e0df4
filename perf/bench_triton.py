"""perf_analyzer against the `vdiff` ensemble: gRPC streaming at 1, 4 and 16 concurrent requests.

    python perf/bench_triton.py [--model vdiff-tiny] [--mixes short-16 short-64 long-32] [--concurrency 1 4 16]
                                [--out perf/results/triton_cpu_vdiff-tiny.json]

Starts tritonserver on the model repository (free loopback ports, one denoiser instance with
max_num_seqs 16), writes perf_analyzer input data for each prompt/length mix (ignore_eos, so each
request generates exactly max_tokens), and runs `perf_analyzer -m vdiff -i grpc --streaming` once
per mix and concurrency. perf_analyzer's latency is the time to the first response (TTFT); tokens/s
is requests/s x max_tokens. The denoiser's own counters, read before and after each run, add
tokens per forward evaluation and the mean denoising-step time. Right after each perf_analyzer run
the same requests go through an in-process `Engine` at the same concurrency (the server idle), so
`serving_ratio` = tokens/s through Triton / tokens/s of the bare engine loop is measured side by
side: what the serving path costs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdiff import Engine, EngineConfig, SamplingParams
from vdiff.serve.launcher import ServerAddress, TritonProcess, start_local

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "every",
    "box",
]


@dataclass(frozen=True)
class Mix:
    name: str
    prompt_words: tuple[int, int]  # prompt length range, in words
    max_tokens: int


MIXES = {
    "short-16": Mix("short-16", (2, 8), 16),
    "short-64": Mix("short-64", (2, 8), 64),
    "long-32": Mix("long-32", (60, 90), 32),
}
COUNTERS = (
    "vdiff:generation_tokens_total",
    "vdiff:nfe_total",
    "vdiff:denoising_step_seconds_sum",
    "vdiff:denoising_step_seconds_count",
)


def input_data(mix: Mix, path: Path, count: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [
        {
            "text_input": [" ".join(rng.choices(WORDS, k=rng.randint(*mix.prompt_words)))],
            "max_tokens": [mix.max_tokens],
            "ignore_eos": [True],
            "stream": [True],
        }
        for _ in range(count)
    ]
    path.write_text(json.dumps({"data": rows}))
    return path


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer from the tritonclient wheel links libcudart.so.12, even against a CPU server."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH", "")]))
    except ImportError:
        pass
    return env


def run_perf_analyzer(grpc: str, data: Path, concurrency: int, requests: int, csv_path: Path) -> dict[str, float]:
    binary = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    command = [
        binary, "-m", "vdiff", "-i", "grpc", "--streaming", "-u", grpc,
        "--input-data", str(data), "--shape", "text_input:1",
        f"--concurrency-range={concurrency}:{concurrency}",
        "--measurement-mode", "count_windows", f"--measurement-request-count={requests}",
        "-s", "30", "-r", "8", "-f", str(csv_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not csv_path.exists():
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    with csv_path.open() as handle:
        row = next(csv.DictReader(handle))
    return {key: float(value) for key, value in row.items()}


def read_counters(metrics_url: str, names: Sequence[str] = COUNTERS, timeout_s: float = 10) -> dict[str, float]:
    """Each counter family's value on a Prometheus page, summed over its labels."""
    values = dict.fromkeys(names, 0.0)
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{", 1)[0]
            if name in values:
                values[name] += float(line.rsplit(" ", 1)[1])
    return values


def measure(mix: Mix, concurrency: int, server: ServerAddress, data: Path, requests: int, work: Path) -> dict[str, Any]:
    metrics_url = server.metrics_url
    before = read_counters(metrics_url)
    row = run_perf_analyzer(server.grpc_target, data, concurrency, requests, work / "perf.csv")
    after = read_counters(metrics_url)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    nfe, steps = delta["vdiff:nfe_total"], delta["vdiff:denoising_step_seconds_count"]
    return {
        "mix": mix.name,
        "max_tokens": mix.max_tokens,
        "concurrency": concurrency,
        "requests_per_s": row["Inferences/Second"],
        "responses_per_s": row["Response Throughput"],
        "tokens_per_s": row["Inferences/Second"] * mix.max_tokens,
        "ttft_ms": {p: row[f"{p} latency"] / 1000 for p in ("p50", "p90", "p99")},
        "tokens_per_nfe": delta["vdiff:generation_tokens_total"] / nfe if nfe else None,
        "engine_steps": int(steps),
        "mean_step_ms": 1000 * delta["vdiff:denoising_step_seconds_sum"] / steps if steps else None,
    }


def engine_baseline(engine: Engine, prompts: list[str], mix: Mix, concurrency: int, requests: int) -> dict[str, float]:
    """The same closed loop as perf_analyzer's (`concurrency` requests in flight), on the bare engine."""
    params = SamplingParams(max_tokens=mix.max_tokens, ignore_eos=True)
    arrived: dict[str, float] = {}
    first: list[float] = []
    submitted = finished = 0
    warmup = concurrency  # the first `concurrency` requests warm up, as perf_analyzer's first window does
    started = time.perf_counter()
    while finished < requests + warmup:
        while len(arrived) < concurrency and submitted < requests + warmup:
            request_id = engine.add_request(prompts[submitted % len(prompts)], params)
            arrived[request_id] = time.perf_counter()
            submitted += 1
        for output in engine.step():
            if output.new_token_ids and len(output.token_ids) == len(output.new_token_ids):
                first.append(time.perf_counter() - arrived[output.request_id])
            if output.finished:
                del arrived[output.request_id]
                finished += 1
                if finished == warmup:
                    started = time.perf_counter()
    requests_per_s = requests / (time.perf_counter() - started)
    return {"requests_per_s": requests_per_s, "tokens_per_s": requests_per_s * mix.max_tokens,
            "ttft_p50_ms": 1000 * sorted(first)[len(first) // 2]}  # fmt: skip


def start_server(model: str, work: Path, max_num_seqs: int, torch_threads: int) -> TritonProcess:
    parameters = {
        "model": model,
        "max_num_seqs": str(max_num_seqs),
        "max_queue_size": "64",
        "torch_num_threads": str(torch_threads),
    }
    return start_local(parameters, work, progress=sys.stderr)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mix | concurrency | req/s | tokens/s | responses/s | TTFT p50 ms | TTFT p99 ms | tokens/NFE | step ms "
        "| engine tokens/s | Triton / engine |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        per_nfe = f"{r['tokens_per_nfe']:.2f}" if r["tokens_per_nfe"] else "-"
        lines.append(
            f"| {r['mix']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['responses_per_s']:.1f} | {r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p99']:.0f} | {per_nfe} | "
            f"{r['mean_step_ms'] or 0:.1f} | {r['engine']['tokens_per_s']:.0f} | {r['serving_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vdiff-tiny")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=60, help="requests per measurement window")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--torch-num-threads", type=int, default=0, help="the denoiser's (0: one per core)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("perf/results") / f"triton_cpu_{Path(args.model).name}.json"
    results = []
    with tempfile.TemporaryDirectory(prefix="vdiff-bench-") as tmp:
        work = Path(tmp)
        server = start_server(args.model, work, args.max_num_seqs, args.torch_num_threads)
        engine = Engine(EngineConfig(model=args.model, max_num_seqs=args.max_num_seqs))
        try:
            for mix in (MIXES[name] for name in args.mixes):
                data = input_data(mix, work / f"{mix.name}.json")
                prompts = [row["text_input"][0] for row in json.loads(data.read_text())["data"]]
                for concurrency in args.concurrency:
                    result = measure(mix, concurrency, server.config.address, data, args.requests, work)
                    result["engine"] = engine_baseline(engine, prompts, mix, concurrency, args.requests)
                    result["serving_ratio"] = result["tokens_per_s"] / result["engine"]["tokens_per_s"]
                    results.append(result)
                    print(markdown([result]).splitlines()[-1], flush=True)
        finally:
            server.stop()
            server.wait(120)
    report = {
        "command": "python perf/bench_triton.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model,
        "max_num_seqs": args.max_num_seqs,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(f"\n{markdown(results)}\n\nwrote {out}")


if __name__ == "__main__":
    main()
