"""Small arrays written whole (a bundle's per-sequence arrays, its ``summary`` group, a bulk
job's sequence table): created together, in one step.

zarr's API costs about 1-3 ms an array (its metadata objects, its event loop, an existence check),
and a bulk job's micro-batch writes about 70 of them: one after another they cost more than the
micro-batch's forward pass on a GPU. A numeric array is therefore written directly when it is new
and either has no data yet (the arrays a bundle creates before its row blocks stream in: only its
metadata) or data of one chunk (almost all small arrays): its ``zarr.json`` is zarr's own metadata
document (that of a template array of the same kind, made once in memory, as a dict with this
shape, chunks and dimension names) and its chunk the bytes zarr's codecs produce (``bytes``
little-endian + Blosc: :func:`storage.bundle.pipeline.blosc_encoder`), both stored in parallel
(one pool of threads a process) through the bundle's :class:`~storage.bundle.chunkstore.ChunkStore`
(the one write path), the document's bytes encoded once per kind, shape, chunks and dimension
names; zarr's handle of such an array is built from that document without I/O. Every other
array (strings, several chunks with data, an empty dimension, one that exists already) goes
through zarr, all of them in one round trip to its event loop. ``tests/storage/test_smallarrays.py``
checks that both give the same files.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import AsyncGroup
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from storage.bundle.format import COMPRESSIONS
from storage.bundle.pipeline import ArrayEncoder, chain_encoder

__all__ = ["NewArray", "create_arrays"]

PUT_THREADS = 16  # objects stored at once (an S3 PUT waits ~20 ms: in parallel, not in turn)

Put = Callable[[str, bytes], None]


@dataclass(frozen=True)
class NewArray:
    """One array to create: Blosc level 1 with the job's compressor and shuffle, or no compressor
    (``COMPRESSIONS``; strings: zstd always); every chunk written; ``data``: written whole right
    after."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    fill_value: Any
    dims: tuple[str, ...]
    compression: str
    data: np.ndarray | None = None

    def compressors(self) -> Any:
        if self.dtype == "str":
            return ZstdCodec(level=1)
        blosc = COMPRESSIONS[self.compression]
        if blosc is None:
            return None
        cname, shuffle = blosc
        return BloscCodec(cname=cname, clevel=1, shuffle=shuffle, typesize=np.dtype(self.dtype).itemsize)

    @property
    def direct(self) -> bool:
        """Written without zarr: numeric, no empty dimension, and either no data yet (its metadata
        only) or data of one chunk."""
        return (
            self.dtype != "str"
            and all(n > 0 for n in self.shape)
            and (self.data is None or self.chunks == self.shape)
        )

    async def create(self, group: AsyncGroup, overwrite: bool) -> Any:
        array = await group.create_array(
            self.name,
            shape=self.shape,
            chunks=self.chunks,
            dtype=self.dtype,
            fill_value=self.fill_value,
            dimension_names=self.dims,
            compressors=self.compressors(),
            config={"write_empty_chunks": True},
            overwrite=overwrite,
        )
        if self.data is not None:
            await array.setitem(..., self.data)
        return array

    def _kind_key(self) -> tuple[str, int, Any, str]:
        """:func:`_kind`'s arguments: the fill value ``"nan"`` for NaN (never equal to itself)."""
        nan = isinstance(self.fill_value, float) and np.isnan(self.fill_value)
        return self.dtype, len(self.shape), "nan" if nan else self.fill_value, self.compression

    def _kind(self) -> _Kind:
        return _kind(*self._kind_key())

    def document(self) -> dict[str, Any]:
        """The array's ``zarr.json`` as zarr writes it: its kind's, with this shape, chunks and
        dimension names."""
        return _document(self._kind(), self.shape, self.chunks, self.dims)

    def objects(self, prefix: str) -> list[tuple[str, bytes]]:
        """The ``zarr.json`` and, with data, the one chunk zarr would store for this array at
        ``prefix``."""
        kind = self._kind()
        text = _document_text(
            self._kind_key(), self.shape, self.chunks, self.dims, zarr.config.get("json_indent")
        )
        out = [(f"{prefix}zarr.json", text)]
        if self.data is not None:
            values = np.ascontiguousarray(self.data, dtype=np.dtype(self.dtype).newbyteorder("<"))
            out.append((f"{prefix}{kind.chunk_key}", bytes(kind.encoder.encode(values))))
        return out

    def handle(self, group: zarr.Group) -> zarr.Array:
        """zarr's handle of this array once :meth:`objects` are stored in ``group`` (no I/O)."""
        metadata = ArrayV3Metadata.from_dict(self.document())
        path = group.store_path / self.name
        return zarr.Array(AsyncArray(metadata, path, config={"write_empty_chunks": True}))


