"""Where one row block of a streamed array lands in it, from the array's declared dimensions.

The capture hands the writer one layer's and one sequence's rows of an array as ``data [heads,
rows, columns]`` (:meth:`storage.bundle.arrays.ArraySpec.row_block`). Which chunks that fills,
and which part of ``data`` each chunk holds, follows from the array's dimensions alone
(``layer``, ``batch``, a head axis, a row axis, then key columns or a trailing axis or nothing),
so the writer has no case per array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from storage.bundle.arrays import DIM_SIZES, HEAD_DIMS, ROW_DIMS
from storage.bundle.layout import BundleLayout

__all__ = ["RowBlock", "RowBlockPlacement", "place_row_block"]

Region = Callable[[], np.ndarray]


@dataclass(frozen=True)
class RowBlock:
    """Row block ``block`` of array ``name`` for exported layer ``layer_pos`` and sequence
    ``batch``, as the capture hands it to the writer: ``data [heads, rows, columns]``
    (:meth:`storage.bundle.writer.BundleWriter.write_row_block` says what the axes hold), read only
    after ``ready()`` (e.g. an asynchronous device-to-host copy); ``release()`` once every chunk of
    it is encoded."""

    name: str
    layer_pos: int
    batch: int
    block: int
    data: np.ndarray
    ready: Callable[[], None] | None = None
    release: Callable[[], None] | None = None


@dataclass(frozen=True)
class RowBlockPlacement:
    """Row block ``block`` of layer ``layer_pos`` and sequence ``batch``: rows ``row0:row1`` of the
    array's row axis and columns ``0:col1`` of the axis after it (none when the row axis is last)."""

    dims: tuple[str, ...]
    layer_pos: int
    batch: int
    block: int
    row0: int
    row1: int
    col1: int
    rows_per_chunk: int

    @property
    def has_heads(self) -> bool:
        return any(d in HEAD_DIMS for d in self.dims)

    @property
    def has_columns(self) -> bool:
        return self.dims[-1] not in ROW_DIMS or self.dims[-1] == "key"

    def view(self, data: np.ndarray) -> np.ndarray:
        """``data [heads, rows, columns]`` as the array's axes after ``layer`` and ``batch``."""
        out = data if self.has_heads else data[0]
        return out if self.has_columns else out[..., 0]

    def chunks(self, data: np.ndarray) -> list[tuple[tuple[int, ...], Region]]:
        """(chunk coordinates, function returning that chunk's part of ``data``) of every chunk the
        block fills: one, or one per key chunk up to ``col1``."""
        keys = self.dims[-1] == "key"
        starts = range(0, self.col1, self.rows_per_chunk) if keys else range(1)
        return [(self._coords(c0 // self.rows_per_chunk), self._region(data, c0, keys)) for c0 in starts]

    def _coords(self, key_chunk: int) -> tuple[int, ...]:
        index = {"layer": self.layer_pos, "batch": self.batch, "key": key_chunk}
        return tuple(index.get(d, self.block if d in ROW_DIMS else 0) for d in self.dims)

    def _region(self, data: np.ndarray, c0: int, keys: bool) -> Region:
        if keys:
            return lambda: self.view(data)[..., c0 : c0 + self.rows_per_chunk]
        return lambda: self.view(data)


def place_row_block(
    layout: BundleLayout, name: str, layer_pos: int, batch: int, block: int, data: np.ndarray
) -> tuple[RowBlockPlacement, np.ndarray]:
    """Where ``data [heads, rows, columns]`` lands, and ``data`` cut to whole key chunks up to its
    widest row (key chunks right of it are never written: they hold zeros, the fill value)."""
    dims = layout.dims(name)
    rows_per_chunk = layout.chunk_rows
    row_dim = next(d for d in dims if d in ROW_DIMS)
    row0 = block * rows_per_chunk
    row1 = min(row0 + rows_per_chunk, DIM_SIZES[row_dim](layout))
    _, rows, cols = data.shape
    if rows > row1 - row0:
        raise ValueError(f"{name}: {rows} rows do not fit row block {block} ({row1 - row0} rows)")
    if dims[-1] == "key":
        col1 = min(-(-cols // rows_per_chunk) * rows_per_chunk, layout.positions)
        data = data[:, :, : min(cols, col1)]
    elif dims[-1] in ROW_DIMS:
        col1 = 0
    else:
        col1 = DIM_SIZES[dims[-1]](layout)
    placement = RowBlockPlacement(dims, layer_pos, batch, block, row0, row1, col1, rows_per_chunk)
    return placement, data
