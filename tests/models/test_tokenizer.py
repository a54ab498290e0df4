"""vdiff.tokenizer: special ids come from the checkpoint, chat templates render as the models expect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import copy_model, edit_json
from vdiff.tokenizer import Tokenizer, TokenizerError


def token_id(path: Path, token: str) -> int:
    added = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    return next(entry["id"] for entry in added if entry["content"] == token)


def test_llada_special_ids(tiny_llada: Path) -> None:
    special = Tokenizer.load(tiny_llada).special
    config = json.loads((tiny_llada / "config.json").read_text())
    assert special.mask == config["mask_token_id"] == token_id(tiny_llada, "<|mdm_mask|>")
    assert special.eos == special.pad == token_id(tiny_llada, "<|endoftext|>")
    assert special.eot == token_id(tiny_llada, "<|eot_id|>")
    assert special.bos == token_id(tiny_llada, "<|startoftext|>")
    assert special.stop_ids == {special.eos, special.eot}


def test_dream_special_ids(tiny_dream: Path) -> None:
    special = Tokenizer.load(tiny_dream).special
    assert special.mask == token_id(tiny_dream, "<|mask|>")
    assert special.eos == special.pad == token_id(tiny_dream, "<|endoftext|>")
    assert special.eot == token_id(tiny_dream, "<|im_end|>")


def test_chat_templates_render_the_reference_formats(tiny_llada: Path, tiny_dream: Path) -> None:
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    assert Tokenizer.load(tiny_llada).apply_chat_template(messages) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 3 + 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert Tokenizer.load(tiny_dream).apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_encode_decode_round_trip(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.load(tiny_model_dir)
    text = "Reverse: abcdef, then count from 12 to 19."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.special.mask not in ids
    assert tokenizer.decode([*ids, tokenizer.special.eos]) == text  # specials are skipped by default


def test_chat_template_override_from_file_and_inline(tiny_llada: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    file = tmp_path / "template.jinja"
    file.write_text(template)
    messages = [{"role": "user", "content": "hi"}]
    for given in (str(file), template):
        tokenizer = Tokenizer.load(tiny_llada, chat_template=given)
        assert tokenizer.chat_template == template
        assert tokenizer.apply_chat_template(messages) == "[user]hi"


def test_separate_tokenizer_directory(tiny_llada: Path, tmp_path: Path) -> None:
    separate = copy_model(tiny_llada, tmp_path)
    for name in ("model.safetensors", "config.json"):
        (separate / name).unlink()
    assert Tokenizer.load(tiny_llada, tokenizer=separate).special == Tokenizer.load(tiny_llada).special


def test_mask_id_disagreement_is_refused(tiny_dream: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_dream, tmp_path)
    mask_id = json.loads((path / "config.json").read_text())["mask_token_id"]
    edit_json(path / "config.json", mask_token_id=mask_id - 1)
    with pytest.raises(TokenizerError, match="does not belong to this model"):
        Tokenizer.load(path)


def test_missing_mask_token_is_refused(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_json(path / "config.json", remove=("mask_token_id",))
    with pytest.raises(TokenizerError, match="no mask token"):
        Tokenizer.load(path)


def test_pad_equal_to_mask_is_refused(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_json(path / "tokenizer_config.json", pad_token="<|mdm_mask|>")
    with pytest.raises(TokenizerError, match="pad token id equals the mask token id"):
        Tokenizer.load(path)


def test_no_chat_template_is_a_clear_error(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_json(path / "tokenizer_config.json", remove=("chat_template",))
    tokenizer = Tokenizer.load(path)
    assert tokenizer.special.eot is None
    with pytest.raises(TokenizerError, match="--chat-template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
