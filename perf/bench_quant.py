"""bitsandbytes quantization side by side: float32, bfloat16, LLM.int8 (8-bit) and NF4 (4-bit).

    python perf/bench_quant.py [--device cpu|cuda] [--per-family 50]
        [--variants float32,bfloat16,8bit,nf4] [--skip-demo] [--skip-realistic]
        [--realistic-dir DIR] [--repeats 5] [--batch16-repeats 2] [--serving-rounds 2]
        [--out perf/results/quant_cpu]

The 8-bit and NF4 variants quantize the blocks' linear layers at load (`LLM(quantization=...)`,
`load_model(quantization=...)`) and keep everything else (embeddings, norms, the LM head and the
activations) in bfloat16.

1. The demo model (vdiff-demo): the held-out problems of vdiff/training/demo_task.py answered
   with the model's default SamplingParams, one request at a time (accuracy per family, tokens/s,
   as bench_quality.py's "default:"), then the whole sample queued at once in an engine with
   16 requests in flight (tokens/s). The variants take turns: one problem per family at a time
   for the first, whole passes (--serving-rounds) for the second.
2. A random LLaDA as wide as real ones: d_model 2048, 16 heads of 128, MLP 3 x 2048, 4 layers,
   LLaDA-8B's 126,464 embedding rows (tools/make_tiny_model.py, cached in --realistic-dir).
   Each variant loads in its own fresh process (its load time, bytes and RSS are its alone);
   the processes then take turns timing the step an engine runs on a new request: the blocks
   over one canvas of 64 prompt + 256 masked tokens, then the LM head on the 256 answer rows
   gathered as the engine gathers them, (N, d_model) (median of --repeats after a warm-up), and
   the same over 16 canvases (median of --batch16-repeats).
3. The targets: 8-bit within 1 point of bfloat16's mean accuracy, NF4 within 3; the blocks'
   linear weights at most 0.55x (8-bit) and 0.30x (NF4) of bfloat16's bytes.

Writes OUT.json and OUT.md (the machine and this command in their header).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from statistics import median
from typing import Any, cast

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from make_tiny_model import make_tiny_model, parse_args  # noqa: E402
from vdiff import LLM, SamplingParams  # noqa: E402
from vdiff.models import load_model  # noqa: E402
from vdiff.models.base import DiffusionLM  # noqa: E402
from vdiff.models.quantization import QuantizationFlags, linear_weight_bytes  # noqa: E402
from vdiff.models.registry import native_architecture  # noqa: E402
from vdiff.training.demo_task import (  # noqa: E402
    FAMILIES,
    Problem,
    accuracy_by_family,
    held_out_set,
)

MB = 1e6
SERVING_CONCURRENCY = 16
PROMPT_TOKENS, ANSWER_TOKENS, WIDE_BATCH = 64, 256, 16
# LLaDA-8B's head size (128), MLP ratio (3x) and embedding rows, at 2048 wide and 4 layers
REALISTIC_SHAPE = {"layers": 4, "hidden": 2048, "heads": 16, "intermediate": 6144}
EMBEDDING_ROWS = 126464
# targets against bfloat16: accuracy drop in points, blocks' linear bytes as a fraction
ACCURACY_TARGETS = {"8bit": 1.0, "nf4": 3.0}
BYTES_TARGETS = {"8bit": 0.55, "nf4": 0.30}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # as --variants spells it
    label: str
    dtype: str  # the model's dtype; for the quantized ones, of everything left unquantized
    quantization: str | None  # LLM's `quantization`

    def flags(self) -> QuantizationFlags | None:
        return QuantizationFlags.parse(self.quantization)


VARIANTS = {
    v.name: v
    for v in (
        Variant("float32", "float32", "float32", None),
        Variant("bfloat16", "bfloat16", "bfloat16", None),
        Variant("8bit", "8-bit LLM.int8 (rest bf16)", "bfloat16", "bitsandbytes-8bit"),
        Variant("nf4", "NF4 (rest bf16)", "bfloat16", "bitsandbytes"),
    )
}


def rotated(items: Sequence[Variant], turn: int) -> list[Variant]:
    """Who goes first changes every turn, so no variant always runs right after another."""
    shift = turn % len(items)
    return [*items[shift:], *items[:shift]]


def within_round(times: dict[str, list[float]], name: str, base: str) -> float | None:
    """The median over rounds of one variant's figure over the base's in the same round."""
    if name not in times or base not in times:
        return None
    return median(a / b for a, b in zip(times[name], times[base], strict=True))


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --- 1. the demo model --------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """One variant's answers and the time they took."""

    replies: dict[int, str] = dataclasses.field(default_factory=dict)  # problem index -> reply
    tokens: list[int] = dataclasses.field(default_factory=list)  # per turn
    nfe: list[int] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    first_answer_s: float = 0.0  # the warm-up answer, before any timed turn


