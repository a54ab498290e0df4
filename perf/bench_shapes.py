"""The engine at a real vocabulary: step time and peak memory with LLaDA-8B's 126,464-token head.

    python perf/bench_shapes.py [--in-flight 1 8] [--label after] [--out perf/results/shapes_cpu.json]

A random LLaDA with LLaDA-8B's vocabulary (126,464 rows), d_model 512, 2 layers, float32, written
once by tools/make_tiny_model.py under --workdir. Each run is a fresh process (peak RSS is per
process): N requests of a 64-token prompt and 256 generated tokens in blocks of 32, one token
per step, and the mean time of the steps of the first block once all N run, then each part's
share of the CPU time of four more steps (torch.profiler: LM head, other vocabulary-wide ops, the
rest). `--label` names the runs in the JSON, so that a run of an older checkout
(PYTHONPATH=that/checkout) and of this one sit side by side: the issue's "before" and "after".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPE = ["--arch", "llada", "--layers", "2", "--hidden", "512", "--heads", "8", "--intermediate", "1536",
         "--embedding-rows", "126464", "--max-len", "512", "--dtype", "float32"]  # fmt: skip
PROMPT, GENERATED, BLOCK = 64, 256, 32
VOCAB = 126464
PROFILED_STEPS = 4  # profiled after the timed ones: the next block's first, the same work a step
MATMULS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm"}


def one_run(model: str, in_flight: int) -> dict[str, Any]:
    """In this process: the engine with `in_flight` requests, the first block's mean step time."""
    import torch

    from vdiff import EngineConfig, SamplingParams
    from vdiff.engine import Engine

    torch.manual_seed(0)
    engine = Engine(EngineConfig(model=model, dtype="float32", max_num_seqs=in_flight))
    params = SamplingParams(max_tokens=GENERATED, block_length=BLOCK, steps=GENERATED, temperature=0.0)
    for _ in range(in_flight):
        prompt = torch.randint(10, 300, (PROMPT,)).tolist()
        engine.add_request(prompt, params)
    engine.step()  # admission and the first step, outside the timing
    started = time.perf_counter()
    for _ in range(BLOCK - 1):
        engine.step()
    step_s = (time.perf_counter() - started) / (BLOCK - 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the profiler's own
    shares = profile_shares(engine, PROFILED_STEPS)
    return {"in_flight": in_flight, "step_ms": round(step_s * 1000, 1), "peak_rss_mb": round(peak_mb),
            "shares": shares}  # fmt: skip


def profile_shares(engine: Any, steps: int) -> dict[str, float]:
    """Each part's share of the CPU time of `steps` more steps, from torch.profiler's op events:
    the LM head (matrix products with a vocabulary-wide operand), other vocabulary-wide ops
    (softmax, argmax, gather, copies over (N, V)), and the rest. Works on any checkout: it reads
    the ops' input shapes, not vdiff's code."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            engine.step()
    parts = {"lm_head": 0.0, "vocab_wide": 0.0, "rest": 0.0}
    for event in prof.events():
        shapes = [shape for shape in event.input_shapes if shape]
        wide = any(VOCAB in shape for shape in shapes)
        part = "rest" if not wide else "lm_head" if event.name in MATMULS else "vocab_wide"
        parts[part] += event.self_cpu_time_total
    total = sum(parts.values())
    return {name: round(value / total, 3) for name, value in parts.items()}


def checkpoint(workdir: Path) -> Path:
    path = workdir / "llada-8b-vocab"
    if not (path / "config.json").is_file():
        tool = Path(__file__).resolve().parent.parent / "tools" / "make_tiny_model.py"
        subprocess.run([sys.executable, str(tool), *SHAPE, "--out", str(path)], check=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--label", default="after")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-shapes"))
    parser.add_argument("--out", type=Path, default=Path("perf/results/shapes_cpu.json"))
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args(argv)
    model = checkpoint(args.workdir)
    if args.one is not None:
        print(json.dumps(one_run(str(model), args.one)))
        return
    runs = []
    for in_flight in args.in_flight:
        child = [sys.executable, __file__, "--workdir", str(args.workdir), "--one", str(in_flight)]
        output = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        print(args.label, runs[-1], flush=True)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report[args.label] = {"command": "python perf/bench_shapes.py " + " ".join(argv or sys.argv[1:]), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
