"""Dream (Dream-org/Dream-v0-Instruct-7B and relatives), architecture only.

Follows `modeling_dream.py` as published with the model (Qwen2-derived, SDPA with
`is_causal=False`). Parameter names equal the checkpoint's: `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}`, `model.layers.{i}.self_attn.o_proj.weight`,
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight`, `model.norm.weight`,
`lm_head.weight`. The forward returns unshifted logits like the original; the right shift by one
that Dream's sampler applies lives in `vdiff.models.base.canvas_logits` (`logits_shift = 1`).
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from vdiff.kv_cache import BatchKV, LayerKV
from vdiff.models.base import NativeModel
from vdiff.models.configs import DreamConfig
from vdiff.models.layers import AttentionMask, RMSNorm, Rotary, default_positions, self_attention, swiglu


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        hidden, kv_dim = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, hidden, bias=True)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor, rotary: Rotary, mask: AttentionMask, kv: LayerKV | None) -> Tensor:
        heads = (self.config.num_attention_heads, self.config.num_key_value_heads)
        return self.o_proj(self_attention(x, (self.q_proj, self.k_proj, self.v_proj), *heads, rotary, mask, kv))


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, rotary: Rotary, mask: AttentionMask, kv: LayerKV | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | AttentionMask | None,
        position_ids: Tensor | None,
        kv: BatchKV | None,
    ) -> Tensor:
        x = self.embed_tokens(input_ids)  # (B, L, hidden)
        positions = default_positions(input_ids) if position_ids is None else position_ids
        # Dream casts cos/sin to the activation dtype before rotating (full_precision=False).
        rotary = Rotary.at(positions, self.config.head_dim, self.config.rope_theta, full_precision=False)
        mask = AttentionMask.from_hf(attention_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary, mask, None if kv is None else kv.layer(i))
        return self.norm(x)


class DreamModel(NativeModel):
    """Top-level module (`model.*` plus `lm_head`). Row i of the logits predicts token i + 1."""

    logits_shift = 1

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    @property
    def max_sequence_length(self) -> int:
        return self.config.max_position_embeddings

    def head(self, hidden: Tensor) -> Tensor:
        return cast(Tensor, self.lm_head(hidden))
