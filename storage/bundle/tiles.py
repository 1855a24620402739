"""Tile pyramids of one attention matrix, built lazily and cached next to the bundle (numpy + zarr).

A pyramid of the ``(layer, head, seq)`` matrix (:class:`~storage.bundle.matrix.AttentionMatrix`:
queries × keys, real tokens only) has level 0, the data, read from the bundle (or computed, for a
derived-attention bundle) whenever a level-0 tile is asked for, and levels ``1 ..`` pooled 2×2 by
max and by mean (:mod:`storage.bundle.pooling`), built once and stored as zarr arrays under a
sibling prefix of the bundle, never inside it (the bundle is complete and checksummed)::

    <bundle>.zarr.tiles/seq-<seq>/layer-<layer>/head-<head>/
        ready.json                     {"build": "<id>", "tokens": T, "levels": n}  written last
        <id>/max_<L>, <id>/mean_<L>    float32 [size_L, size_L], one chunk per 256 × 256 tile;
                                       tiles right of the diagonal's are not stored (zero)

Building reads the matrix in bands of rows (the causal upper triangle is never read: keys after a
row are zero) and pools each band down every level; each level keeps at most one row of tiles
before it writes it, so memory stays near ``band_rows × tokens`` values plus one tile row per level,
whatever ``tokens``. The next band is read, and finished rows of tiles written (at most four
waiting), on two threads while the current band is pooled. Two builders of the same pyramid
(threads, processes, API replicas) never disturb each other: each writes under its own build id,
and ``ready.json``, a single object written whole (atomically replaced on a local disk), names the
finished build that readers use.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from storage.bundle.matrix import AttentionMatrix
from storage.bundle.pooling import POOLS, TILE, block_counts, level_sizes, pool_2x2, tiles_per_side
from storage.bundle.selectors import NotInBundle, SliceError
from storage.stores.objectstore import is_s3, zarr_store

__all__ = ["DEFAULT_BAND_ROWS", "PyramidInfo", "TilePyramid", "tiles_url"]

DEFAULT_BAND_ROWS = 512  # level-0 rows read per band while building (the writer's default chunk rows)
MARKER = "ready.json"
PYRAMID_FORMAT = 1


def tiles_url(bundle_url: str, layer: int, head: int, seq: int) -> str:
    """Where the pyramid of ``(layer, head, seq)`` of the bundle at ``bundle_url`` is cached."""
    return f"{str(bundle_url).rstrip('/')}.tiles/seq-{seq}/layer-{layer}/head-{head}"


@dataclass(frozen=True)
class PyramidInfo:
    """What a viewer needs before asking for tiles: ``tokens`` per side, ``level_sizes`` (level 0
    first), whether levels ≥ 1 are ``ready`` (built), and the ``token_strings`` of the axes."""

    tokens: int
    levels: int
    level_sizes: list[int]
    ready: bool
    token_strings: list[str]
    tile: int = TILE
    pools: tuple[str, ...] = POOLS


@dataclass
class _Level:
    """One level ≥ 1 while building: the rows of the level below waiting for a partner, and the
    tile row being filled before it is written whole."""

    level: int
    size: int
    below_size: int
    tokens: int
    arrays: dict[str, zarr.Array]
    write: Callable[[Callable[[], None]], None]  # runs a write of whole chunks (in the background)
    pending: tuple[np.ndarray, np.ndarray, int] | None = None
    rows_done: int = 0
    buffer: dict[str, np.ndarray] = field(default_factory=dict)
    filled: int = 0
    width: int = 0  # columns of the buffered rows that may be non-zero

    def feed(self, maxes: np.ndarray, sums: np.ndarray, width: int, *, last: bool) -> tuple[Any, ...] | None:
        """Rows of the level below, in order; returns this level's new rows (maxes, sums, width)."""
        if self.pending is not None:
            old_max, old_sum, old_width = self.pending
            width = max(width, old_width)
            maxes = np.concatenate([_widen(old_max, width), _widen(maxes, width)])
            sums = np.concatenate([_widen(old_sum, width), _widen(sums, width)])
            self.pending = None
        usable = maxes.shape[0] if last else maxes.shape[0] - maxes.shape[0] % 2
        if usable < maxes.shape[0]:
            self.pending = (maxes[usable:], sums[usable:], width)
        if usable == 0:
            return None
        pooled = pool_2x2(maxes[:usable], sums[:usable], width, self.below_size, last_rows=last)
        self._store(*pooled)
        return pooled

    def _store(self, maxes: np.ndarray, sums: np.ndarray, width: int) -> None:
        rows = maxes.shape[0]
        means = sums / np.outer(
            block_counts(self.level, self.rows_done, self.rows_done + rows, self.tokens),
            block_counts(self.level, 0, width, self.tokens),
        )
        done = 0
        while done < rows:
            if not self.buffer:
                height = min(TILE, self.size - self.rows_done - done)
                self.buffer = {p: np.zeros((height, self.size), dtype=np.float32) for p in POOLS}
                self.filled = 0
            take = min(rows - done, self.buffer["max"].shape[0] - self.filled)
            self.buffer["max"][self.filled : self.filled + take, :width] = maxes[done : done + take]
            self.buffer["mean"][self.filled : self.filled + take, :width] = means[done : done + take]
            self.filled += take
            self.width = max(self.width, width)
            done += take
            if self.filled == self.buffer["max"].shape[0]:
                start = self.rows_done + done - self.filled
                # a row of tiles, whole chunks only, up to the last one with a non-zero column: the
                # rest stays unwritten and reads as the fill value, zero (the causal upper triangle)
                stop = min(self.size, -(-self.width // TILE) * TILE)
                for pool in POOLS:
                    self.write(partial(_put, self.arrays[pool], start, self.buffer[pool][:, :stop]))
                self.buffer, self.width = {}, 0  # the write owns the old buffers now
        self.rows_done += rows


def _put(array: zarr.Array, row: int, data: np.ndarray) -> None:
    array[row : row + data.shape[0], : data.shape[1]] = data


class _Writes:
    """Writes of tile rows on a thread of their own while the next band is read and pooled: at most
    ``depth`` waiting (memory stays bounded); the first error is raised by :meth:`submit` or
    :meth:`wait`."""

    def __init__(self, pool: ThreadPoolExecutor, depth: int = 4) -> None:
        self.pool, self.depth = pool, depth
        self.pending: deque[Future[None]] = deque()

    def submit(self, write: Callable[[], None]) -> None:
        self.pending.append(self.pool.submit(write))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()


def _widen(rows: np.ndarray, width: int) -> np.ndarray:
    return rows if rows.shape[1] >= width else np.pad(rows, ((0, 0), (0, width - rows.shape[1])))


class TilePyramid:
    """The pyramid of one matrix (module docstring): :meth:`info`, :meth:`tile`, :meth:`build`."""

    def __init__(
        self,
        matrix: AttentionMatrix,
        cache_url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        band_rows: int = DEFAULT_BAND_ROWS,
    ) -> None:
        self.matrix = matrix
        self.cache_url = cache_url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.band_rows = band_rows
        self.sizes = level_sizes(matrix.tokens)
        self._build_id: str | None = None
        self._arrays: dict[tuple[str, int], zarr.Array] = {}
        self._lock = threading.Lock()

    # -- the marker ------------------------------------------------------------------------------
    def _fs(self) -> Any:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(
            self.cache_url, **(self.storage_options if is_s3(self.cache_url) else {})
        )
        return fs

    def _marker_path(self) -> str:
        return f"{self.cache_url.removeprefix('s3://').removeprefix('file://')}/{MARKER}"

    def _read_marker(self) -> str | None:
        try:
            document = json.loads(self._fs().cat_file(self._marker_path()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if document.get("format") != PYRAMID_FORMAT or document.get("tokens") != self.matrix.tokens:
            return None
        return str(document["build"])

    def _write_marker(self, build_id: str) -> None:
        body = json.dumps(
            {
                "format": PYRAMID_FORMAT,
                "build": build_id,
                "tokens": self.matrix.tokens,
                "levels": len(self.sizes),
            }
        ).encode()
        path = self._marker_path()
        if is_s3(self.cache_url):
            self._fs().pipe_file(path, body)  # one PUT: atomic
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as fh:
            fh.write(body)
        os.replace(temporary, path)

    @property
    def ready(self) -> bool:
        """Whether levels ≥ 1 are built (a single-level pyramid is always ready)."""
        if len(self.sizes) == 1:
            return True
        if self._build_id is None:
            self._build_id = self._read_marker()
        return self._build_id is not None

    def info(self) -> PyramidInfo:
        view = self.matrix.view
        ref = view.locate(self.matrix.seq)
        return PyramidInfo(
            tokens=self.matrix.tokens,
            levels=len(self.sizes),
            level_sizes=list(self.sizes),
            ready=self.ready,
            token_strings=view.token_strings(ref),
        )

    # -- tiles -----------------------------------------------------------------------------------
    def check_tile(self, level: int, row: int, col: int) -> None:
        """NotInBundle naming the ranges when ``(level, row, col)`` is not a tile of this pyramid."""
        if not 0 <= level < len(self.sizes):
            raise NotInBundle(
                f"level {level} is out of range: this pyramid has levels 0..{len(self.sizes) - 1}"
            )
        side = tiles_per_side(self.sizes[level])
        if not (0 <= row < side and 0 <= col < side):
            raise NotInBundle(
                f"tile ({row}, {col}) is out of range at level {level}: rows and columns 0..{side - 1} "
                f"({self.sizes[level]} cells per side, {TILE} per tile)"
            )

    def tile(self, level: int, row: int, col: int, pool: str = "max") -> np.ndarray:
        """Tile ``(row, col)`` of ``level``: float32 ``[TILE, TILE]``, NaN outside the matrix.
        Level 0 reads the bundle; a level ≥ 1 builds the pyramid first when it is not built."""
        if pool not in POOLS:
            raise SliceError(f"pool={pool!r}: choose one of {', '.join(POOLS)}")
        self.check_tile(level, row, col)
        size = self.sizes[level]
        r0, c0 = row * TILE, col * TILE
        r1, c1 = min(size, r0 + TILE), min(size, c0 + TILE)
        out = np.full((TILE, TILE), np.nan, dtype=np.float32)
        if level == 0:
            out[: r1 - r0, : c1 - c0] = self.matrix.read(r0, r1, c0, c1)
            return out
        self.build()
        out[: r1 - r0, : c1 - c0] = self._array(pool, level)[r0:r1, c0:c1]
        return out

    def _array(self, pool: str, level: int) -> zarr.Array:
        key = (pool, level)
        if key not in self._arrays:
            store = zarr_store(
                f"{self.cache_url}/{self._build_id}", storage_options=self.storage_options, read_only=True
            )
            self._arrays[key] = zarr.open_array(store, path=f"{pool}_{level}", mode="r", zarr_format=3)
        return self._arrays[key]

    # -- building --------------------------------------------------------------------------------
    def build(self) -> bool:
        """Build levels ≥ 1 unless built (here or by another builder); True when this call built."""
        if self.ready:
            return False
        with self._lock:
            if self.ready:
                return False
            build_id = uuid.uuid4().hex
            self._write_levels(build_id)
            if self._read_marker() is None:  # another builder may have finished meanwhile
                self._write_marker(build_id)
            else:
                self._delete(build_id)
            self._build_id = self._read_marker()
            self._arrays.clear()
            return True

    def _delete(self, build_id: str) -> None:
        fs = self._fs()
        path = f"{self.cache_url.removeprefix('s3://').removeprefix('file://')}/{build_id}"
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def _write_levels(self, build_id: str) -> None:
        store = zarr_store(f"{self.cache_url}/{build_id}", storage_options=self.storage_options)
        group = zarr.open_group(store, mode="w", zarr_format=3)
        tokens = self.matrix.tokens
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkvault-tiles") as pool:
            writes = _Writes(pool)
            self._pool_bands(group, tokens, pool, writes)
            writes.wait()
        group.attrs.update({"tokens": tokens, "level_sizes": self.sizes, "pools": list(POOLS)})

    def _pool_bands(self, group: zarr.Group, tokens: int, pool: ThreadPoolExecutor, writes: _Writes) -> None:
        """Read the matrix band by band (the next band read while this one is pooled) and feed
        every level; rows of tiles are written by ``writes``."""
        levels: list[_Level] = []
        for number, size in enumerate(self.sizes[1:], start=1):
            arrays = {
                pool: group.create_array(
                    f"{pool}_{number}",
                    shape=(size, size),
                    chunks=(TILE, TILE),
                    dtype="float32",
                    fill_value=0.0,  # chunks never written: the causal upper triangle
                    dimension_names=("query", "key"),
                    compressors=BloscCodec(cname="lz4", clevel=1, shuffle="shuffle", typesize=4),
                )
                for pool in POOLS
            }
            levels.append(_Level(number, size, self.sizes[number - 1], tokens, arrays, writes.submit))
        starts = range(0, tokens, self.band_rows)

        def read(start: int) -> np.ndarray:
            stop = min(tokens, start + self.band_rows)
            return self.matrix.read(start, stop, 0, stop)  # keys after the band's last row are zero

        upcoming = pool.submit(read, 0)
        for start in starts:
            block = upcoming.result()
            if start + self.band_rows < tokens:
                upcoming = pool.submit(read, start + self.band_rows)
            stop = min(tokens, start + self.band_rows)
            rows: tuple[Any, ...] | None = (block, block, stop)
            for level in levels:  # the last band empties every level (last=True pools odd rows)
                if rows is None:
                    break
                rows = level.feed(rows[0], rows[1], rows[2], last=stop == tokens)
