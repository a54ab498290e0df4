"""Engine throughput at 1, 4 and 16 concurrent requests against the reference loop and the bare forward.

    python perf/bench_engine.py [--arch llada|dream] [--vocab 8192] [--dtype float32|bfloat16] [--rounds 7]
                                [--out perf/results/engine_cpu.json]

A tiny model (4 layers, 256 wide, 448 or --vocab rows), fixed seed, prompts of mixed lengths, temperature 0 and
full_canvas, so every configuration does the same work: `steps` forwards per request. The
reference loop is the test oracle (one full forward per step, one request at a time); t_fwd(B)
is the bare model forward over the same padded batches the engine runs, as many times. Each
configuration runs once per round, rounds interleaved; figures are medians over rounds and ratios
are taken within a round, then the median, because this machine is shared and its speed drifts.
The engine also runs in batch-invariant mode at 1 and 16 requests (`invariant_c*`): its cost is
the time ratio to the default mode at the same concurrency, and its tokens at 16 must equal its
tokens at 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]
from make_tiny_model import make_tiny_model, parse_args  # noqa: E402
from oracles import dream_reference, llada_reference  # noqa: E402
from vdiff import LLM, SamplingParams  # noqa: E402


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or resident set size sampled every 10 ms."""

    def __init__(self) -> None:
        self.peak, self._running = 0, False

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()

    def _sample(self) -> None:
        while self._running:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            self.peak = max(self.peak, pages * 4096)
            time.sleep(0.01)


def timed(fn: Callable[[], Any]) -> tuple[float, Any, int]:
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return seconds, result, memory.peak


def bare_forwards(llm: LLM, prompts: list[list[int]], gen: int, batch: int) -> Callable[[], None]:
    """The engine's forwards without the engine: `gen` forwards of each padded batch of `batch` canvases."""
    mask_id = llm.tokenizer.special.mask
    batches = []
    for i in range(0, len(prompts), batch):
        canvases = [torch.tensor(p + [mask_id] * gen) for p in prompts[i : i + batch]]
        ids = torch.nn.utils.rnn.pad_sequence(canvases, batch_first=True, padding_value=0)
        keep = torch.arange(ids.shape[1]) < torch.tensor([len(c) for c in canvases])[:, None]
        batches.append((ids, None if batch == 1 else keep))

    @torch.inference_mode()
    def run() -> None:
        for ids, keep in batches:
            for _ in range(gen):
                llm.model(ids, attention_mask=keep)

    return run


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--arch", choices=["llada", "dream"], default="llada")
    cli.add_argument("--requests", type=int, default=32)
    cli.add_argument("--max-tokens", type=int, default=32)
    cli.add_argument("--rounds", type=int, default=7)
    cli.add_argument("--vocab", type=int, help="vocabulary rows (default 448; 8192 gives LLaDA-8B's vocab/width of 32)")
    cli.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    cli.add_argument("--out", type=Path, default=ROOT / "perf/results/engine_cpu.json")
    args = cli.parse_args()
    rng, gen = random.Random(0), args.max_tokens
    model_dir = Path(tempfile.mkdtemp()) / "bench-model"
    tiny = ["--layers", "4", "--hidden", "256", "--heads", "4", "--intermediate", "688", "--seed", "0"]
    tiny += ["--embedding-rows", str(args.vocab)] if args.vocab else []
    make_tiny_model(parse_args(["--arch", args.arch, "--out", str(model_dir), *tiny]))
    prompts = [[rng.randrange(1, 380) for _ in range(rng.randrange(8, 33))] for _ in range(args.requests)]
    algorithm = "low_confidence" if args.arch == "llada" else "entropy"
    params = SamplingParams(max_tokens=gen, steps=gen, algorithm=algorithm, temperature=0.0, full_canvas=True, seed=0)
    llm = LLM(model=model_dir, dtype=args.dtype)
    invariant = LLM(model=model_dir, dtype=args.dtype, batch_invariant=True)
    mask = llm.tokenizer.special.mask
    if args.arch == "llada":
        oracle = partial(llada_reference, llm.model, mask_id=mask, steps=gen, gen_length=gen, block_length=gen)
    else:
        oracle = partial(dream_reference, llm.model, mask_id=mask, steps=gen, gen_length=gen, alg=algorithm)

    def engine(concurrency: int, which: LLM = llm) -> list[list[int]]:
        which.engine.scheduler.max_num_seqs = concurrency
        return [o.token_ids for o in which.generate(prompts, params)]

    runs: dict[str, Callable[[], Any]] = {"reference": lambda: [oracle(p) for p in prompts]}
    runs |= {f"engine_c{c}": partial(engine, c) for c in (1, 4, 16)}
    runs |= {f"invariant_c{c}": partial(engine, c, invariant) for c in (1, 16)}
    runs |= {f"forward_b{b}": bare_forwards(llm, prompts, gen, b) for b in (1, 16)}
    expected = runs["reference"]()  # also the warm-up
    alone = runs["invariant_c1"]()  # batch-invariant mode's own tokens, which no batch may change
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    peak = dict.fromkeys(runs, 0)
    same = dict.fromkeys(runs, True)
    for _ in range(args.rounds):  # rounds interleave the configurations: this is a shared, noisy machine
        for name, run in runs.items():
            elapsed, tokens, memory = timed(run)
            seconds[name].append(elapsed)
            peak[name] = max(peak[name], memory)
            target = alone if name.startswith("invariant") else expected
            same[name] &= name.startswith("forward") or tokens == target
    total = args.requests * gen  # full_canvas: every request makes gen tokens in `steps` = gen forwards
    lines: dict[str, dict[str, Any]] = {}
    for name in runs:
        concurrency = 1 if name == "reference" else int(name.split("_")[1][1:])
        mid = median(seconds[name])
        lines[name] = {"tok_s": total / mid, "step_ms": 1e3 * mid * concurrency / total, "peak_mb": peak[name] / 2**20}
        lines[name]["round_spread"] = max(seconds[name]) / min(seconds[name]) - 1  # slowest round over fastest
        if name.startswith("invariant"):
            lines[name] |= {"nfe_per_token": 1.0, "equals_invariant_c1": same[name]}
        elif not name.startswith("forward"):
            lines[name] |= {"nfe_per_token": 1.0, "equals_reference": same[name]}

    def per_round(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(seconds[a], seconds[b], strict=True)]

    # ratios taken within each round, then the median: a slow minute hits both sides of a ratio
    c16_gain, forward_gain = per_round("engine_c1", "engine_c16"), per_round("forward_b1", "forward_b16")
    lines["targets"] = {
        "c1_vs_reference": median(per_round("reference", "engine_c1")),  # target >= 1
        "c1_step_over_t_fwd_1": median(per_round("engine_c1", "forward_b1")),  # target <= 1.25
        "c16_gain": median(c16_gain),
        "forward_gain_16": median(forward_gain),
        "c16_gain_over_forward_gain": median(g / f for g, f in zip(c16_gain, forward_gain, strict=True)),  # >= 1
        "invariant_cost_c1": median(per_round("invariant_c1", "engine_c1")),  # time ratio, batch-invariant mode
        "invariant_cost_c16": median(per_round("invariant_c16", "engine_c16")),
    }
    for name, line in lines.items():
        print(f"{name:12s}", "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    setup = {"arch": args.arch, "vocab": llm.engine.vocab_size, "requests": args.requests, "max_tokens": gen}
    setup |= {"dtype": args.dtype}
    setup |= {"rounds": args.rounds, "torch": torch.__version__, **machine}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, **lines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
