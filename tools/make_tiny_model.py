#!/usr/bin/env python3
"""Write a tiny random-weight LLaDA or Dream checkpoint in exactly the real on-disk layout.

    python tools/make_tiny_model.py --arch llada --out DIR [--seed 0] [--layers 2 --hidden 64 ...]

DIR gets config.json (the real key set, small values), model.safetensors (or shards plus
model.safetensors.index.json with --shards N), generation_config.json, and a byte-level BPE
tokenizer trained here on generated text (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) with the family's special tokens and chat template. The same
arguments always give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vdiff.models import load_model
from vdiff.models.quantization import Quantization
from vdiff.models.registry import native_architecture

# Llama-3 style, as LLaDA-8B-Instruct renders it:
# <|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>...
LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen2 style, as Dream-v0-Instruct-7B renders it (default system prompt when none is given).
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    arch: str
    model_type: str
    specials: tuple[str, ...]  # appended after the BPE vocabulary, in this order
    bos: str
    eos: str
    mask: str
    chat_template: str
    tokenizer_has_mask: bool  # Dream's tokenizer_config names its mask token; LLaDA's config carries it


FAMILIES = {
    "llada": Family(
        "llada",
        "llada",
        (
            "<|startoftext|>",
            "<|endoftext|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|mdm_mask|>",
        ),
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        mask="<|mdm_mask|>",
        chat_template=LLADA_CHAT_TEMPLATE,
        tokenizer_has_mask=False,
    ),
    "dream": Family(
        "dream",
        "Dream",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"),
        bos="<|beginoftext|>",
        eos="<|endoftext|>",
        mask="<|mask|>",
        chat_template=DREAM_CHAT_TEMPLATE,
        tokenizer_has_mask=True,
    ),
}

_WORDS = tuple(
    " ".join(
        (
            "the a an and or but if then when where what which who how why is are was were be been have has",
            "had do does did will would can could should may might must not no yes this that these those here",
            "there all any some many much more most few less one two three four five six seven eight nine ten",
            "first last next other same new old good bad big small long short high low right left up down in",
            "out on off over under to from with without about into after before between number word letter",
            "answer question sum difference reverse sort count spell add subtract model token mask text time",
            "day year way thing man woman child world life hand part place case week point government company",
            "group problem fact water house story book system program eye job night",
        )
    ).split()
)
_PROMPTS = (
    "What is {a} + {b}?",
    "What is {a} - {b}?",
    "Count from {a} to {b}",
    "Sort: {a} {b} {c}",
    "Spell: {w}",
)


def training_text(seed: int, lines: int = 3000) -> list[str]:
    """Deterministic English-like lines, numbers and chat-shaped prompts to train the BPE on."""
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        if rng.random() < 0.3:
            a, b, c = rng.randrange(100), rng.randrange(100), rng.randrange(100)
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
            text.append(rng.choice(_PROMPTS).format(a=a, b=b, c=c, w=word))
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
            text.append(" ".join(words).capitalize() + rng.choice(".?!,;:"))
    return text


def train_tokenizer(family: Family, vocab: int, seed: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(training_text(seed), trainer=trainer)
    bpe.add_special_tokens(list(family.specials))  # ids after the BPE vocabulary, as in the real models
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.eos,
        mask_token=family.mask if family.tokenizer_has_mask else None,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    hf.chat_template = family.chat_template
    return hf


def llada_config(args: argparse.Namespace, ids: dict[str, int], vocab: int) -> dict[str, Any]:
    """The key set of LLaDA-8B-Instruct's config.json, with small values."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": args.hidden,
        "embedding_dropout": 0.0,
        "embedding_size": vocab,
        "eos_token_id": ids["<|endoftext|>"],
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ids["<|mdm_mask|>"],
        "max_sequence_length": args.max_len,
        "mlp_hidden_size": args.intermediate,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": args.heads,
        "n_kv_heads": args.kv_heads or args.heads,
        "n_layers": args.layers,
        "pad_token_id": ids["<|endoftext|>"],
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": args.dtype,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": vocab,
        "weight_tying": False,
    }


def dream_config(args: argparse.Namespace, ids: dict[str, int], vocab: int) -> dict[str, Any]:
    """The key set of Dream-v0-Instruct-7B's config.json, with small values."""
    eos = ids["<|endoftext|>"]
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": args.hidden,
        "initializer_range": 0.02,
        "intermediate_size": args.intermediate,
        "mask_token_id": ids["<|mask|>"],
        "max_position_embeddings": args.max_len,
        "max_window_layers": args.layers,
        "model_type": "Dream",
        "num_attention_heads": args.heads,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads or max(1, args.heads // 2),
        "pad_token_id": eos,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": args.max_len,
        "tie_word_embeddings": False,
        "torch_dtype": args.dtype,
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def generation_config(family: Family, ids: dict[str, int]) -> dict[str, Any]:
    eos = ids[family.eos]
    if family.arch == "llada":
        return {"bos_token_id": ids[family.bos], "eos_token_id": eos, "pad_token_id": eos}
    # Dream publishes its sampler defaults here; mask_token_id stays null (config.json has it).
    return {
        "alg": "origin",
        "alg_temp": None,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "eps": 0.001,
        "mask_token_id": None,
        "max_new_tokens": 512,
        "pad_token_id": eos,
        "steps": 512,
        "temperature": 0.0,
        "top_k": None,
        "top_p": None,
    }


def random_weights(config: dict[str, Any], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights with structure: every tensor distinct, so swapped names change the logits."""
    architecture = native_architecture(config["model_type"])
    assert architecture is not None
    with torch.device("meta"):
        model = architecture.build(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(model.state_dict().items()):
        state[name] = _init(name, tuple(param.shape), generator).to(dtype).contiguous()
    return state


def _init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    if "wte" in name or "embed_tokens" in name:
        return noise
    return noise / math.sqrt(shape[-1])  # keeps activations O(1) through the blocks


def save_weights(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    metadata = {"format": "pt"}
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata=metadata)
        return
    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[index::shards]}
        save_file(part, str(out / file), metadata=metadata)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, with the chat template inside tokenizer_config.json as both models ship it."""
    tokenizer.save_pretrained(str(out))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config_file = out / "tokenizer_config.json"
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if v is not None}
    config["chat_template"] = tokenizer.chat_template
    write_json(config_file, config)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tiny_model(args: argparse.Namespace) -> Path:
    family = FAMILIES[args.arch]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(family, args.vocab, args.seed)
    save_tokenizer(tokenizer, out)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in family.specials}
    vocab = 64 * math.ceil(len(tokenizer) / 64)  # embedding rows padded past the tokenizer, as in the real models
    if args.embedding_rows is not None:
        if args.embedding_rows < len(tokenizer):
            raise SystemExit(f"--embedding-rows {args.embedding_rows} is below the tokenizer's {len(tokenizer)} tokens")
        vocab = args.embedding_rows
    config = (llada_config if family.arch == "llada" else dream_config)(args, ids, vocab)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(family, ids))
    save_weights(random_weights(config, args.seed, getattr(torch, args.dtype)), out, args.shards)
    if args.quantize:
        quantize_checkpoint(out, config, args)
    return out


def quantize_checkpoint(out: Path, config: dict[str, Any], args: argparse.Namespace) -> None:
    """Rewrite the checkpoint in `out` as bitsandbytes writes it (transformers' save_pretrained of
    a model loaded with a BitsAndBytesConfig): the linear layers' quantized tensors and
    statistics beside the plain embeddings, norms and head, and config.json's quantization_config."""
    bits = 8 if args.quantize == "8bit" else 4
    plan = Quantization(bits=bits, quant_type=args.quant_type, double_quant=args.double_quant)
    model = load_model(out, dtype=args.dtype, device="cpu", quantization=plan)
    # clones: tied names share storage, which safetensors refuses
    state = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    for file in out.glob("model*.safetensors*"):
        file.unlink()
    save_weights(state, out, args.shards)
    quantization_config = plan.hf_config(getattr(torch, args.dtype))
    write_json(out / "config.json", {**config, "quantization_config": quantization_config})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--out", required=True, help="directory to write (created if absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: heads (llada), heads/2 (dream)")
    parser.add_argument("--intermediate", type=int, default=128, help="MLP hidden size")
    parser.add_argument("--vocab", type=int, default=384, help="BPE vocabulary before special tokens")
    parser.add_argument(
        "--embedding-rows",
        type=int,
        default=None,
        help="embedding and LM-head rows (default: the tokenizer's size rounded up to 64); "
        "real checkpoints have far more rows than width (LLaDA-8B: 126464 for 4096)",
    )
    parser.add_argument("--max-len", type=int, default=512, help="max_sequence_length / max_position_embeddings")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--shards", type=int, default=1, help="split the weights into N safetensors files")
    parser.add_argument(
        "--quantize", choices=["8bit", "4bit"], default=None,
        help="write a bitsandbytes checkpoint (LLM.int8 or 4-bit) as transformers' save_pretrained does",
    )  # fmt: skip
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="with --quantize 4bit")
    parser.add_argument("--double-quant", action="store_true", help="with --quantize 4bit: quantize the scales")
    args = parser.parse_args(argv)
    if args.hidden % args.heads or args.heads % (args.kv_heads or 1):
        parser.error("--hidden must divide by --heads and --heads by --kv-heads")
    return args


def main(argv: list[str] | None = None) -> None:
    out = make_tiny_model(parse_args(argv))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
