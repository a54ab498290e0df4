"""What the canvas stream costs the engine: the demo model's held-out questions with
`stream_canvas` off and on, in one process, interleaved.

    python perf/bench_canvas_stream.py [--per-family 20] [--rounds 3] [--modes off,on]
        [--out perf/results/canvas_stream.json]

For each decoding (the checkpoint's default, and one token per step) and each round, every mode
answers all questions twice: one request at a time, then all submitted at once (the engine
batches up to its max_num_seqs). Reported: generated tokens per second, the median over rounds,
and on / off. Mode `off` never names the field, so the same script times a checkout from before
the option existed (PYTHONPATH=that checkout python perf/bench_canvas_stream.py --modes off).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vdiff import LLM, SamplingParams  # noqa: E402
from vdiff.training.demo_task import held_out_set  # noqa: E402

DECODINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "one token per step": {"max_tokens": 72, "steps": 72, "block_length": 72},  # steps: no default rule
}


def params(decoding: str, mode: str) -> SamplingParams:
    fields: dict[str, Any] = {"temperature": 0.0, **DECODINGS[decoding]}
    if mode == "on":
        fields["stream_canvas"] = True
    return SamplingParams(**fields)


def tokens_per_s(llm: LLM, conversations: list[list[dict[str, str]]], p: SamplingParams, batched: bool) -> float:
    started = time.perf_counter()
    # all at once: the engine batches them; alone: one chat call each
    batch = [conversations] if batched else [[c] for c in conversations]
    outputs = [out for group in batch for out in llm.chat(group, p)]  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    return sum(len(o.token_ids) for o in outputs) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-family", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="off,on")
    parser.add_argument("--out", default=str(ROOT / "perf" / "results" / "canvas_stream.json"))
    args = parser.parse_args()
    modes = args.modes.split(",")
    llm = LLM("vdiff-demo")
    conversations = [[{"role": "user", "content": p.question}] for p in held_out_set(args.per_family)]
    samples: dict[str, list[float]] = {}
    for decoding in DECODINGS:
        for mode in modes:  # a warm-up of each pairing, not counted
            tokens_per_s(llm, conversations[:8], params(decoding, mode), batched=True)
        for _ in range(args.rounds):
            for mode in modes:
                for batched in (False, True):
                    key = f"{decoding} | {'batched' if batched else 'alone'} | {mode}"
                    rate = tokens_per_s(llm, conversations, params(decoding, mode), batched)
                    samples.setdefault(key, []).append(rate)
    medians = {key: round(statistics.median(values), 1) for key, values in samples.items()}
    report = {
        "command": " ".join(["python perf/bench_canvas_stream.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "dtype": str(next(llm.engine.model.parameters()).dtype),
        "questions": len(conversations),
        "tokens_per_s": medians,
        "samples": samples,
    }
    if "on" in modes and "off" in modes:
        report["on_vs_off"] = {
            key.rsplit(" | ", 1)[0]: round(medians[key] / medians[key.replace("| on", "| off")], 3)
            for key in medians
            if key.endswith("| on")
        }
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.out != "-":
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
