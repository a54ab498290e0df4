"""APD's throughput with many requests in flight: the demo model and its trained verifier.

    python perf/bench_apd.py [--baseline /tmp/before] [--rounds 5] [--out perf/results/apd_cpu.json]

Each configuration (two APD settings, at 1 and 16 in flight) answers the first N held-out chat
prompts at temperature 0, after one warm-up pass. Each round is a fresh process per checkout:
with `--baseline PATH` (another checkout of vdiff, for example `git worktree add /tmp/before
COMMIT`) the baseline's round and this checkout's alternate, in ABBA order, and the speed-up is
the median of the per-round ratios, since this shared machine's speed drifts between rounds.
`tokens_sha` shows whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "R0.7": {"apd_mixture_weight": 0.7},
    "R0.7-W4-M8": {"apd_mixture_weight": 0.7, "apd_kv_window": 4, "apd_max_lookahead": 8},
}


def one_round(in_flight: list[int], prompts: int, max_tokens: int, threads: int) -> list[dict[str, Any]]:
    """In this process: every configuration once, after a warm-up."""
    import torch

    import vdiff
    from vdiff import LLM, SamplingParams
    from vdiff.training.demo_task import held_out_set

    torch.set_num_threads(threads)
    checkout = str(Path(vdiff.__file__).parent.parent)
    results = []
    for count in in_flight:
        llm = LLM(model="vdiff-demo", verifier="vdiff-demo-ar", dtype="float32", max_num_seqs=count)
        chats = [[{"role": "user", "content": p.question}] for p in held_out_set(prompts)]
        ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat)) for chat in chats]
        for name, fields in SETTINGS.items():
            params = SamplingParams(algorithm="apd", temperature=0.0, max_tokens=max_tokens, **fields)
            llm.generate(ids, params)  # warm-up
            started = time.perf_counter()
            outputs = llm.generate(ids, params)
            seconds = time.perf_counter() - started
            tokens = sum(len(o.token_ids) for o in outputs)
            results.append({
                "setting": name, "in_flight": count, "prompts": len(ids), "tokens": tokens,
                "forwards": sum(o.nfe for o in outputs), "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1), "checkout": checkout,
                "tokens_sha": hashlib.sha256(json.dumps([o.token_ids for o in outputs]).encode()).hexdigest()[:16],
            })  # fmt: skip
    return results


def run_round(checkout: Path | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One round in a fresh process, importing vdiff from `checkout` (None: this one)."""
    env = dict(os.environ, PYTHONPATH=str(checkout or ROOT))  # first on the path, before any install
    command = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--prompts", str(args.prompts),
               "--max-tokens", str(args.max_tokens), "--in-flight", *map(str, args.in_flight)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def summary(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for i, first in enumerate(rounds[0]):
        speeds = [r[i]["tokens_per_s"] for r in rounds]
        seconds = statistics.median(r[i]["seconds"] for r in rounds)
        rows.append({**first, "seconds": seconds, "tokens_per_s": statistics.median(speeds), "rounds": speeds})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout of vdiff to compare against")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts", type=int, default=64, help="held-out problems per family (six families)")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/apd_cpu.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_round(args.in_flight, args.prompts, args.max_tokens, args.threads)))
        return
    ours, theirs = [], []
    for number in range(args.rounds):
        if args.baseline is not None and number % 2:  # ABBA: neither checkout always runs first
            ours.append(run_round(None, args))
            theirs.append(run_round(args.baseline, args))
        else:
            if args.baseline is not None:
                theirs.append(run_round(args.baseline, args))
            ours.append(run_round(None, args))
        base = [r["tokens_per_s"] for r in theirs[-1]] if theirs else []
        print(f"round {number + 1}: tokens/s {[r['tokens_per_s'] for r in ours[-1]]}, baseline {base}")
    report: dict[str, Any] = {"setup": vars(args) | {"out": str(args.out), "baseline": str(args.baseline)}}
    report["this"] = summary(ours)
    if theirs:
        report["baseline"] = summary(theirs)
        report["speedup"] = [
            {"setting": mine[0]["setting"], "in_flight": mine[0]["in_flight"],
             "same_tokens": all(m["tokens_sha"] == t["tokens_sha"] for m, t in zip(mine, base, strict=True)),
             "ratio": round(statistics.median(m["tokens_per_s"] / t["tokens_per_s"]
                                              for m, t in zip(mine, base, strict=True)), 2)}
            for mine, base in zip(zip(*ours, strict=True), zip(*theirs, strict=True), strict=True)
        ]  # fmt: skip
        for row in report["speedup"]:
            print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
