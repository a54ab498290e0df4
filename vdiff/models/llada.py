"""LLaDA (GSAI-ML/LLaDA-8B-Instruct and relatives), architecture only.

Follows `modeling_llada.py` as published with the model (OLMo-derived, `block_type="llama"`;
the Oct-2025 revision with attention-mask support). Module and parameter names equal the
checkpoint's state-dict names, so `state_dict()` keys are `model.transformer.wte.weight`,
`model.transformer.blocks.{i}.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,
ff_out}.weight`, `model.transformer.ln_f.weight`, `model.transformer.ff_out.weight`.
Naming trap kept from the original: `ff_proj` is the SiLU-gated branch, `up_proj` the linear one.
"""

from __future__ import annotations

import math
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from vdiff.kv_cache import BatchKV, LayerKV
from vdiff.models.base import NativeModel
from vdiff.models.configs import LLaDAConfig
from vdiff.models.layers import AttentionMask, RMSNorm, Rotary, default_positions, self_attention


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        d, kv_dim, hidden = config.d_model, config.n_kv_heads * config.head_dim, config.mlp_hidden_size
        qkv_bias, bias = config.include_bias or config.include_qkv_bias, config.include_bias
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: Tensor, rotary: Rotary, mask: AttentionMask, kv: LayerKV | None) -> Tensor:
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        heads = (self.config.n_heads, self.config.n_kv_heads)
        x = x + self.attn_out(self_attention(self.attn_norm(x), qkv, *heads, rotary, mask, kv))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.embedding_size, config.d_model),
            "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | AttentionMask | None,
        position_ids: Tensor | None,
        kv: BatchKV | None,
    ) -> Tensor:
        config = self.config
        x = self.transformer["wte"](input_ids)  # (B, L, d_model)
        if config.input_emb_norm:
            x = x * config.d_model**0.5
        positions = default_positions(input_ids) if position_ids is None else position_ids
        rotary = Rotary.at(positions, config.head_dim, config.rope_theta, config.rope_full_precision)
        mask = AttentionMask.from_hf(attention_mask)
        for i, block in enumerate(cast(nn.ModuleList, self.transformer["blocks"])):
            x = block(x, rotary, mask, None if kv is None else kv.layer(i))
        return cast(Tensor, self.transformer["ln_f"](x))  # (B, L, d_model)

    def head(self, hidden: Tensor) -> Tensor:
        """(..., d_model) final hidden states -> (..., embedding_size) logits."""
        config = self.config
        if config.weight_tying:
            logits = F.linear(hidden, cast(Tensor, self.transformer["wte"].weight))
        else:  # the module itself, which may be a quantized layer
            logits = self.transformer["ff_out"](hidden)
        return logits / math.sqrt(config.d_model) if config.scale_logits else logits


class LLaDAModelLM(NativeModel):
    """Top-level module; `self.model` keeps the checkpoint's `model.` prefix. No logit shift."""

    logits_shift = 0
    model: LLaDAModel

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDAModel(config)

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    @property
    def max_sequence_length(self) -> int:
        return self.config.max_sequence_length

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.head(hidden)
