"""The on-disk side of the demo models: a character tokenizer and HF checkpoint directories.

Reuses tools/make_tiny_model.py for everything LLaDA checkpoints share (config key set, special
tokens, chat template, tokenizer saving), so the demo model loads exactly like the real ones.
Every printable ASCII character and the newline is one token, so no digit or letter is ever
merged with its neighbours (what makes carries and orderings learnable at this size).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from make_tiny_model import FAMILIES, llada_config, save_tokenizer, write_json

LLADA = FAMILIES["llada"]
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (a BPE without merges), then LLaDA's special tokens."""
    vocab = {char: index for index, char in enumerate(CHARACTERS)}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.decoder = decoders.Fuse()  # join the characters back without separators
    model.normalizer = ascii_only()
    model.add_special_tokens(list(LLADA.specials))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token=LLADA.bos,
        eos_token=LLADA.eos,
        pad_token=LLADA.eos,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    hf.chat_template = LLADA.chat_template
    return hf


def ascii_only() -> normalizers.Normalizer:
    """Accents dropped (é -> e), any other character outside the vocabulary shown as '?'.

    Without it a BPE with no unknown token silently deletes such characters from the prompt.
    """
    outside = Regex(r"[^\n\x20-\x7e]")  # not newline or printable ASCII
    return normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Replace(outside, "?")])


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in LLADA.specials}


def embedding_rows(tokenizer: PreTrainedTokenizerFast) -> int:
    return 64 * math.ceil(len(tokenizer) / 64)  # padded past the tokenizer, as the real models are


def demo_llada_config(tokenizer: PreTrainedTokenizerFast, size: argparse.Namespace) -> dict[str, Any]:
    """LLaDA-8B-Instruct's config.json key set; `size` has layers, hidden, heads, intermediate, max_len."""
    args = argparse.Namespace(kv_heads=None, dtype="float32", **vars(size))
    return llada_config(args, special_ids(tokenizer), embedding_rows(tokenizer))


def demo_llama_config(tokenizer: PreTrainedTokenizerFast, size: argparse.Namespace) -> dict[str, Any]:
    """A plain Llama causal LM (transformers' LlamaForCausalLM) sharing the tokenizer."""
    ids = special_ids(tokenizer)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": embedding_rows(tokenizer),
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.heads,
        "max_position_embeddings": size.max_len,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": ids[LLADA.bos],
        "eos_token_id": ids[LLADA.eos],
        "pad_token_id": ids[LLADA.eos],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def llada_generation_config(tokenizer: PreTrainedTokenizerFast, answer_len: int) -> dict[str, Any]:
    """The recommended decoding: one token per step, low-confidence remasking, greedy."""
    ids = special_ids(tokenizer)
    return {
        "alg": "low_confidence",
        "block_length": answer_len,  # one block: the whole answer is one canvas, as trained
        "bos_token_id": ids[LLADA.bos],
        "eos_token_id": ids[LLADA.eos],
        "max_new_tokens": answer_len,
        "pad_token_id": ids[LLADA.eos],
        "steps": answer_len,
        "temperature": 0.0,
    }


def llama_generation_config(tokenizer: PreTrainedTokenizerFast, answer_len: int) -> dict[str, Any]:
    ids = special_ids(tokenizer)
    return {
        "bos_token_id": ids[LLADA.bos],
        "do_sample": False,
        "eos_token_id": [ids[LLADA.eos], ids["<|eot_id|>"]],
        "max_new_tokens": answer_len,
        "pad_token_id": ids[LLADA.eos],
    }


def save_checkpoint(
    model: nn.Module,
    out: Path,
    config: dict[str, Any],
    generation: dict[str, Any],
    tokenizer: PreTrainedTokenizerFast,
    dtype: torch.dtype,
) -> Path:
    """config.json, generation_config.json, model.safetensors and the tokenizer files in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu", dtype).contiguous() for name, t in sorted(model.state_dict().items())}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", {**config, "torch_dtype": str(dtype).removeprefix("torch.")})
    write_json(out / "generation_config.json", generation)
    save_tokenizer(tokenizer, out)
    return out


def chat_prompt(tokenizer: PreTrainedTokenizerFast, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
