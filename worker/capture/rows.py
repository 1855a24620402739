"""Gather streamed rows into whole row blocks (numpy, no torch): whole-chunk writes only."""

from __future__ import annotations

import numpy as np


class RowBlockBuffer:
    """Rows of one (array, layer, sequence), arriving in increasing contiguous order of their
    stored row index.

    ``add`` returns every row block it completes as ``(block, data[heads, rows, cols])``; ``flush``
    returns the last, incomplete block. Holds at most one block. ``width`` fixes the column count
    (q/k/v head_dim, hidden size); ``None`` (attention) sizes each block to its widest row rounded
    up to whole chunks of ``chunk_rows`` keys.
    """

    def __init__(self, heads: int, chunk_rows: int, dtype: np.dtype, width: int | None = None) -> None:
        self.heads = heads
        self.chunk_rows = chunk_rows
        self.dtype = dtype
        self.width = width
        self._block = 0
        self._filled = 0
        self._pieces: list[tuple[int, int, np.ndarray]] = []  # (row in block, col0, data)

    def add(self, row0: int, data: np.ndarray, col0: int = 0) -> list[tuple[int, np.ndarray]]:
        """Add stored rows ``row0 .. row0 + n`` (``data [heads, n, cols]``, columns from ``col0``)."""
        done: list[tuple[int, np.ndarray]] = []
        rows = data.shape[1]
        offset = 0
        while offset < rows:
            row = row0 + offset
            block, in_block = divmod(row, self.chunk_rows)
            expected = self._block * self.chunk_rows + self._filled
            if row != expected:
                raise ValueError(f"row {row} out of order: expected row {expected}")
            take = min(rows - offset, self.chunk_rows - in_block)
            piece = data[:, offset : offset + take]
            if self.width is None:  # attention: drop all-zero columns on the right (never written)
                nonzero = np.flatnonzero(piece.any(axis=(0, 1)))
                piece = piece[:, :, : nonzero[-1] + 1 if nonzero.size else 0]
            self._pieces.append((in_block, col0, piece))
            self._filled += take
            offset += take
            if self._filled == self.chunk_rows:
                done.append((block, self._assemble()))
        return done

    def _assemble(self) -> np.ndarray:
        if self.width is not None:
            width = self.width
        else:
            widest = max(col0 + piece.shape[2] for _, col0, piece in self._pieces)
            width = max(1, -(-widest // self.chunk_rows)) * self.chunk_rows
        pieces = self._pieces
        if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][1] == 0 and pieces[0][2].shape[2] == width:
            out = np.ascontiguousarray(pieces[0][2], dtype=self.dtype)
        else:
            out = np.zeros((self.heads, self._filled, width), dtype=self.dtype)
            for in_block, col0, piece in pieces:
                out[:, in_block : in_block + piece.shape[1], col0 : col0 + piece.shape[2]] = piece
        self._pieces = []
        self._block += 1
        self._filled = 0
        return out

    def flush(self) -> tuple[int, np.ndarray] | None:
        if not self._filled:
            return None
        block = self._block
        return block, self._assemble()
