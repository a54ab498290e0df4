"""The five reproductions of issue 18, replayed against a fresh `vdiff` as a user starts it.

    python perf/adversarial.py [--model vdiff-demo] [--out perf/results/adversarial_demo.json]

The server runs on loopback with an API key, `--max-num-seqs 8 --max-queue-size 8`, as in the
adversarial pass that found them. Recorded per reproduction:
1. gRPC `steps` / `block_length` = 2**31 - 1 to the `vdiff` ensemble on Triton's own port: the
   answer and its time, the denoiser stub's RSS before and after, a normal chat afterwards;
2. `/v1/completions` with 128 prompts x n = 128: status and time, `/version` and another client's
   chat meanwhile, the server's RSS before and after;
3. `/tokenize` without the key; four concurrent 1.9 MB `/tokenize` with `return_token_strs` with
   it, beside a chat (its latency against its idle latency);
4. 3,000 requests with made-up HTTP methods without a key: the `/metrics` size before and after;
5. a POST announcing 100 body bytes that sends 4, and half-sent headers: when the server answers
   or closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import tritonclient.grpc as grpcclient
from bench_load import wait_healthy

from vdiff.serve.cli import triton_port_flags
from vdiff.serve.launcher import free_loopback_address

KEY = "adversary-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 8}
INT32_MAX = 2**31 - 1


def start(model: str, log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """`vdiff` with a key and 8 + 8 slots; (process, HTTP URL, Triton's gRPC address)."""
    http, triton = free_loopback_address().http_port, free_loopback_address()
    command = [sys.executable, "-m", "vdiff.serve.cli", "--model", model, "--host", "127.0.0.1",
               "--port", str(http), "--api-key", KEY, "--max-num-seqs", "8", "--max-queue-size", "8",
               *triton_port_flags(triton), "--disable-uvicorn-access-log"]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{http}", triton.grpc_target


def stub_rss_mb(server: subprocess.Popen[bytes], model: str) -> float:
    for child in psutil.Process(server.pid).children(recursive=True):
        if f"/{model}/" in " ".join(child.cmdline()):
            return round(child.memory_info().rss / 2**20, 1)
    return float("nan")


def grpc_refusal(grpc_target: str, field: str) -> dict[str, Any]:
    """One ensemble request with `field` at INT32's maximum, as the adversarial pass sent it."""
    events: list[tuple[Any, Any]] = []
    client = grpcclient.InferenceServerClient(grpc_target)
    client.start_stream(callback=lambda result, error: events.append((result, error)))
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"What is 12 + 30?"]], dtype=np.object_))
    value = grpcclient.InferInput(field, [1, 1], "INT32")
    value.set_data_from_numpy(np.array([[INT32_MAX]], dtype=np.int32))
    started = time.perf_counter()
    client.async_stream_infer("vdiff", [text, value])
    while not events and time.perf_counter() - started < 30:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    client.stop_stream(cancel_requests=True)
    client.close()
    error = events[0][1] if events else None
    return {"answered_s": round(elapsed, 3), "error": None if error is None else error.message()}


async def timed(coroutine: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await coroutine
    return round(time.perf_counter() - started, 3), result


async def chat_seconds(http: httpx.AsyncClient, url: str) -> float:
    seconds, response = await timed(http.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH))
    assert response.status_code == 200, response.text
    return seconds


async def beside(http: httpx.AsyncClient, url: str, load: Any) -> dict[str, Any]:
    """`load` running, and meanwhile /version and a chat: how long each took."""
    task = asyncio.create_task(timed(load))
    await asyncio.sleep(0.2)
    version, _ = await timed(http.get(f"{url}/version"))
    chat = await chat_seconds(http, url)
    load_s, result = await task
    return {"load_s": load_s, "load_result": result, "version_meanwhile_s": version, "chat_meanwhile_s": chat}


async def many_completions(http: httpx.AsyncClient, url: str) -> Any:
    body = {"prompt": ["What is 12 + 30?"] * 128, "n": 128, "max_tokens": 1, "temperature": 1.0}
    response = await http.post(f"{url}/v1/completions", json=body, headers=AUTH)
    return {"status": response.status_code, "message": response.json()["error"]["message"][:160]}


async def big_tokenizes(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Any:
    body = {"prompt": "word " * 380_000, "return_token_strs": True}  # 1.9 MB
    responses = await asyncio.gather(*(http.post(f"{url}/tokenize", json=body, headers=headers) for _ in range(4)))
    return sorted({r.status_code for r in responses})


async def made_up_methods(url: str, count: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as http:
        before = len((await http.get(f"{url}/metrics")).content)
        for index in range(count):
            await http.request(f"X{index:08d}", f"{url}/v1/models")
        after = len((await http.get(f"{url}/metrics")).content)
    return {"requests": count, "metrics_bytes_before": before, "metrics_bytes_after": after}


def seconds_until_closed(url: str, payload: bytes) -> dict[str, Any]:
    """Send `payload`, then nothing: when the server answers or closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(payload)
        conn.settimeout(120)
        started = time.perf_counter()
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
        return {"closed_after_s": round(time.perf_counter() - started, 2), "answer": answer.split(b"\r\n")[0].decode()}


async def http_reproductions(url: str, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    rss = psutil.Process(server.pid).memory_info
    async with httpx.AsyncClient(timeout=300) as http:
        idle = statistics.median([await chat_seconds(http, url) for _ in range(5)])
        report["chat_idle_s"] = round(idle, 3)
        before = rss().rss / 2**20
        report["n_times_prompts"] = await beside(http, url, many_completions(http, url))
        report["n_times_prompts"] |= {"rss_mb_before": round(before, 1), "rss_mb_after": round(rss().rss / 2**20, 1)}
        keyless = await http.post(f"{url}/tokenize", json={"prompt": "word " * 1000, "return_token_strs": True})
        report["tokenize_without_key"] = keyless.status_code
        report["tokenize_with_key"] = await beside(http, url, big_tokenizes(http, url, AUTH))
    report["made_up_methods"] = await made_up_methods(url, 3000)
    report["stalled_body"] = seconds_until_closed(
        url,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b'\r\nContent-Length: 100\r\n\r\n{"pr',
    )
    report["half_sent_headers"] = seconds_until_closed(url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return report


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server, url, grpc_target = start(args.model, workdir / "vdiff.log")
    try:
        wait_healthy(url, server)
        before = stub_rss_mb(server, "diffusion_denoise")
        grpc = {field: grpc_refusal(grpc_target, field) for field in ("steps", "block_length")}
        time.sleep(2)
        grpc |= {"stub_rss_mb_before": before, "stub_rss_mb_after": stub_rss_mb(server, "diffusion_denoise")}
        report = {"grpc": grpc} | asyncio.run(http_reproductions(url, server))
        report["healthy_at_the_end"] = httpx.get(f"{url}/health", timeout=10).status_code
    finally:
        server.terminate()
        report_exit = server.wait(120)
    return report | {"exit_code_on_sigterm": report_exit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vdiff-demo")
    parser.add_argument("--out", type=Path, default=Path("perf/results/adversarial_demo.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vdiff-adversarial-") as workdir:
        report = {"command": "python perf/adversarial.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        report |= run(args, Path(workdir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
