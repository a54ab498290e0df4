"""Building blocks shared by the native LLaDA and Dream implementations.

Both families are Llama-shaped (pre-norm RMSNorm, rotate-half RoPE, SwiGLU MLP) with fully
bidirectional attention; they differ only in names, biases and two dtype details that are
parameters here (RoPE precision, logit shift). Shapes: B batch, L query length, S key length,
H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from vdiff.kv_cache import LayerKV


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale by the weight.

    This order (cast before the weight multiply) is what both reference implementations do,
    so bf16 outputs match them bit for bit.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass(frozen=True)
class Rotary:
    """RoPE tables for one forward: cos/sin of shape (B, 1, L, D) in float32."""

    cos: Tensor
    sin: Tensor
    full_precision: bool  # LLaDA rotates q/k in float32; Dream casts cos/sin to the activation dtype

    @classmethod
    def at(cls, positions: Tensor, head_dim: int, theta: float, full_precision: bool) -> Rotary:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
        freqs = positions.float()[..., None] * inv_freq  # (B, L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, D)
        return cls(angles.cos(), angles.sin(), full_precision)

    def apply(self, x: Tensor) -> Tensor:
        """Rotate x of shape (B, heads, L, D)."""
        if self.full_precision:
            return _rotate(x.float(), self.cos, self.sin).to(x.dtype)
        return _rotate(x, self.cos.to(x.dtype), self.sin.to(x.dtype))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass(frozen=True)
class AttentionMask:
    """What every attention layer of one forward needs to know about padding.

    `keep` (B, S) is True on real tokens when the batch is padded: only keys are masked, so
    padded query rows stay finite (LLaDA's Oct-2025 semantics). `dense` is a caller-supplied
    4D mask (bool: True attends; float: additive) passed to SDPA unchanged, as Dream's
    reference sampler builds it. `sequences` (batch-invariant mode, vdiff/models/invariant.py)
    gives each row's real (query, key) lengths: attention then runs one row at a time on
    exactly those, and `keep` is not needed.
    """

    keep: Tensor | None = None
    dense: Tensor | None = None
    sequences: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def from_hf(cls, attention_mask: Tensor | str | AttentionMask | None) -> AttentionMask:
        if isinstance(attention_mask, AttentionMask):
            return attention_mask
        if attention_mask is None or isinstance(attention_mask, str):  # Dream passes "full" for no mask
            return cls()
        if attention_mask.dim() == 4:
            return cls(dense=attention_mask)
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be (batch, seq_len) or (batch, 1, seq_len, seq_len), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        keep = attention_mask.bool()
        if bool(keep.all()):
            return cls()
        if not bool(keep.any(dim=1).all()):  # softmax over no key at all would give NaN rows
            raise ValueError("attention_mask has a row with no real token; every row needs at least one")
        return cls(keep=keep)

    def sdpa_mask(self) -> Tensor | None:
        if self.dense is not None:
            return self.dense
        return None if self.keep is None else self.keep[:, None, None, :]  # (B, 1, 1, S)

    def with_keys(self, keep: Tensor | None) -> AttentionMask:
        """The mask for a cached forward, whose keys (and their padding) come from the caches."""
        return self if self.sequences is not None else AttentionMask(keep=keep)


def self_attention(
    x: Tensor,
    projections: tuple[nn.Linear, nn.Linear, nn.Linear],
    num_heads: int,
    num_kv_heads: int,
    rotary: Rotary,
    mask: AttentionMask,
    kv: LayerKV | None = None,
) -> Tensor:
    """Bidirectional multi-head (or grouped-query) attention of x (B, L, C); returns (B, L, H*D).

    With `kv` the L queries are a window of each canvas: their keys and values go into the cache
    and the queries attend to the cached canvas (S keys) instead of to each other alone.
    """
    q_proj, k_proj, v_proj = projections
    batch, length, _ = x.shape
    q = q_proj(x).view(batch, length, num_heads, -1).transpose(1, 2)  # (B, H, L, D)
    k = k_proj(x).view(batch, length, num_kv_heads, -1).transpose(1, 2)  # (B, K, L, D)
    v = v_proj(x).view(batch, length, num_kv_heads, -1).transpose(1, 2)
    k = rotary.apply(k)
    if kv is not None:
        k, v, keep = kv.update(k, v)  # (B, K, S, D) each
        mask = mask.with_keys(keep)
    out = attend(rotary.apply(q), k, v, mask)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(batch, length, -1)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """softmax(q k^T / sqrt(D)) v without a causal mask: flash-attn on CUDA when possible, else SDPA."""
    if mask.sequences is not None:
        return _attend_each(q, k, v, mask.sequences)
    if _can_use_flash(q, k, mask):
        return _flash_attend(q, k, v, mask.keep)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.sdpa_mask(), enable_gqa=gqa)


def _attend_each(q: Tensor, k: Tensor, v: Tensor, sequences: tuple[tuple[int, int], ...]) -> Tensor:
    """Each row alone on its real queries and keys: the call it makes in a batch of one.
    Padded query rows stay zero; nothing real attends to them."""
    out = q.new_zeros(q.shape)  # (B, H, L, D)
    for row, (queries, keys) in enumerate(sequences):
        q_row = q[row : row + 1, :, :queries]
        k_row, v_row = k[row : row + 1, :, :keys], v[row : row + 1, :, :keys]
        out[row : row + 1, :, :queries] = attend(q_row, k_row, v_row, AttentionMask())
    return out


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """What a canvas attends with on `device` in `dtype`: flash-attn on CUDA in half precision
    when installed, else PyTorch's SDPA (CPU, MPS, float32, no flash-attn). A forward whose
    queries are fewer than its keys (cached windows) and 4D masks take SDPA on any device."""
    half = dtype in (torch.float16, torch.bfloat16)
    flash = device.type == "cuda" and half and flash_attn_functions() is not None
    return "flash-attn" if flash else "sdpa"


def _can_use_flash(q: Tensor, k: Tensor, mask: AttentionMask) -> bool:
    return mask.dense is None and q.shape[2] == k.shape[2] and attention_backend(q.device, q.dtype) == "flash-attn"


@functools.cache
def flash_attn_functions() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """(flash_attn_func, flash_attn_varlen_func) when the optional `vdiff[gpu]` extra is installed."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_func, flash_attn_varlen_func


def _flash_attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    functions = flash_attn_functions()
    assert functions is not None
    dense_fn, varlen_fn = functions
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, L, heads, D)
    if keep is None:
        return dense_fn(q, k, v, causal=False).transpose(1, 2)
    # Padded batch: pack the real tokens of every row and let the varlen kernel keep rows
    # apart. Padded query rows come back as zeros (never read: no real token attends to them).
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    packed = varlen_fn(
        q[keep], k[keep], v[keep], cu_seqlens, cu_seqlens, longest, longest, causal=False
    )  # (real tokens, H, D)
    out = q.new_zeros(q.shape)
    out[keep] = packed
    return out.transpose(1, 2)


def swiglu(x: Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> Tensor:
    return down(F.silu(gate(x)) * up(x))


def default_positions(input_ids: Tensor) -> Tensor:
    """Absolute positions 0..L-1 for every row, pads included (LLaDA's reference convention)."""
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).expand(batch, length)
