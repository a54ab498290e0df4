"""Text deltas from token ids, statelessly, so any detokenizer instance can serve any response.

Decoding only the new ids of a response loses the leading space of SentencePiece pieces and
splits multi-byte characters across responses. The denoiser therefore sends every final id of the
answer so far with two character offsets into its decoded text: where the text already sent ends
and where the text that is settled now ends (before a stop string, and short of a character whose
bytes are still coming). The delta is the decoded text between the two; both offsets come from the
engine, which decodes the same ids with the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from vdiff.tokenizer import Tokenizer


def text_delta(tokenizer: Tokenizer, token_ids: Sequence[int], sent: int, settled: int) -> str:
    """The characters [sent, settled) of the decoded answer."""
    if settled <= sent:
        return ""
    return tokenizer.decode(token_ids)[sent:settled]