def demo_llm(args: argparse.Namespace, variant: Variant, max_num_seqs: int) -> LLM:
    return LLM(
        model=args.model,
        dtype=variant.dtype,
        device=args.device,
        max_num_seqs=max_num_seqs,
        quantization=variant.quantization,
    )


def ask(llm: LLM, question: str) -> tuple[str, int, int]:
    (output,) = llm.chat([{"role": "user", "content": question}], SamplingParams())
    return output.text, len(output.token_ids), output.nfe


def answer_turn(llm: LLM, tally: Tally, problems: dict[int, Problem]) -> None:
    """Some problems, one request at a time."""
    tokens = nfe = 0
    started = time.perf_counter()
    for index, problem in problems.items():
        tally.replies[index], answer_tokens, answer_nfe = ask(llm, problem.question)
        tokens, nfe = tokens + answer_tokens, nfe + answer_nfe
    tally.seconds.append(time.perf_counter() - started)
    tally.tokens.append(tokens)
    tally.nfe.append(nfe)


def serve_all(llm: LLM, tally: Tally, problems: list[Problem]) -> None:
    """Every problem queued at once; the engine keeps max_num_seqs of them in flight."""
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    started = time.perf_counter()
    outputs = llm.chat(conversations, SamplingParams())
    tally.seconds.append(time.perf_counter() - started)
    tally.tokens.append(sum(len(o.token_ids) for o in outputs))
    tally.nfe.append(sum(o.nfe for o in outputs))
    tally.replies = dict(enumerate(o.text for o in outputs))


def one_per_family(problems: list[Problem], per_family: int) -> list[dict[int, Problem]]:
    """held_out_set lists family by family; turn k takes each family's k-th problem."""
    families = len(problems) // per_family
    turns = [[f * per_family + k for f in range(families)] for k in range(per_family)]
    return [{i: problems[i] for i in turn} for turn in turns]


def accuracy(problems: list[Problem], tally: Tally) -> dict[str, float]:
    replies = [tally.replies[i] for i in range(len(problems))]
    scores = accuracy_by_family(problems, replies)
    return {family: round(value, 4) for family, value in scores.items()}


def tokens_per_s(tally: Tally) -> float:
    return sum(tally.tokens) / sum(tally.seconds)


def demo_pass(
    variants: Sequence[Variant],
    llms: dict[str, LLM],
    turns: Sequence[Callable[[LLM, Tally], None]],
) -> dict[str, Tally]:
    """Each turn run by every variant in rotating order, after one warm-up answer each."""
    tallies = {v.name: Tally() for v in variants}
    for name, llm in llms.items():
        started = time.perf_counter()
        ask(llm, "What is 1 + 1?")
        tallies[name].first_answer_s = time.perf_counter() - started
    started = time.perf_counter()
    for k, turn in enumerate(turns):
        for variant in rotated(variants, k):
            turn(llms[variant.name], tallies[variant.name])
        if (k + 1) % 10 == 0:
            elapsed = time.perf_counter() - started
            print(f"  turn {k + 1}/{len(turns)}, {elapsed:.0f} s", flush=True)
    return tallies


