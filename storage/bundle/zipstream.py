"""Stream a bundle (a Zarr v3 store under one URL) as a ZIP file, piece by piece.

The zip is ``ZIP_STORED`` (chunks are already compressed by their codecs), has ``zarr.json`` at its
root and is deterministic: names sorted, every timestamp 1980-01-01 00:00:00, fixed permissions, so
one store always gives byte-identical zips. ``zipfile`` writes into a small non-seekable sink (so it
uses data descriptors for sizes and CRCs, and ZIP64 where a file or the archive needs it), and the
sink's buffer is handed out after each piece. The zip's exact length is computed from the listing
before the first byte (:func:`zip_size`: the API's ``Content-Length``).

A bundle is mostly small files (chunks and ``zarr.json`` documents), and on S3 each read is a
request of its own: read one after another, a bulk job's thousands of files cost their round trips
in turn. So files of at most one piece are read whole, :data:`READ_AHEAD_FILES` at a time ahead of
the writer, on as many threads (:class:`_ReadAhead`); larger files are streamed in pieces when their
turn comes. Memory stays bounded: at most ``READ_AHEAD_FILES`` pieces ahead, one piece being written.

Open a downloaded bundle with ``xr.open_zarr(zarr.storage.ZipStore(path, mode="r"), zarr_format=3)``.
Imports neither fastapi nor torch: usable from the API, the CLI and a notebook.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from storage.errors import BundleNotReady
from storage.stores.objectstore import ObjectStore

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest timestamp ZIP can express
FILE_MODE = 0o100644  # regular file, rw-r--r--
DEFAULT_PIECE_BYTES = 1 << 20  # 1 MiB read from the store per piece
READ_AHEAD_FILES = 16  # small files (at most one piece) read at once ahead of the zip's writer


class _Sink:
    """Write-only, non-seekable file object that collects what ``zipfile`` writes until drained.

    It deliberately has no ``tell``/``seek``: ``zipfile`` then treats the stream as unseekable and
    never tries to go back and patch a header.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> bytes:
        out = bytes(self._buffer)
        self._buffer.clear()
        return out


