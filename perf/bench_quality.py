"""Accuracy against speed: decoding configurations on the demo task's held-out problems.

    python perf/bench_quality.py [--model vdiff-demo] [--verifier vdiff-demo-ar] [--per-family 50]
        [--configs "default:" "2/step:steps=20" ...] [--no-serving] [--device cpu] [--out PATH]

Every configuration answers the same fixed held-out sample (vdiff/training/demo_task.py, never
trained on) one request at a time through the offline engine, so latency is a single request's
and tokens/s is what one user sees, as the APD and Fast-dLLM papers report it. A configuration is
`NAME:field=value,...` over SamplingParams fields (steps, block_length, algorithm, max_tokens,
temperature, ...); an empty list after the colon is the model's own generation_config defaults.
`--verifier` loads APD's verifier (the `apd-*` configurations need it) and adds it alone
(greedy, transformers' generate) as a row.

Per configuration and family: exact-match accuracy; per configuration: NFE per generated token
(forwards / tokens up to and including EOS), generated tokens per second, mean latency. Then
(unless --no-serving) the default and the fastest configurations within 1 point of its accuracy
(overall, Fast-dLLM's rules, APD) answer the whole sample again with 16 requests in flight in one engine: throughput
under continuous batching. Writes OUT.json, OUT.md and OUT.png (mean accuracy against tokens/s,
the Pareto frontier drawn).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vdiff import LLM, SamplingParams  # noqa: E402
from vdiff.models.checkpoint import resolve_model_dir  # noqa: E402
from vdiff.training.demo_task import FAMILIES, Problem, accuracy_by_family, held_out_set  # noqa: E402

DEFAULT_CONFIGS = (
    "default:",  # one token per step, low-confidence remasking, greedy (the checkpoint's generation_config)
    "2/step:steps=20",
    "4/step:steps=10",
    "8/step:steps=5",
    "random-remask:algorithm=random",
    "blocks-of-8:block_length=8",
    # Fast-dLLM's parallel decoding, without and with its approximate KV caches (the checkpoint's
    # block is the whole 40-token answer, so its caches keep the prompt; blocks of 8 cache more)
    "threshold-0.7:threshold=0.7",
    "threshold-0.7+prefix:threshold=0.7,cache=prefix",
    "threshold-0.7+dual:threshold=0.7,cache=dual",
    "threshold-0.8:threshold=0.8",
    "threshold-0.8+prefix:threshold=0.8,cache=prefix",
    "threshold-0.8+dual:threshold=0.8,cache=dual",
    "threshold-0.9:threshold=0.9",
    "threshold-0.9+prefix:threshold=0.9,cache=prefix",
    "threshold-0.9+dual:threshold=0.9,cache=dual",
    "threshold-0.9+dual/8:threshold=0.9,cache=dual,block_length=8",
    "threshold-0.95:threshold=0.95",
    "threshold-0.99:threshold=0.99",
    "threshold-0.99+dual:threshold=0.99,cache=dual",
    "factor-1:factor=1",
    "factor-1+prefix:factor=1,cache=prefix",
    "factor-1+dual:factor=1,cache=dual",
    # APD (needs --verifier): R, then the lookahead M and the KV window W (APD's cache)
    "apd-R0.5:algorithm=apd,apd_mixture_weight=0.5",
    "apd-R0.7:algorithm=apd,apd_mixture_weight=0.7",
    "apd-R0.9:algorithm=apd,apd_mixture_weight=0.9",
    "apd-R0.7-M8:algorithm=apd,apd_mixture_weight=0.7,apd_max_lookahead=8",
    "apd-R0.7-W4:algorithm=apd,apd_mixture_weight=0.7,apd_kv_window=4",
    "apd-R0.7-W4-M8:algorithm=apd,apd_mixture_weight=0.7,apd_kv_window=4,apd_max_lookahead=8",
    "apd-R0.9-W4-M8:algorithm=apd,apd_mixture_weight=0.9,apd_kv_window=4,apd_max_lookahead=8",
)
SERVING_CONCURRENCY = 16  # requests in flight for the serving table (the engine's max_num_seqs)


@dataclasses.dataclass(frozen=True)
class Answer:
    reply: str
    tokens: int  # generated tokens up to and including the one that stopped it
    nfe: int  # forward passes
    seconds: float


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    params: dict[str, Any] | None  # None: the verifier alone
    accuracy: dict[str, float]  # per family, and "mean"
    nfe_per_token: float
    tokens_per_s: float
    mean_latency_s: float


@dataclasses.dataclass(frozen=True)
class ServingRow:
    """One configuration with SERVING_CONCURRENCY requests in flight: throughput, not one user's speed."""

    name: str
    params: dict[str, Any]
    accuracy: dict[str, float]
    nfe_per_token: float  # forwards each request took part in, per generated token
    tokens_per_s: float  # all generated tokens / wall time
    requests_per_s: float


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """'NAME:steps=20,algorithm=random' -> ('NAME', {'steps': 20, 'algorithm': 'random'})."""
    name, sep, fields = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: a configuration is NAME:field=value,... (NAME: for defaults)")
    known = {f.name: f for f in dataclasses.fields(SamplingParams)}
    params: dict[str, Any] = {}
    for item in filter(None, fields.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not field=value over {sorted(known)}")
        params[key] = _typed(value)
    return name, params


def _typed(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def timed(answer_one: Callable[[str], tuple[str, int, int]], questions: Sequence[str]) -> list[Answer]:
    answers = []
    for question in questions:
        started = time.perf_counter()
        reply, tokens, nfe = answer_one(question)
        answers.append(Answer(reply, tokens, nfe, time.perf_counter() - started))
    return answers


def diffusion_answerer(llm: LLM, params: SamplingParams) -> Callable[[str], tuple[str, int, int]]:
    def answer(question: str) -> tuple[str, int, int]:
        (output,) = llm.chat([{"role": "user", "content": question}], params)
        return output.text, len(output.token_ids), output.nfe

    return answer


def verifier_answerer(model_dir: Path, device: str) -> Callable[[str], tuple[str, int, int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    @torch.no_grad()
    def answer(question: str) -> tuple[str, int, int]:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").to(device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False)[0, ids.shape[1] :]
        return tokenizer.decode(generated, skip_special_tokens=True), len(generated), len(generated)

    return answer


def scores(problems: list[Problem], replies: list[str], nfe: int, tokens: int) -> tuple[dict[str, float], float]:
    """Accuracy per family (and mean) and forwards per generated token, rounded for the report."""
    accuracy = accuracy_by_family(problems, replies)
    return {family: round(value, 4) for family, value in accuracy.items()}, round(nfe / max(tokens, 1), 3)


def summarise(name: str, params: dict[str, Any] | None, problems: list[Problem], answers: list[Answer]) -> Row:
    tokens, seconds = sum(a.tokens for a in answers), sum(a.seconds for a in answers)
    accuracy, nfe_per_token = scores(problems, [a.reply for a in answers], sum(a.nfe for a in answers), tokens)
    return Row(
        name=name,
        params=params,
        accuracy=accuracy,
        nfe_per_token=nfe_per_token,
        tokens_per_s=round(tokens / seconds, 1),
        mean_latency_s=round(mean(a.seconds for a in answers), 4),
    )


def serve_all(llm: LLM, name: str, params: dict[str, Any], problems: list[Problem]) -> ServingRow:
    """Every problem queued at once; the engine keeps max_num_seqs of them in flight until all finish."""
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    started = time.perf_counter()
    outputs = llm.chat(conversations, SamplingParams(**params))
    wall = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for o in outputs)
    accuracy, nfe_per_token = scores(problems, [o.text for o in outputs], sum(o.nfe for o in outputs), tokens)
    return ServingRow(
        name=name,
        params=params,
        accuracy=accuracy,
        nfe_per_token=nfe_per_token,
        tokens_per_s=round(tokens / wall, 1),
        requests_per_s=round(len(problems) / wall, 2),
    )


def fastest_close_to(rows: list[Row], floor: float) -> Row | None:
    """The fastest row whose mean accuracy reaches `floor`, if any does."""
    close = [r for r in rows if r.accuracy["mean"] >= floor]
    return max(close, key=lambda r: r.tokens_per_s) if close else None


def serving_markdown(rows: list[ServingRow], header: str) -> str:
    lines = [header, "", "| configuration | mean accuracy | NFE/token | tokens/s | requests/s | vs default |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        ratio = row.tokens_per_s / rows[0].tokens_per_s
        lines.append(
            f"| {row.name} | {100 * row.accuracy['mean']:.1f} | {row.nfe_per_token:.2f} | "
            f"{row.tokens_per_s:.0f} | {row.requests_per_s:.1f} | {ratio:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[Row], header: str) -> str:
    families = [f for f in FAMILIES if f in rows[0].accuracy]
    lines = [
        header,
        "",
        "| configuration | " + " | ".join(families) + " | mean | NFE/token | tokens/s | latency (ms) |",
        "|---" * (len(families) + 5) + "|",
    ]
    for row in rows:
        cells = [f"{100 * row.accuracy[f]:.0f}" for f in families]
        lines.append(
            f"| {row.name} | " + " | ".join(cells) + f" | {100 * row.accuracy['mean']:.1f} | "
            f"{row.nfe_per_token:.2f} | {row.tokens_per_s:.0f} | {1000 * row.mean_latency_s:.1f} |"
        )
    return "\n".join(lines) + "\n"


def pareto(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both accuracy and tokens/s, fastest first."""
    ordered = sorted(rows, key=lambda r: (-r.tokens_per_s, -r.accuracy["mean"]))
    frontier: list[Row] = []
    for row in ordered:
        if not frontier or row.accuracy["mean"] > frontier[-1].accuracy["mean"]:
            frontier.append(row)
    return frontier


def plot(rows: list[Row], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter([r.tokens_per_s for r in rows], [100 * r.accuracy["mean"] for r in rows], color="tab:blue")
    for row in rows:
        axes.annotate(row.name, (row.tokens_per_s, 100 * row.accuracy["mean"]), fontsize=8, xytext=(4, 4),
                      textcoords="offset points")  # fmt: skip
    frontier = pareto(rows)
    axes.plot([r.tokens_per_s for r in frontier], [100 * r.accuracy["mean"] for r in frontier], "--", color="gray")
    axes.set(xlabel="generated tokens/s (one request at a time)", ylabel="exact match, mean of families (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    problems = held_out_set(args.per_family)
    questions = [p.question for p in problems]
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=1, verifier=args.verifier)
    rows = []
    for name, params in args.configs:
        answers = timed(diffusion_answerer(llm, SamplingParams(**params)), questions)
        rows.append(summarise(name, params, problems, answers))
        print(markdown(rows[-1:], name).splitlines()[-1], flush=True)
    if args.verifier:
        answers = timed(verifier_answerer(resolve_model_dir(args.verifier), args.device), questions)
        rows.append(summarise(f"{args.verifier} (AR, greedy)", None, problems, answers))
        print(markdown(rows[-1:], "").splitlines()[-1], flush=True)
    return rows


def run_serving(args: argparse.Namespace, rows: list[Row]) -> list[ServingRow]:
    """The default against the fastest configuration within 1 point of it: overall, of Fast-dLLM's
    rules and of APD (each group's most accurate when none is that close)."""
    problems = held_out_set(args.per_family)
    diffusion = [r for r in rows if r.params is not None]
    baseline, floor = diffusion[0], diffusion[0].accuracy["mean"] - 0.01
    chosen = [baseline, fastest_close_to(diffusion, floor) or baseline]
    rules = [r for r in diffusion if r.params and ("threshold" in r.params or "factor" in r.params)]
    apd = [r for r in diffusion if r.params and r.params.get("algorithm") == "apd"]
    for group in (rules, apd):
        if group:
            chosen.append(fastest_close_to(group, floor) or max(group, key=lambda r: r.accuracy["mean"]))
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=SERVING_CONCURRENCY,
              verifier=args.verifier)  # fmt: skip
    served = []
    for row in {r.name: r for r in chosen}.values():  # in order, once each
        served.append(serve_all(llm, row.name, row.params or {}, problems))
        print(serving_markdown(served, "").splitlines()[-1], flush=True)
    return served


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vdiff-demo")
    p.add_argument("--verifier", default=None, help="an autoregressive model to time alone, e.g. vdiff-demo-ar")
    p.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS])
    p.add_argument("--per-family", type=int, default=50, help="held-out problems per family")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-serving", dest="serving", action="store_false",
                   help=f"skip the table at {SERVING_CONCURRENCY} requests in flight")  # fmt: skip
    p.add_argument("--out", default=None, help="path without suffix (default perf/results/quality_MODEL)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    served = run_serving(args, rows) if args.serving else []
    out = Path(args.out or ROOT / "perf" / "results" / f"quality_{Path(args.model).name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{processor_name()}, {torch.get_num_threads()} threads, {args.device}, {args.dtype}"
    header = f"{args.model} on {args.per_family} held-out problems per family ({machine}); command: {_command()}"
    text = markdown(rows, header)
    if served:
        text += "\n" + serving_markdown(served, f"The default and the fastest within 1 point of it (overall, "
                                         f"rules, APD), {SERVING_CONCURRENCY} requests in flight:")  # fmt: skip
    out.with_suffix(".md").write_text(text)
    serving = {"concurrency": SERVING_CONCURRENCY, "rows": [dataclasses.asdict(r) for r in served]}
    report = {"command": _command(), "machine": machine, "model": args.model, "verifier": args.verifier,
              "per_family": args.per_family, "rows": [dataclasses.asdict(r) for r in rows],
              "serving": serving}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, f"{args.model}: accuracy against speed ({machine})", out.with_suffix(".png"))
    print(f"wrote {out}.json, .md and .png")


def processor_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _command() -> str:
    return "python perf/bench_quality.py " + " ".join(sys.argv[1:])


if __name__ == "__main__":
    main()
