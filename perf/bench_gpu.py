"""The engine at real scale: an LLaDA-8B-shaped model with random bf16 weights, built on the GPU.

    python perf/bench_gpu.py [--device cuda] [--layers 32] [--d-model 4096] [--heads 32]
                             [--mlp-hidden 12288] [--vocab 126464] [--requests 1,16] [--steps 64]
                             [--variants bfloat16,nf4] [--budget-s 170] [--out PREFIX]

Why: every other benchmark here runs tiny models on a CPU. This one measures what the engine
costs at LLaDA-8B's published shape (d_model 4096, 32 layers, 32 heads, MLP 12288, 126,464
embedding rows) without its 16 GB checkpoint: the weights are random (the modules' own init,
seed 0), made on the device in bfloat16, and never touch the disk. The engine reads the config,
generation config and tokenizer from a scratch directory: tools/make_tiny_model.py's, with
config.json rewritten to the 8B shape and no weight file (Checkpoint.open reads no weights).

Per variant (bfloat16; nf4: the same model's block linears quantized in place by bitsandbytes,
embeddings, norms and LM head kept) and per concurrency (--requests in flight, admitted
together): prompts of 64 random tokens, max_tokens 256, block 32, LLaDA's low_confidence
schedule with --steps steps (default 64: 8 per block, 4 tokens per step), temperature 0 and
ignore_eos, so every request runs its whole schedule whatever the random logits propose. Each
run follows a warm-up of 3 steps at the same shapes. Recorded: engine step time (median, mean),
generated tokens/s (requests x max_tokens / the run's wall time), peak GPU memory
(torch.cuda.max_memory_allocated over the run), and the bare batched forward of the same rows:
hidden states of the (requests, 320) canvases plus the LM head on one block of each (what any
step computes at least), and the full forward with the head on every row. engine/bare is the
engine's step over the bare forward: its scheduling, candidate head, strategy and commits.

NF4 runs after bf16 only while the elapsed time leaves room within --budget-s (else a printed
reason); results are written after every row, so a run cut short keeps what it measured.
On a CPU, tiny sizes make a smoke test: --device cpu --layers 1 --d-model 256 --heads 4
--mlp-hidden 512 --vocab 4096 --steps 8 --max-tokens 32 --block 16 --prompt 16.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean, median
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_tiny_model import make_tiny_model, parse_args  # noqa: E402
from vdiff import Engine, EngineConfig, SamplingParams  # noqa: E402
from vdiff.models.configs import LLaDAConfig  # noqa: E402
from vdiff.models.layers import flash_attn_functions  # noqa: E402
from vdiff.models.llada import LLaDAModelLM  # noqa: E402

WARMUP_STEPS = 3
GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """The model's shape; the defaults are LLaDA-8B-Instruct's published config.json."""

    layers: int = 32
    d_model: int = 4096
    heads: int = 32
    mlp_hidden: int = 12288
    vocab: int = 126464

    def config(self, tiny: dict[str, Any]) -> dict[str, Any]:
        """The tiny checkpoint's config.json (its special token ids kept) at this shape."""
        sizes = {"d_model": self.d_model, "n_heads": self.heads, "n_kv_heads": self.heads}
        sizes |= {"n_layers": self.layers, "mlp_hidden_size": self.mlp_hidden}
        sizes |= {"vocab_size": self.vocab, "embedding_size": self.vocab}
        return tiny | sizes | {"max_sequence_length": 4096, "torch_dtype": "bfloat16"}


@dataclass(frozen=True)
class Workload:
    prompt: int = 64
    max_tokens: int = 256
    block: int = 32
    steps: int = 64

    @property
    def canvas(self) -> int:
        return self.prompt + self.max_tokens

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, block_length=self.block, steps=self.steps,
            algorithm="low_confidence", temperature=0.0, ignore_eos=True,
        )  # fmt: skip


@dataclass
class Row:
    variant: str
    requests: int
    steps: int
    step_ms_median: float
    step_ms_mean: float
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_gib: float | None
    bare_forward_ms: float
    full_forward_ms: float
    engine_over_bare: float


