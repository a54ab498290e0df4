"""Approximate key/value caches for bidirectional denoising (Fast-dLLM's prefix and dual cache).

A request with a cache keeps the keys and values of its whole canvas, per layer, from its last
full forward (the refresh at each block start). Later steps feed only a window of the canvas
(prefix: the block and everything after it; dual: the block alone): the window's fresh keys and
values overwrite its part of the cache, and its queries attend to the whole canvas, stale outside
the window. So one rule serves both modes, and a refresh is simply a window that covers the canvas.
APD (vdiff/decoding/apd.py) uses the same rule with a shorter key range: its rows attend only to
the canvas up to their lookahead end, the positions after it are not in its input at all.

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
    persistent: bool = True  # False: a one-step stand-in for a request that keeps no cache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class Window:
    """The canvas positions [start, end) a row feeds this step; its queries attend to the keys of
    positions [0, key_end), of a canvas of `canvas_len` (None: the whole canvas). `reads` is the
    first position whose logits the strategy reads (None: start); a shifted family scores it from
    the row before, which the runner then feeds too."""

    start: int
    end: int
    canvas_len: int
    key_end: int | None = None
    reads: int | None = None

    def fed_from(self, shift: int) -> int:
        """The first position to feed so that every position read has its scoring row fed."""
        first_read = self.start if self.reads is None else self.reads
        return max(0, min(self.start, first_read - shift))

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def key_len(self) -> int:
        return self.canvas_len if self.key_end is None else self.key_end

    @property
    def covers_canvas(self) -> bool:
        return self.start == 0 and self.end == self.canvas_len and self.key_len == self.canvas_len

    @property
    def is_full(self) -> bool:
        """The window is everything the row attends to: a refresh, which replaces the cache."""
        return self.start == 0 and self.end == self.key_len


class BatchKV:
    """The caches of one windowed forward; `layer(i)` is what attention layer i reads and writes."""

    def __init__(self, caches: list[RequestKV], windows: list[Window], device: torch.device | str = "cpu") -> None:
        self.caches = caches
        self.windows = windows
        longest = max(w.key_len for w in windows)
        self.key_len = longest
        self.keep: Tensor | None = None  # (B, S) True on real keys, None when no row is padded
        if any(w.key_len != longest for w in windows):
            lengths = torch.tensor([w.key_len for w in windows], device=device)
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
                room = window.canvas_len if cache.persistent else None
                _store(cache.keys, self.index, fresh_k, room)
                _store(cache.values, self.index, fresh_v, room)
            else:
                cache.keys[self.index][:, window.start : window.end] = fresh_k
                cache.values[self.index][:, window.start : window.end] = fresh_v
        if len(batch.caches) == 1:
            key_len = batch.windows[0].key_len
            cache = batch.caches[0]
            return cache.keys[self.index][None, :, :key_len], cache.values[self.index][None, :, :key_len], batch.keep
        return self._stacked("keys", k), self._stacked("values", v), batch.keep

    def _stacked(self, name: str, like: Tensor) -> Tensor:
        heads, dim = like.shape[1], like.shape[3]
        out = like.new_zeros(len(self.batch.caches), heads, self.batch.key_len, dim)
        for row, (cache, window) in enumerate(zip(self.batch.caches, self.batch.windows, strict=True)):
            out[row, :, : window.key_len] = getattr(cache, name)[self.index][:, : window.key_len]
        return out


def _store(tensors: list[Tensor], index: int, fresh: Tensor, room: int | None) -> None:
    """Keep a refresh's (K, S, D) keys or values, in room for the whole canvas (K, L, D); a
    one-step cache (room None) reads the step's own tensors, with nothing copied."""
    if room is None:
        tensor = fresh
    elif fresh.shape[1] == room:
        tensor = fresh.clone(memory_format=torch.contiguous_format)  # one copy, not a view of the step's k/v
    else:  # a shorter range (APD's lookahead): later windows write past its end
        tensor = fresh.new_zeros(fresh.shape[0], room, fresh.shape[2])
        tensor[:, : fresh.shape[1]] = fresh
    if index < len(tensors):
        tensors[index] = tensor
    else:
        assert index == len(tensors), "layers refresh in order"
        tensors.append(tensor)