def _entry(name: str, size_bytes: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, whatever platform builds the zip
    info.external_attr = FILE_MODE << 16
    info.file_size = size_bytes  # only a hint: zipfile picks ZIP64 headers from it
    return info


# Record sizes of what ``zipfile`` writes for a ZIP_STORED entry on a non-seekable stream (APPNOTE 4.3)
_LOCAL_HEADER = 30
_CENTRAL_HEADER = 46
_END_RECORD = 22
_ZIP64_END_RECORDS = 56 + 20  # ZIP64 end of central directory record + its locator
_ZIP64_LOCAL_EXTRA = 20  # extra field of a local header: id, length, file size, compressed size
_DATA_DESCRIPTOR, _ZIP64_DATA_DESCRIPTOR = 16, 24  # signature, CRC, sizes (32- or 64-bit)


def _encoded_name(name: str) -> bytes:
    try:  # as ZipInfo._encodeFilenameFlags: ASCII when it can, else UTF-8
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("utf-8")


def zip_size(files: Sequence[tuple[str, int]]) -> int:
    """Exact byte length of the zip :func:`iter_bundle_zip` streams for ``files`` ((name, size) in
    any order), mirroring ``zipfile``'s writer: per entry a local header (+ a ZIP64 extra when
    ``size x 1.05`` exceeds ``zipfile.ZIP64_LIMIT``, zipfile's own guess), the data and a data
    descriptor (64-bit sizes after a ZIP64 header); then a central directory header per entry (+ a
    ZIP64 extra holding the sizes past ``ZIP64_LIMIT`` and/or the header offset past it) and the end
    record, preceded by the ZIP64 end record and locator when the entry count, the central
    directory's offset or its size exceeds zipfile's limits. Limits are read from ``zipfile`` when
    called. tests/api/test_api_zipstream.py checks every branch against the stream."""
    limit = zipfile.ZIP64_LIMIT
    offset = 0  # where the next local header starts
    central = 0  # central directory bytes
    for name, size in sorted(files):
        encoded = _encoded_name(name)
        zip64_local = size * 1.05 > limit
        header_offset = offset
        offset += _LOCAL_HEADER + len(encoded) + (_ZIP64_LOCAL_EXTRA if zip64_local else 0)
        offset += size + (_ZIP64_DATA_DESCRIPTOR if zip64_local else _DATA_DESCRIPTOR)
        extra_fields = (2 if size > limit else 0) + (1 if header_offset > limit else 0)
        central += _CENTRAL_HEADER + len(encoded) + (4 + 8 * extra_fields if extra_fields else 0)
    zip64_end = len(files) > zipfile.ZIP_FILECOUNT_LIMIT or offset > limit or central > limit
    return offset + central + (_ZIP64_END_RECORDS if zip64_end else 0) + _END_RECORD


@dataclass(frozen=True)
class BundleZip:
    """A bundle zip about to be streamed: its exact length and its pieces (consumed once)."""

    size: int
    pieces: Generator[bytes, None, None]  # closing it early cancels the reads ahead


def open_bundle_zip(store: ObjectStore, bundle_url: str, piece_bytes: int = DEFAULT_PIECE_BYTES) -> BundleZip:
    """List the bundle once: the zip's exact size (:func:`zip_size`) and its lazy pieces
    (:func:`iter_bundle_zip`, from the same listing). The sizes are the store's; a file that changes
    while it is streamed makes the body differ from ``size`` (a bundle is written before it is
    downloadable, so this does not happen to a finished job)."""
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
    files = store.list_files(bundle_url)
    if not any(name == "zarr.json" for name, _ in files):
        raise BundleNotReady(
            f"no bundle at {bundle_url}: zarr.json is missing (the job has not written its metadata yet)",
            detail={"bundle_url": bundle_url},
        )
    ordered = sorted(files)
    return BundleZip(zip_size(ordered), _generate(store, bundle_url, ordered, piece_bytes))


def iter_bundle_zip(
    store: ObjectStore, bundle_url: str, piece_bytes: int = DEFAULT_PIECE_BYTES
) -> Generator[bytes, None, None]:
    """Yield a ZIP_STORED zip of every file under ``bundle_url`` (paths relative to it), in pieces.

    The store is checked and listed when this function is called (not lazily on the first
    ``next()``), so a missing bundle raises :class:`BundleNotReady` before any byte is sent.
    Each yielded piece is at most about ``piece_bytes`` plus one header; memory stays
    O(``READ_AHEAD_FILES`` × ``piece_bytes``).
    """
    return open_bundle_zip(store, bundle_url, piece_bytes).pieces


class _ReadAhead:
    """The files of one zip in its order: those of at most ``piece_bytes`` read whole, up to ``depth``
    of them at once ahead of the writer (each one request, :meth:`ObjectStore.read_bytes`, on a
    thread of its own); larger files streamed in pieces when their turn comes. A context manager:
    leaving it (the zip finished, failed or its consumer gone) cancels the reads not started."""

    def __init__(
        self,
        store: ObjectStore,
        bundle_url: str,
        files: Sequence[tuple[str, int]],
        piece_bytes: int,
        depth: int,
    ) -> None:
        self._store, self._url, self._piece_bytes, self._depth = store, bundle_url, piece_bytes, depth
        self._queued = deque(name for name, size_bytes in files if size_bytes <= piece_bytes)
        self._reading: dict[str, Future[bytes]] = {}
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="zip-read-ahead")

    def __enter__(self) -> _ReadAhead:
        self._read_ahead()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _read_ahead(self) -> None:
        while self._queued and len(self._reading) < self._depth:
            name = self._queued.popleft()
            self._reading[name] = self._pool.submit(self._store.read_bytes, self._url, name)

    def pieces(self, name: str) -> Iterator[bytes]:
        """File ``name``'s bytes in pieces of at most ``piece_bytes``: the next file of the zip's order."""
        reading = self._reading.pop(name, None)
        if reading is None:  # larger than one piece
            yield from self._store.iter_file(self._url, name, self._piece_bytes)
            return
        self._read_ahead()
        if data := reading.result():
            yield data


def _generate(
    store: ObjectStore, bundle_url: str, files: list[tuple[str, int]], piece_bytes: int
) -> Generator[bytes, None, None]:
    sink = _Sink()
    with (
        _ReadAhead(store, bundle_url, files, piece_bytes, READ_AHEAD_FILES) as ahead,
        zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        for name, size_bytes in files:
            with archive.open(_entry(name, size_bytes), mode="w") as member:
                for piece in ahead.pieces(name):
                    member.write(piece)
                    yield sink.drain()
            if tail := sink.drain():  # local header of an empty file, or the data descriptor
                yield tail
    # closing the archive wrote the central directory (and ZIP64 end records when needed)
    if tail := sink.drain():
        yield tail


def write_bundle_zip(
    store: ObjectStore,
    bundle_url: str,
    dest_path: str | os.PathLike[str],
    piece_bytes: int = DEFAULT_PIECE_BYTES,
) -> Path:
    """Write the bundle zip to ``dest_path`` atomically (a temporary file in the same folder, then rename)."""
    dest = Path(dest_path)
    pieces = iter_bundle_zip(store, bundle_url, piece_bytes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest
