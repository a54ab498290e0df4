"""Run an architecture vdiff does not implement through the checkpoint's own code (trust_remote_code).

The adapter gives the remote model the same surface as the native ones (`DiffusionLM`): keyword
forward returning `.logits`, `logits_shift`, `mask_token_id`, `max_sequence_length`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vdiff.models.base import DiffusionLMOutput, HFStyleModel
from vdiff.models.checkpoint import CONFIG_FILE, Checkpoint, ModelLoadError, config_max_length

# Which auto_map entry to instantiate, most specific to a bidirectional LM first.
_AUTO_CLASSES = ("AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM")


class RemoteCodeModel(HFStyleModel):
    # Unknown families are assumed to predict position i from row i (like LLaDA and BERT-style
    # masked LMs); a shifted family needs a native implementation to declare its shift.
    logits_shift = 0
    supports_kv_cache = False  # the checkpoint's own attention knows nothing of vdiff's windows
    supports_batch_invariance = False  # nor of per-row attention: batch-invariant mode runs it row by row
    supports_row_head = False  # its forward returns logits of every position

    def __init__(self, inner: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.inner = inner
        self.mask_token_id: int | None = config.get("mask_token_id")
        self.max_sequence_length = config_max_length(config)

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> RemoteCodeModel:
        import transformers

        auto_map = checkpoint.config["auto_map"]
        name = next((n for n in _AUTO_CLASSES if n in auto_map), None)
        if name is None:
            raise ModelLoadError(
                f"{checkpoint.path / CONFIG_FILE}: auto_map has none of {', '.join(_AUTO_CLASSES)}; "
                "vdiff cannot tell which class is the model"
            )
        try:
            inner = getattr(transformers, name).from_pretrained(
                str(checkpoint.path), trust_remote_code=True, torch_dtype=dtype
            )
        except Exception as error:  # remote code can raise anything; report it with its origin
            raise ModelLoadError(
                f"{checkpoint.path}: the checkpoint's own modeling code failed to load "
                f"({type(error).__name__}: {error})"
            ) from error
        return cls(inner.to(device), checkpoint.config).eval().requires_grad_(False)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> DiffusionLMOutput:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        return DiffusionLMOutput(self.inner(input_ids, **{k: v for k, v in kwargs.items() if v is not None}).logits)
