"""RowBlockBuffer: rows arriving one by one or in slabs come out as the same whole blocks."""

from __future__ import annotations

import numpy as np
import pytest

from worker.capture.hostcopy import HostBlock
from worker.capture.rows import RowBlockBuffer


def _rows(n: int, width: int) -> np.ndarray:
    return np.arange(2 * n * width, dtype=np.float32).reshape(2, n, width) + 1


def test_blocks_are_identical_whether_rows_come_in_slabs_or_singly() -> None:
    full = np.tril(np.ones((10, 12), dtype=np.float32))[None].repeat(2, 0)
    slab = RowBlockBuffer(2, 4, np.dtype(np.float32))
    # callers pass attention rows of one block at a time, as wide as the last row's last visible
    # key (causal): no zero columns on the right to scan for
    out_slab = slab.add(0, full[:, :4, :4]) + slab.add(4, full[:, 4:7, :7]) + slab.add(7, full[:, 7:8, :8])
    out_slab += slab.add(8, full[:, 8:, :10])
    out_slab.append(slab.flush())  # type: ignore[arg-type]
    single = RowBlockBuffer(2, 4, np.dtype(np.float32))
    out_single = []
    for r in range(10):
        out_single += single.add(r, full[:, r : r + 1, : r + 1])
    out_single.append(single.flush())  # type: ignore[arg-type]
    assert [b for b, _ in out_slab] == [b for b, _ in out_single] == [0, 1, 2]
    for (_, a), (_, b) in zip(out_slab, out_single, strict=True):
        np.testing.assert_array_equal(a.array, b.array)
    assert out_slab[0][1].array.shape == (2, 4, 4) and out_slab[1][1].array.shape == (2, 4, 8)
    assert out_slab[2][1].array.shape == (2, 2, 12)  # last block: only the rows that exist


def test_column_offset_places_a_window() -> None:
    buf = RowBlockBuffer(1, 4, np.dtype(np.float32))
    buf.add(0, np.ones((1, 4, 4), dtype=np.float32))
    done = buf.add(4, np.full((1, 4, 3), 2, dtype=np.float32), col0=5)
    ((block, data),) = done
    assert block == 1 and data.array[0, 0].tolist() == [0, 0, 0, 0, 0, 2, 2, 2]


def test_out_of_order_rows_are_refused() -> None:
    buf = RowBlockBuffer(1, 4, np.dtype(np.float32), width=3)
    buf.add(0, _rows(2, 3)[:1])
    with pytest.raises(ValueError, match="out of order"):
        buf.add(3, _rows(1, 3)[:1])


def test_a_whole_block_passes_through_with_its_transfer_callbacks() -> None:
    events: list[str] = []
    whole = HostBlock(
        _rows(4, 4), ready=lambda: events.append("ready"), release=lambda: events.append("release")
    )
    buf = RowBlockBuffer(2, 4, np.dtype(np.float32))
    ((block, out),) = buf.add(0, whole)
    assert block == 0 and np.shares_memory(out.array, whole.array) and out.ready is whole.ready
    assert events == []  # the writer thread waits and releases
    assert out.release is not None
    out.release()
    assert events == ["release"]


def test_a_partial_piece_is_copied_and_its_buffer_released_at_once() -> None:
    events: list[str] = []
    data = _rows(3, 4)
    piece = HostBlock(data, ready=lambda: events.append("ready"), release=lambda: events.append("release"))
    buf = RowBlockBuffer(2, 4, np.dtype(np.float32))
    assert buf.add(0, piece) == []
    assert events == ["ready", "release"]
    data[...] = -1  # the buffer may be reused now: the rows were copied
    ((block, out),) = buf.add(3, _rows(1, 4))
    assert block == 0 and out.array[:, :3].tolist() == _rows(3, 4).tolist()


def test_the_last_piece_of_a_known_length_passes_through_without_a_wait() -> None:
    """A prefill with no generated tokens: the buffer knows its row count, so the sequence's last,
    incomplete block is handed to the writer as a view with the transfer's callbacks (no wait, no
    copy on the forward pass's thread), and flush has nothing left."""
    events: list[str] = []
    data = _rows(6, 4)
    piece = HostBlock(data, ready=lambda: events.append("ready"), release=lambda: events.append("release"))
    buf = RowBlockBuffer(2, 4, np.dtype(np.float32), width=4, final_rows=6)
    done = buf.add(0, piece)
    assert [block for block, _ in done] == [0, 1] and events == []
    assert [out.array.shape for _, out in done] == [(2, 4, 4), (2, 2, 4)]
    assert all(np.shares_memory(out.array, data) and out.ready is piece.ready for _, out in done)
    for _, out in done:
        assert out.release is not None
        out.release()
    assert events == ["release"]  # once, after both blocks
    assert buf.flush() is None
    with pytest.raises(ValueError, match="out of order"):
        buf.add(6, _rows(1, 4))


def test_a_piece_that_does_not_end_the_rows_is_still_copied() -> None:
    """Rows that more rows will follow (generation) keep the copying path, whatever final_rows says."""
    events: list[str] = []
    piece = HostBlock(
        _rows(3, 4), ready=lambda: events.append("ready"), release=lambda: events.append("release")
    )
    buf = RowBlockBuffer(2, 4, np.dtype(np.float32), width=4, final_rows=5)
    assert buf.add(0, piece) == [] and events == ["ready", "release"]
    ((block, out),) = buf.add(3, _rows(2, 4))
    assert block == 0 and out.array.shape == (2, 4, 4)
    flushed = buf.flush()
    assert flushed is not None and flushed[0] == 1 and flushed[1].array.shape == (2, 1, 4)
