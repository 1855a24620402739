"""Decoding rows that wait for a later step (worker/capture/waiting_rows.py): the buffer's size, the
runs of rows it hands over, and the keys it refuses. The metrics of waiting rows against the
probability path: tests/worker/fused_cases.py (through the kernels)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.capture.waiting_rows import MAX_WAITING_BYTES, MAX_WAITING_ROWS, WaitingRows, waiting_capacity


class _Observer:
    """Records each observe_qk call: (rows, sequences, query offset, key count, mask rows)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[int, ...], int, int, int | None]] = []
        self.queries: list[torch.Tensor] = []

    def observe_qk(
        self, layer_pos: int, query: torch.Tensor, key: torch.Tensor, pads: Any, wanted: Any, **kw: Any
    ) -> None:
        mask = kw["mask"]
        self.calls.append(
            (
                query.shape[2],
                tuple(wanted),
                kw["query_offset"],
                key.shape[2],
                None if mask is None else mask.shape[2],
            )
        )
        self.queries.append(query.clone())


def test_the_buffer_holds_what_its_byte_budget_allows() -> None:
    def capacity(batch: int, rows_left: int = 1000, mask: bool = True, n: int = 1) -> int:
        query = torch.empty(batch, 32, n, 128, dtype=torch.bfloat16)
        keys = torch.empty(batch, 1, n, 2049, dtype=torch.bool) if mask else None
        return waiting_capacity(query, keys, 2048, 0, rows_left)

    row = 32 * 128 * 2  # one sequence's query row
    assert capacity(1) == MAX_WAITING_ROWS
    assert capacity(64) == MAX_WAITING_BYTES // (64 * (row + 2048 + MAX_WAITING_ROWS)) == 12
    assert capacity(64, mask=False) == MAX_WAITING_BYTES // (64 * row) == 16
    assert capacity(1, rows_left=5) == 5
    assert capacity(4096, n=3) == 3  # never fewer than the call's own rows


def test_rows_go_out_in_runs_of_the_same_sequences_with_the_keys_they_saw() -> None:
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 2, 1, 4, generator=gen) for _ in range(4)]
    masks = [torch.ones(3, 1, 1, 10 + i, dtype=torch.bool) for i in range(4)]
    waiting = WaitingRows(steps[0], masks[0], 10, 0, capacity=4, scaling=0.5)
    wanted = [(0, 1, 2), (0, 1, 2), (0, 2), (0, 2)]
    for i, (q, m) in enumerate(zip(steps, masks, strict=True)):
        assert waiting.takes(q, m, 10 + i, 0)
        waiting.add(q, m, wanted[i])
    assert waiting.full and not waiting.takes(steps[0], masks[0], 14, 0)
    assert not WaitingRows(steps[0], masks[0], 10, 0, 4, 0.5).takes(steps[0], masks[0], 11, 0)  # not next
    observer = _Observer()
    key = torch.randn(3, 1, 20, 4, generator=gen)  # a later call's: more keys than the rows saw
    waiting.observe(observer, 0, key, 0, [0, 0, 0])  # type: ignore[arg-type]
    assert observer.calls == [(2, (0, 1, 2), 10, 14, 2), (2, (0, 2), 12, 14, 2)]
    assert torch.equal(torch.cat(observer.queries, dim=2), torch.cat(steps, dim=2))


def test_keys_from_another_position_are_refused() -> None:
    """A cache that dropped keys (keys from a later position) would give the rows the wrong keys:
    an error, never wrong metrics."""
    q = torch.zeros(1, 2, 1, 4)
    waiting = WaitingRows(q, None, 10, 0, capacity=4, scaling=0.5)
    waiting.add(q, None, [0])
    with pytest.raises(RuntimeError, match="no longer holds the keys"):
        waiting.observe(_Observer(), 0, torch.zeros(1, 1, 8, 4), 3, [0])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no longer holds the keys"):
        waiting.observe(_Observer(), 0, torch.zeros(1, 1, 5, 4), 0, [0])  # type: ignore[arg-type]
