"""The autoregressive verifier of Adaptive Parallel Decoding (APD, arXiv 2506.00413).

Any causal LM that transformers loads serves, as long as it shares the diffusion model's tokenizer:
below the verifier's logit width, where the mixture compares them (APD cuts Dream's 152,064 logits
to Qwen2.5-0.5B's 151,936), an id must mean the same token to both wherever both define it.

Each request keeps its own verifier cache (`VerifierState`): the keys and values of its accepted
tokens and the verifier's logits for the first position not yet accepted. A round scores the drafts
at [start, end) (the first round feeds the prompt too), then `accept` crops the cache to the
accepted prefix. One forward scores the rounds of every APD request of an engine step, packed
into one sequence (`Verifier._forward_packed`): the linear layers run on exactly the fed tokens,
with no padding, and attention runs round by round on each round's own keys. A lone round runs
as a batch-1 loop does, with the model's own attention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vdiff.models import Checkpoint, ModelLoadError
from vdiff.tokenizer import Tokenizer


@dataclass
class VerifierState:
    """One request's verifier cache."""

    # per layer, the keys and values of the accepted tokens: (1, K, accepted length, D) each,
    # K the key/value heads
    layers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    next_logits: Tensor | None = None  # (V,) logits for the first position not yet accepted
    scored: Tensor | None = None  # (n + 1, V) this round's logits for positions start .. start + n
    # mid-round, per layer: the keys and values through the drafts, (1, K, start + n, D) each
    pending: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def cached_length(self) -> int:
        return 0 if not self.layers else int(self.layers[0][0].shape[-2])


