"""Accuracy against speed: decoding configurations on the demo task's held-out problems.

    python perf/bench_quality.py [--model vdiff-demo] [--verifier vdiff-demo-ar] [--per-family 50]
        [--configs "default:" "t9:threshold=0.9" ...] [--no-serving] [--no-single-digit]
        [--exclude NAME ...] [--apply-to MODEL_DIR] [--device cpu] [--out PATH]

Every configuration answers the same fixed held-out sample (vdiff/training/demo_task.py, never
trained on) one request at a time through the offline engine, so latency is a single request's
and tokens/s is what one user sees, as the APD and Fast-dLLM papers report it. A configuration is
`NAME:field=value,...` over SamplingParams fields (steps, block_length, algorithm, max_tokens,
temperature, ...); an empty list after the colon is the model's own generation_config defaults.
`--verifier` loads APD's verifier (the `apd-*` configurations need it) and adds it alone
(greedy, transformers' generate) as a row.

The sample is the held-out problems of every family and (unless --no-single-digit) all 100
single-digit sums and all 100 single-digit differences, reported as their own rows and left out
of the mean. The fixed schedule comes first: `1/step` (one token per step over the checkpoint's
answer length, the accuracy every faster setting is held to), then 2, 4 and 8 tokens a step.

Per configuration and family: exact-match accuracy; per configuration: NFE per generated token
(forwards / tokens up to and including EOS), generated tokens per second, mean latency. The
fastest setting a generation_config.json can carry (steps, block_length, threshold, factor)
within 1 point of `1/step` is the recommendation; `--apply-to MODEL_DIR` writes it there. Then
(unless --no-serving) `1/step`, the default and the fastest configurations within 1 point of
`1/step` (overall, Fast-dLLM's rules, APD) answer the whole sample again with 16 requests in
flight in one engine: throughput under continuous batching. Writes OUT.json, OUT.md and OUT.png
(mean accuracy against tokens/s on a log axis, one marker per method, the Pareto front drawn).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from vdiff.training.demo_task import (  # noqa: E402
    FAMILIES,
    SINGLE_DIGIT,
    Problem,
    accuracy_by_family,
    held_out_set,
    single_digit_set,
)

# The fixed schedule at 1, 2, 4 and 8 tokens a step, and blocks of 8 with one token a step, are
# added in front of these with the steps the checkpoint's answer length gives (`schedule_configs`).
DEFAULT_CONFIGS = (
    "default:",  # the checkpoint's generation_config, whatever it selects
    "random-remask:algorithm=random",
    # Fast-dLLM's parallel decoding, without and with its approximate KV caches (the checkpoint's
    # block is the whole answer, so its caches keep the prompt; blocks of 8 cache more)
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
BASELINE = "1/step"  # one token per step: the accuracy the fast settings are held to
# the pace fields a generation_config.json can carry, under the same names (SamplingDefaults)
GENERATION_CONFIG_FIELDS = ("steps", "block_length", "threshold", "factor")
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


def schedule_configs(max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """The fixed schedule at 1, 2, 4 and 8 tokens a step over the checkpoint's answer length, and
    blocks of 8 at one token a step: `steps` set, so a default parallel rule stays out."""
    configs = [(f"{k}/step", {"steps": max_tokens // k}) for k in (1, 2, 4, 8) if max_tokens % k == 0]
    if max_tokens % 8 == 0:
        configs.append(("blocks-of-8", {"block_length": 8, "steps": max_tokens}))
    return configs


def recommended(rows: list[Row]) -> Row | None:
    """The fastest setting a generation_config.json can carry within 1 point of one token per step."""
    expressible = [r for r in rows if r.params and set(r.params) <= set(GENERATION_CONFIG_FIELDS)]
    return fastest_close_to(expressible, baseline_floor(rows))


def baseline_floor(rows: list[Row]) -> float:
    """1 point below one token per step's mean accuracy: what a faster setting must keep."""
    return next(r for r in rows if r.name == BASELINE).accuracy["mean"] - 0.01


def apply_to(model_dir: Path, row: Row) -> dict[str, Any]:
    """Make `row` the checkpoint's default: its fields replace the pace keys of generation_config.json."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text())
    for key in GENERATION_CONFIG_FIELDS:
        config.pop(key, None)
    assert row.params is not None
    config.update(row.params)
    path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    return config


def serving_markdown(rows: list[ServingRow], header: str) -> str:
    lines = [header, "", f"| configuration | mean accuracy | NFE/token | tokens/s | requests/s | vs {BASELINE} |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        ratio = row.tokens_per_s / rows[0].tokens_per_s
        lines.append(
            f"| {row.name} | {100 * row.accuracy['mean']:.1f} | {row.nfe_per_token:.2f} | "
            f"{row.tokens_per_s:.0f} | {row.requests_per_s:.1f} | {ratio:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def columns(row: Row) -> list[str]:
    """The task's families present, then the single-digit rows, in a fixed order."""
    return [f for f in (*FAMILIES, *SINGLE_DIGIT) if f in row.accuracy]


