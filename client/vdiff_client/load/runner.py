"""`vdiff-load`: a bounded headless Locust run against an OpenAI endpoint, summarized as JSON.

    vdiff-load --host http://127.0.0.1:8000 --users 8 --run-time 30s --max-tokens 32 --out load.json

Locust runs in a subprocess (`python -m locust -f locustfile.py --headless ...`) so that gevent's
monkey-patching never touches the caller. The Locust process writes its raw samples when it quits
and the report takes p50/p90/p99 from them. Exit status: 0 when no request failed (429/503
rejections are not failures), 1 when some did, 2 when the run could not happen.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vdiff_client.load.options import (
    API_KEY_ENV,
    SAMPLES_OPTION,
    add_load_options,
    load_option_argv,
    remote_host_refusal,
)
from vdiff_client.load.results import Tally, build_report

LOCUSTFILE = Path(__file__).with_name("locustfile.py")  # a path, never imported here (gevent)
TIMESPAN = re.compile(r"(\d+)([hms]?)")
SECONDS = {"h": 3600, "m": 60, "s": 1, "": 1}
SPARE_S = 120  # past run time and stop timeout: Locust's start-up and shutdown


class LoadRunError(RuntimeError):
    """The Locust run did not happen or left no samples."""


def timespan_seconds(text: str) -> int:
    """'90', '90s', '2m', '1h30m' -> seconds."""
    parts = TIMESPAN.findall(text.strip().lower())
    if not parts or "".join(number + unit for number, unit in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"not a time span: {text!r} (for example 30s, 2m, 1h30m)")
    return sum(int(number) * SECONDS[unit] for number, unit in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdiff-load", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="the server's base URL (loopback only)")
    parser.add_argument("--users", "-u", type=int, default=8, help="concurrent closed-loop users")
    parser.add_argument("--spawn-rate", "-r", type=float, default=0.0, help="users started per second (0: all)")
    parser.add_argument("--run-time", "-t", type=timespan_seconds, default=30, help="30s, 2m, ...")
    parser.add_argument("--stop-timeout", type=int, default=30, help="seconds requests in flight get to finish")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here (default: stdout)")
    parser.add_argument("--quiet", action="store_true", help="show Locust's output only when the run fails")
    add_load_options(parser)
    return parser


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the report records about the run (never the API key)."""
    settings = {key: value for key, value in vars(args).items() if key not in ("api_key", "out", "quiet")}
    return settings | {"spawn_rate": args.spawn_rate or args.users}


def locust_command(args: argparse.Namespace, samples: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", args.host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate or args.users),
        "--run-time", f"{args.run_time}s", "--stop-timeout", str(args.stop_timeout),
        SAMPLES_OPTION, str(samples), *load_option_argv(args),
    ]  # fmt: skip


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """Runs Locust headless with these arguments and returns the report; raises LoadRunError."""
    if refusal := remote_host_refusal(args.host, args.allow_remote):
        raise LoadRunError(refusal)
    with tempfile.TemporaryDirectory(prefix="vdiff-load-") as workdir:
        samples = Path(workdir) / "samples.json"
        limit = args.run_time + args.stop_timeout + SPARE_S
        try:
            env = os.environ | ({API_KEY_ENV: args.api_key} if args.api_key else {})
            command = locust_command(args, samples)
            done = subprocess.run(command, env=env, timeout=limit, capture_output=args.quiet, text=True)
        except subprocess.TimeoutExpired as error:
            raise LoadRunError(f"Locust did not finish within {limit} s") from error
        if not samples.exists():
            output = (done.stdout or "") + (done.stderr or "")
            raise LoadRunError(f"Locust exited with status {done.returncode} and wrote no samples\n{output[-3000:]}")
        report = build_report(Tally.read(samples), run_settings(args))
    return report | {"locust_exit_code": done.returncode}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_load(args)
    except LoadRunError as error:
        print(f"vdiff-load: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    # Locust's own status also counts errors raised inside a user, which no failure counter sees
    return 1 if report["failures"]["total"] or report["locust_exit_code"] else 0


if __name__ == "__main__":
    sys.exit(main())
