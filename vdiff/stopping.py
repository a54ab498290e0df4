"""When a request's answer is settled: stop tokens, stop strings and max_tokens on the stable prefix.

Only final tokens (the stable prefix) are looked at, so nothing reported is ever taken back.
Token ids keep the token that stopped the answer (an EOS, or the token that completed a stop
string); the text stops before a stop string, as vLLM's does by default. The text is decoded
incrementally (vdiff/detokenizer.py), so a step's text work grows with its new tokens only.
Reported text only grows: a character whose bytes are still coming waits, and with stop strings
the last (longest stop - 1) characters wait until no stop string can start in them.
"""

from __future__ import annotations

from vdiff.detokenizer import IncrementalDetokenizer
from vdiff.request import Request
from vdiff.tokenizer import Tokenizer


def settle(request: Request, final: int, tokenizer: Tokenizer) -> tuple[list[int], str] | None:
    """Move the newly final tokens into the request's output: (new ids, new text), or None."""
    have = len(request.output_ids)
    final = min(final, request.max_tokens)
    if final <= have:
        return None
    new = _through_stop_token(request, request.answer[have:final])
    request.output_ids.extend(new)
    if not request.is_finished and len(request.output_ids) >= request.max_tokens:
        request.finish("length")
    decoder = request.detokenizer
    before = decoder.snapshot()
    decoder.extend(tokenizer, request.output_ids, request.is_finished)
    reported = len(request.text)
    request.text = decoder.shown
    if request.params.stop:
        _cut_at_stop_string(request, before, have, tokenizer)
        if not request.is_finished:
            request.text = decoder.shown[: len(decoder.shown) - _held_back(request)]
    return request.output_ids[have:], request.text[reported:]


def _held_back(request: Request) -> int:
    """Characters a stop string may still begin in, so not yet reported."""
    return min(len(request.detokenizer.shown), max(len(stop) for stop in request.params.stop) - 1)


def _through_stop_token(request: Request, new: list[int]) -> list[int]:
    for i, token in enumerate(new):
        if token in request.stop_ids:
            # vLLM reports stop_reason None for EOS and the id for a requested stop_token_id
            request.finish("stop", token if token in request.params.stop_token_ids else None)
            return new[: i + 1]
    return new


def _cut_at_stop_string(request: Request, before: IncrementalDetokenizer, have: int, tokenizer: Tokenizer) -> None:
    """End the answer before the first stop string in the new text, after the token completing it."""
    text = request.detokenizer.shown
    hits = []
    for stop in request.params.stop:
        index = text.find(stop, _search_from(before, stop))
        if index >= 0:
            hits.append((index, stop))
    if not hits:
        return
    index, stop = min(hits)
    ids = request.output_ids
    del ids[_token_completing(ids, have, stop, before, tokenizer) :]
    request.text = text[:index]
    request.finish("stop", stop)


def _token_completing(
    ids: list[int], have: int, stop: str, before: IncrementalDetokenizer, tokenizer: Tokenizer
) -> int:
    """The fewest ids (more than `have`) whose text holds `stop`, decoded on from `before`."""
    start = _search_from(before, stop)
    for end in range(have + 1, len(ids)):
        text = before.text_through(tokenizer, ids[:end])
        if text is not None and text.find(stop, start) >= 0:
            return end
    return len(ids)


def _search_from(before: IncrementalDetokenizer, stop: str) -> int:
    """Where `stop` may first begin: the text shown before held no stop string."""
    return max(0, len(before.shown) - len(stop) + 1)
