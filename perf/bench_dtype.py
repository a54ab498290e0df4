"""float32 against bfloat16 on this CPU: the forward of random LLaDA models of growing width.

    python perf/bench_dtype.py [--widths 128 256 512 1024 2048 4096] [--rounds 5] [--out perf/results/dtype_cpu]

Each width gets a 2-layer model (heads of 64, MLP about 2.7x wide, the tiny vocabulary), written by
tools/make_tiny_model.py. Per width and dtype it times the forward over one canvas and over 16
canvases of 96 tokens (one request and 16 in flight), the two dtypes interleaved within each
round; figures are medians over rounds, ratios (bf16 time / float32 time) are taken within a
round, then the median. `dtype="auto"` on a CPU with native bf16 picks bf16 from the width where
bf16 is faster at both batch sizes (vdiff/models/loader.py, AUTO_BF16_MIN_HIDDEN).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_tiny_model import make_tiny_model, parse_args  # noqa: E402
from vdiff.models import load_model  # noqa: E402
from vdiff.models.loader import cpu_has_fast_bf16  # noqa: E402

DTYPES = ("float32", "bfloat16")
BATCHES = (1, 16)
CANVAS = 96


def write_model(width: int, root: Path) -> Path:
    heads = max(2, width // 64)
    intermediate = -(-int(width * 2.7) // 64) * 64
    out = root / f"llada-{width}"
    shape = ["--hidden", str(width), "--heads", str(heads), "--intermediate", str(intermediate)]
    make_tiny_model(parse_args(["--arch", "llada", "--out", str(out), "--layers", "2", *shape]))
    return out


@torch.inference_mode()
def forward_ms(model: torch.nn.Module, ids: torch.Tensor, seconds: float = 1.0) -> float:
    """Median milliseconds of one forward over `ids`, repeated for about `seconds`."""
    model(ids)  # warm-up
    times: list[float] = []
    while sum(times) < seconds or len(times) < 3:
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


def measure(path: Path, rounds: int) -> dict[str, float]:
    models = {dtype: load_model(path, dtype=dtype, device="cpu") for dtype in DTYPES}
    inputs = {b: torch.randint(1, 300, (b, CANVAS), generator=torch.Generator().manual_seed(b)) for b in BATCHES}
    times: dict[str, list[float]] = {}
    for _ in range(rounds):  # the dtypes interleave: this is a shared machine whose speed drifts
        for batch, ids in inputs.items():
            for dtype, model in models.items():
                times.setdefault(f"{dtype}_b{batch}", []).append(forward_ms(model, ids))
    line = {name: median(values) for name, values in times.items()}
    for batch in BATCHES:
        pairs = zip(times[f"bfloat16_b{batch}"], times[f"float32_b{batch}"], strict=True)
        line[f"bf16_over_fp32_b{batch}"] = median(bf16 / fp32 for bf16, fp32 in pairs)
    return line


def markdown(results: dict[int, dict[str, float]], header: str) -> str:
    columns = ["hidden", "fp32 ms, 1", "bf16 ms, 1", "bf16/fp32, 1", "fp32 ms, 16", "bf16 ms, 16", "bf16/fp32, 16"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for width, r in results.items():
        cells = [f"{r[f'{d}_b{b}']:.1f}" for b in BATCHES for d in DTYPES]
        ratios = [f"{r[f'bf16_over_fp32_b{b}']:.2f}" for b in BATCHES]
        lines.append(f"| {width} | {cells[0]} | {cells[1]} | {ratios[0]} | {cells[2]} | {cells[3]} | {ratios[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--out", type=Path, default=ROOT / "perf/results/dtype_cpu")
    args = cli.parse_args()
    root = Path(tempfile.mkdtemp())
    results = {}
    for width in args.widths:
        results[width] = measure(write_model(width, root), args.rounds)
        print(width, {k: round(v, 3) for k, v in results[width].items()}, flush=True)
    machine = {"threads": torch.get_num_threads(), "native_bf16": cpu_has_fast_bf16(), "torch": torch.__version__}
    header = f"Forward ms, 2-layer LLaDA, canvas {CANVAS}, CPU {machine}; command: python perf/bench_dtype.py"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": machine, "results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, header))


if __name__ == "__main__":
    main()
