"""The text of a growing answer, decoded a few tokens at a time (vLLM's prefix and read offsets).

A token decoded alone loses its context: a SentencePiece piece's leading space is dropped at the
start of a decode, and a character's bytes may span tokens. So each decode covers a short window:
from `prefix`, tokens whose text is already out and serve as context, to the newest token. The
window's text past the text of [prefix, read) is new. While the window's text ends in U+FFFD a
character's bytes may still be coming: the ids are not read yet, and only the text before that
U+FFFD is shown. The work per call grows with the new tokens (and the short window), not with the
answer.

The result equals decoding every id at once when a tokenizer's decoding is local, as LLaDA's,
Dream's and vdiff's own are. A tokenizer that cleans up spaces around punctuation after decoding
(`clean_up_tokenization_spaces`) is decoded whole each time instead, which stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from vdiff.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what a decode gives for a character whose bytes have not all come


@dataclass
class IncrementalDetokenizer:
    prefix: int = 0  # first id of the context window
    read: int = 0  # ids whose text is in `text`
    text: str = ""  # the decoded text of ids[:read]
    # what can be shown: `text`, and the text of the ids after it up to a trailing U+FFFD; it only
    # grows (a decode's text before its trailing U+FFFD is never changed by later bytes)
    shown: str = ""

    def extend(self, tokenizer: Tokenizer, ids: Sequence[int], final: bool) -> None:
        """Read ids[read:] (`ids` extends the ids seen before). When `final`, a trailing U+FFFD
        is shown as it is: no more bytes are coming."""
        text = self.text_through(tokenizer, ids)
        if text is None:
            return
        if text.endswith(INCOMPLETE) and not final:
            self.shown = max(self.shown, text.rstrip(INCOMPLETE), key=len)
            return
        # the ids just read become the next window's context (unused when decoding whole)
        self.prefix, self.read, self.text = self.read, len(ids), text
        self.shown = text

    def text_through(self, tokenizer: Tokenizer, ids: Sequence[int]) -> str | None:
        """The text of all of `ids`, given what was read; None when the new ids add no characters."""
        if not tokenizer.decodes_locally:
            return tokenizer.decode(ids)
        context = tokenizer.decode(ids[self.prefix : self.read])
        window = tokenizer.decode(ids[self.prefix :])
        if len(window) <= len(context):  # e.g. special tokens, skipped: keep them in the window
            return None
        return self.text + window[len(context) :]

    def snapshot(self) -> IncrementalDetokenizer:
        return replace(self)
