"""Typed, frozen views of the Hugging Face `config.json` of each native architecture.

Each config is built once from the checkpoint's raw dict by `from_hf`, which reads the real
key names, fills the family's published defaults for absent keys, and rejects values the
native implementation does not support with a `ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config.json value that vdiff cannot run, with the key that holds it."""


def _get(raw: Mapping[str, Any], key: str, default: Any) -> Any:
    value = raw.get(key, default)
    return default if value is None else value


def _require(raw: Mapping[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ConfigError(f"config.json has no {key!r}; it is required for model_type {raw.get('model_type')!r}")
    return raw[key]


def _refuse_unless(raw: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    value = _get(raw, key, default)
    if value not in allowed:
        raise ConfigError(
            f"config.json has {key}={value!r}, which vdiff's native implementation does not support "
            f"(supported: {', '.join(repr(a) for a in allowed)})"
        )
    return value


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json has {name}={value!r}; it must be a positive integer")
    return value


@dataclass(frozen=True)
class LLaDAConfig:
    """LLaDA (OLMo-derived, `model_type: "llada"`, `block_type: "llama"`)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    rope_theta: float
    rope_full_precision: bool
    rms_norm_eps: float
    weight_tying: bool
    include_bias: bool
    include_qkv_bias: bool
    input_emb_norm: bool
    scale_logits: bool
    mask_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> LLaDAConfig:
        _refuse_unless(raw, "block_type", ("llama",), "sequential")
        _refuse_unless(raw, "layer_norm_type", ("rms",), "default")
        _refuse_unless(raw, "activation_type", ("silu", "swiglu"), "swiglu")
        _refuse_unless(raw, "rope", (True,), False)
        _refuse_unless(raw, "alibi", (False,), False)
        _refuse_unless(raw, "attention_layer_norm", (False,), False)
        _refuse_unless(raw, "layer_norm_with_affine", (True,), True)
        _refuse_unless(raw, "bias_for_layer_norm", (False,), False)
        # OLMo's block groups only regroup modules for FSDP; LLaDA checkpoints use 1.
        _refuse_unless(raw, "block_group_size", (1,), 1)
        d_model = _positive("d_model", _require(raw, "d_model"))
        n_heads = _positive("n_heads", _require(raw, "n_heads"))
        n_kv_heads = _llada_kv_heads(raw, n_heads)
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ConfigError(
                f"config.json has d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads}: "
                "d_model must divide by n_heads and n_heads by n_kv_heads"
            )
        n_layers = _positive("n_layers", _require(raw, "n_layers"))
        vocab_size = _positive("vocab_size", _require(raw, "vocab_size"))
        embedding_size = _positive("embedding_size", _get(raw, "embedding_size", vocab_size))
        if embedding_size < vocab_size:
            raise ConfigError(f"config.json has embedding_size={embedding_size} < vocab_size={vocab_size}")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            n_layers=n_layers,
            mlp_hidden_size=_positive(
                "mlp_hidden_size", _get(raw, "mlp_hidden_size", _get(raw, "mlp_ratio", 4) * d_model)
            ),
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            max_sequence_length=_positive("max_sequence_length", _get(raw, "max_sequence_length", 1024)),
            rope_theta=float(_get(raw, "rope_theta", 10000.0)),
            rope_full_precision=bool(_get(raw, "rope_full_precision", True)),
            rms_norm_eps=float(_get(raw, "rms_norm_eps", 1e-5)),
            weight_tying=bool(_get(raw, "weight_tying", True)),
            include_bias=bool(_get(raw, "include_bias", False)),
            include_qkv_bias=bool(_get(raw, "include_qkv_bias", False)),
            input_emb_norm=bool(_get(raw, "input_emb_norm", False)),
            scale_logits=bool(_get(raw, "scale_logits", False)),
            mask_token_id=raw.get("mask_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )


def _llada_kv_heads(raw: Mapping[str, Any], n_heads: int) -> int:
    # OLMo semantics: multi_query_attention wins, then n_kv_heads, else plain MHA.
    if raw.get("multi_query_attention"):
        return 1
    return _positive("n_kv_heads", _get(raw, "n_kv_heads", n_heads))


@dataclass(frozen=True)
class DreamConfig:
    """Dream (Qwen2-derived, `model_type: "Dream"`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    mask_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> DreamConfig:
        _refuse_unless(raw, "hidden_act", ("silu",), "silu")
        _refuse_unless(raw, "use_sliding_window", (False,), False)
        scaling = raw.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
            raise ConfigError(f"config.json has rope_scaling={scaling!r}; vdiff supports only unscaled RoPE")
        hidden = _positive("hidden_size", _require(raw, "hidden_size"))
        heads = _positive("num_attention_heads", _require(raw, "num_attention_heads"))
        kv_heads = _positive("num_key_value_heads", _get(raw, "num_key_value_heads", heads))
        if hidden % heads or heads % kv_heads:
            raise ConfigError(
                f"config.json has hidden_size={hidden}, num_attention_heads={heads}, "
                f"num_key_value_heads={kv_heads}: hidden_size must divide by the heads and heads by kv heads"
            )
        return cls(
            hidden_size=hidden,
            intermediate_size=_positive("intermediate_size", _require(raw, "intermediate_size")),
            num_hidden_layers=_positive("num_hidden_layers", _require(raw, "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=_positive("vocab_size", _require(raw, "vocab_size")),
            max_position_embeddings=_positive("max_position_embeddings", _get(raw, "max_position_embeddings", 32768)),
            rope_theta=float(_get(raw, "rope_theta", 10000.0)),
            rms_norm_eps=float(_get(raw, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(_get(raw, "tie_word_embeddings", False)),
            mask_token_id=raw.get("mask_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )
