"""tools/make_tiny_model.py writes the real on-disk layout, deterministically."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, write_tiny

# The key sets of the published config.json files (LLaDA-8B-Instruct, Dream-v0-Instruct-7B).
LLADA_KEYS = {
    "activation_type", "alibi", "alibi_bias_max", "architectures", "attention_dropout", "attention_layer_norm",
    "attention_layer_norm_with_affine", "auto_map", "bias_for_layer_norm", "block_group_size", "block_type",
    "d_model", "embedding_dropout", "embedding_size", "eos_token_id", "flash_attention", "include_bias",
    "include_qkv_bias", "init_cutoff_factor", "init_device", "init_fn", "init_std", "input_emb_norm",
    "layer_norm_type", "layer_norm_with_affine", "mask_token_id", "max_sequence_length", "mlp_hidden_size",
    "mlp_ratio", "model_type", "multi_query_attention", "n_heads", "n_kv_heads", "n_layers", "pad_token_id",
    "precision", "residual_dropout", "rms_norm_eps", "rope", "rope_full_precision", "rope_theta",
    "scale_logits", "torch_dtype", "transformers_version", "use_cache", "vocab_size", "weight_tying",
}  # fmt: skip
DREAM_KEYS = {
    "architectures", "attention_dropout", "auto_map", "bos_token_id", "eos_token_id", "hidden_act",
    "hidden_size", "initializer_range", "intermediate_size", "mask_token_id", "max_position_embeddings",
    "max_window_layers", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "pad_token_id", "rms_norm_eps", "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "use_cache", "use_sliding_window", "vocab_size",
}  # fmt: skip
LLADA_NAMES = re.compile(
    r"model\.transformer\.(wte|ln_f|ff_out|blocks\.\d+\."
    r"(attn_norm|q_proj|k_proj|v_proj|attn_out|ff_norm|ff_proj|up_proj|ff_out))\.weight"
)
DREAM_NAMES = re.compile(
    r"lm_head\.weight|model\.(embed_tokens|norm)\.weight|model\.layers\.\d+\.("
    r"self_attn\.[qkv]_proj\.(weight|bias)|self_attn\.o_proj\.weight|mlp\.(gate|up|down)_proj\.weight|"
    r"(input_layernorm|post_attention_layernorm)\.weight)"
)
FILES = {"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json"}
FILES |= {"tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize(
    ("arch", "keys", "names"), [("llada", LLADA_KEYS, LLADA_NAMES), ("dream", DREAM_KEYS, DREAM_NAMES)]
)
def test_real_config_keys_and_tensor_names(arch: str, keys: set[str], names: re.Pattern[str], tmp_path: Path) -> None:
    path = write_tiny(tmp_path / arch, arch, "--layers", "3")
    assert {p.name for p in path.iterdir()} == FILES
    config = json.loads((path / "config.json").read_text())
    assert set(config) == keys
    state = load_file(str(path / "model.safetensors"))
    assert all(names.fullmatch(name) for name in state), [n for n in state if not names.fullmatch(n)]
    layers = {m[1] for name in state if (m := re.search(r"(?:blocks|layers)\.(\d+)\.", name))}
    assert layers == {"0", "1", "2"}


def test_special_tokens_follow_the_bpe_vocabulary(tiny_llada: Path) -> None:
    tokenizer = json.loads((tiny_llada / "tokenizer.json").read_text())
    config = json.loads((tiny_llada / "config.json").read_text())
    bpe_size = len(tokenizer["model"]["vocab"])
    special_ids = sorted(entry["id"] for entry in tokenizer["added_tokens"])
    assert special_ids == list(range(bpe_size, bpe_size + 6))
    assert config["vocab_size"] == config["embedding_size"] >= bpe_size + 6
    assert config["vocab_size"] % 64 == 0
    assert tokenizer["pre_tokenizer"]["type"] == "ByteLevel"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    first, second = write_tiny(tmp_path / "a", "dream"), write_tiny(tmp_path / "b", "dream")
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = write_tiny(tmp_path / "c", "dream", "--seed", "1")
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [
        sys.executable,
        str(ROOT / "tools" / "make_tiny_model.py"),
        "--arch",
        "llada",
        "--out",
        str(out),
    ]
    command += ["--hidden", "32", "--heads", "2", "--dtype", "float32"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert f"wrote {out}" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["d_model"], config["n_heads"], config["torch_dtype"]) == (32, 2, "float32")
    bad = subprocess.run([*command[:6], "--hidden", "30", "--heads", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--hidden must divide by --heads" in bad.stderr


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_embedding_rows_widen_the_vocabulary_past_the_tokenizer(arch: str, tmp_path: Path) -> None:
    out = write_tiny(tmp_path / arch, arch, "--embedding-rows", "1024")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 1024
    head = "model.transformer.ff_out.weight" if arch == "llada" else "lm_head.weight"
    assert load_file(out / "model.safetensors")[head].shape[0] == 1024
    with pytest.raises(SystemExit, match="below the tokenizer"):
        write_tiny(tmp_path / "small", arch, "--embedding-rows", "64")