@dataclass(frozen=True)
class VerifierRound:
    """What one request asks of a verifier forward: score `drafts`, which follow `context`."""

    state: VerifierState
    context: Tensor  # (start,) the canvas before the drafts: the prompt and every accepted token
    drafts: Tensor  # (n,)

    @property
    def fed(self) -> Tensor:
        """The tokens this forward feeds: the drafts, after the prompt in a request's first round."""
        return self.drafts if self.state.layers else torch.cat([self.context, self.drafts])


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

    def score(self, rounds: list[VerifierRound]) -> list[Tensor]:
        """Per round, (n, V) verifier logits for the n draft positions [start, start + n), each
        conditioned on the context and the drafts before it: one forward for all rounds where the
        model can pack them (`packs`), else one forward each."""
        fed = [r.fed for r in rounds]
        if len(rounds) > 1 and self.packs:
            results = self._forward_packed(rounds, fed)
        else:
            results = [self._forward_alone(r, tokens) for r, tokens in zip(rounds, fed, strict=True)]
        scored = []
        for round_, (read, layers) in zip(rounds, results, strict=True):
            state = round_.state
            # in a first round the row before the drafts predicts the first; later, the last
            # round's logits predicted `start`
            rows = read if state.next_logits is None else torch.cat([state.next_logits[None], read])
            state.scored, state.pending = rows, layers  # (n + 1, V): the last row predicts the one after
            scored.append(rows[:-1])
        return scored

    def accept(self, state: VerifierState, start: int, accepted: int) -> None:
        """Keep the first `accepted` drafts: crop the cache after them and keep the logits that follow.

        With every draft accepted the next position's logits are the round's last row. (APD's code
        keeps the row before it there, the prediction for the last draft itself; vdiff keeps the
        one for the position it will verify next.) The kept keys and values are copies, so the
        round's packed tensors go.
        """
        assert state.scored is not None
        end = start + accepted
        state.layers = [(k[..., :end, :].clone(), v[..., :end, :].clone()) for k, v in state.pending]
        state.next_logits, state.scored, state.pending = state.scored[accepted].clone(), None, []

    @property
    def packs(self) -> bool:
        """Whether rounds can share a forward. The model must take its attention from transformers'
        attention interface, where the packed rounds' attention is registered, and attend plainly:
        sliding windows, logit soft-capping and attention sinks are not reproduced there, so such
        a verifier scores its rounds one by one."""
        config = self.model.config
        layer_types = getattr(config, "layer_types", None) or []
        plain = (
            all(kind == "full_attention" for kind in layer_types)
            and not (getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None))
            and getattr(config, "attn_logit_softcapping", None) is None
            and config.model_type not in ("gpt_oss",)
        )  # fmt: skip
        return plain and bool(getattr(self.model, "_supports_attention_backend", False))

    def _forward_alone(self, round_: VerifierRound, fed: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The round's rows read (from the one before the drafts) and its keys and values, with the
        model's own attention and its whole output, exactly as a batch-1 loop runs."""
        cache = _packed_cache([round_])
        logits = self.model(fed[None], past_key_values=cache, use_cache=True).logits[0]  # (fed, V)
        read = logits if round_.state.layers else logits[len(round_.context) - 1 :]
        return read, [(layer.keys, layer.values) for layer in cache.layers]

    def _forward_packed(
        self, rounds: list[VerifierRound], fed: list[Tensor]
    ) -> list[tuple[Tensor, list[tuple[Tensor, Tensor]]]]:
        """Every round's fed tokens packed into one sequence, so that the linear layers run on
        exactly those tokens; per round, the rows read and its keys and values.

        Keys are [every round's cache, round after round | every round's fed tokens]. Attention
        (`packed_rounds_attention`) runs round by round: a fed token attends to its own round's
        cache and its round's fed tokens up to itself, at its round's own positions. The head runs
        only on the rows read (a first round's prompt rows are not), so the logits held stay small.
        """
        skips = [0 if r.state.layers else len(r.context) - 1 for r in rounds]
        cached = [r.state.cached_length for r in rounds]
        layout = PackedRounds.of(cached, [len(t) for t in fed], skips, fed[0].device)
        cache = _packed_cache(rounds)
        config = self.model.config
        backend, config._attn_implementation = config._attn_implementation, _use_packed_attention()
        try:
            logits = self.model(
                torch.cat(fed)[None], position_ids=layout.positions[None], past_key_values=cache,
                use_cache=True, logits_to_keep=layout.read_rows, packed_rounds=layout,
            ).logits[0]  # fmt: skip  # (rows read, V)
        finally:
            config._attn_implementation = backend
        results = []
        for part in layout.parts:
            own = [part.cached_keys, part.fed_keys]
            layers = [(_joined(layer.keys, own), _joined(layer.values, own)) for layer in cache.layers]
            results.append((logits[part.read], layers))
        return results


@dataclass(frozen=True)
class PackedPart:
    """Where one round sits in a packed forward."""

    cached_keys: slice  # its cache among the keys
    fed: slice  # its fed tokens among the queries
    fed_keys: slice  # the same tokens among the keys, after every cache
    read: slice  # its rows among the logits kept
    allowed: Tensor  # (fed, cached + fed) bool: causal over its fed tokens, all of its cache


@dataclass(frozen=True)
class PackedRounds:
    """The layout of a packed verifier forward: C cached keys, then T fed tokens."""

    parts: list[PackedPart]
    positions: Tensor  # (T,) each fed token's position in its own round
    read_rows: Tensor  # (rows read,) the fed tokens whose logits are read, in order

    @classmethod
    def of(cls, cached: list[int], fed: list[int], skips: list[int], device: torch.device) -> PackedRounds:
        """`skips`: per round, the fed tokens before its first row read."""
        prefix, key_start, query_start, read_start = sum(cached), 0, 0, 0
        parts, positions, read_rows = [], [], []
        for count, length, skip in zip(cached, fed, skips, strict=True):
            keys = torch.arange(count + length, device=device)
            allowed = keys <= count + torch.arange(length, device=device)[:, None]
            fed_slice = slice(query_start, query_start + length)
            fed_keys = slice(prefix + query_start, prefix + query_start + length)
            read = slice(read_start, read_start + length - skip)
            parts.append(PackedPart(slice(key_start, key_start + count), fed_slice, fed_keys, read, allowed))
            positions.append(torch.arange(count, count + length, device=device))
            read_rows.append(torch.arange(query_start + skip, query_start + length, device=device))
            key_start, query_start, read_start = key_start + count, query_start + length, read.stop
        return cls(parts, torch.cat(positions), torch.cat(read_rows))


PACKED_ATTENTION = "vdiff_packed_rounds"


def packed_rounds_attention(
    module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, None]:
    """transformers' attention-interface function for a packed forward: (1, H, T, D) queries and
    (1, K, C + T, D) keys and values laid out as `PackedRounds` says; (1, T, H, D) out.

    Each round attends to its own keys only, so no work is spent across rounds."""
    layout: PackedRounds = kwargs["packed_rounds"]
    for option in ("sliding_window", "softcap", "s_aux"):
        assert kwargs.get(option) is None, f"packed verifier rounds do not support {option} (Verifier.packs)"
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention; a mask with enable_gqa takes SDPA's slowest kernel
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    outputs = []
    for part in layout.parts:
        own = [part.cached_keys, part.fed_keys]
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, part.fed], _joined(key, own), _joined(value, own), attn_mask=part.allowed,
            scale=kwargs.get("scaling"),
        ))  # fmt: skip
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _use_packed_attention() -> str:
    """Register the packed rounds' attention with transformers, on first use; its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_rounds_attention)
    return PACKED_ATTENTION


def _joined(packed: Tensor, parts: list[slice]) -> Tensor:
    """One round's (1, K, cached + fed, D) keys or values from a packed layer's parts."""
    return torch.cat([packed[:, :, part] for part in parts], dim=2)


def _packed_cache(rounds: list[VerifierRound]) -> Any:
    """A transformers DynamicCache holding the rounds' caches one after another on the sequence axis."""
    from transformers import DynamicCache

    kept = [r.state.layers for r in rounds if r.state.layers]
    if not kept:
        return DynamicCache()
    if len(kept) == 1:
        return DynamicCache(kept[0])
    layers = zip(*kept, strict=True)  # per layer, each round's (keys, values)
    return DynamicCache([(torch.cat([k for k, _ in layer], dim=2), torch.cat([v for _, v in layer], dim=2))
                         for layer in layers])  # fmt: skip


def _vocabulary(checkpoint: Checkpoint) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(checkpoint.path).get_vocab())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"verifier {checkpoint.path} has no tokenizer to check against the model's: {exc}"
        ) from exc
