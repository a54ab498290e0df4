"""APD's throughput with many requests in flight: the demo model and its trained verifier.

    python perf/bench_apd.py [--label after] [--rounds 3] [--out perf/results/apd_cpu.json]

Each configuration generates answers to the first N held-out chat prompts at temperature 0 with
`max_num_seqs` = in flight, in this process, after one warm-up pass; the figures are the median
over rounds. `--label` names the runs in the JSON, so that a run of an older checkout
(PYTHONPATH=that/checkout python that/checkout/perf/bench_apd.py --label before) and of this one
sit side by side, and `tokens_sha` shows whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "R0.7": {"apd_mixture_weight": 0.7},
    "R0.7-W4-M8": {"apd_mixture_weight": 0.7, "apd_kv_window": 4, "apd_max_lookahead": 8},
}


def measure(in_flight: int, prompts: int, rounds: int, max_tokens: int, threads: int) -> list[dict[str, Any]]:
    import torch

    from vdiff import LLM, SamplingParams
    from vdiff.training.demo_task import held_out_set

    torch.set_num_threads(threads)
    llm = LLM(model="vdiff-demo", verifier="vdiff-demo-ar", dtype="float32", max_num_seqs=in_flight)
    chats = [[{"role": "user", "content": p.question}] for p in held_out_set(prompts)]
    ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat)) for chat in chats]
    results = []
    for name, fields in SETTINGS.items():
        params = SamplingParams(algorithm="apd", temperature=0.0, max_tokens=max_tokens, **fields)
        llm.generate(ids, params)  # warm-up
        times, outputs = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            outputs = llm.generate(ids, params)
            times.append(time.perf_counter() - started)
        tokens = sum(len(o.token_ids) for o in outputs)
        digest = hashlib.sha256(json.dumps([o.token_ids for o in outputs]).encode()).hexdigest()[:16]
        seconds = statistics.median(times)
        results.append({
            "setting": name, "in_flight": in_flight, "prompts": len(ids), "tokens": tokens,
            "threads": threads, "forwards": sum(o.nfe for o in outputs), "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "tokens_sha": digest,
        })  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/apd_cpu.json")
    args = parser.parse_args(argv)
    runs = [r for n in args.in_flight for r in measure(n, args.prompts, args.rounds, args.max_tokens, args.threads)]
    for run in runs:
        print(args.label, json.dumps(run))
    existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
    existing[args.label] = runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(existing, indent=1) + "\n")


if __name__ == "__main__":
    main()
