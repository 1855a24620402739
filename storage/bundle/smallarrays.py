"""Small arrays written whole (a bundle's per-sequence arrays, its ``summary`` group, a bulk
job's sequence table): created together, in one step.

zarr's API costs about 1-3 ms an array (its metadata objects, its event loop, an existence check),
and a bulk job's micro-batch writes about 70 of them: one after another they cost more than the
micro-batch's forward pass on a GPU. A numeric array of one chunk (almost all of them) is therefore
written directly: its ``zarr.json`` is zarr's own metadata document (a template array of the same
kind, made once in memory, with this shape and dimension names) and its chunk the bytes zarr's
codecs produce (``bytes`` little-endian + Blosc: :func:`storage.bundle.pipeline.blosc_encoder`),
both stored in parallel through the bundle's :class:`~storage.bundle.chunkstore.ChunkStore` (the
one write path). Every other array (strings, several chunks, one that exists already) goes
through zarr, all of them in one round trip to its event loop. ``tests/storage/test_pipeline.py``
checks that both give the same files.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.group import AsyncGroup
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from storage.bundle.format import COMPRESSIONS
from storage.bundle.pipeline import blosc_encoder

__all__ = ["NewArray", "create_arrays"]

PUT_THREADS = 16  # objects stored at once (an S3 PUT waits ~20 ms: in parallel, not in turn)

Put = Callable[[str, bytes], None]


@dataclass(frozen=True)
class NewArray:
    """One array to create: Blosc level 1 with the job's compressor and shuffle (``COMPRESSIONS``;
    strings: zstd only); every chunk written; ``data``: written whole right after."""

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
        cname, shuffle = COMPRESSIONS[self.compression]
        return BloscCodec(cname=cname, clevel=1, shuffle=shuffle, typesize=np.dtype(self.dtype).itemsize)

    @property
    def direct(self) -> bool:
        """Written without zarr: numeric, one chunk, data given, no empty dimension."""
        return (
            self.data is not None
            and self.dtype != "str"
            and self.chunks == self.shape
            and all(n > 0 for n in self.shape)
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

    def objects(self, prefix: str) -> list[tuple[str, bytes]]:
        """The ``zarr.json`` and the one chunk zarr would store for this array at ``prefix``."""
        assert self.data is not None
        nan = isinstance(self.fill_value, float) and np.isnan(self.fill_value)
        template = _template(self.dtype, len(self.shape), "nan" if nan else self.fill_value, self.compression)
        metadata = replace(
            template,
            shape=self.shape,
            chunk_grid=RegularChunkGrid(chunk_shape=self.chunks),
            dimension_names=self.dims,
        )
        document = metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
        codec = metadata.codecs[1]
        assert isinstance(codec, BloscCodec)
        values = np.ascontiguousarray(self.data, dtype=np.dtype(self.dtype).newbyteorder("<"))
        chunk = bytes(blosc_encoder(codec).encode(values))
        key = metadata.encode_chunk_key((0,) * len(self.shape))
        return [(f"{prefix}zarr.json", document), (f"{prefix}{key}", chunk)]


@lru_cache(maxsize=256)
def _template(dtype: str, ndim: int, fill: Any, compression: str) -> ArrayV3Metadata:
    """zarr's metadata of an array of this kind (shape and dimension names are replaced);
    ``fill``: the fill value, ``"nan"`` for NaN (which would never equal itself as a cache key)."""
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
    return metadata


def create_arrays(group: zarr.Group, arrays: Sequence[NewArray], put: Put) -> dict[str, zarr.Array]:
    """Create (and write) ``arrays`` in ``group`` (module docstring); ``put(key, data)`` stores one
    object by its key in the store ``group`` lives in. Returns zarr's handles of the arrays made
    through zarr (the others are written and need none). Only arrays that exist already (an earlier
    attempt's) are overwritten: replacing one lists and deletes its keys first."""
    existing = set(group.array_keys())
    prefix = f"{group.path}/" if group.path else ""
    direct = [a for a in arrays if a.direct and a.name not in existing]
    through_zarr = [a for a in arrays if not (a.direct and a.name not in existing)]
    objects = [item for a in direct for item in a.objects(f"{prefix}{a.name}/")]
    if objects:
        with ThreadPoolExecutor(max_workers=min(PUT_THREADS, len(objects))) as pool:
            list(pool.map(lambda item: put(*item), objects))

    async def create() -> list[Any]:
        return await asyncio.gather(*(a.create(group._async_group, a.name in existing) for a in through_zarr))

    if not through_zarr:
        return {}
    with warnings.catch_warnings():  # variable-length strings: "not yet part of the v3 spec" warning
        warnings.simplefilter("ignore", category=UserWarning)
        created = sync(create())
    return {a.name: zarr.Array(made) for a, made in zip(through_zarr, created, strict=True)}
