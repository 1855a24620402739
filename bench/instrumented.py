"""The qkvault run's instruments: hooks without a database, and the real BundleWriter with timers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from storage.bundle.layout import BundleLayout
from storage.bundle.records import ChunkRecord
from storage.bundle.rowblocks import RowBlock
from storage.bundle.writer import BundleWriter


class NullHooks:
    """ExportHooks without a database: counts the chunk records the job runner would index."""

    def __init__(self) -> None:
        self.chunks = 0
        self.chunk_bytes = 0

    def phase(self, name: str, units_total: int | None = None) -> None:
        pass

    def unit_done(self) -> None:
        pass

    def chunk_stored(self, record: ChunkRecord) -> None:
        """The writer's ``on_chunk`` (store threads): counted under the GIL, one record at a time."""
        self.chunks += 1
        self.chunk_bytes += record.nbytes

    def check_cancelled(self) -> None:
        pass


class TimedWriter(BundleWriter):
    """The real BundleWriter with timers: ``write_s`` is the time the forward pass spent handing
    row blocks over (waiting when the write queue is full), ``drain_s`` the wait at the end for
    the chunks still queued, ``metadata_s`` the array creation, small arrays and consolidation."""

    write_s = 0.0
    drain_s = 0.0
    metadata_s = 0.0

    def write_row_blocks(self, blocks: Sequence[RowBlock]) -> None:
        t0 = time.perf_counter()
        super().write_row_blocks(blocks)  # write_row_block calls it: counted once
        self.write_s += time.perf_counter() - t0

    def create(self, layout: BundleLayout, attrs: dict[str, Any]) -> None:
        before, t0 = self.metadata_s, time.perf_counter()
        super().create(layout, attrs)  # calls write_array itself: count that time once
        self.metadata_s = before + time.perf_counter() - t0

    def write_array(self, name: str, data: np.ndarray) -> None:
        t0 = time.perf_counter()
        super().write_array(name, data)
        self.metadata_s += time.perf_counter() - t0

    def finalize(self, attrs: dict[str, Any], **options: Any) -> None:
        t0 = time.perf_counter()
        self.wait()
        self.drain_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        super().finalize(attrs, **options)  # BundleWriter.finalize's keywords, as they are
        self.metadata_s += time.perf_counter() - t0
