"""`vdiff-load` sweeps against the whole `vdiff` stack: 1, 8 and 32 users, then more than it can take.

    python perf/bench_load.py [--model vdiff-tiny] [--users 1 8 32] [--overload-users 64] [--run-time 25s]
                              [--max-num-seqs 16] [--max-queue-size 16] [--url http://127.0.0.1:8000]
                              [--out perf/results/load_tiny.json]

Starts the real `vdiff` command (tritonserver + the OpenAI server, free loopback ports) unless --url
names a server that is already up, waits for /health, warms up, then runs one headless Locust run
per user count (closed loop, streamed chat and completions, ignore_eos so every answer has
--max-tokens tokens). The last runs (two by default) have more users than --max-num-seqs +
--max-queue-size, so part of their requests are refused with 503 + Retry-After: they must show up as
rejections, never failures. Around each run the resident memory of the server's whole process tree
(the `vdiff` process, tritonserver and its Python backend stubs) is read with psutil: it may rise the
first time a higher concurrency is reached and should stay flat when a run repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from vdiff.serve.cli import triton_port_flags
from vdiff.serve.launcher import free_loopback_address
from vdiff_client.load.runner import build_parser, run_load

MIB = 1024 * 1024
PERCENTILES = ("p50", "p90", "p99")


def start_vdiff(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The `vdiff` command as a user starts it, on free loopback ports; returns it and its URL."""
    http, triton = free_loopback_address().http_port, free_loopback_address()
    command = [sys.executable, "-m", "vdiff.serve.cli", "--model", args.model, "--host", "127.0.0.1",
               "--port", str(http), "--max-num-seqs", str(args.max_num_seqs),
               "--max-queue-size", str(args.max_queue_size), "--torch-num-threads", str(args.torch_num_threads),
               *triton_port_flags(triton), "--disable-uvicorn-access-log"]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{http}"


def wait_healthy(url: str, process: subprocess.Popen[bytes] | None, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"vdiff exited with status {process.returncode} before it was healthy")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} was not healthy within {timeout_s:.0f} s")


def process_label(process: psutil.Process) -> str:
    """'tritonserver', 'python' (the vdiff command) or 'stub:<model>' for a Python backend stub."""
    model = next((arg.split("/")[-3] for arg in process.cmdline() if arg.endswith("/1/model.py")), "")
    return f"stub:{model}" if model else process.name()


def tree_rss_mib(pid: int | None) -> dict[str, float] | None:
    """Resident memory of a process and all its descendants, per process and in total (None: no process)."""
    if pid is None:
        return None
    root = psutil.Process(pid)
    sizes: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            label = process_label(process)
            sizes[label] = sizes.get(label, 0.0) + round(process.memory_info().rss / MIB, 1)
    return sizes | {"total": round(sum(sizes.values()), 1)}


def load_args(args: argparse.Namespace, url: str, users: int, run_time: str) -> argparse.Namespace:
    argv = ["--host", url, "--users", str(users), "--run-time", run_time, "--max-tokens", str(args.max_tokens)]
    argv += ["--ignore-eos", "--extra-body", args.extra_body, "--non-stream-share", "0.1", "--quiet"]
    return build_parser().parse_args(argv)


def measure(args: argparse.Namespace, url: str, pid: int | None, users: int) -> dict[str, Any]:
    rss_before = tree_rss_mib(pid)
    report = run_load(load_args(args, url, users, args.run_time))
    rss_after = tree_rss_mib(pid)
    metrics = report["metrics"]
    return {
        "users": users,
        "above_capacity": users > args.max_num_seqs + args.max_queue_size,
        "duration_s": report["duration_s"],
        "requests": report["requests"],
        "throughput": report["throughput"],
        "failures": report["failures"],
        "rejections": {key: report["rejections"][key] for key in ("total", "by_status")},
        "latency_ms": {name: {p: metrics[name].get(p) for p in PERCENTILES} for name in ("ttft", "itl", "tpot", "e2e")},
        "chunk_tokens_mean": metrics["chunk_tokens"].get("mean"),
        "rss_mib": {"before": rss_before, "after": rss_after},
        "locust_exit_code": report["locust_exit_code"],
    }


