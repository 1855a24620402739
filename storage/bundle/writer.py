"""Streaming bundle writer (numpy + zarr only).

Writes whole chunks only (a row block of one layer and sequence at a time), learns the exact
stored bytes of every chunk through a store wrapper (size + sha256, no re-read), and hands the
records to ``on_chunks`` once zarr has written them — the caller records them in the SQL index.
Metadata (root attributes, consolidation) is written last.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import Buffer
from zarr.storage import WrapperStore

from storage.bundle.format import FORMAT_NAME, FORMAT_VERSION
from storage.bundle.layout import BundleLayout
from storage.bundle.resume import ResumeSet
from storage.errors import StoreError
from storage.index.records import ChunkRecord
from storage.objectstore import StoreRetry, zarr_store


def _create(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    fill_value: Any,
    dims: tuple[str, ...],
) -> zarr.Array:
    """One array: Blosc zstd level 1 with byte shuffle (strings: zstd only); every chunk written."""
    if dtype == "str":
        compressors: Any = ZstdCodec(level=1)
    else:
        typesize = np.dtype(dtype).itemsize
        compressors = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=typesize)
    with warnings.catch_warnings():  # variable-length strings: "not yet part of the v3 spec" warning
        warnings.simplefilter("ignore", category=UserWarning)
        return group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            dimension_names=dims,
            compressors=compressors,
            config={"write_empty_chunks": True},
            overwrite=True,
        )


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """``"attention/c/0/1/0/2/0"`` → ``("attention", (0, 1, 0, 2, 0))``; metadata keys → ``None``."""
    array, sep, coords = key.partition("/c/")
    if not sep:
        return None
    try:
        return array, tuple(int(c) for c in coords.split("/"))
    except ValueError:
        return None


class RecordingStore(WrapperStore[Store]):
    """Passes every operation through; remembers (key, size, checksum) of each chunk set."""

    def __init__(self, store: Store, sink: list[ChunkRecord] | None = None) -> None:
        super().__init__(store)
        self._sink: list[ChunkRecord] = [] if sink is None else sink
        self._lock = threading.Lock()

    def _with_store(self, store: Store) -> RecordingStore:
        return type(self)(store, self._sink)

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        parsed = parse_chunk_key(key)
        if parsed is not None:
            data = value.to_bytes()
            record = ChunkRecord(parsed[0], parsed[1], key, len(data), checksum(data))
            with self._lock:
                self._sink.append(record)

    def drain(self) -> list[ChunkRecord]:
        with self._lock:
            out = list(self._sink)
            self._sink.clear()
        return out


class BundleWriter:
    """Create a bundle's arrays (shapes preallocated), stream row blocks, finalize metadata."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        on_chunks: Callable[[Sequence[ChunkRecord]], None] | None = None,
        resume: ResumeSet | None = None,
        retry: StoreRetry | None = None,
    ) -> None:
        self.url = url
        base = zarr_store(url, storage_options=storage_options, retry=retry)
        self._store = RecordingStore(base if resume is None else resume.wrap(base))
        self._on_chunks = on_chunks
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self.layout: BundleLayout | None = None

    # -- setup --------------------------------------------------------------------------------
    def create(self, layout: BundleLayout, attrs: dict[str, Any]) -> None:
        """Create the group and every array (overwriting a previous attempt's metadata)."""
        self.layout = layout
        try:
            group = zarr.open_group(self._store, mode="a", zarr_format=3)
            group.attrs.update(
                {"qkvault_format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False, **attrs}
            )
            for name in layout.arrays():
                # keep the handles: reopening by name would drop write_empty_chunks (zarr's default
                # skips all-zero chunks) and re-read metadata on every write
                self._arrays[name] = _create(
                    group,
                    name,
                    layout.shape(name),
                    layout.chunks(name),
                    layout.dtype(name),
                    layout.fill_value(name),
                    layout.dims(name),
                )
        except OSError as exc:
            raise StoreError(f"cannot create bundle at {self.url}: {exc}") from exc
        self._group = group
        self.write_array("layer", np.asarray(layout.layers, dtype=np.int32))
        self.write_array("head", np.asarray(layout.heads, dtype=np.int32))
        self.write_array("kv_head", np.asarray(layout.kv_heads, dtype=np.int32))

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            raise RuntimeError("BundleWriter.create() must be called first")
        return self._group

    def _flush_records(self) -> None:
        records = self._store.drain()
        if records and self._on_chunks is not None:
            self._on_chunks(records)

    # -- data ---------------------------------------------------------------------------------
    def write_array(self, name: str, data: np.ndarray) -> None:
        """Write a small array whole."""
        self._arrays[name][...] = data
        self._flush_records()

    def write_row_block(self, name: str, layer_pos: int, batch: int, block: int, data: np.ndarray) -> None:
        """Write row block ``block`` of ``name`` for one exported layer and sequence.

        ``data`` is ``[heads, rows, cols]``: for ``attention`` cols are key positions from 0 (any
        width; the rest of the row is zero, and key chunks right of the widest row are never
        written); for q/k/v cols are head_dim; for hidden_states heads is 1 and cols the hidden
        size. ``rows`` may be shorter than the chunk (the rest is zero). Whole chunks only.
        """
        layout = self.layout
        assert layout is not None
        rows_per_chunk = layout.chunk_rows
        row0 = block * rows_per_chunk
        row1 = min(row0 + rows_per_chunk, layout.attention_rows if name == "attention" else layout.positions)
        heads, rows, cols = data.shape
        if rows > row1 - row0:
            raise ValueError(f"{name}: {rows} rows do not fit row block {block} ({row1 - row0} rows)")
        if name == "attention":
            # whole key chunks up to the block's widest row; chunks right of it are never written
            col1 = min(-(-cols // rows_per_chunk) * rows_per_chunk, layout.positions)
            data, cols = data[:, :, :col1], min(cols, col1)
        else:
            col1 = layout.shape(name)[-1]
        dtype = np.dtype(layout.dtype(name))
        if rows == row1 - row0 and cols == col1 and data.dtype == dtype:
            full = data
        else:
            full = np.zeros((heads, row1 - row0, col1), dtype=dtype)
            full[:, :rows, :cols] = data
        if name == "hidden_states":
            self._arrays[name][layer_pos, batch, row0:row1, :] = full[0]
        else:
            self._arrays[name][layer_pos, batch, :, row0:row1, :col1] = full
        self._flush_records()

    def write_group(
        self,
        group_name: str,
        arrays: dict[str, tuple[tuple[str, ...], np.ndarray]],
        *,
        per_layer_batch: bool = False,
    ) -> list[ChunkRecord]:
        """Write a subgroup of arrays whole (``summary``, ``kv/<method>``): ``name -> (dims, data)``.
        ``per_layer_batch``: arrays whose dims start with (layer, batch) get one chunk per cell.
        Returns the chunk records written (also passed to ``on_chunks``)."""
        group = self.group.require_group(group_name)
        for name, (dims, data) in arrays.items():
            dtype = "str" if data.dtype.kind in "OUT" else str(data.dtype)
            fill: Any = "" if dtype == "str" else (float("nan") if data.dtype.kind == "f" else 0)
            chunks = data.shape
            if per_layer_batch and dims[:2] == ("layer", "batch"):
                chunks = (1, 1, *data.shape[2:])
            array = _create(group, name, data.shape, chunks, dtype, fill, dims)
            array[...] = data
        records = self._store.drain()
        if records and self._on_chunks is not None:
            self._on_chunks(records)
        return records

    # -- metadata last ------------------------------------------------------------------------
    def finalize(self, attrs: dict[str, Any], *, complete: bool = True, partial: bool = False) -> None:
        """Write final root attributes and consolidate metadata (the last write of a job)."""
        self.group.attrs.update({**attrs, "complete": complete, "partial": partial})
        with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec" (yet)
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self._store, zarr_format=3)
