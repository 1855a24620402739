"""Streaming bundle writer (numpy + zarr only).

Writes whole chunks only (a row block of one layer and sequence at a time). Row blocks go through
a :class:`~storage.bundle.pipeline.ChunkPipeline` (encode, checksum and store in a thread pool,
bounded by pending bytes) and return at once; small arrays and groups go through zarr. Every
stored chunk's record (key, size, checksum of the stored bytes, no re-read) reaches ``on_chunks``
once the store confirmed it, in batches at most every ``record_interval_s`` — the caller records
them in the SQL index. Metadata (root attributes, consolidation) is written last, after every
queued chunk is stored.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore, WrapperStore

from storage.bundle.checksum import DEFAULT_CHECKSUM, ChecksumAlgorithm, checksum
from storage.bundle.format import COMPRESSIONS, DEFAULT_COMPRESSION, FORMAT_NAME, FORMAT_VERSION
from storage.bundle.layout import BundleLayout
from storage.bundle.pipeline import (
    DEFAULT_IO_THREADS,
    DEFAULT_MAX_PENDING_BYTES,
    ChunkEncoder,
    ChunkPipeline,
    PipelineStats,
    local_put,
    store_put,
)
from storage.bundle.resume import ResumeSet, local_resume_check
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
    compression: str,
) -> zarr.Array:
    """One array: Blosc level 1 with the job's compressor and shuffle (``COMPRESSIONS``; strings:
    zstd only); every chunk written."""
    if dtype == "str":
        compressors: Any = ZstdCodec(level=1)
    else:
        typesize = np.dtype(dtype).itemsize
        cname, shuffle = COMPRESSIONS[compression]
        compressors = BloscCodec(cname=cname, clevel=1, shuffle=shuffle, typesize=typesize)
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


__all__ = ["BundleWriter", "RecordingStore", "checksum", "parse_chunk_key"]
ROW_BLOCK_ARRAYS = ("attention", "q", "k", "v", "hidden_states")


def parse_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """``"attention/c/0/1/0/2/0"`` → ``("attention", (0, 1, 0, 2, 0))``; metadata keys → ``None``."""
    array, sep, coords = key.partition("/c/")
    if not sep:
        return None
    try:
        return array, tuple(int(c) for c in coords.split("/"))
    except ValueError:
        return None


def _local_root(store: Any) -> Path | None:
    """The directory of a local store, also under pass-through wrappers (a local disk error is not
    transient: retrying it is pointless); None for any other store."""
    while isinstance(store, WrapperStore) and not isinstance(store, LocalStore):
        store = store._store
    if type(store) is LocalStore and not store.read_only:
        return Path(store.root)
    return None


def _region(data: np.ndarray, col0: int, col1: int) -> Callable[[], np.ndarray]:
    """Columns ``col0:col1`` of ``data [heads, rows, cols]``, read when the writer thread needs them."""
    return lambda: data[:, :, col0:col1]


class RecordingStore(WrapperStore[Store]):
    """Passes every operation through; remembers (key, size, checksum) of each chunk set."""

    def __init__(
        self,
        store: Store,
        sink: list[ChunkRecord] | None = None,
        algorithm: ChecksumAlgorithm = DEFAULT_CHECKSUM,
    ) -> None:
        super().__init__(store)
        self._sink: list[ChunkRecord] = [] if sink is None else sink
        self._lock = threading.Lock()
        self.algorithm: ChecksumAlgorithm = algorithm

    def _with_store(self, store: Store) -> RecordingStore:
        return type(self)(store, self._sink, self.algorithm)

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        parsed = parse_chunk_key(key)
        if parsed is not None:
            data = value.to_bytes()
            record = ChunkRecord(parsed[0], parsed[1], key, len(data), checksum(data, self.algorithm))
            with self._lock:
                self._sink.append(record)

    def drain(self) -> list[ChunkRecord]:
        with self._lock:
            out = list(self._sink)
            self._sink.clear()
        return out

    @property
    def inner(self) -> Store:
        """The wrapped store (writes to it are not recorded here)."""
        return self._store


class BundleWriter:
    """Create a bundle's arrays (shapes preallocated), stream row blocks, finalize metadata."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        on_chunks: Callable[[Sequence[ChunkRecord]], None] | None = None,
        write_threads: int | None = None,
        io_threads: int = DEFAULT_IO_THREADS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        record_interval_s: float = 0.5,
        resume: ResumeSet | None = None,
        retry: StoreRetry | None = None,
        checksum_algorithm: ChecksumAlgorithm = DEFAULT_CHECKSUM,
    ) -> None:
        """``write_threads``: chunk encoder threads (None: one per core, at most 16); ``io_threads``:
        threads storing encoded chunks;
        ``max_pending_bytes``: row-block bytes queued before :meth:`write_row_block` blocks;
        ``record_interval_s``: how often stored row-block chunks are handed to ``on_chunks``;
        ``checksum_algorithm``: of the chunk records (storage/bundle/checksum.py)."""
        self.url = url
        # resume (storage/bundle/resume.py): chunks an earlier attempt recorded and that still verify
        # are not written again, and array creation keeps them; retry: the store's retry policy
        base = zarr_store(url, storage_options=storage_options, retry=retry)
        wrapped = base if resume is None else resume.wrap(base)
        self._store = RecordingStore(wrapped, algorithm=checksum_algorithm)
        self._on_chunks = on_chunks
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._encoders: dict[str, ChunkEncoder] = {}
        root = _local_root(base)
        if root is not None:  # row-block chunks go straight to the files, resume checked per chunk
            put, should_write = local_put(root), None if resume is None else local_resume_check(resume, root)
        else:  # S3: through the wrappers (retry, resume) on zarr's event loop
            put, should_write = store_put(self._store.inner), None
        self._pipeline = ChunkPipeline(
            put,
            threads=write_threads,
            io_threads=io_threads,
            max_pending_bytes=max_pending_bytes,
            should_write=should_write,
            checksum_algorithm=checksum_algorithm,
        )
        self._record_interval_s = record_interval_s
        self._last_records = time.monotonic()
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
                    layout.compression,
                )
                encoder = ChunkEncoder.encoder_for(self._arrays[name])
                if name in ROW_BLOCK_ARRAYS and encoder is not None:
                    self._encoders[name] = encoder
        except OSError as exc:
            raise StoreError(f"cannot create bundle at {self.url}: {exc}") from exc
        self._group = group
        self.write_array("layer", np.asarray(layout.layers, dtype=np.int32))
        self.write_array("head", np.asarray(layout.heads, dtype=np.int32))
        self.write_array("kv_head", np.asarray(layout.kv_heads, dtype=np.int32))

    @property
    def pipeline_stats(self) -> PipelineStats:
        """What the chunk pipeline's threads did so far (thread-seconds, bytes in and out)."""
        return self._pipeline.stats

    @property
    def pipeline_threads(self) -> tuple[int, int]:
        """(encoder threads, store threads) of the chunk pipeline."""
        return self._pipeline.threads, self._pipeline.io_threads

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            raise RuntimeError("BundleWriter.create() must be called first")
        return self._group

    def _flush_records(self, *, force: bool = True) -> None:
        """Hand stored chunks to ``on_chunks``: zarr's at once, the pipeline's every interval."""
        records = self._store.drain()
        now = time.monotonic()
        if force or now - self._last_records >= self._record_interval_s:
            records += self._pipeline.drain()
            self._last_records = now
        if records and self._on_chunks is not None:
            self._on_chunks(records)

    def wait(self) -> None:
        """Block until every queued chunk is stored and recorded (raises the first write error)."""
        try:
            self._pipeline.wait()
        finally:
            self._flush_records()

    def close(self) -> None:
        """Wait for queued chunks (errors are not raised), record them, stop the threads."""
        try:
            self._pipeline.close()
        finally:
            self._flush_records()

    # -- data ---------------------------------------------------------------------------------
    def write_array(self, name: str, data: np.ndarray) -> None:
        """Write a small array whole."""
        self._arrays[name][...] = data
        self._flush_records()

    def write_row_block(
        self,
        name: str,
        layer_pos: int,
        batch: int,
        block: int,
        data: np.ndarray,
        *,
        ready: Callable[[], None] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Queue row block ``block`` of ``name`` for one exported layer and sequence (returns at once;
        blocks only while ``max_pending_bytes`` are queued).

        ``data`` is ``[heads, rows, cols]``: for ``attention`` cols are key positions from 0 (any
        width; the rest of the row is zero, and key chunks right of the widest row are never
        written); for q/k/v cols are head_dim; for hidden_states heads is 1 and cols the hidden
        size. ``rows`` may be shorter than the chunk (the rest is zero). Whole chunks only.
        ``ready()`` is called (in a writer thread) before ``data`` is read — e.g. waiting for an
        asynchronous device-to-host copy — and ``release()`` once every chunk of it is stored.
        """
        layout = self.layout
        assert layout is not None
        rows_per_chunk = layout.chunk_rows
        row0, row1 = self._row_range(name, block)
        _, rows, cols = data.shape
        if rows > row1 - row0:
            raise ValueError(f"{name}: {rows} rows do not fit row block {block} ({row1 - row0} rows)")
        if name == "attention":
            # whole key chunks up to the block's widest row; chunks right of it are never written
            col1 = min(-(-cols // rows_per_chunk) * rows_per_chunk, layout.positions)
            cols = min(cols, col1)
            data = data[:, :, :cols]
        elif name == "attention_sink":
            col1 = 1  # [heads, rows, 1]: one value per row
        else:
            col1 = layout.shape(name)[-1]
        encoder = self._encoders.get(name)
        if encoder is None:
            self._write_through_zarr(name, layer_pos, batch, block, data, col1, ready, release)
            return
        regions: list[tuple[tuple[int, ...], Callable[[], np.ndarray]]]
        if name == "attention":
            starts = range(0, col1, rows_per_chunk)
            regions = [
                ((layer_pos, batch, 0, block, c0 // rows_per_chunk), _region(data, c0, c0 + rows_per_chunk))
                for c0 in starts
            ]
        elif name == "hidden_states":
            regions = [((layer_pos, batch, block, 0), lambda: data[0])]
        else:
            regions = [((layer_pos, batch, 0, block, 0), lambda: data)]
        self._pipeline.submit(encoder, name, regions, nbytes=data.nbytes, ready=ready, release=release)
        self._flush_records(force=False)

    def _row_range(self, name: str, block: int) -> tuple[int, int]:
        """Rows ``[row0, row1)`` of row block ``block`` of ``name`` (the last one may be short)."""
        assert self.layout is not None
        rows_per_chunk = self.layout.chunk_rows
        total = (
            self.layout.attention_rows if name in ("attention", "attention_sink") else self.layout.positions
        )
        row0 = block * rows_per_chunk
        return row0, min(row0 + rows_per_chunk, total)

    def _write_through_zarr(
        self,
        name: str,
        layer_pos: int,
        batch: int,
        block: int,
        data: np.ndarray,
        col1: int,
        ready: Callable[[], None] | None,
        release: Callable[[], None] | None,
    ) -> None:
        """Arrays whose codecs the pipeline does not reproduce: zarr writes them, synchronously."""
        assert self.layout is not None
        if ready is not None:
            ready()
        row0, row1 = self._row_range(name, block)
        heads, rows, cols = data.shape
        full = np.zeros((heads, row1 - row0, col1), dtype=np.dtype(self.layout.dtype(name)))
        full[:, :rows, :cols] = data
        if name == "hidden_states":
            self._arrays[name][layer_pos, batch, row0:row1, :] = full[0]
        elif name == "attention_sink":
            self._arrays[name][layer_pos, batch, :, row0:row1] = full[:, :, 0]
        else:
            self._arrays[name][layer_pos, batch, :, row0:row1, :col1] = full
        if release is not None:
            release()
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
            compression = self.layout.compression if self.layout is not None else DEFAULT_COMPRESSION
            array = _create(group, name, data.shape, chunks, dtype, fill, dims, compression)
            array[...] = data
        records = self._store.drain()
        if records and self._on_chunks is not None:
            self._on_chunks(records)
        return records

    # -- metadata last ------------------------------------------------------------------------
    def finalize(self, attrs: dict[str, Any], *, complete: bool = True, partial: bool = False) -> None:
        """Store every queued chunk, then write final root attributes and consolidate metadata
        (the last write of a job)."""
        self.close()
        self.group.attrs.update({**attrs, "complete": complete, "partial": partial})
        with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec" (yet)
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self._store, zarr_format=3)
