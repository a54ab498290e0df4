"""When a request's answer is settled: stop tokens, stop strings and max_tokens on the stable prefix.

Only final tokens (the stable prefix) are looked at, so nothing reported is ever taken back.
Token ids keep the token that stopped the answer (an EOS, or the token that completed a stop
string); the text stops before a stop string, as vLLM's does by default. Text is only extended
once its characters are complete, so every reported text is a prefix of the final one.
"""

from __future__ import annotations

from vdiff.request import Request
from vdiff.tokenizer import Tokenizer


def settle(request: Request, final: int, tokenizer: Tokenizer) -> list[int] | None:
    """Move the newly final tokens into the request's output; the new ids, or None without news."""
    have = len(request.output_ids)
    final = min(final, request.max_tokens)
    if final <= have:
        return None
    new = _through_stop_token(request, request.answer[have:final])
    request.output_ids.extend(new)
    if not request.is_finished and len(request.output_ids) >= request.max_tokens:
        request.finish("length")
    previous_text = len(request.text)
    request.text = _settled_text(tokenizer.decode(request.output_ids), request.is_finished)
    if request.params.stop:
        _cut_at_stop_string(request, previous_text, have, tokenizer)
    return request.output_ids[have:]


def _settled_text(text: str, finished: bool) -> str:
    """Text that later tokens cannot change: a trailing U+FFFD may be a character whose bytes are still coming."""
    return text if finished else text.rstrip("\ufffd")


def _through_stop_token(request: Request, new: list[int]) -> list[int]:
    for i, token in enumerate(new):
        if token in request.stop_ids:
            # vLLM reports stop_reason None for EOS and the id for a requested stop_token_id
            request.finish("stop", token if token in request.params.stop_token_ids else None)
            return new[: i + 1]
    return new


def _cut_at_stop_string(request: Request, previous_text: int, have: int, tokenizer: Tokenizer) -> None:
    text = request.text
    hits = []
    for stop in request.params.stop:
        index = text.find(stop, max(0, previous_text - len(stop) + 1))
        if index >= 0:
            hits.append((index, stop))
    if not hits:
        return
    index, stop = min(hits)
    ids = request.output_ids
    end = next(k for k in range(have + 1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    del ids[end:]
    request.text = text[:index]
    request.finish("stop", stop)
