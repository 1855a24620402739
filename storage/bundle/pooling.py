"""The arithmetic of a tile pyramid (numpy only): level sizes, 2×2 pooling, exact block means.

Level 0 of a ``tokens × tokens`` matrix is the matrix; level ``L`` has ``ceil(tokens / 2**L)`` rows
and columns, cell ``(i, j)`` standing for the level-0 block of rows ``i·2**L .. (i+1)·2**L - 1`` and
the same columns, cut at the matrix's edge (an odd size leaves a last block of fewer cells). Its
``max`` is the block's maximum; its ``mean`` the block's exact mean, computed from running sums so
that blocks cut by the edge are not biased by their smaller children. The coarsest level is the
first whose whole matrix fits one ``tile × tile`` tile.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["POOLS", "TILE", "block_counts", "level_sizes", "pool_2x2", "tiles_per_side"]

TILE = 256  # cells per side of one tile (part of the HTTP contract)
POOLS = ("max", "mean")


def level_sizes(tokens: int, tile: int = TILE) -> list[int]:
    """Rows (= columns) of each level, level 0 first, down to the first that fits one tile."""
    sizes = [tokens]
    while sizes[-1] > tile:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def tiles_per_side(size: int, tile: int = TILE) -> int:
    """Tiles along each side of a level of ``size`` cells (at least one)."""
    return max(1, math.ceil(size / tile))


def block_counts(level: int, start: int, stop: int, tokens: int) -> np.ndarray:
    """Level-0 cells along one axis behind level-``level`` cells ``start .. stop - 1`` (float64):
    ``2**level``, fewer for the last one where the matrix ends."""
    step = 1 << level
    first = np.arange(start, stop, dtype=np.int64) * step
    return np.clip(tokens - first, 0, step).astype(np.float64)


def pool_2x2(
    maxes: np.ndarray, sums: np.ndarray, width: int, full_width: int, last_rows: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pool rows of one level into the next: ``maxes``/``sums`` ``[rows, width]`` are the first
    ``width`` columns of those rows (every column at or past ``width`` holds zero, up to
    ``full_width``, the level's size). ``rows`` is even, or odd when ``last_rows`` (the matrix's
    last row has no partner). Returns the next level's ``(maxes, sums, width)``, ``width`` now
    ``ceil(width / 2)``: each cell the max and the sum of its (up to) 2×2 children."""
    rows = maxes.shape[0]
    if rows % 2 and not last_rows:
        raise ValueError(f"{rows} rows: pool an even number of rows until the matrix's last one")
    # a missing partner column is a real zero inside the matrix, nothing past its edge
    edge_max = -np.inf if width >= full_width else 0.0
    pad_rows, pad_cols = rows % 2, width % 2
    if pad_rows or pad_cols:
        maxes = np.pad(
            maxes, ((0, pad_rows), (0, pad_cols)), constant_values=((-np.inf, -np.inf), (0, edge_max))
        )
        sums = np.pad(sums, ((0, pad_rows), (0, pad_cols)))
    # pairwise on strided views: much faster than a reduction over a 4-D reshape
    pooled_max = np.maximum(maxes[0::2], maxes[1::2])
    pooled_max = np.maximum(pooled_max[:, 0::2], pooled_max[:, 1::2])
    row_sums = np.add(sums[0::2], sums[1::2], dtype=np.float64)
    pooled_sum = row_sums[:, 0::2] + row_sums[:, 1::2]
    return pooled_max, pooled_sum, maxes.shape[1] // 2
