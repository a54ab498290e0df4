"""Fault drills against the whole `vdiff` stack: SIGTERM under streaming load, and Triton killed under load.

    python perf/fault_drills.py [--model vdiff-tiny] [--streams 16] [--max-tokens 64]
                                [--out perf/results/faults_tiny.json]

1. SIGTERM: `--streams` streamed chat requests are started and each has sent its first chunk; then
   `vdiff` gets SIGTERM. Recorded: whether every stream finished with all its tokens and `[DONE]`,
   what a request sent during the drain got, /health during the drain, the exit code, the time to
   exit, and whether any process of the server's tree outlived it.
2. Triton killed: the same load plus plain requests; then tritonserver gets SIGKILL. Recorded: how
   every request ended (status, or the code of the stream's error event) and how long after the kill,
   how long until /health is 503 (or nothing listens), `vdiff`'s exit code, how long until it
   exited, its message, and any process left behind.
3. Denoiser killed, and wedged: the same, but the diffusion_denoise stub gets SIGKILL, or SIGSTOP
   (a stub that stops answering); tritonserver lives on and reports the model ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_load import start_vdiff, wait_healthy

CHAT = {"messages": [{"role": "user", "content": "Count from 1 to 9"}], "ignore_eos": True}


async def stream_chat(http: httpx.AsyncClient, url: str, max_tokens: int, first: asyncio.Event) -> dict[str, Any]:
    """How one streamed answer ended: status, finish reason, tokens, error code, [DONE], end time."""
    body = CHAT | {"max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    outcome: dict[str, Any] = {"status": None, "finish_reason": None, "tokens": 0, "error": None, "done": False}
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            outcome["status"] = response.status_code
            async for line in response.aiter_lines():
                first.set()
                record_event(outcome, line)
    except httpx.TransportError as error:
        outcome["error"] = f"transport: {type(error).__name__}"
    first.set()
    outcome["ended"] = time.monotonic()
    return outcome


def record_event(outcome: dict[str, Any], line: str) -> None:
    if not line.startswith("data: "):
        return
    payload = line[len("data: ") :]
    if payload == "[DONE]":
        outcome["done"] = True
        return
    event = json.loads(payload)
    if "error" in event:
        outcome["error"] = event["error"]["code"]
    for choice in event.get("choices") or []:
        outcome["finish_reason"] = choice.get("finish_reason") or outcome["finish_reason"]
    if event.get("usage"):
        outcome["tokens"] = event["usage"]["completion_tokens"]


async def plain_chat(http: httpx.AsyncClient, url: str, max_tokens: int) -> dict[str, Any]:
    try:
        response = await http.post(f"{url}/v1/chat/completions", json=CHAT | {"max_tokens": max_tokens})
        return {"status": response.status_code, "ended": time.monotonic(), "body": response.json()}
    except httpx.TransportError as error:
        return {"status": None, "ended": time.monotonic(), "body": f"transport: {type(error).__name__}"}


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def alive(processes: list[psutil.Process]) -> list[str]:
    """The command lines of those still running (a server's leftovers)."""
    left = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(process.cmdline())[:120])
    return left


async def sigterm_drill(process: Any, url: str, args: argparse.Namespace) -> dict[str, Any]:
    processes = tree(process.pid)
    async with httpx.AsyncClient(timeout=300) as http:
        firsts = [asyncio.Event() for _ in range(args.streams)]
        streams = [asyncio.create_task(stream_chat(http, url, args.max_tokens, f)) for f in firsts]
        await asyncio.gather(*(f.wait() for f in firsts))
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.3)
        during = await plain_chat(http, url, 4)
        health = (await http.get(f"{url}/health")).status_code
        outcomes = await asyncio.gather(*streams)
    code = await asyncio.to_thread(process.wait, 120)
    exited = time.monotonic() - signalled
    complete = [o["finish_reason"] == "length" and o["tokens"] == args.max_tokens and o["done"] for o in outcomes]
    return {
        "streams": args.streams,
        "streams_complete": sum(complete),
        "last_stream_end_s": round(max(o["ended"] for o in outcomes) - signalled, 2),
        "request_during_drain": during["status"],
        "health_during_drain": health,
        "exit_code": code,
        "exit_after_sigterm_s": round(exited, 2),
        "processes_left": alive(processes),
    }