def percentiles(run: dict[str, Any], name: str) -> str:
    values = run["latency_ms"][name]
    return " / ".join("-" if values[p] is None else f"{values[p]:.0f}" for p in PERCENTILES)


def table_row(run: dict[str, Any]) -> str:
    rejections = ", ".join(f"{status}: {n}" for status, n in run["rejections"]["by_status"].items()) or "0"
    rss = {key: (value or {}).get("total") for key, value in run["rss_mib"].items()}
    return (
        f"| {run['users']} | {run['throughput']['requests_per_s']:.2f} | "
        f"{run['throughput']['output_tokens_per_s']:.0f} | {percentiles(run, 'ttft')} | {percentiles(run, 'itl')} | "
        f"{percentiles(run, 'tpot')} | {percentiles(run, 'e2e')} | {run['chunk_tokens_mean'] or 0:.1f} | "
        f"{run['failures']['total']} | {rejections} | {rss['before']} -> {rss['after']} |"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['machine']['platform']}, {report['machine']['cpus']} CPUs (load average {report['machine']['load']} "
        f"at the start, shared machine); model {report['model']}, max_num_seqs {report['max_num_seqs']}, "
        f"max_queue_size {report['max_queue_size']}, torch_num_threads {report['torch_num_threads']}; "
        f"{report['max_tokens']} tokens per answer (ignore_eos), 10% without stream, "
        f"extra body {report['extra_body']}; {report['run_time']} per run. Latencies in ms, p50 / p90 / p99.",
        "",
        "| users | req/s | output tok/s | TTFT | ITL | TPOT | e2e | tokens/chunk | failures | rejections "
        "| server RSS MiB before -> after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    lines += [table_row(run) for run in report["runs"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="", help="an already running server (then no RSS is measured)")
    parser.add_argument("--model", default="vdiff-tiny")
    parser.add_argument("--users", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--overload-users", type=int, default=64, help="last runs above capacity (0: none)")
    parser.add_argument("--overload-runs", type=int, default=2, help="how often; a repeat shows whether RSS stays flat")
    parser.add_argument("--run-time", default="25s")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--extra-body", default='{"block_length": 8}', help="diffusion fields for every request")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-queue-size", type=int, default=16)
    parser.add_argument("--torch-num-threads", type=int, default=1, help="the denoiser's (1 leaves a core to the rest)")
    parser.add_argument("--out", type=Path, default=Path("perf/results/load_tiny.json"))
    return parser.parse_args(argv)


def sweep(args: argparse.Namespace, url: str, pid: int | None) -> list[dict[str, Any]]:
    run_load(load_args(args, url, 4, "5s"))  # warm-up: first-request costs stay out of the table
    user_counts = [*args.users, *([args.overload_users] * args.overload_runs if args.overload_users else [])]
    runs = []
    for users in user_counts:
        runs.append(measure(args, url, pid, users))
        print(table_row(runs[-1]), flush=True)
    return runs


def header(args: argparse.Namespace) -> dict[str, Any]:
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}  # fmt: skip
    keys = ("model", "max_num_seqs", "max_queue_size", "torch_num_threads", "max_tokens", "extra_body", "run_time")
    return {"machine": machine} | {key: getattr(args, key) for key in keys}


@contextlib.contextmanager
def served(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """The URL to load and the server's pid: --url as given, or a `vdiff` started here and stopped after."""
    if args.url:
        yield args.url, None
        return
    with tempfile.TemporaryDirectory(prefix="vdiff-bench-load-") as work:
        log = Path(work) / "vdiff.log"
        process, url = start_vdiff(args, log)
        try:
            wait_healthy(url, process)
            yield url, process.pid
        except BaseException:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python perf/bench_load.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S")} | header(args)
    with served(args) as (url, pid):
        report["runs"] = sweep(args, url, pid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(f"\n{markdown(report)}\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
