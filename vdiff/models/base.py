"""What every model the engine drives looks like, and the one place the logit shift lives.

Models keep the Hugging Face calling convention: `model(input_ids, attention_mask=None,
position_ids=None).logits` is (B, L, V) exactly as the checkpoint's own code returns it, so
reference samplers can drive vdiff's models unchanged. Families differ in what row i of those
logits predicts: LLaDA's row i predicts token i; Dream (Qwen2 initialisation) predicts token i
from row i - 1, and its sampler shifts the logits right by one. `canvas_logits` applies that
shift, so every vdiff decoder reads "row i predicts position i" whatever the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vdiff.kv_cache import BatchKV
    from vdiff.models.layers import AttentionMask


@dataclass
class DiffusionLMOutput:
    logits: Tensor  # (B, L, V), unshifted, in the model dtype


class DiffusionLM(Protocol):
    """The interface the engine relies on; native models and the remote-code adapter satisfy it."""

    logits_shift: int  # how many positions the logits must move right to line up with the canvas
    mask_token_id: int | None
    max_sequence_length: int
    supports_kv_cache: bool  # takes `kv` (vdiff/kv_cache.py): vdiff's native models do
    # honours AttentionMask.sequences and RowTiles (vdiff/models/invariant.py): native models do
    supports_batch_invariance: bool
    # `hidden_states` and `head` split the forward, so the engine runs the LM head only on the
    # rows a strategy reads (for LLaDA-8B's 126,464-token head, most of a step): native models do
    supports_row_head: bool

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | AttentionMask | None = None,
        position_ids: Tensor | None = None,
        kv: BatchKV | None = None,
    ) -> DiffusionLMOutput: ...

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | AttentionMask | None = None,
        position_ids: Tensor | None = None,
        kv: BatchKV | None = None,
    ) -> Tensor: ...

    def head(self, hidden: Tensor) -> Tensor: ...


class HFStyleModel(nn.Module):
    """`device` and `dtype` as transformers models expose them (reference samplers read model.device)."""

    supports_kv_cache = True
    supports_batch_invariance = True
    supports_row_head = True

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class NativeModel(HFStyleModel):
    """vdiff's own architectures: a body (`self.model`, the checkpoint's `model.` prefix) that ends at
    the last hidden states, and a head that turns any of their rows into logits."""

    model: nn.Module

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | AttentionMask | None = None,
        position_ids: Tensor | None = None,
        kv: BatchKV | None = None,
    ) -> DiffusionLMOutput:
        return DiffusionLMOutput(self.head(self.hidden_states(input_ids, attention_mask, position_ids, kv)))

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | AttentionMask | None = None,
        position_ids: Tensor | None = None,
        kv: BatchKV | None = None,
    ) -> Tensor:
        """(B, L, hidden): what the head turns into logits, row for row."""
        hidden: Tensor = self.model(input_ids, attention_mask, position_ids, kv)
        return hidden

    def head(self, hidden: Tensor) -> Tensor:
        """(..., hidden) -> (..., V) logits."""
        raise NotImplementedError


def canvas_logits(logits: Tensor, shift: int) -> Tensor:
    """Line logits up with the canvas: row i of the result scores position i.

    shift == 1 is Dream's `cat([logits[:, :1], logits[:, :-1]], dim=1)`: position 0 reuses its
    own row (position 0 is always prompt, so its prediction is never used).
    """
    if shift == 0:
        return logits
    if shift != 1:
        raise ValueError(f"logits_shift must be 0 or 1, got {shift}")
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def canvas_rows(positions: Tensor, shift: int) -> Tensor:
    """The logits row that scores each canvas position: `canvas_logits` as a gather, for a few positions."""
    if shift not in (0, 1):
        raise ValueError(f"logits_shift must be 0 or 1, got {shift}")
    return positions if shift == 0 else (positions - 1).clamp_min(0)