def demo_row(problems: list[Problem], alone: Tally, served: Tally) -> dict[str, Any]:
    tokens = sum(alone.tokens)
    return {
        "accuracy": accuracy(problems, alone),
        "nfe_per_token": round(sum(alone.nfe) / max(tokens, 1), 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens_per_s(alone), 1),  # all tokens / all seconds
        "tokens_per_s_turn_median": round(median(rates(alone)), 1),  # robust to a busy minute
        "tokens_per_s_turns": [round(rate, 1) for rate in rates(alone)],
        "mean_latency_s": round(sum(alone.seconds) / len(problems), 4),
        "first_answer_s": round(alone.first_answer_s, 3),
        "serving": {
            "accuracy": accuracy(problems, served),
            "nfe_per_token": round(sum(served.nfe) / max(sum(served.tokens), 1), 3),
            "tokens_per_s": round(tokens_per_s(served), 1),
            "tokens_per_s_rounds": [round(rate, 1) for rate in rates(served)],
        },
    }


def run_demo(args: argparse.Namespace, variants: Sequence[Variant]) -> dict[str, Any]:
    problems = held_out_set(args.per_family)
    chunks = one_per_family(problems, args.per_family)
    turns = [partial(answer_turn, problems=chunk) for chunk in chunks]
    alone = demo_pass(variants, {v.name: demo_llm(args, v, 1) for v in variants}, turns)
    print("demo, one at a time:", {n: round(tokens_per_s(t), 1) for n, t in alone.items()})
    serving = [partial(serve_all, problems=problems)] * args.serving_rounds
    llms = {v.name: demo_llm(args, v, SERVING_CONCURRENCY) for v in variants}
    served = demo_pass(variants, llms, serving)
    print("demo, 16 in flight:", {n: round(tokens_per_s(t), 1) for n, t in served.items()})
    rows = {v.name: demo_row(problems, alone[v.name], served[v.name]) for v in variants}
    for name, row in rows.items():  # within-turn ratios: tokens/s over bfloat16's
        row["tokens_per_s_vs_bf16"] = rounded(within_round(all_rates(alone), name, "bfloat16"))
        row["serving"]["vs_bf16"] = rounded(within_round(all_rates(served), name, "bfloat16"))
    return {"model": args.model, "per_family": args.per_family, "problems": len(problems),
            "serving_concurrency": SERVING_CONCURRENCY, "serving_rounds": args.serving_rounds,
            "rows": rows}  # fmt: skip


def rates(tally: Tally) -> list[float]:
    """Tokens/s of each turn."""
    return [k / s for k, s in zip(tally.tokens, tally.seconds, strict=True)]


def all_rates(tallies: dict[str, Tally]) -> dict[str, list[float]]:
    return {name: rates(tally) for name, tally in tallies.items()}


# --- 2. the realistic-width model ---------------------------------------------------------------


def realistic_model(directory: Path) -> Path:
    """The random 2048-wide LLaDA, written once (make_tiny_model's output is deterministic)."""
    config = directory / "config.json"
    if config.exists():
        found = json.loads(config.read_text())
        wanted = {"d_model": REALISTIC_SHAPE["hidden"], "n_layers": REALISTIC_SHAPE["layers"],
                  "n_heads": REALISTIC_SHAPE["heads"], "embedding_size": EMBEDDING_ROWS,
                  "mlp_hidden_size": REALISTIC_SHAPE["intermediate"]}  # fmt: skip
        if any(found.get(key) != value for key, value in wanted.items()):
            raise SystemExit(f"{directory} holds another model; pass an empty --realistic-dir")
        return directory
    shape = [f"--{key}={value}" for key, value in REALISTIC_SHAPE.items()]
    argv = ["--arch", "llada", "--out", str(directory), *shape]
    make_tiny_model(parse_args([*argv, f"--embedding-rows={EMBEDDING_ROWS}", "--dtype=bfloat16"]))
    return directory


