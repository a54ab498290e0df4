"""Approximate key/value caches for bidirectional denoising (Fast-dLLM's prefix and dual cache).

A request with a cache keeps the keys and values of its whole canvas, per layer, from its last
full forward (the refresh at each block start). Later steps feed only a window of the canvas
(prefix: the block and everything after it; dual: the block alone): the window's fresh keys and
values overwrite its part of the cache, and its queries attend to the whole canvas, stale outside
the window. So one rule serves both modes, and a refresh is simply a window that covers the canvas.

In a batch every row has its own window and canvas length: queries are right-padded to the
longest window (B, Q) and keys to the longest canvas (B, S), padded keys masked.
Shapes: K key/value heads, L canvas length, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RequestKV:
    """One request's cache: per layer, keys and values (K, L, D) for every canvas position."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class Window:
    """The canvas positions [start, end) a row feeds this step, of a canvas of `canvas_len`."""

    start: int
    end: int
    canvas_len: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def is_full(self) -> bool:
        return self.start == 0 and self.end == self.canvas_len


class BatchKV:
    """The caches of one windowed forward; `layer(i)` is what attention layer i reads and writes."""

    def __init__(self, caches: list[RequestKV], windows: list[Window], device: torch.device | str = "cpu") -> None:
        self.caches = caches
        self.windows = windows
        longest = max(w.canvas_len for w in windows)
        self.key_len = longest
        self.keep: Tensor | None = None  # (B, S) True on real keys, None when no row is padded
        if any(w.canvas_len != longest for w in windows):
            lengths = torch.tensor([w.canvas_len for w in windows], device=device)
            self.keep = torch.arange(longest, device=device) < lengths[:, None]

    def layer(self, index: int) -> LayerKV:
        return LayerKV(self, index)


@dataclass(frozen=True)
class LayerKV:
    batch: BatchKV
    index: int

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write the window's k, v (B, K, Q, D) into each row's cache; return the keys, values
        (B, K, S, D) every row attends to and their padding mask (B, S) or None."""
        batch = self.batch
        for row, (cache, window) in enumerate(zip(batch.caches, batch.windows, strict=True)):
            fresh_k, fresh_v = k[row, :, : window.length], v[row, :, : window.length]
            if window.is_full:  # a refresh: the fresh tensors are the cache
                _store(cache.keys, self.index, fresh_k)
                _store(cache.values, self.index, fresh_v)
            else:
                cache.keys[self.index][:, window.start : window.end] = fresh_k
                cache.values[self.index][:, window.start : window.end] = fresh_v
        if len(batch.caches) == 1:
            return batch.caches[0].keys[self.index][None], batch.caches[0].values[self.index][None], batch.keep
        return self._stacked(batch.caches, "keys", k), self._stacked(batch.caches, "values", v), batch.keep

    def _stacked(self, caches: list[RequestKV], name: str, like: Tensor) -> Tensor:
        heads, dim = like.shape[1], like.shape[3]
        out = like.new_zeros(len(caches), heads, self.batch.key_len, dim)
        for row, cache in enumerate(caches):
            tensor = getattr(cache, name)[self.index]
            out[row, :, : tensor.shape[1]] = tensor
        return out


def _store(tensors: list[Tensor], index: int, fresh: Tensor) -> None:
    tensor = fresh.clone(memory_format=torch.contiguous_format)  # one copy, not a view of the step's k/v
    if index < len(tensors):
        tensors[index] = tensor
    else:
        assert index == len(tensors), "layers refresh in order"
        tensors.append(tensor)