def markdown(rows: list[Row], header: str) -> str:
    names = columns(rows[0])
    lines = [
        header,
        "",
        "| configuration | " + " | ".join(names) + " | mean | NFE/token | tokens/s | latency (ms) |",
        "|---" * (len(names) + 5) + "|",
    ]
    for row in rows:
        cells = [f"{100 * row.accuracy[f]:.0f}" for f in names]
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


def method(row: Row) -> str:
    """The method family a row belongs to, one marker and colour each in the figure."""
    params = row.params
    if params is None:
        return "autoregressive verifier"
    if params.get("algorithm") == "apd":
        return "APD"
    if "threshold" in params or "factor" in params:
        return "Fast-dLLM rule + cache" if params.get("cache", "none") != "none" else "Fast-dLLM rule"
    if row.name == "default":
        return "default"
    return "fixed schedule"


STYLES = {  # method -> (marker, colour)
    "fixed schedule": ("o", "tab:blue"),
    "Fast-dLLM rule": ("^", "tab:orange"),
    "Fast-dLLM rule + cache": ("v", "tab:red"),
    "APD": ("s", "tab:green"),
    "autoregressive verifier": ("D", "tab:purple"),
    "default": ("*", "black"),
}


def plot(rows: list[Row], title: str, path: Path) -> None:
    """Mean accuracy against tokens/s (log scale), zoomed to the data, the Pareto front drawn and
    named; the other points are told apart by their method's marker and colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(10.5, 5.5))
    for name, (marker, colour) in STYLES.items():
        group = [r for r in rows if method(r) == name]
        if group:
            speeds = [r.tokens_per_s for r in group]
            accuracies = [100 * r.accuracy["mean"] for r in group]
            size = 110 if name == "default" else 40
            axes.scatter(speeds, accuracies, marker=marker, color=colour, s=size, label=name, zorder=3)
    frontier = pareto(rows)
    axes.plot([r.tokens_per_s for r in frontier], [100 * r.accuracy["mean"] for r in frontier], "-",
              color="gray", alpha=0.6, zorder=2, label="Pareto front")  # fmt: skip
    axes.set_xscale("log")
    speeds = [r.tokens_per_s for r in rows]
    axes.set_xlim(min(speeds) / 1.3, max(speeds) * 2)  # room for the names of the fastest points
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor_label))
    every = [100 * r.accuracy["mean"] for r in rows]
    axes.set_ylim(min(every) - 2, min(100.5, max(every) + 2))
    named = {r.name: r for r in [*frontier, *(r for r in rows if r.name in ("default", BASELINE))]}
    place_labels(figure, axes, list(named.values()))
    axes.set(xlabel="generated tokens/s, one request at a time (log scale)",
             ylabel="exact match, mean of the task's families (%)")  # fmt: skip
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def minor_label(value: float, _: int) -> str:
    """Only 2 and 5 times a power of ten are written between the decades, so labels never collide."""
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if leading in (2, 5) else ""


LABEL_OFFSETS = [(6, 6), (6, -12), (-6, 6), (-6, -12), (6, 16), (6, -22), (-6, 16), (-6, -22), (10, 28),
                 (10, -34)]  # fmt: skip


def place_labels(figure: Any, axes: Any, rows: list[Row]) -> None:
    """Each name at the first offset around its point whose box overlaps no name placed before."""
    renderer = figure.canvas.get_renderer()
    placed: list[Any] = []
    for row in sorted(rows, key=lambda r: -r.accuracy["mean"]):
        point = (row.tokens_per_s, 100 * row.accuracy["mean"])
        for dx, dy in LABEL_OFFSETS:
            label = axes.annotate(row.name, point, xytext=(dx, dy), textcoords="offset points", fontsize=7,
                                  ha="left" if dx > 0 else "right",
                                  arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.5})  # fmt: skip
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            label.remove()
        else:  # crowded everywhere: the first offset, as good as any
            axes.annotate(row.name, point, xytext=LABEL_OFFSETS[0], textcoords="offset points", fontsize=7)


def problems_for(args: argparse.Namespace) -> list[Problem]:
    """The held-out sample, then (unless --no-single-digit) all single-digit sums and differences."""
    return held_out_set(args.per_family) + (single_digit_set() if args.single_digit else [])


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    problems = problems_for(args)
    questions = [p.question for p in problems]
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=1, verifier=args.verifier)
    defaults = llm.engine.defaults
    configs = [c for c in (*schedule_configs(defaults.max_tokens), *args.configs) if c[0] not in args.exclude]
    if defaults.threshold is None and defaults.factor is None and defaults.steps in (None, defaults.max_tokens):
        configs = [c for c in configs if c[0] != "default"]  # the checkpoint's default is 1/step itself
    rows = []
    for name, params in configs:
        answers = timed(diffusion_answerer(llm, SamplingParams(**params)), questions)
        rows.append(summarise(name, params, problems, answers))
        print(markdown(rows[-1:], name).splitlines()[-1], flush=True)
    if args.verifier:
        answers = timed(verifier_answerer(resolve_model_dir(args.verifier), args.device), questions)
        rows.append(summarise(f"{args.verifier} (AR, greedy)", None, problems, answers))
        print(markdown(rows[-1:], "").splitlines()[-1], flush=True)
    return rows


def run_serving(args: argparse.Namespace, rows: list[Row]) -> list[ServingRow]:
    """One token per step against the default and the fastest configuration within 1 point of it:
    overall, of Fast-dLLM's rules and of APD (each group's most accurate when none is that close)."""
    problems = problems_for(args)
    diffusion = [r for r in rows if r.params is not None]
    baseline = next(r for r in diffusion if r.name == BASELINE)
    floor = baseline_floor(diffusion)
    default = next((r for r in diffusion if r.name == "default"), baseline)
    chosen = [baseline, default, fastest_close_to(diffusion, floor) or baseline]
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
    p.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="configurations to leave out")
    p.add_argument("--per-family", type=int, default=50, help="held-out problems per family")
    p.add_argument("--no-single-digit", dest="single_digit", action="store_false",
                   help="leave out the rows of all 100 single-digit sums and differences")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-serving", dest="serving", action="store_false",
                   help=f"skip the table at {SERVING_CONCURRENCY} requests in flight")  # fmt: skip
    p.add_argument("--apply-to", type=Path, default=None, metavar="MODEL_DIR",
                   help="write the recommended setting into MODEL_DIR/generation_config.json")  # fmt: skip
    p.add_argument("--out", default=None, help="path without suffix (default perf/results/quality_MODEL)")
    p.add_argument("--replot", type=Path, default=None, metavar="OUT.json",
                   help="only draw OUT.png again from a report this script wrote")  # fmt: skip
    return p.parse_args(argv)


def figure_title(model: str, machine: str) -> str:
    return f"{model}: accuracy against speed ({machine})"


def replot(report_path: Path) -> None:
    report = json.loads(report_path.read_text())
    rows = [Row(**row) for row in report["rows"]]
    plot(rows, figure_title(report["model"], report["machine"]), report_path.with_suffix(".png"))
    print(f"wrote {report_path.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    rows = run(args)
    served = run_serving(args, rows) if args.serving else []
    out = Path(args.out or ROOT / "perf" / "results" / f"quality_{Path(args.model).name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{processor_name()}, {torch.get_num_threads()} threads, {args.device}, {args.dtype}"
    header = f"{args.model} on {args.per_family} held-out problems per family ({machine}); command: {_command()}"
    text = markdown(rows, header)
    best = recommended(rows)
    if best is not None:
        text += (f"\nFastest setting a generation_config.json can carry within 1 point of {BASELINE}: "
                 f"{best.name} ({best.params}).\n")  # fmt: skip
    if served:
        title = (f"{BASELINE} against the default and the fastest within 1 point of it (overall, "
                 f"rules, APD), {SERVING_CONCURRENCY} requests in flight:")  # fmt: skip
        text += "\n" + serving_markdown(served, title)
    out.with_suffix(".md").write_text(text)
    serving = {"concurrency": SERVING_CONCURRENCY, "rows": [dataclasses.asdict(r) for r in served]}
    report = {"command": _command(), "machine": machine, "model": args.model, "verifier": args.verifier,
              "per_family": args.per_family, "rows": [dataclasses.asdict(r) for r in rows],
              "recommended": None if best is None else {"name": best.name, "params": best.params},
              "serving": serving}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, figure_title(args.model, machine), out.with_suffix(".png"))
    print(f"wrote {out}.json, .md and .png")
    if args.apply_to is not None and best is not None:
        print(f"{args.apply_to}/generation_config.json: {apply_to(args.apply_to, best)}")


def processor_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _command() -> str:
    return "python perf/bench_quality.py " + " ".join(sys.argv[1:])


if __name__ == "__main__":
    main()