@dataclass(frozen=True)
class _Kind:
    """What arrays of one dtype, rank, fill value and compression share: zarr's metadata document
    (shape, chunks and dimension names aside), the key of a one-chunk array's chunk, its encoder."""

    document: dict[str, Any]
    chunk_key: str
    encoder: ArrayEncoder  # numcodecs' Blosc with the codec's configuration, or the raw bytes


@lru_cache(maxsize=256)
def _kind(dtype: str, ndim: int, fill: Any, compression: str) -> _Kind:
    """The :class:`_Kind` of a template array zarr creates in memory; ``fill``: the fill value,
    ``"nan"`` for NaN (which would never equal itself as a cache key)."""
    shape = (1,) * ndim
    fill_value = float("nan") if fill == "nan" else fill
    kind = NewArray("t", shape, shape, dtype, fill_value, ("d",) * ndim, compression)
    array = zarr.create_array(
        MemoryStore(),
        shape=shape,
        chunks=shape,
        dtype=dtype,
        fill_value=kind.fill_value,
        dimension_names=kind.dims,
        compressors=kind.compressors(),
        config={"write_empty_chunks": True},
    )
    metadata = array.metadata
    assert isinstance(metadata, ArrayV3Metadata)
    encoder = chain_encoder(metadata.codecs)
    assert encoder is not None
    document = json.loads(metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
    return _Kind(document, metadata.encode_chunk_key((0,) * ndim), encoder)


def _document(
    kind: _Kind, shape: tuple[int, ...], chunks: tuple[int, ...], dims: tuple[str, ...]
) -> dict[str, Any]:
    document = dict(kind.document)  # the nested values replaced are new objects
    document["shape"] = list(shape)
    document["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}
    document["dimension_names"] = list(dims)
    return document


@lru_cache(maxsize=4096)
def _document_text(
    kind_key: tuple[str, int, Any, str],
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dims: tuple[str, ...],
    indent: int | None,
) -> bytes:
    """An array's ``zarr.json`` bytes, encoded once for each kind, shape, chunks and dimension names:
    the indented JSON zarr writes takes Python's pure-Python encoder (≈ 0.3 ms a document), and a
    micro-batch's ~60 arrays share a few shapes, as micro-batches of one size share all of them."""
    document = _document(_kind(*kind_key), shape, chunks, dims)
    return json.dumps(document, allow_nan=True, indent=indent).encode()


@cache
def _put_pool(pid: int) -> ThreadPoolExecutor:
    """The threads that store new arrays' objects, one pool a process (``pid``: a forked child makes
    its own; a parent's threads do not exist there): a pool a call would start 16 threads for every
    group a micro-batch writes."""
    return ThreadPoolExecutor(max_workers=PUT_THREADS, thread_name_prefix="qkvault-put")


def create_arrays(
    group: zarr.Group,
    arrays: Sequence[NewArray],
    put: Put,
    *,
    handles: bool = False,
    existing: Collection[str] | None = None,
    store_later: Callable[[list[tuple[str, bytes]]], None] | None = None,
) -> dict[str, zarr.Array]:
    """Create (and write) ``arrays`` in ``group`` (module docstring); ``put(key, data)`` stores one
    object by its key in the store ``group`` lives in. Returns zarr's handles of the arrays made
    through zarr and, with ``handles``, of every other one (made without I/O). Only arrays that
    exist already (an earlier attempt's) are overwritten: replacing one lists and deletes its keys
    first. ``existing``: the names of the arrays the group holds, when the caller knows them (an
    empty set for a group it just created); otherwise the group is listed. ``store_later(objects)``:
    takes the objects of the arrays written directly instead, to store them in the background (a
    writer's store threads, waited for before anything reads the arrays)."""
    if existing is None:  # the caller does not know (a new group holds none): list the group
        existing = set(group.array_keys())
    prefix = f"{group.path}/" if group.path else ""
    direct = [a for a in arrays if a.direct and a.name not in existing]
    through_zarr = [a for a in arrays if not (a.direct and a.name not in existing)]
    objects = [item for a in direct for item in a.objects(f"{prefix}{a.name}/")]
    if store_later is not None:
        store_later(objects)
    elif len(objects) == 1:
        put(*objects[0])
    elif objects:  # every put ends before an error is raised, as each one's own write would
        pool = _put_pool(os.getpid())
        stored = [pool.submit(put, key, data) for key, data in objects]
        wait_futures(stored)
        for future in stored:
            future.result()

    made = {a.name: a.handle(group) for a in direct} if handles else {}

    async def create() -> list[Any]:
        return await asyncio.gather(*(a.create(group._async_group, a.name in existing) for a in through_zarr))

    if not through_zarr:
        return made
    with warnings.catch_warnings():  # variable-length strings: "not yet part of the v3 spec" warning
        warnings.simplefilter("ignore", category=UserWarning)
        created = sync(create())
    return made | {a.name: zarr.Array(array) for a, array in zip(through_zarr, created, strict=True)}
