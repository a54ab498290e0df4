"""Batch-invariant numerics: a row's result does not depend on which rows share its forward.

A default forward is exact only up to reduction order: CPU and GPU kernels pick their blocking,
vector width and thread split from the shapes they are given, so a canvas alone and the same
canvas in a right-padded batch of eight round differently (about 1e-6 in float32, 1e-2 in
bfloat16 after a few layers). A confidence-ranked sampler turns one flipped last bit into another
unmasking order, so diffusion decoding feels this more than autoregressive decoding does.

In batch-invariant mode three rules make every row see exactly the arithmetic it sees alone:
1. Layout: each sequence of the batch is padded to a multiple of `TILE_ROWS` positions, so its
   row l sits at tile offset l % TILE_ROWS whatever its neighbours (`padded_length`).
2. Row-local ops whose result depends on the shape they run on (`ROW_TILED`: matrix products,
   whose kernels choose by row count, and SiLU/cos/sin, whose vectorised and scalar paths differ
   in the last bit on CPU) run on fixed tiles of `TILE_ROWS` rows (`RowTiles`). Exact
   elementwise arithmetic (add, mul, casts, sqrt/division) and per-row reductions need no tiles.
3. Attention runs one sequence at a time, on exactly its real queries and keys
   (`AttentionMask.sequences` in vdiff/models/layers.py), never over the batch's padding.
The decoding strategies then take one request at a time (vdiff/engine.py), so their vocabulary-wide
softmax, sort and top-k run on the shapes they have alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# Rows per tile. Any fixed size is exact: every sequence starts on a tile boundary, so a row sits at
# the same offset of a same-shaped call alone and in any batch. 64 keeps padding and calls few.
TILE_ROWS = 64

# Functions whose output rows must come from calls of one fixed shape. F.linear covers nn.Linear
# and the LM heads; Tensor.cos/sin are the RoPE tables.
ROW_TILED: frozenset[Callable[..., Any]] = frozenset({F.linear, F.silu, torch.cos, torch.sin, Tensor.cos, Tensor.sin})


def padded_length(length: int) -> int:
    """The positions a sequence of `length` occupies in a batch-invariant batch."""
    return -(-length // TILE_ROWS) * TILE_ROWS


class RowTiles(TorchFunctionMode):
    """Within this mode, the functions in ROW_TILED run on tiles of exactly TILE_ROWS rows.

    Rows are the flattened leading dimensions of the first argument, whose last dimension is the
    feature dimension; a last partial tile is padded with zeros and cut off again.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func not in ROW_TILED or not isinstance(args[0], Tensor) or args[0].dim() < 2:
            return func(*args, **kwargs)
        return _tiled(func, args[0], args[1:], kwargs)


def _tiled(func: Callable[..., Any], x: Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])  # (M, C)
    count = rows.shape[0]
    if count % TILE_ROWS:
        rows = F.pad(rows, (0, 0, 0, TILE_ROWS - count % TILE_ROWS))
    out = torch.cat([func(tile, *rest, **kwargs) for tile in rows.split(TILE_ROWS)])  # (M', C')
    return out[:count].view(*x.shape[:-1], out.shape[-1])
