"""The one place vdiff loads a tokenizer and learns the ids that drive diffusion decoding.

The mask, EOS, end-of-turn, pad and BOS ids are read from the checkpoint (config.json,
generation_config.json) and the tokenizer itself, never from family defaults, and checked
against each other so that a mismatched tokenizer fails at load time with a clear message.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdiff.models.checkpoint import Checkpoint, resolve_model_dir
from vdiff_client.tokenizer import longest_token_chars, read_template

log = logging.getLogger(__name__)

_SENTINEL = "\x00vdiff-sentinel\x00"


class TokenizerError(ValueError):
    """A tokenizer that cannot serve this model, with the reason."""


@dataclass(frozen=True)
class SpecialTokens:
    mask: int
    eos: int
    pad: int
    eot: int | None = None  # end of a chat turn (<|eot_id|>, <|im_end|>), when the template has one
    bos: int | None = None

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.eos, self.eot) if i is not None)


class Tokenizer:
    """A Hugging Face tokenizer plus the special ids and chat template of its model."""

    def __init__(self, hf: Any, special: SpecialTokens) -> None:
        self.hf = hf
        self.special = special

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | Checkpoint,
        tokenizer: str | os.PathLike[str] | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Load from the model directory (or `tokenizer`, a separate directory or hub id)."""
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
        source = resolve_model_dir(tokenizer) if tokenizer is not None else checkpoint.path
        hf = _auto_tokenizer(source, trust_remote_code)
        if chat_template is not None:
            hf.chat_template = read_template(chat_template)
        return cls(hf, resolve_special_tokens(hf, checkpoint.config, checkpoint.generation_config))

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @functools.cached_property
    def decodes_locally(self) -> bool:
        """A decode of a window of ids extends a decode of its start (vdiff/detokenizer.py);
        not so when spaces before punctuation are cleaned up after decoding."""
        return not getattr(self.hf, "clean_up_tokenization_spaces", False)

    @functools.cached_property
    def longest_token_chars(self) -> int:
        return longest_token_chars(self.hf)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = self.hf.encode(text, add_special_tokens=add_special_tokens)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:  # what hf.decode runs, without its 10 us of conversions
            fast: str = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
            return fast
        text: str = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    @functools.cached_property
    def _backend(self) -> Any:
        """The Rust tokenizer of a fast tokenizer that decodes as it does (no space clean-up)."""
        return self.hf.backend_tokenizer if getattr(self.hf, "is_fast", False) and self.decodes_locally else None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template; pass one (--chat-template)")
        text: str = self.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text


def resolve_special_tokens(hf: Any, config: Mapping[str, Any], generation: Mapping[str, Any]) -> SpecialTokens:
    mask = _agreeing_id("mask", config.get("mask_token_id"), getattr(hf, "mask_token_id", None))
    eos = _first_id(getattr(hf, "eos_token_id", None), config.get("eos_token_id"), generation.get("eos_token_id"))
    if mask is None:
        raise TokenizerError("no mask token: config.json has no mask_token_id and the tokenizer no mask_token")
    if eos is None:
        raise TokenizerError("no EOS token: neither the tokenizer, config.json nor generation_config.json names one")
    pad = _first_id(getattr(hf, "pad_token_id", None), config.get("pad_token_id"), eos)
    assert pad is not None
    if pad == mask:
        raise TokenizerError(f"the pad token id equals the mask token id ({mask}); padding would look like masks")
    bos = _first_id(getattr(hf, "bos_token_id", None), config.get("bos_token_id"))
    return SpecialTokens(mask=mask, eos=eos, pad=pad, eot=_end_of_turn_id(hf, eos), bos=bos)


def _agreeing_id(what: str, from_config: int | None, from_tokenizer: int | None) -> int | None:
    if from_config is not None and from_tokenizer is not None and from_config != from_tokenizer:
        raise TokenizerError(
            f"config.json says the {what} token id is {from_config} but the tokenizer says {from_tokenizer}; "
            "the tokenizer does not belong to this model"
        )
    return from_config if from_config is not None else from_tokenizer


def _first_id(*candidates: int | Sequence[int] | None) -> int | None:
    for candidate in candidates:
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    return None


def _end_of_turn_id(hf: Any, eos: int) -> int | None:
    """The special token the chat template writes right after a message's content.

    Rendering a one-message chat around a sentinel finds it for any template (<|eot_id|> for
    LLaDA, <|im_end|> for Dream) without knowing the family.
    """
    if not isinstance(getattr(hf, "chat_template", None), str):
        return None
    try:
        text = hf.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    except Exception as error:  # a template may reject a lone user turn; then there is no eot to learn
        log.debug("chat template did not render a probe message: %s", error)
        return None
    after = text.split(_SENTINEL, 1)[-1] if _SENTINEL in text else ""
    ids = hf.encode(after, add_special_tokens=False) if after else []
    special = set(getattr(hf, "all_special_ids", [])) | set(getattr(hf, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special and ids[0] != eos else None


def _auto_tokenizer(source: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as error:
        # A custom tokenizer class (Dream ships one) with tokenizer.json beside it loads as a plain
        # fast tokenizer; that is what the custom class wraps.
        if not (source / "tokenizer.json").exists():
            raise TokenizerError(f"cannot load a tokenizer from {source}: {error}") from None
        log.warning("%s: %s; loading tokenizer.json as a PreTrainedTokenizerFast", source, error)
        return PreTrainedTokenizerFast.from_pretrained(str(source))
