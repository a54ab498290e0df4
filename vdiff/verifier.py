"""The autoregressive verifier of Adaptive Parallel Decoding (APD, arXiv 2506.00413).

Any causal LM that transformers loads serves, as long as it shares the diffusion model's tokenizer:
below the verifier's logit width, where the mixture compares them (APD cuts Dream's 152,064 logits
to Qwen2.5-0.5B's 151,936), an id must mean the same token to both wherever both define it.

Each request keeps its own verifier cache (`VerifierState`): the keys and values of its accepted
tokens and the verifier's logits for the first position not yet accepted. A round scores the drafts
at [start, end) in one forward (the first round feeds the prompt too), then `accept` crops the cache
to the accepted prefix. The verifier runs one request at a time; it is small next to the diffusion
model, whose forward the engine batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vdiff.models import Checkpoint, ModelLoadError
from vdiff.tokenizer import Tokenizer


@dataclass
class VerifierState:
    """One request's verifier cache."""

    cache: Any = None  # transformers DynamicCache of the accepted tokens (and, mid-round, the drafts)
    next_logits: Tensor | None = None  # (V,) logits for the first position not yet accepted
    scored: Tensor | None = None  # (n + 1, V) this round's logits for positions start .. start + n


class Verifier:
    def __init__(self, model: Any, path: str) -> None:
        self.model = model
        self.path = path
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        positions = getattr(model.config, "max_position_embeddings", None)
        self.max_length: int | None = None if positions is None else int(positions)

    @classmethod
    def load(cls, path: str, tokenizer: Tokenizer, dtype: torch.dtype, device: torch.device) -> Verifier:
        """Load a causal LM and check that it reads the diffusion model's tokens as the same tokens."""
        from transformers import AutoModelForCausalLM

        checkpoint = Checkpoint.open(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"verifier {path!r} is not a causal LM that transformers can load: {exc}") from exc
        verifier = cls(model.to(device).eval(), path)  # type: ignore[arg-type]  # transformers' stub wraps .to
        verifier.check_vocabulary(_vocabulary(checkpoint), tokenizer.hf.get_vocab())
        return verifier

    def check_vocabulary(self, ours: dict[str, int], theirs: dict[str, int]) -> None:
        """Every id below the verifier's width means the same token to both, where both define it:
        the diffusion model's own added tokens (Dream's mask, ids 151665-6) fall on the verifier's
        unused rows (Qwen2.5-0.5B defines 151665 of its 151936), as in APD's pairing."""
        by_id = {index: token for token, index in ours.items()}
        for token, index in sorted(theirs.items(), key=lambda item: item[1]):
            if index >= self.vocab_size:
                continue
            if ours.get(token, index) != index or by_id.get(index, token) != token:
                raise ModelLoadError(
                    f"verifier {self.path!r} does not share the model's tokenizer: token {token!r} is id {index} "
                    f"for the diffusion model, the verifier has it as {ours.get(token)!r} and id {index} as "
                    f"{by_id.get(index)!r}"
                )

    def score(self, state: VerifierState, canvas: Tensor, drafts: Tensor, start: int) -> Tensor:
        """(n, V) verifier logits for the n positions [start, start + n), each conditioned on the
        canvas before `start` and the drafts before it."""
        from transformers import DynamicCache

        if state.cache is None:  # the first round: the prompt (and nothing else) precedes the drafts
            state.cache = DynamicCache()
            ids = torch.cat([canvas[:start], drafts])[None]  # (1, start + n)
            logits = self.model(ids, past_key_values=state.cache, use_cache=True).logits[0, start - 1 :].clone()
        else:  # the cache holds every accepted token, and the last round's logits predicted `start`
            assert state.next_logits is not None
            fresh = self.model(drafts[None], past_key_values=state.cache, use_cache=True).logits[0]  # (n, V)
            logits = torch.cat([state.next_logits[None], fresh])
        state.scored = logits  # (n + 1, V): the last row predicts the position after the drafts
        return logits[:-1]

    def accept(self, state: VerifierState, start: int, accepted: int) -> None:
        """Keep the first `accepted` drafts: crop the cache after them and keep the logits that follow.

        With every draft accepted the next position's logits are the round's last row. (APD's code
        keeps the row before it there, the prediction for the last draft itself; vdiff keeps the
        one for the position it will verify next.)
        """
        assert state.scored is not None
        state.cache.crop(start + accepted)
        state.next_logits, state.scored = state.scored[accepted].clone(), None  # not a view of the round's rows


def _vocabulary(checkpoint: Checkpoint) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(checkpoint.path).get_vocab())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"verifier {checkpoint.path} has no tokenizer to check against the model's: {exc}"
        ) from exc
