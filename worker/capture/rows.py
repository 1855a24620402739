"""Gather streamed rows into whole row blocks: whole-chunk writes only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from worker.capture.hostcopy import HostBlock, shared_release


class RowBlockBuffer:
    """Rows of one (array, layer, sequence), arriving in increasing contiguous order of their
    stored row index.

    ``add`` returns every row block it completes as ``(block, HostBlock [heads, rows, cols])``;
    ``flush`` returns the last, incomplete block. Holds at most one block. ``width`` fixes the
    column count (q/k/v head_dim, hidden size); ``None`` (attention) sizes each block to its widest
    row rounded up to whole chunks of ``chunk_rows`` keys: callers pass attention rows only as wide
    as their last visible key (causal), so the width is known without scanning the data.

    The whole blocks of a piece that starts a block (a prefill) are passed through as views,
    untouched, with the piece's ``ready`` and a shared ``release`` for the writer threads; other
    rows are copied here, which waits for the transfer, so buffered rows never hold the
    device-to-host ring. ``final_rows``: the number of rows this buffer will ever get, where the
    caller knows it (a prefill with no generated tokens): the piece that ends there is passed
    through too, its last, incomplete block included, with no wait on the forward pass's thread
    (fixed widths only: an attention block's width is rounded up to whole chunks when assembled).
    """

    def __init__(
        self,
        heads: int,
        chunk_rows: int,
        dtype: np.dtype,
        width: int | None = None,
        final_rows: int | None = None,
    ) -> None:
        self.heads = heads
        self.chunk_rows = chunk_rows
        self.dtype = dtype
        self.width = width
        self.final_rows = final_rows if width is not None else None
        self._block = 0
        self._filled = 0
        self._pieces: list[tuple[int, int, np.ndarray]] = []  # (row in block, col0, data)

    def add(self, row0: int, data: HostBlock | np.ndarray, col0: int = 0) -> list[tuple[int, HostBlock]]:
        """Add stored rows ``row0 .. row0 + n`` (``data [heads, n, cols]``, columns from ``col0``)."""
        host = data if isinstance(data, HostBlock) else HostBlock(data)
        rows = host.array.shape[1]
        block, in_block = divmod(row0, self.chunk_rows)
        expected = self._block * self.chunk_rows + self._filled
        if row0 != expected:
            raise ValueError(f"row {row0} out of order: expected row {expected}")
        done: list[tuple[int, HostBlock]] = []
        starts_block = in_block == 0 and col0 == 0 and self._whole(host.array)
        whole_blocks = rows // self.chunk_rows if starts_block else 0
        last_too = starts_block and rows % self.chunk_rows > 0 and row0 + rows == self.final_rows
        if whole_blocks or last_too:  # views of the transferred data, released after the last one
            blocks = whole_blocks + last_too
            release = shared_release(host.release, whole_blocks + (rows % self.chunk_rows > 0))
            for j in range(blocks):
                view = host.array[:, j * self.chunk_rows : (j + 1) * self.chunk_rows]
                done.append((block + j, HostBlock(view, host.ready, release)))
            self._block += blocks
            if rows == whole_blocks * self.chunk_rows or last_too:
                return done
            host = replace(host, array=host.array[:, whole_blocks * self.chunk_rows :], release=release)
            row0, rows = row0 + whole_blocks * self.chunk_rows, rows - whole_blocks * self.chunk_rows
        array = host.materialize()
        offset = 0
        while offset < rows:
            block, in_block = divmod(row0 + offset, self.chunk_rows)
            take = min(rows - offset, self.chunk_rows - in_block)
            self._pieces.append((in_block, col0, array[:, offset : offset + take]))
            self._filled += take
            offset += take
            if self._filled == self.chunk_rows:
                done.append((block, HostBlock(self._assemble())))
        return done

    def _whole(self, array: np.ndarray) -> bool:
        """Whether ``array`` can be written as it is (dtype and, for fixed widths, width)."""
        if array.dtype != self.dtype:
            return False
        return self.width is None or array.shape[2] == self.width

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

    def flush(self) -> tuple[int, HostBlock] | None:
        if not self._filled:
            return None
        block = self._block
        return block, HostBlock(self._assemble())