def tritonserver(processes: list[psutil.Process]) -> psutil.Process:
    return next(p for p in processes if p.name() == "tritonserver")


def denoiser_stub(processes: list[psutil.Process]) -> psutil.Process:
    """The Python backend stub that runs diffusion_denoise (tritonserver outlives it)."""
    return next(p for p in processes if "/diffusion_denoise/" in " ".join(p.cmdline()))


VICTIMS = {  # drill name -> (which process, which signal)
    "triton_killed": (tritonserver, signal.SIGKILL),
    "denoiser_killed": (denoiser_stub, signal.SIGKILL),
    "denoiser_wedged": (denoiser_stub, signal.SIGSTOP),
}


async def seconds_until_unhealthy(http: httpx.AsyncClient, url: str, since: float) -> float | None:
    """Until /health is 503 or nothing listens any more (vdiff exited); None past 30 s."""
    while time.monotonic() - since < 30:
        try:
            unhealthy = (await http.get(f"{url}/health", timeout=10)).status_code == 503
        except httpx.TransportError:
            unhealthy = True
        if unhealthy:
            return round(time.monotonic() - since, 2)
        await asyncio.sleep(0.05)
    return None


async def kill_drill(process: Any, url: str, args: argparse.Namespace, name: str) -> dict[str, Any]:
    processes = tree(process.pid)
    find, sig = VICTIMS[name]
    victim = find(processes)
    async with httpx.AsyncClient(timeout=300) as http:
        firsts = [asyncio.Event() for _ in range(args.streams)]
        streams = [asyncio.create_task(stream_chat(http, url, args.max_tokens * 4, f)) for f in firsts]
        await asyncio.gather(*(f.wait() for f in firsts))
        plain = [asyncio.create_task(plain_chat(http, url, args.max_tokens * 4)) for _ in range(4)]
        await asyncio.sleep(0.3)
        victim.send_signal(sig)
        killed = time.monotonic()
        unhealthy = asyncio.create_task(seconds_until_unhealthy(http, url, killed))
        stream_outcomes, plain_outcomes = await asyncio.gather(*streams), await asyncio.gather(*plain)
        unhealthy_after = await unhealthy
    code = await asyncio.to_thread(process.wait, 120)
    ends = [o["ended"] for o in [*stream_outcomes, *plain_outcomes]]
    return {
        "signal": sig.name,
        "stream_endings": sorted({str(o["error"] or o["finish_reason"]) for o in stream_outcomes}),
        "streams_ended_with_503_event": sum(o["error"] == 503 and o["done"] for o in stream_outcomes),
        "plain_statuses": sorted({str(o["status"]) for o in plain_outcomes}),
        "all_requests_ended_within_s": round(max(ends) - killed, 2),
        "health_503_after_s": unhealthy_after,
        "exit_code": code,
        "exit_after_s": round(time.monotonic() - killed, 2),
        "processes_left": alive(processes),
    }


def run_drill(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    log = workdir / f"{name}.log"
    process, url = start_vdiff(args, log)
    try:
        wait_healthy(url, process)
        drill = sigterm_drill(process, url, args) if name == "sigterm" else kill_drill(process, url, args, name)
        result = asyncio.run(drill)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    wanted = ("[shutdown]", "tritonserver", "denoiser", "requests in flight")
    result["log_lines"] = [line for line in text.splitlines() if any(w in line for w in wanted)][-6:]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vdiff-tiny")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-queue-size", type=int, default=16)
    parser.add_argument("--torch-num-threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("perf/results/faults_tiny.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vdiff-faults-") as workdir:
        report = {
            "command": "python perf/fault_drills.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "sigterm": run_drill("sigterm", args, Path(workdir)),
        } | {name: run_drill(name, args, Path(workdir)) for name in VICTIMS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
