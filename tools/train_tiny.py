#!/usr/bin/env python3
"""Train the demo models that ship with vdiff: `vdiff-demo` (LLaDA) and its AR verifier `vdiff-demo-ar`.

    python tools/train_tiny.py [--which both] [--llada-out build/demo/vdiff-demo] [--ar-out build/demo/vdiff-demo-ar]

The verifier is a transformers LlamaForCausalLM with the character tokenizer, trained first on
next-token loss of the answer; the diffusion model is the repo's own LLaDA implementation of the
same shape, started from the verifier's weights and trained with LLaDA's SFT objective
(vdiff/training/sft.py), both on the synthetic task of vdiff/training/demo_task.py. AdamW with
linear warmup and cosine decay. One seed gives the same checkpoints on the same machine and
thread count. A progress line reports loss and, every --eval-every steps,
held-out exact-match accuracy per family (the diffusion model decoded by vdiff's engine with
its shipped defaults: one token per step, low-confidence remasking, temperature 0).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_checkpoint as ckpt  # noqa: E402

from vdiff.models.registry import native_architecture  # noqa: E402
from vdiff.sampling_params import SamplingParams  # noqa: E402
from vdiff.training.demo_task import Problem, TrainingStream, accuracy_by_family, held_out_set, parse_weights  # noqa: E402
from vdiff.training.evaluate import ar_replies, format_accuracy, llada_replies  # noqa: E402
from vdiff.training.sft import causal_lm_loss, llada_sft_loss, sft_batch  # noqa: E402

# the hard families weighted up (sort, the diffusion model's weakest, most); the diffusion model
# also sees more count and reverse, whose answer length it must get right (the verifier stops at
# EOS by itself); help is one fixed sentence, learnt from few examples
LLADA_MIX = "add=3,sub=3,sort=4,reverse=2,count=3,spell=1,help=1"
AR_MIX = "add=3,sub=3,sort=3,reverse=1,count=1,spell=1,help=1"
# The verifier's transformers Llama names -> this repo's LLaDA names, for the warm start.
LLAMA_TO_LLADA = {
    "model.embed_tokens": "model.transformer.wte",
    "model.norm": "model.transformer.ln_f",
    "lm_head": "model.transformer.ff_out",
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ff_proj",  # LLaDA's SiLU-gated branch
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ff_norm",
}
# Projections into the residual stream (LLaDA's, then Llama's), initialised smaller. LLaDA's untied
# LM head is also named "ff_out" and is shrunk with them: a small-logit start, which is harmless.
RESIDUAL_OUTPUTS = ("attn_out.weight", "ff_out.weight", "o_proj.weight", "down_proj.weight")


@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_len: int  # positions: the chat template (23 tokens), the question, the answer


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int
    lr: float
    warmup: int
    min_lr_ratio: float  # cosine decays to lr * min_lr_ratio
    weight_decay: float
    mix: str
    seed: int
    answer_len: int
    eval_every: int
    eval_per_family: int
    log_every: int


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def init_weights(model: nn.Module, layers: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) everywhere, residual output projections shrunk by depth."""
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue  # norm weights keep their ones
        residual_out = name.endswith(RESIDUAL_OUTPUTS)
        nn.init.normal_(param, std=std / math.sqrt(2 * layers) if residual_out else std)


def llada_name(llama_name: str) -> str:
    stem = llama_name.removesuffix(".weight")
    if stem in LLAMA_TO_LLADA:
        return LLAMA_TO_LLADA[stem] + ".weight"
    _, _, index, rest = stem.split(".", 3)  # model.layers.{i}.{module}
    return f"model.transformer.blocks.{index}.{LLAMA_TO_LLADA[rest]}.weight"