def sizes(model: nn.Module) -> dict[str, float]:
    """MB of the blocks' linear weights (the quantized ones), the LM head, the embeddings and
    every parameter, bitsandbytes' statistics included."""
    heads = native_architecture("llada").head_modules  # type: ignore[union-attr]
    head = sum(linear_weight_bytes(model.get_submodule(name)) for name in heads)
    linear = linear_weight_bytes(model)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    rest = [p for p in model.parameters() if id(p) not in linear_weights]
    embedding = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    return {
        "blocks_linear_mb": (linear - head) / MB,
        "lm_head_mb": head / MB,
        "embedding_mb": sum(p.numel() * p.element_size() for p in embedding) / MB,
        "whole_model_mb": (linear + sum(p.numel() * p.element_size() for p in rest)) / MB,
    }


def canvases(batch: int, mask_id: int, device: str) -> torch.Tensor:
    seeded = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 380, (batch, PROMPT_TOKENS), generator=seeded)
    answer = torch.full((batch, ANSWER_TOKENS), mask_id)
    return torch.cat([prompt, answer], dim=1).to(device)


def synchronize(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.inference_mode()
def step(model: DiffusionLM, ids: torch.Tensor, device: str) -> dict[str, float]:
    """Seconds of the blocks over the whole canvases, and of the LM head on the answer rows as
    the engine runs it: on the rows gathered into one (N, d_model) matrix."""
    started = synchronize(device)
    hidden = model.hidden_states(ids)
    body = synchronize(device)
    model.head(hidden[:, PROMPT_TOKENS:].reshape(-1, hidden.shape[-1]))
    return {"body_s": body - started, "head_s": synchronize(device) - body}


def memory(device: str) -> dict[str, float]:
    """Peak and current resident memory of this process (and on CUDA, torch's allocations).
    The peak is Linux's VmHWM: ru_maxrss keeps the parent's peak across fork and exec."""
    out = resident()
    if "peak_rss_mb" not in out:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    if device.startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / MB
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated() / MB
    return out


def resident() -> dict[str, float]:
    """Resident MB: the peak, and now: all, anonymous (allocated) and file-backed (mapped
    checkpoint pages)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines)
           if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}  # fmt: skip
    names = {"VmHWM": "peak_rss_mb", "VmRSS": "rss_mb", "RssAnon": "rss_anon_mb",
             "RssFile": "rss_file_mb"}  # fmt: skip
    return {names[k]: 1024 * v / MB for k, v in kib.items()}


def worker(conn: Connection, path: str, variant: Variant, device: str, threads: int) -> None:
    """One variant in its own process: load, report, then time steps when asked."""
    try:
        torch.set_num_threads(threads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            flags = variant.flags()
            model = load_model(path, dtype=variant.dtype, device=device, quantization=flags)
            loaded = {"load_s": time.perf_counter() - started, **sizes(model), **memory(device)}
            conn.send(loaded)
            lm = cast(DiffusionLM, model)
            for command, batch in iter(conn.recv, ("stop", 0)):
                if command == "step":
                    ids = canvases(batch, lm.mask_token_id or 0, device)
                    conn.send(step(lm, ids, device))
                else:
                    notices = sorted({str(w.message) for w in caught})
                    conn.send({**memory(device), "warnings": notices})
    except Exception:  # the parent waits on this pipe: tell it rather than hang it
        conn.send({"error": traceback.format_exc()})


class Worker:
    """The parent's end of one variant's process."""

    def __init__(self, args: argparse.Namespace, path: Path, variant: Variant) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: its RSS is its own
        self.conn, child = context.Pipe()
        config = (child, str(path), variant, args.device, args.threads)
        self.process = context.Process(target=worker, args=config, daemon=True)
        self.process.start()
        self.first_step_s = 0.0  # the warm-up step
        self.loaded = self.receive()

    def receive(self) -> dict[str, Any]:
        reply: dict[str, Any] = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"worker failed:\n{reply['error']}")
        return reply

    def ask(self, command: str, batch: int = 0) -> dict[str, Any]:
        self.conn.send((command, batch))
        return self.receive()

    def stop(self) -> None:
        self.conn.send(("stop", 0))
        self.process.join(timeout=60)


def time_steps(
    workers: dict[str, Worker], variants: Sequence[Variant], batch: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Every variant's step at `batch`, `rounds` times, the variants taking turns."""
    times: dict[str, dict[str, list[float]]] = {v.name: {} for v in variants}
    for turn in range(rounds):
        for variant in rotated(variants, turn):
            for part, seconds in workers[variant.name].ask("step", batch).items():
                times[variant.name].setdefault(part, []).append(seconds)
    return times


def run_realistic(args: argparse.Namespace, variants: Sequence[Variant]) -> dict[str, Any]:
    directory = Path(args.realistic_dir or Path(tempfile.gettempdir()) / "vdiff-bench-quant-llada")
    path = realistic_model(directory)
    workers = {}
    try:
        for variant in variants:  # one at a time, so each load has the machine to itself
            workers[variant.name] = Worker(args, path, variant)
            print(variant.name, "loaded:", _short(workers[variant.name].loaded), flush=True)
        for name, parts in time_steps(workers, variants, 1, 1).items():  # warm-up
            workers[name].first_step_s = sum(seconds for (seconds,) in parts.values())
        one = time_steps(workers, variants, 1, args.repeats)
        after_one = {name: w.ask("stats") for name, w in workers.items()}
        wide = time_steps(workers, variants, WIDE_BATCH, args.batch16_repeats)
        after_wide = {name: w.ask("stats") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.stop()
    after = (after_one, after_wide)
    rows = {v.name: realistic_row(v.name, workers, one, wide, *after) for v in variants}
    add_ratios(rows, one, wide)
    return {"path": str(path), "shape": {**REALISTIC_SHAPE, "embedding_rows": EMBEDDING_ROWS},
            "canvas": {"prompt": PROMPT_TOKENS, "answer": ANSWER_TOKENS}, "repeats": args.repeats,
            "batch16_repeats": args.batch16_repeats, "rows": rows}  # fmt: skip


def realistic_row(
    name: str,
    workers: dict[str, Worker],
    one: dict[str, dict[str, list[float]]],
    wide: dict[str, dict[str, list[float]]],
    after_one: dict[str, dict[str, Any]],
    after_wide: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    load = {key: round(value, 3) for key, value in workers[name].loaded.items()}
    row: dict[str, Any] = {"load": load, "first_step_s": round(workers[name].first_step_s, 3)}
    row["after_batch1"] = after_one[name]
    row["after_batch16"] = after_wide[name]
    row["warnings"] = row["after_batch16"].pop("warnings", [])
    row["after_batch1"].pop("warnings", None)
    steps = whole_steps(one[name])
    row["batch1_ms"] = {"body": 1e3 * median(one[name]["body_s"]),
                        "head": 1e3 * median(one[name]["head_s"]), "step": 1e3 * median(steps),
                        "step_rounds": [round(1e3 * s, 1) for s in steps]}  # fmt: skip
    if wide[name]:
        wide_steps = whole_steps(wide[name])
        row["batch16_ms"] = {"body": 1e3 * median(wide[name]["body_s"]),
                             "head": 1e3 * median(wide[name]["head_s"]),
                             "step": 1e3 * median(wide_steps),
                             "step_rounds": [round(1e3 * s, 1) for s in wide_steps]}  # fmt: skip
    return row


def add_ratios(
    rows: dict[str, dict[str, Any]],
    one: dict[str, dict[str, list[float]]],
    wide: dict[str, dict[str, list[float]]],
) -> None:
    """Each variant over bfloat16: bytes and peak RSS, and times within each round."""
    steps = {name: whole_steps(parts) for name, parts in one.items()}
    wide_steps = {name: whole_steps(parts) for name, parts in wide.items() if parts}
    base = rows.get("bfloat16")
    for name, row in rows.items():
        ratios: dict[str, float | None] = {
            "blocks_linear": _ratio(row, base, "load", "blocks_linear_mb"),
            "whole_model": _ratio(row, base, "load", "whole_model_mb"),
            "peak_rss": _ratio(row, base, "after_batch1", "peak_rss_mb"),
            "step_batch1": rounded(within_round(steps, name, "bfloat16")),
            "body_batch1": rounded(within_round(_part(one, "body_s"), name, "bfloat16")),
            "step_batch16": rounded(within_round(wide_steps, name, "bfloat16")),
            "body_batch16": rounded(within_round(_part(wide, "body_s"), name, "bfloat16")),
        }
        row["vs_bf16"] = ratios


def whole_steps(parts: dict[str, list[float]]) -> list[float]:
    return [b + h for b, h in zip(parts["body_s"], parts["head_s"], strict=True)]


def _part(times: dict[str, dict[str, list[float]]], part: str) -> dict[str, list[float]]:
    return {name: parts[part] for name, parts in times.items() if part in parts}


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, group: str, key: str) -> float | None:
    return None if base is None else round(row[group][key] / base[group][key], 3)


def _short(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in values.items()}


# --- 3. targets and the report ------------------------------------------------------------------


def targets(demo: dict[str, Any] | None, realistic: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each target against bfloat16: the measured figure, the limit, pass or miss, the margin."""
    out = []
    demo_rows = demo["rows"] if demo else {}
    if "bfloat16" in demo_rows:
        base = 100 * demo_rows["bfloat16"]["accuracy"]["mean"]
        for name, points in ACCURACY_TARGETS.items():
            if name in demo_rows:
                drop = base - 100 * demo_rows[name]["accuracy"]["mean"]
                out.append(_target(f"{name} mean accuracy drop vs bf16 (points)", drop, points))
    real_rows = realistic["rows"] if realistic else {}
    if "bfloat16" in real_rows:
        for name, limit in BYTES_TARGETS.items():
            if name in real_rows:
                ratio = real_rows[name]["vs_bf16"]["blocks_linear"]
                out.append(_target(f"{name} blocks' linear bytes / bf16", ratio, limit))
    return out


def _target(what: str, value: float, limit: float) -> dict[str, Any]:
    return {"target": what, "value": round(value, 3), "limit": limit,
            "met": value <= limit, "margin": round(limit - value, 3)}  # fmt: skip


def demo_markdown(demo: dict[str, Any]) -> list[str]:
    rows: dict[str, dict[str, Any]] = demo["rows"]
    families = [f for f in FAMILIES if f in next(iter(rows.values()))["accuracy"]]
    lines = [
        f"### {demo['model']}: {demo['problems']} held-out problems, default SamplingParams",
        "",
        f"One request at a time in turns of one problem per family ({demo['per_family']} turns), "
        f"then {demo['serving_concurrency']} in flight ({demo['serving_rounds']} passes of the "
        "whole sample); the variants take turns in rotating order. Accuracy is the first's; "
        "'mean acc. there' is the batched answers'. 'first answer' is the warm-up answer:",
        "",
        "| variant | " + " | ".join(families) + " | mean | NFE/token | "
        "tokens/s, 1 at a time (all / median of turns) | "
        f"vs bf16 | tokens/s, {demo['serving_concurrency']} in flight | vs bf16 | "
        "mean acc. there | first answer s |",
        "|---" * (len(families) + 9) + "|",
    ]
    for name, row in rows.items():
        serving, acc = row["serving"], row["accuracy"]
        cells = [f"{100 * acc[f]:.0f}" for f in families]
        lines.append(
            f"| {VARIANTS[name].label} | " + " | ".join(cells) + f" | {100 * acc['mean']:.1f} | "
            f"{row['nfe_per_token']:.2f} | {row['tokens_per_s']:.1f} / "
            f"{row['tokens_per_s_turn_median']:.1f} | "
            f"{_x(row['tokens_per_s_vs_bf16'])} | {serving['tokens_per_s']:.1f} | "
            f"{_x(serving['vs_bf16'])} | {100 * serving['accuracy']['mean']:.1f} | "
            f"{row['first_answer_s']:.2f} |"
        )
    return lines


def realistic_markdown(real: dict[str, Any], device: str) -> list[str]:
    shape, cuda = real["shape"], device == "cuda"
    cuda_column = " CUDA peak |" if cuda else ""
    lines = [
        f"### Random LLaDA, d_model {shape['hidden']}, {shape['layers']} layers, "
        f"{shape['heads']} heads of {shape['hidden'] // shape['heads']}, MLP "
        f"{shape['intermediate']}, {shape['embedding_rows']} embedding rows",
        "",
        "Weights (MB, bitsandbytes' statistics included) and this process's resident memory "
        "(MB): after loading, and the peak after the steps on 1 and on "
        f"{WIDE_BATCH} canvases" + (", and torch's peak CUDA allocation" if cuda else "") + ":",
        "",
        "| variant | load s | blocks' linear | vs bf16 | LM head | embedding | whole model | "
        "RSS loaded (anon + file) | peak RSS, 1 | vs bf16 | peak RSS, 16 |" + cuda_column,
        "|---" * (11 + cuda) + "|",
    ]
    for name, row in real["rows"].items():
        lines.append(memory_line(name, row, cuda))
    return [*lines, "", *timing_markdown(real)]


def memory_line(name: str, row: dict[str, Any], cuda: bool) -> str:
    load, ratio = row["load"], row["vs_bf16"]
    one, wide = row["after_batch1"], row["after_batch16"]
    extra = f" {wide.get('cuda_max_allocated_mb', 0.0):.0f} |" if cuda else ""
    return (
        f"| {VARIANTS[name].label} | {load['load_s']:.1f} | {load['blocks_linear_mb']:.1f} | "
        f"{_x(ratio['blocks_linear'], 3)} | {load['lm_head_mb']:.1f} | "
        f"{load['embedding_mb']:.1f} | {load['whole_model_mb']:.1f} | {_rss(load)} | "
        f"{one['peak_rss_mb']:.0f} | {_x(ratio['peak_rss'])} | {wide['peak_rss_mb']:.0f} |{extra}"
    )


def timing_markdown(real: dict[str, Any]) -> list[str]:
    canvas, wide = real["canvas"], real["batch16_repeats"]
    lines = [
        f"Step of an engine on new requests, ms: the blocks over {canvas['prompt']} prompt + "
        f"{canvas['answer']} masked tokens, the LM head on the {canvas['answer']} answer rows; "
        f"1 canvas: median of {real['repeats']} after a warm-up (the first step)"
        + (f"; {WIDE_BATCH} canvases: median of {wide}:" if wide else ":"),
        "",
        "| variant | first step | blocks | head | step | step vs bf16 | blocks vs bf16 | "
        f"blocks, {WIDE_BATCH} | head, {WIDE_BATCH} | step, {WIDE_BATCH} | vs bf16 | "
        f"blocks vs bf16, {WIDE_BATCH} |",
        "|---" * 12 + "|",
    ]
    for name, row in real["rows"].items():
        lines.append(timing_line(name, row))
    return lines


def timing_line(name: str, row: dict[str, Any]) -> str:
    one, ratio = row["batch1_ms"], row["vs_bf16"]
    wide = row.get("batch16_ms")
    cells = ["-"] * 3 if wide is None else [f"{wide[k]:.0f}" for k in ("body", "head", "step")]
    return (
        f"| {VARIANTS[name].label} | {1e3 * row['first_step_s']:.0f} | {one['body']:.0f} | "
        f"{one['head']:.0f} | {one['step']:.0f} | {_x(ratio['step_batch1'])} | "
        f"{_x(ratio['body_batch1'])} | " + " | ".join(cells) + f" | {_x(ratio['step_batch16'])} | "
        f"{_x(ratio['body_batch16'])} |"
    )


def targets_markdown(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | limit | result | margin |", "|---|---|---|---|---|"]
    for c in checks:
        verdict = "pass" if c["met"] else "MISS"
        lines.append(f"| {c['target']} | {c['value']:.3f} | <= {c['limit']} | {verdict} | "
                     f"{c['margin']:+.3f} |")  # fmt: skip
    return lines


def _rss(memory: dict[str, float]) -> str:
    anon, file = memory.get("rss_anon_mb"), memory.get("rss_file_mb")
    split = "" if anon is None or file is None else f" ({anon:.0f} + {file:.0f})"
    return f"{memory.get('rss_mb', 0.0):.0f}{split}"


def _x(ratio: float | None, digits: int = 2) -> str:
    return "-" if ratio is None else f"{ratio:.{digits}f}x"


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [report["header"], "", NOTE, ""]
    if report["demo"]:
        lines += [*demo_markdown(report["demo"]), ""]
    if report["realistic"]:
        lines += [*realistic_markdown(report["realistic"], args.device), ""]
    if report["targets"]:
        lines += ["### Targets (against bfloat16)", "", *targets_markdown(report["targets"]), ""]
    notices = sorted({w for r in (report["realistic"] or {}).get("rows", {}).values()
                      for w in r["warnings"]})  # fmt: skip
    if notices:
        lines += ["Warnings raised in the realistic runs:", "", *[f"- {w}" for w in notices], ""]
    return "\n".join(lines)


NOTE = (
    "8-bit and NF4 quantize the blocks' linear layers with bitsandbytes at load; the "
    "embeddings, norms, LM head and activations stay bfloat16 (NF4 computes in bfloat16). "
    "Ratios are to bfloat16; times are medians of ratios taken within each round."
)


def machine(device: str) -> str:
    import bitsandbytes

    where = torch.cuda.get_device_name() if device == "cuda" else processor_name()
    return (f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}")  # fmt: skip


def processor_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def command() -> str:
    return " ".join(["python perf/bench_quant.py", *sys.argv[1:]])


def variant_list(text: str) -> list[Variant]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: variants are among {', '.join(VARIANTS)}")
    return [VARIANTS[name] for name in names]


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--per-family", type=int, default=50, help="held-out demo problems per family")
    p.add_argument("--variants", type=variant_list, default=list(VARIANTS.values()),
                   help=f"comma-separated, among {','.join(VARIANTS)}")  # fmt: skip
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-realistic", action="store_true")
    p.add_argument("--realistic-dir", default=None, help="where the 2048-wide model is cached")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, batch 1")
    p.add_argument("--batch16-repeats", type=int, default=2, help="at 16 canvases (0: skip)")
    p.add_argument("--serving-rounds", type=int, default=2, help="demo passes at 16 in flight")
    p.add_argument("--model", default="vdiff-demo")
    p.add_argument("--threads", type=int, default=2, help="torch threads (on CPU)")
    p.add_argument("--out", default=str(ROOT / "perf/results/quant_cpu"), help="path, no suffix")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants
    demo = None if args.skip_demo else run_demo(args, variants)
    realistic = None if args.skip_realistic else run_realistic(args, variants)
    report = {"header": f"bitsandbytes quantization on {machine(args.device)}; "
              f"command: {command()}", "command": command(), "machine": machine(args.device),
              "device": args.device, "variants": [dataclasses.asdict(v) for v in variants],
              "demo": demo, "realistic": realistic,
              "targets": targets(demo, realistic)}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report, args)
    Path(f"{args.out}.md").write_text(text)
    print(text)
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