def scaffold(root: Path, shape: Shape) -> Path:
    """A model directory with the tokenizer and configs the engine reads, and no weights."""
    out = make_tiny_model(parse_args(["--arch", "llada", "--out", str(root / "llada-8b-shape")]))
    config_file = out / "config.json"
    config_file.write_text(json.dumps(shape.config(json.loads(config_file.read_text())), indent=2))
    (out / "model.safetensors").unlink()
    return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(model_dir: Path, device: torch.device) -> LLaDAModelLM:
    """The architecture at the directory's shape, its parameters made on `device` in bf16."""
    config = LLaDAConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = LLaDAModelLM(config)
    return model.eval().requires_grad_(False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall milliseconds of `fn` after two warm-up calls, the device drained around each."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


@torch.inference_mode()
def bare_forwards_ms(
    model: LLaDAModelLM,
    work: Workload,
    requests: int,
    repeats: int,
) -> tuple[float, float]:
    """(hidden states + the head on one block of each row, the full forward), median ms."""
    device = next(model.parameters()).device
    ids = torch.randint(0, 380, (requests, work.canvas), device=device)
    block = slice(work.prompt, work.prompt + work.block)

    def block_head() -> None:
        hidden = model.hidden_states(ids)
        model.head(hidden[:, block].reshape(-1, hidden.shape[-1]))

    return median_ms(block_head, device, repeats), median_ms(lambda: model(ids), device, repeats)


def prompts(count: int, length: int, mask_id: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    ids = torch.randint(1, 380, (count, length), generator=generator)
    return [[t if t != mask_id else t + 1 for t in row] for row in ids.tolist()]


def warm_up(engine: Engine, work: Workload, requests: int) -> None:
    """A few steps at the measured shapes (kernels chosen, allocator grown), then aborted."""
    mask_id = engine.tokenizer.special.mask
    ids = [engine.add_request(p, work.params()) for p in prompts(requests, work.prompt, mask_id)]
    for _ in range(WARMUP_STEPS):
        engine.step()
    for request_id in ids:
        engine.abort(request_id)
    engine.step()  # the abort notices


Run = tuple[list[float], int, float, float | None]


def run_engine(engine: Engine, work: Workload, requests: int) -> Run:
    """(step seconds, generated tokens, wall seconds, peak GiB or None off CUDA) of one run."""
    device = engine.runner.device
    warm_up(engine, work, requests)
    for prompt in prompts(requests, work.prompt, engine.tokenizer.special.mask):
        engine.add_request(prompt, work.params())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, tokens = [], 0
    synchronize(device)
    start = time.perf_counter()
    while engine.has_unfinished():
        begin = time.perf_counter()
        outputs = engine.step()
        synchronize(device)
        steps.append(time.perf_counter() - begin)
        tokens += sum(len(o.token_ids) for o in outputs if o.finished)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return steps, tokens, wall, peak


def measure(engine: Engine, variant: str, work: Workload, requests: int, repeats: int) -> Row:
    steps, tokens, wall, peak = run_engine(engine, work, requests)
    model = engine.model
    assert isinstance(model, LLaDAModelLM)
    bare, full = bare_forwards_ms(model, work, requests, repeats)
    step_ms = 1e3 * median(steps)
    return Row(
        variant, requests, len(steps), round(step_ms, 3), round(1e3 * mean(steps), 3), tokens,
        round(wall, 3), round(tokens / wall, 1), None if peak is None else round(peak, 3),
        round(bare, 3), round(full, 3), round(step_ms / bare, 3),
    )  # fmt: skip


def quantize_nf4(model: LLaDAModelLM, device: torch.device) -> None:
    """The blocks' linear layers to bitsandbytes NF4, in place, as --quantization bitsandbytes
    does at load. quantize_linear_layers documents CPU weights; 4-bit layers (Params4bit)
    quantize whatever device the weight is on, so the GPU-resident model works too."""
    from vdiff.models.quantization import (
        Quantization,
        quantize_linear_layers,
        quantized_module_names,
    )
    from vdiff.models.registry import native_architecture

    plan = Quantization(bits=4, quant_type="nf4")
    architecture = native_architecture("llada")
    assert architecture is not None
    names = quantized_module_names(model, plan, architecture.head_modules)
    quantize_linear_layers(model, plan, names, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def nf4_unavailable(device: torch.device) -> str | None:
    """Why the NF4 rows cannot run here, or None."""
    from vdiff.models import ModelLoadError
    from vdiff.models.quantization import DEVICES, bitsandbytes

    if device.type not in DEVICES:
        return f"bitsandbytes does not run on {device.type}"
    try:
        bitsandbytes()  # imports it, with vdiff's filter on its known notices
    except (ModelLoadError, ImportError, RuntimeError) as error:
        return f"bitsandbytes is not usable here ({error})"
    return None


def environment(device: torch.device) -> dict[str, Any]:
    flash = flash_attn_functions() is not None
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    info["attention"] = "flash-attn" if flash and device.type == "cuda" else "SDPA"
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def markdown(report: dict[str, Any]) -> str:
    env, shape, work = report["environment"], report["shape"], report["workload"]
    where = env.get("gpu") or env.get("cpu")
    scale = "LLaDA-8B shape" if shape == asdict(Shape()) else "a reduced LLaDA shape"
    lines = [
        f"# Engine at {scale} on {where} ({env['attention']}, torch {env['torch']})",
        "",
        f"Model: {shape['layers']} layers, d_model {shape['d_model']}, {shape['heads']} heads, "
        f"MLP {shape['mlp_hidden']}, vocabulary {shape['vocab']}; random weights, bf16.",
        f"Requests: prompt {work['prompt']} + {work['max_tokens']} tokens, block {work['block']}, "
        f"{work['steps']} steps (low_confidence, temperature 0, ignore_eos).",
        "",
        "| variant | requests | steps | step ms (median) | tokens/s | peak GiB | bare fwd ms "
        "| full fwd ms | engine/bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['requests']} | {r['steps']} | {r['step_ms_median']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {peak} | {r['bare_forward_ms']:.1f} "
            f"| {r['full_forward_ms']:.1f} | {r['engine_over_bare']:.2f} |"
        )
    lines += [f"- skipped {s['variant']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=Shape.layers, help="fewer for a dry run")
    parser.add_argument("--d-model", type=int, default=Shape.d_model)
    parser.add_argument("--heads", type=int, default=Shape.heads)
    parser.add_argument("--mlp-hidden", type=int, default=Shape.mlp_hidden)
    parser.add_argument("--vocab", type=int, default=Shape.vocab, help="embedding and LM-head rows")
    parser.add_argument("--prompt", type=int, default=Workload.prompt)
    parser.add_argument("--max-tokens", type=int, default=Workload.max_tokens)
    parser.add_argument("--block", type=int, default=Workload.block)
    parser.add_argument("--steps", type=int, default=Workload.steps, help="all blocks together")
    parser.add_argument("--requests", default="1,16", help="concurrencies, comma-separated")
    parser.add_argument("--variants", default="bfloat16,nf4", help="bfloat16 and/or nf4")
    parser.add_argument("--repeats", type=int, default=5, help="timed bare forwards per row")
    parser.add_argument("--budget-s", type=float, default=170.0, help="NF4 starts only within it")
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/gpu_scale")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= {"bfloat16", "nf4"} or variants[0] != "bfloat16":
        parser.error("--variants: bfloat16 first, then optionally nf4 (quantizes the bf16 model)")
    return args


def nf4_skip_reason(device: torch.device, started: float, budget_s: float) -> str | None:
    """Why NF4 is left out (bitsandbytes missing, or over half the budget spent), or None."""
    elapsed = time.perf_counter() - started
    if elapsed > budget_s / 2:
        return f"{elapsed:.0f} s spent of a {budget_s:.0f} s budget; NF4 would not fit"
    return nf4_unavailable(device)


def run_variants(args: argparse.Namespace, model_dir: Path, report: dict[str, Any]) -> None:
    """Build the model once, measure it in bf16, then (if it fits) quantized to NF4 in place."""
    started, device = time.perf_counter(), torch.device(args.device)
    work = Workload(args.prompt, args.max_tokens, args.block, args.steps)
    concurrencies = [int(n) for n in args.requests.split(",")]
    model = build_model(model_dir, device)
    synchronize(device)
    report["build_s"] = round(time.perf_counter() - started, 2)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"built {billions:.2f}B parameters on {device} in {report['build_s']} s", flush=True)
    config = EngineConfig(
        model=str(model_dir),
        dtype="bfloat16",
        device=str(device),
        max_num_seqs=max(concurrencies),
    )
    for variant in args.variants.split(","):
        if variant == "nf4":
            reason = nf4_skip_reason(device, started, args.budget_s)
            if reason is not None:
                print(f"skipped {variant}: {reason}", flush=True)
                report["skipped"].append({"variant": variant, "reason": reason})
                continue
            quantize_nf4(model, device)
        engine = Engine(config, model=model)
        for requests in concurrencies:
            row = measure(engine, variant, work, requests, args.repeats)
            print(json.dumps(asdict(row)), flush=True)
            report["rows"].append(asdict(row))
            write(report, args.out)  # a run cut short keeps its rows


def main() -> None:
    args = cli()
    started, device = time.perf_counter(), torch.device(args.device)
    shape = Shape(args.layers, args.d_model, args.heads, args.mlp_hidden, args.vocab)
    work = Workload(args.prompt, args.max_tokens, args.block, args.steps)
    report: dict[str, Any] = {"environment": environment(device), "shape": asdict(shape)}
    report |= {"workload": asdict(work), "rows": [], "skipped": []}
    with tempfile.TemporaryDirectory() as scratch:
        run_variants(args, scaffold(Path(scratch), shape), report)
    report["total_s"] = round(time.perf_counter() - started, 1)
    write(report, args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
