"""A real scale-out on one machine: `vdiff` replicas behind HAProxy, with Locust load through it,
a rolling restart under load, then a crash under load.

    python perf/scale_out.py [--model vdiff-demo] [--users 8] [--run-time 200] [--before 20]
        [--crash-run-time 40] [--max-tokens 32] [--out perf/results/scale_out]

Two replicas (`vdiff` with its own tritonserver each) start on loopback ports, and HAProxy with
deploy/haproxy/haproxy.cfg (health checks on /health, retries of a draining replica's 503) in
front of them. Then:

1. Rolling restart: `vdiff-load` runs through the balancer for --run-time seconds. After --before
   seconds, replica A gets SIGTERM; once it has exited a new A starts on the same ports, and once
   that one is healthy the same happens to B. Recorded: requests sent, failed (the target is 0),
   rejected (the 503s clients saw), retried and redispatched by the balancer, generated tokens per
   second before, during and after the restart (from the replicas' own counters), and each
   replica's drain time (SIGTERM to exit).
2. Crash: a second load run; after a third of it, replica B's process group gets SIGKILL.
   Recorded: what the clients saw (failures, by reason), how many requests B had in flight then
   (the most that may fail), and how long until the balancer marked B down.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))
from bench_load import wait_healthy  # noqa: E402
from bench_triton import read_counters  # noqa: E402

from vdiff.serve.cli import triton_port_flags  # noqa: E402
from vdiff.serve.launcher import ServerAddress, free_loopback_address  # noqa: E402
from vdiff_client.load.runner import build_parser, run_load  # noqa: E402

HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
GENERATED = "vllm:generation_tokens_total"
SAMPLE_S = 0.5  # how often the replicas' token counters are read


@dataclass
class Replica:
    """One `vdiff` on fixed loopback ports, so that a restarted one is where the balancer expects it."""

    name: str
    model: str
    workdir: Path
    http_port: int = field(default_factory=lambda: free_loopback_address().http_port)
    triton: ServerAddress = field(default_factory=free_loopback_address)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.starts += 1
        workdir = self.workdir / f"{self.name}-{self.starts}"
        flags = ["--max-num-seqs", "8", "--max-queue-size", "16", "--torch-num-threads", "1",
                 "--shutdown-timeout", "30", "--disable-uvicorn-access-log", "--workdir", str(workdir)]  # fmt: skip
        address = ["--host", "127.0.0.1", "--port", str(self.http_port), *triton_port_flags(self.triton)]
        command = [sys.executable, "-m", "vdiff.serve.cli", "--model", self.model, *address, *flags]
        log = (self.workdir / f"{self.name}-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self) -> None:
        wait_healthy(self.url, self.process, timeout_s=300)

    def drain(self) -> dict[str, Any]:
        """SIGTERM and wait for the exit: the drain's seconds and the exit status."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        return {"drain_s": round(time.monotonic() - started, 2), "exit_code": code}

    def crash(self) -> None:
        """SIGKILL to the whole process group: vdiff, tritonserver and the stubs, as a node loss."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def generated_tokens(self) -> float | None:
        """vllm:generation_tokens_total from its /metrics (None while nothing listens)."""
        try:
            return read_counters(f"{self.url}/metrics", (GENERATED,), timeout_s=2)[GENERATED]
        except OSError:
            return None


class Balancer:
    """HAProxy with the example configuration, on loopback ports, in the foreground."""

    def __init__(self, replicas: list[Replica], workdir: Path) -> None:
        self.port = free_loopback_address().http_port
        self.stats_port = free_loopback_address().http_port
        env = os.environ | {
            "VDIFF_LB_BIND": f"127.0.0.1:{self.port}",
            "VDIFF_LB_STATS": f"127.0.0.1:{self.stats_port}",
            **{f"VDIFF_{r.name.upper()}": f"127.0.0.1:{r.http_port}" for r in replicas},
        }
        log = (workdir / "haproxy.log").open("wb")
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(HAPROXY_CONFIG)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def servers(self) -> dict[str, dict[str, str]]:
        """The stats CSV rows of the backend's servers and of the backend itself ("BACKEND")."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as response:
            text = response.read().decode().lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "vdiff"}

    def wait_status(self, server: str, status: str, timeout_s: float) -> float:
        """Seconds until `server` shows `status` (UP, DOWN) on the stats page."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(OSError):
                if self.servers()[server]["status"].startswith(status):
                    return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"HAProxy did not mark {server} {status} within {timeout_s} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class TokenMeter(threading.Thread):
    """Samples every replica's generated-token counter; a restarted replica's counter starts at 0."""

    def __init__(self, replicas: list[Replica]) -> None:
        super().__init__(daemon=True)
        self.replicas = replicas
        self.samples: list[tuple[float, float]] = []  # (time.monotonic(), tokens generated so far)
        self.stopped = threading.Event()

    def run(self) -> None:
        last: dict[str, float] = {}
        total = 0.0
        while not self.stopped.is_set():
            for replica in self.replicas:
                value = replica.generated_tokens()
                if value is None:
                    continue
                previous = last.get(replica.name, 0.0)
                total += value - previous if value >= previous else value  # reset: a new process
                last[replica.name] = value
            self.samples.append((time.monotonic(), total))
            self.stopped.wait(SAMPLE_S)

    def rate(self, start: float, end: float) -> float:
        """Generated tokens per second between two times."""
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return round((n1 - n0) / (t1 - t0), 1)


def load_args(args: argparse.Namespace, url: str, run_time: int) -> argparse.Namespace:
    argv = ["--host", url, "--users", str(args.users), "--run-time", f"{run_time}s", "--quiet",
            "--max-tokens", str(args.max_tokens), "--ignore-eos",
            "--non-stream-share", "0.2"]  # fmt: skip
    return build_parser().parse_args(argv)


def load_in_background(args: argparse.Namespace, url: str, run_time: int) -> Future[dict[str, Any]]:
    """`vdiff-load` through the balancer on another thread; its report (or its error) when done."""
    pool = ThreadPoolExecutor(max_workers=1)
    load = pool.submit(run_load, load_args(args, url, run_time))
    pool.shutdown(wait=False)  # its one thread ends with the load
    return load


def load_outcome(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": report["requests"]["total"],
        "succeeded": report["requests"]["succeeded"],
        "failed": report["failures"]["total"],
        "failures_by_reason": report["failures"]["by_reason"],
        "rejected": report["rejections"]["by_status"],
        "output_tokens_per_s": report["throughput"]["output_tokens_per_s"],
    }


def retries(balancer: Balancer) -> dict[str, int]:
    backend = balancer.servers()["BACKEND"]
    return {"retried": int(backend["wretr"] or 0), "redispatched": int(backend["wredis"] or 0)}


def rolling_restart(args: argparse.Namespace, replicas: list[Replica], balancer: Balancer) -> dict[str, Any]:
    meter = TokenMeter(replicas)
    meter.start()
    before_retries = retries(balancer)
    started = time.monotonic()
    load = load_in_background(args, balancer.url, args.run_time)
    time.sleep(args.before)
    restart_started = time.monotonic()
    drains = {}
    for replica in replicas:
        drains[replica.name] = replica.drain()
        replica.start()
        replica.wait_healthy()
        balancer.wait_status(replica.name, "UP", timeout_s=30)
    restart_ended = time.monotonic()
    report = load.result()
    ended = time.monotonic()
    meter.stopped.set()
    after_retries = retries(balancer)
    return {
        "load": load_outcome(report),
        "balancer": {k: after_retries[k] - before_retries[k] for k in after_retries},
        "drains": drains,
        "restart_s": round(restart_ended - restart_started, 1),
        "after_s": round(ended - restart_ended, 1),
        "tokens_per_s": {
            "before": meter.rate(started + 2, restart_started),  # the first 2 s: users still arriving
            "during": meter.rate(restart_started, restart_ended),
            "after": meter.rate(restart_ended, ended - 2),
        },
    }


def crash(args: argparse.Namespace, replicas: list[Replica], balancer: Balancer) -> dict[str, Any]:
    load = load_in_background(args, balancer.url, args.crash_run_time)
    time.sleep(args.crash_run_time / 3)
    victim = replicas[-1]
    in_flight = int(balancer.servers()[victim.name]["scur"] or 0)
    victim.crash()
    marked_down_s = balancer.wait_status(victim.name, "DOWN", timeout_s=30)
    report = load.result()
    return {
        "killed": victim.name,
        "in_flight_on_it": in_flight,
        "marked_down_after_s": round(marked_down_s, 2),
        "load": load_outcome(report),
    }


def markdown(report: dict[str, Any]) -> str:
    restart, crashed = report["rolling_restart"], report["crash"]
    load, rates = restart["load"], restart["tokens_per_s"]
    lines = [
        f"# Scale-out: {report['replicas']} replicas of {report['model']} behind HAProxy",
        "",
        f"Command: `{report['command']}`; {report['users']} users, {report['machine']}.",
        "",
        "| drill | requests | failed | 503s seen by clients | retried / redispatched by HAProxy |",
        "|---|---|---|---|---|",
        f"| rolling restart | {load['requests']} | {load['failed']} | {load['rejected'].get('503', 0)} | "
        f"{restart['balancer']['retried']} / {restart['balancer']['redispatched']} |",
        f"| crash (kill -9 {crashed['killed']}) | {crashed['load']['requests']} | {crashed['load']['failed']} | "
        f"{crashed['load']['rejected'].get('503', 0)} | - |",
        "",
        f"Generated tokens/s: {rates['before']} before, {rates['during']} during the restart "
        f"({restart['restart_s']} s), {rates['after']} after. Drain times: "
        + ", ".join(f"{name} {d['drain_s']} s (exit {d['exit_code']})" for name, d in restart["drains"].items())
        + ".",
        "",
        f"Crash: {crashed['in_flight_on_it']} requests were in flight on {crashed['killed']}; "
        f"{crashed['load']['failed']} failed ({crashed['load']['failures_by_reason']}); HAProxy marked it "
        f"down after {crashed['marked_down_after_s']} s.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vdiff-demo")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--run-time", type=int, default=200, help="seconds of load around the rolling restart")
    p.add_argument("--before", type=int, default=20, help="seconds of load before the first SIGTERM")
    p.add_argument("--crash-run-time", type=int, default=40, help="seconds of load around the crash")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "perf" / "results" / "scale_out"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vdiff-scale-out-") as work:
        workdir = Path(work)
        replicas = [Replica("a", args.model, workdir), Replica("b", args.model, workdir)]
        balancer = None
        try:
            for replica in replicas:
                replica.start()
            for replica in replicas:
                replica.wait_healthy()
            balancer = Balancer(replicas, workdir)
            for replica in replicas:
                balancer.wait_status(replica.name, "UP", timeout_s=30)
            report = {
                "command": " ".join(["python perf/scale_out.py", *sys.argv[1:]]),
                "model": args.model,
                "replicas": len(replicas),
                "users": args.users,
                "machine": f"{os.cpu_count()} cores, loopback",
                "rolling_restart": rolling_restart(args, replicas, balancer),
                "crash": crash(args, replicas, balancer),
            }
        finally:
            if balancer is not None:
                balancer.stop()
            for replica in replicas:
                if replica.process is not None and replica.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(replica.process.pid, signal.SIGKILL)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["rolling_restart"]["load"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
