"""Streaming bundle writer (numpy + zarr only).

Writes whole chunks only (a row block of one layer and sequence at a time). Row blocks go through
a :class:`~storage.bundle.pipeline.ChunkPipeline` (encode and checksum in a thread pool, bounded by
pending bytes) and return at once; small arrays and groups are encoded by zarr. Both end in the
bundle's one :class:`~storage.bundle.chunkstore.ChunkStore` (resume check, store with the store's
retry policy, record): every stored chunk's record (key, size, checksum of the stored bytes, no
re-read) reaches ``on_chunk`` from the storing thread once the store confirmed it — the worker
queues it for the SQL index, off the forward thread. Metadata (root attributes, consolidation) is
written last, after every queued chunk is stored.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.common import ZARR_JSON

from storage.bundle.arrays import array_spec
from storage.bundle.checksum import DEFAULT_CHECKSUM, ChecksumAlgorithm
from storage.bundle.chunkstore import ChunkStore
from storage.bundle.consolidated import consolidated_root
from storage.bundle.format import DEFAULT_COMPRESSION, FORMAT_NAME, FORMAT_VERSION
from storage.bundle.groups import open_group
from storage.bundle.layout import BundleLayout
from storage.bundle.pipeline import (
    DEFAULT_IO_THREADS,
    DEFAULT_MAX_PENDING_BYTES,
    BlockWrite,
    ChunkEncoder,
    ChunkPipeline,
    PipelineStats,
)
from storage.bundle.records import ChunkRecord
from storage.bundle.resume import ResumeSet
from storage.bundle.rowblocks import RowBlock, place_row_block
from storage.bundle.smallarrays import NewArray, create_arrays
from storage.errors import StoreError
from storage.stores.objectstore import StoreRetry

__all__ = ["BundleWriter"]


class BundleWriter:
    """Create a bundle's arrays (shapes preallocated), stream row blocks, finalize metadata."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        on_chunk: Callable[[ChunkRecord], None] | None = None,
        write_threads: int | None = None,
        write_processes: bool = True,
        io_threads: int = DEFAULT_IO_THREADS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        resume: ResumeSet | None = None,
        retry: StoreRetry | None = None,
        checksum_algorithm: ChecksumAlgorithm = DEFAULT_CHECKSUM,
        key_prefix: str = "",
    ) -> None:
        """``on_chunk(record)``: called from the storing thread for every stored chunk (it must not
        block: the worker queues the record); ``write_threads``: chunk encoder threads (None: one
        per core, at most 16); ``write_processes``: chunks whose data lie in shared memory (a CUDA
        worker's device-to-host ring) are encoded in as many processes instead (storage/bundle/
        encodeprocs.py); ``io_threads``: threads storing encoded chunks;
        ``max_pending_bytes``: row-block bytes queued before :meth:`write_row_block` blocks;
        ``resume``: chunks an earlier attempt recorded (storage/bundle/resume.py); ``retry``: the
        store's retry policy; ``checksum_algorithm``: of the chunk records; ``key_prefix``: where
        ``url`` lies inside the job's bundle (:class:`~storage.bundle.chunkstore.ChunkStore`)."""
        self.url = url
        self._on_chunk = on_chunk
        self._collect_lock = threading.Lock()
        self._collecting: tuple[str, list[ChunkRecord]] | None = None
        self.chunks = ChunkStore(
            url,
            storage_options=storage_options,
            retry=retry,
            resume=resume,
            checksum_algorithm=checksum_algorithm,
            on_stored=self._stored,
            key_prefix=key_prefix,
        )
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._encoders: dict[str, ChunkEncoder] = {}
        self._pipeline = ChunkPipeline(
            self.chunks.put,
            threads=write_threads,
            io_threads=io_threads,
            max_pending_bytes=max_pending_bytes,
            checksum_algorithm=checksum_algorithm,
            sink=self.chunks,
            processes=write_processes,
        )
        self.layout: BundleLayout | None = None
        self._children_by_others = False

    def _stored(self, record: ChunkRecord) -> None:
        """A chunk the store confirmed (any thread): to ``on_chunk``, and to :meth:`write_group`'s
        tally while it writes that group."""
        with self._collect_lock:
            if self._collecting is not None and record.key.startswith(self._collecting[0]):
                self._collecting[1].append(record)
        if self._on_chunk is not None:
            self._on_chunk(record)

    # -- setup --------------------------------------------------------------------------------
    def create_root(
        self, attrs: dict[str, Any], *, format_version: str, children: Sequence[str] = ()
    ) -> None:
        """Create a group without arrays of its own, with empty child groups ``children``: a bulk
        job's root (its micro-batches are groups written by writers of their own, its sequence
        table a :meth:`write_group`). The group's metadata is written anew, without an earlier
        attempt's consolidated metadata (which would hide groups added since); children stay."""
        # its children are filled by writers of their own: its store does not hold their documents
        self._children_by_others = bool(children)
        root = {"qkvault_format": FORMAT_NAME, "format_version": format_version, "complete": False, **attrs}
        for key, attributes in (("zarr.json", root), *((f"{c}/zarr.json", {}) for c in children)):
            document = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
            self.chunks.put(key, json.dumps(document).encode("utf-8"))
        self._group = zarr.open_group(self.chunks.zarr(), mode="r+", zarr_format=3)

    def create(self, layout: BundleLayout, attrs: dict[str, Any]) -> None:
        """Create the group and every array (overwriting a previous attempt's metadata)."""
        self.layout = layout
        try:
            # an earlier attempt's attributes stay unless replaced; a new group holds no arrays
            group, fresh = open_group(
                self.chunks,
                attrs={
                    "qkvault_format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "complete": False,
                    **attrs,
                },
            )
            index = {"layer": layout.layers, "head": layout.heads, "kv_head": layout.kv_heads}
            new = [
                NewArray(
                    name,
                    layout.shape(name),
                    layout.chunks(name),
                    layout.dtype(name),
                    layout.fill_value(name),
                    layout.dims(name),
                    layout.compression,
                    np.asarray(index[name], dtype=np.int32) if name in index else None,
                )
                for name in layout.arrays()
            ]
            # keep the handles: reopening by name would drop write_empty_chunks (zarr's default
            # skips all-zero chunks) and re-read metadata on every write
            # their documents are stored by the store threads, before finalize writes the group's
            made = create_arrays(
                group,
                new,
                self.chunks.put,
                handles=True,
                existing=set() if fresh else None,
                store_later=self._pipeline.store_objects,
            )
            self._arrays.update(made)
            for name in layout.arrays():
                if array_spec(name).written == "row blocks":
                    self._encoders[name] = ChunkEncoder.for_array(self._arrays[name])
        except StoreError:
            raise  # classified by the ChunkStore (e.g. StoreNotWritable: disk full, read-only)
        except OSError as exc:
            raise StoreError(f"cannot create bundle at {self.url}: {exc}") from exc
        self._group = group

    def open(self, layout: BundleLayout) -> None:
        """Write into the arrays :meth:`create` made (by another writer: the planner of a job cut by
        layers, whose shards each write their layers' chunks) without creating them again, which
        would delete the chunks other writers stored."""
        self.layout = layout
        try:
            group = zarr.open_group(self.chunks.zarr(), mode="r+", zarr_format=3)
            for name in layout.arrays():
                found = group[name]
                assert isinstance(found, zarr.Array)
                self._arrays[name] = found.with_config({"write_empty_chunks": True})  # as created
                if array_spec(name).written == "row blocks":
                    self._encoders[name] = ChunkEncoder.for_array(self._arrays[name])
        except StoreError:
            raise
        except (OSError, KeyError) as exc:
            raise StoreError(f"cannot open the bundle's arrays at {self.url}: {exc}") from exc
        self._group = group

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

    def wait(self) -> None:
        """Block until every queued chunk is stored and recorded (raises the first write error)."""
        self._pipeline.wait()

    def close(self) -> None:
        """Wait for queued chunks (errors are not raised), record them, stop the threads."""
        self._pipeline.close()

    # -- data ---------------------------------------------------------------------------------
    def write_array(self, name: str, data: np.ndarray) -> None:
        """Write a small array whole (an array of one chunk: its chunk encoded and stored here,
        without a round trip to zarr's event loop)."""
        array = self._arrays[name]
        encoder = ChunkEncoder.encoder_for(array) if tuple(array.chunks) == data.shape else None
        if encoder is None or data.size == 0:
            array[...] = data
            return
        key = encoder.key((0,) * data.ndim)
        self.chunks.put(key.removeprefix("/"), encoder.encode(data))

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

        ``data`` is ``[heads, rows, cols]`` as :meth:`storage.bundle.arrays.ArraySpec.row_block`
        says: e.g. for ``attention`` cols are key positions from 0 (any width; the rest of the row
        is zero, and key chunks right of the widest row are never written), for q/k/v head_dim,
        for hidden_states heads is 1 and cols the hidden size. ``rows`` may be shorter than the
        chunk (the rest is zero). Whole chunks only; where they land: storage/bundle/rowblocks.py.
        ``ready()`` is called (in a writer thread) before ``data`` is read — e.g. waiting for an
        asynchronous device-to-host copy — and ``release()`` once every chunk of it is encoded.
        """
        self.write_row_blocks([RowBlock(name, layer_pos, batch, block, data, ready, release)])

    def write_row_blocks(self, blocks: Sequence[RowBlock]) -> None:
        """Queue several row blocks as :meth:`write_row_block` does each, at once (a layer call's:
        every sequence's q and k): their room in the queue is taken once and their chunks are
        shared out among the encoder threads by a few tasks (:meth:`ChunkPipeline.submit_blocks`)."""
        assert self.layout is not None
        writes = []
        for row_block in blocks:
            placement, data = place_row_block(
                self.layout,
                row_block.name,
                row_block.layer_pos,
                row_block.batch,
                row_block.block,
                row_block.data,
            )
            encoder = self._encoders[row_block.name]
            writes.append(
                BlockWrite(encoder, placement.chunks(data), data.nbytes, row_block.ready, row_block.release)
            )
        self._pipeline.submit_blocks(writes)

    def write_group(
        self,
        group_name: str,
        arrays: dict[str, tuple[tuple[str, ...], np.ndarray]],
        *,
        per_layer_batch: bool = False,
    ) -> list[ChunkRecord]:
        """Write a subgroup of arrays whole (``summary``, ``kv/<method>``): ``name -> (dims, data)``.
        ``per_layer_batch``: arrays whose dims start with (layer, batch) get one chunk per cell.
        Returns the chunk records written (also passed to ``on_chunk``)."""
        records: list[ChunkRecord] = []
        with self._collect_lock:
            self._collecting = (f"{self.chunks.key_prefix}{group_name}/", records)
        try:
            self._write_group(group_name, arrays, per_layer_batch)
        finally:
            with self._collect_lock:
                self._collecting = None
        return records

    def _write_group(
        self,
        group_name: str,
        arrays: dict[str, tuple[tuple[str, ...], np.ndarray]],
        per_layer_batch: bool,
    ) -> None:
        prefix = f"{self.group.path}/" if self.group.path else ""
        group, fresh = open_group(self.chunks, prefix + group_name)
        compression = self.layout.compression if self.layout is not None else DEFAULT_COMPRESSION
        new = []
        for name, (dims, data) in arrays.items():
            dtype = "str" if data.dtype.kind in "OUT" else str(data.dtype)
            fill: Any = "" if dtype == "str" else (float("nan") if data.dtype.kind == "f" else 0)
            chunks = data.shape
            if per_layer_batch and dims[:2] == ("layer", "batch"):
                chunks = (1, 1, *data.shape[2:])
            new.append(NewArray(name, data.shape, chunks, dtype, fill, dims, compression, data))
        create_arrays(group, new, self.chunks.put, existing=set() if fresh else None)

    # -- metadata last ------------------------------------------------------------------------
    def finalize(
        self,
        attrs: dict[str, Any],
        *,
        complete: bool = True,
        partial: bool = False,
        consolidate: bool = True,
        before_complete: Callable[[], None] | None = None,
    ) -> None:
        """Store every queued chunk, remove what writes a killed earlier attempt left unfinished in
        this writer's directory (:meth:`ChunkStore.remove_leftovers`), then write final root
        attributes and consolidate metadata (the last write of a job). A chunk that could not be
        stored raises its error here, before the bundle is marked complete.
        ``consolidate=False``: a bulk job's root, whose tree holds
        every micro-batch's arrays (each micro-batch group is consolidated on its own; the root's
        copy of them all, ~130 KB a micro-batch, would make every open read and parse tens of MB).
        ``before_complete``: called once every chunk is stored, before the attributes are written
        (a bulk micro-batch's chunk records go to the index then: worker/bulk.py)."""
        try:
            self.wait()
        finally:
            self.close()
        self.chunks.remove_leftovers()  # a killed earlier attempt's temporary files
        if before_complete is not None:
            before_complete()
        final = {**attrs, "complete": complete, "partial": partial}
        documents = self.chunks.documents() if consolidate and not self._children_by_others else None
        if documents is not None and ZARR_JSON in documents:  # every node's document is known here
            self.chunks.put(ZARR_JSON, consolidated_root(documents, final))
            return
        self.group.update_attributes(final)
        if not consolidate:
            return
        with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec" (yet)
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self.chunks.zarr(), zarr_format=3)