def warm_start(model: nn.Module, causal_dir: Path) -> None:
    """Start the diffusion model from the verifier's weights (same tokenizer and shape).

    Adapting a causal LM to the masked-diffusion objective is how Dream was made from Qwen2.5;
    here it takes the model past the loss plateau that a random start sits on for thousands of
    steps. Every LLaDA weight must come from the checkpoint, or the shapes disagree.
    """
    from safetensors.torch import load_file

    weights = {llada_name(k): v.float() for k, v in load_file(causal_dir / "model.safetensors").items()}
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise SystemExit(f"{causal_dir} does not have the diffusion model's shape; train it with the same --ar-* sizes")
    model.load_state_dict(weights)


def optimizer_for(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


def encode_batch(problems: list[Problem], tokenizer, answer_len: int | None):  # type: ignore[no-untyped-def]
    """answer_len None: just room for the longest answer and one EOS (the causal verifier needs no more)."""
    prompts = [tokenizer.encode(ckpt.chat_prompt(tokenizer, p.question), add_special_tokens=False) for p in problems]
    answers = [tokenizer.encode(p.answer, add_special_tokens=False) for p in problems]
    length = answer_len if answer_len is not None else 1 + max(len(a) for a in answers)
    return sft_batch(prompts, answers, length, tokenizer.eos_token_id)


def train(
    name: str,
    model: nn.Module,
    loss_of: Callable[[list[Problem], torch.Generator], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    config: TrainConfig,
) -> dict[str, float]:
    stream = TrainingStream(config.seed, parse_weights(config.mix))
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = optimizer_for(model, config)
    started, running, accuracy = time.monotonic(), None, {}
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = loss_of(stream.batch(config.batch), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            accuracy = evaluate()
            model.train()
        if done % config.log_every == 0 or done == config.steps:
            print(_progress(name, done, config.steps, started, running, accuracy), flush=True)
    return accuracy


def _progress(name: str, done: int, total: int, started: float, loss: float | None, accuracy: dict[str, float]) -> str:
    elapsed = time.monotonic() - started
    eta = elapsed / done * (total - done)
    bar = "#" * (20 * done // total) + "." * (20 - 20 * done // total)
    held_out = f" | held-out {format_accuracy(accuracy)}" if accuracy else ""
    return f"{name} [{bar}] {done}/{total} {elapsed / 60:.1f}m eta {eta / 60:.1f}m loss {loss:.4f}{held_out}"


def train_llada(args: argparse.Namespace, config: TrainConfig, tokenizer) -> dict[str, float]:  # type: ignore[no-untyped-def]
    size = ModelSize(args.layers, args.hidden, args.heads, args.intermediate, args.max_len)
    raw = ckpt.demo_llada_config(tokenizer, argparse.Namespace(**vars(size)))
    # the verifier's base, so that the warm start keeps the positions it learned (LLaDA-8B's 500000
    # would leave a 32-wide head almost no positional resolution over 90 tokens)
    raw["rope_theta"] = args.rope_theta
    torch.manual_seed(config.seed)
    architecture = native_architecture("llada")
    assert architecture is not None
    model = architecture.build(raw)
    init_weights(model, size.layers)
    if args.init_from != "none":
        warm_start(model, Path(args.init_from or args.ar_out))
    model.to(args.device)
    print(f"vdiff-demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    mask_id, out = raw["mask_token_id"], Path(args.llada_out)
    generation = ckpt.llada_generation_config(tokenizer, config.answer_len)
    held_out = held_out_set(config.eval_per_family)

    def loss_of(problems: list[Problem], generator: torch.Generator) -> torch.Tensor:
        return llada_sft_loss(model, encode_batch(problems, tokenizer, config.answer_len), mask_id, generator)

    def evaluate(dtype: torch.dtype = torch.float32) -> dict[str, float]:
        ckpt.save_checkpoint(model, out, raw, generation, tokenizer, dtype)
        # SamplingParams(): the generation_config just written decides, as for a user of the checkpoint
        replies = llada_replies(out, [p.question for p in held_out], SamplingParams(), args.device)
        return accuracy_by_family(held_out, replies)

    train("vdiff-demo", model, loss_of, evaluate, config)
    final = evaluate(getattr(torch, args.save_dtype))
    print(f"vdiff-demo saved to {out} ({args.save_dtype}): {format_accuracy(final)}", flush=True)
    return final


def train_ar(args: argparse.Namespace, config: TrainConfig, tokenizer) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    size = ModelSize(args.ar_layers, args.ar_hidden, args.ar_heads, args.ar_intermediate, args.max_len)
    raw = ckpt.demo_llama_config(tokenizer, argparse.Namespace(**vars(size)))
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(LlamaConfig(**raw))
    init_weights(model, size.layers)
    model.to(args.device)
    print(f"vdiff-demo-ar: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    out, eos = Path(args.ar_out), tokenizer.eos_token_id
    held_out = held_out_set(config.eval_per_family)

    def loss_of(problems: list[Problem], generator: torch.Generator) -> torch.Tensor:
        return causal_lm_loss(model, encode_batch(problems, tokenizer, None), eos)

    def evaluate() -> dict[str, float]:
        return accuracy_by_family(
            held_out, ar_replies(model, tokenizer, [p.question for p in held_out], config.answer_len)
        )

    train("vdiff-demo-ar", model, loss_of, evaluate, config)
    generation = ckpt.llama_generation_config(tokenizer, config.answer_len)
    ckpt.save_checkpoint(model, out, raw, generation, tokenizer, getattr(torch, args.save_dtype))
    final = evaluate()
    print(f"vdiff-demo-ar saved to {out} ({args.save_dtype}): {format_accuracy(final)}", flush=True)
    return final


def train_config(args: argparse.Namespace, ar: bool) -> TrainConfig:
    return TrainConfig(
        steps=args.ar_steps if ar else args.steps,
        batch=args.batch,
        lr=args.ar_lr if ar else args.lr,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        mix=args.ar_mix if ar else args.mix,
        seed=args.seed,
        answer_len=args.answer_len,
        eval_every=args.eval_every,
        eval_per_family=args.eval_per_family,
        log_every=args.log_every,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", choices=["llada", "ar", "both"], default="both")
    p.add_argument("--llada-out", default="build/demo/vdiff-demo")
    p.add_argument("--ar-out", default="build/demo/vdiff-demo-ar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu (the shipped models' budget) or cuda (recipe sweeps)")
    p.add_argument("--steps", type=int, default=10000, help="diffusion-model optimizer steps")
    p.add_argument(
        "--init-from",
        default=None,
        help="causal LM to warm-start the diffusion model from (default: the verifier at --ar-out; 'none': random)",
    )
    p.add_argument("--ar-steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ar-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--mix", default=LLADA_MIX, help="family weights, e.g. add=3,sub=3 (others 1)")
    p.add_argument("--ar-mix", default=AR_MIX)
    p.add_argument("--answer-len", type=int, default=72, help="answers padded with EOS to this many tokens")
    p.add_argument("--max-len", type=int, default=160, help="both models' positions (prompt and answer)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--rope-theta", type=float, default=10000.0, help="the verifier's, for the warm start")
    p.add_argument("--ar-layers", type=int, default=4)
    p.add_argument("--ar-hidden", type=int, default=128)
    p.add_argument("--ar-heads", type=int, default=4)
    p.add_argument("--ar-intermediate", type=int, default=384)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-per-family", type=int, default=25)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    return p.parse_args(argv)


def keep_freed_memory() -> None:
    """Stop glibc from unmapping freed activations after every step.

    Batches change shape from step to step, so glibc's adaptive mmap threshold keeps handing
    multi-megabyte blocks back to the kernel and faulting them in again; on the 2-core machine
    a third of the CPU went to the kernel. A fixed 32 MiB threshold and no trimming keep them.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return  # not glibc (macOS, musl): nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_freed_memory()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    tokenizer = ckpt.char_tokenizer()
    if args.which in ("ar", "both"):  # first: the diffusion model starts from it
        train_ar(args, train_config(args, ar=True), tokenizer)
    if args.which in ("llada", "both"):
        train_llada(args, train_config(args, ar=False), tokenizer)


if __name__ == "__main__":
    main()
