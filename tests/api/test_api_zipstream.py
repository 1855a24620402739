"""storage.bundle.zipstream: deterministic, streamed ZIP_STORED bundles (local and S3 stores)."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from storage.bundle.zipstream import (
    READ_AHEAD_FILES,
    ZIP_EPOCH,
    iter_bundle_zip,
    open_bundle_zip,
    write_bundle_zip,
)
from storage.errors import BundleNotReady
from storage.stores.objectstore import ObjectStore
from tests.api.support import write_small_bundle
from tests.services import S3Server


@pytest.fixture
def local_store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(str(tmp_path / "store"))


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_zip_holds_every_file_relative_to_the_bundle(local_store: ObjectStore) -> None:
    url = local_store.bundle_url("job-a")
    files = {
        "zarr.json": b'{"zarr_format": 3, "node_type": "group"}',
        "q/zarr.json": b"{}",
        "q/c/0/1": os.urandom(5000),
        "empty": b"",
    }
    _write_files(Path(url), files)

    data = b"".join(iter_bundle_zip(local_store, url))

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == sorted(files)
        assert zf.testzip() is None
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == ZIP_EPOCH
            assert zf.read(info) == files[info.filename]


def test_zip_is_deterministic_across_identical_stores(tmp_path: Path) -> None:
    zips = []
    for name in ("one", "two"):
        store = ObjectStore(str(tmp_path / name))
        url = store.bundle_url("same-job")
        write_small_bundle(url, seed=7)
        os.utime(Path(url) / "zarr.json", (1_000_000_000 + len(name), 1_000_000_000 + len(name)))
        zips.append(b"".join(iter_bundle_zip(store, url)))
    assert zips[0] == zips[1]
    assert zips[0] == b"".join(iter_bundle_zip(store, url, piece_bytes=4096))  # piece size changes nothing


def test_zip_is_streamed_in_pieces(local_store: ObjectStore) -> None:
    url = local_store.bundle_url("job-big")
    big = os.urandom(300_000)
    _write_files(Path(url), {"zarr.json": b"{}", "a/c/0": big, "b/c/0": big[::-1]})
    piece_bytes = 16 << 10  # 16 KiB

    pieces = iter_bundle_zip(local_store, url, piece_bytes=piece_bytes)
    first = next(pieces)  # available before the rest is read
    rest = list(pieces)

    assert len(first) <= piece_bytes + 512
    assert len(rest) >= 2 * len(big) // piece_bytes
    assert max(len(p) for p in rest) <= piece_bytes + 512  # a piece plus at most a few headers
    with zipfile.ZipFile(io.BytesIO(first + b"".join(rest))) as zf:
        assert zf.read("a/c/0") == big


class _ReadRecorder:
    """Wraps a store's ``read_bytes``: each read takes a while, as an S3 request does, and the
    files read and the most reads running at once are recorded."""

    def __init__(self, store: ObjectStore, delay_s: float = 0.02) -> None:
        self._read = store.read_bytes
        self._delay_s = delay_s
        self._lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.names: list[str] = []

    def __call__(self, url: str, relpath: str) -> bytes:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.names.append(relpath)
        try:
            time.sleep(self._delay_s)
            return self._read(url, relpath)
        finally:
            with self._lock:
                self.running -= 1


def test_small_files_are_read_ahead_at_once_and_large_ones_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle of many small files (chunks, zarr.json documents) is read several files at once
    ahead of the writer, at most READ_AHEAD_FILES, each whole; a file over one piece is streamed in
    pieces instead. The zip is the same bytes as when every file is read in turn."""
    piece_bytes = 4096
    files = {"zarr.json": b"{}", "big/c/0": os.urandom(5 * piece_bytes)}
    files |= {f"q/c/{i}": os.urandom(1 + i * 37 % piece_bytes) for i in range(60)}
    plain = ObjectStore(str(tmp_path / "plain"))
    _write_files(Path(plain.bundle_url("job")), files)
    wanted = b"".join(iter_bundle_zip(plain, plain.bundle_url("job"), piece_bytes=piece_bytes))

    store = ObjectStore(str(tmp_path / "plain"))
    recorder = _ReadRecorder(store)
    monkeypatch.setattr(store, "read_bytes", recorder)
    got = b"".join(iter_bundle_zip(store, store.bundle_url("job"), piece_bytes=piece_bytes))

    assert got == wanted
    assert sorted(recorder.names) == sorted(name for name in files if name != "big/c/0")
    assert 1 < recorder.most_at_once <= READ_AHEAD_FILES


def test_a_zip_left_unread_reads_no_further(
    local_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download given up after its first piece (the client went away): the reads queued ahead
    are cancelled, at most those already running finish."""
    url = local_store.bundle_url("job-gone")
    _write_files(Path(url), {f"c/{i:03d}": os.urandom(100) for i in range(200)} | {"zarr.json": b"{}"})
    recorder = _ReadRecorder(local_store, delay_s=0.05)
    monkeypatch.setattr(local_store, "read_bytes", recorder)
    pieces = iter_bundle_zip(local_store, url)
    next(pieces)
    pieces.close()
    deadline = time.monotonic() + 10
    while recorder.running and time.monotonic() < deadline:  # the reads that had started end
        time.sleep(0.01)
    assert recorder.running == 0
    started = len(recorder.names)
    time.sleep(0.2)
    assert len(recorder.names) == started <= 2 * READ_AHEAD_FILES + 1  # none starts after the close


def _size_and_bytes(store: ObjectStore, url: str, piece_bytes: int = 4096) -> tuple[int, bytes]:
    bundle = open_bundle_zip(store, url, piece_bytes)
    return bundle.size, b"".join(bundle.pieces)


def test_zip_size_is_known_before_streaming(local_store: ObjectStore) -> None:
    """The size (the API's Content-Length) is computed from the listing alone and is exact."""
    url = local_store.bundle_url("job-size")
    files = {
        "zarr.json": b'{"zarr_format": 3}',
        "empty": b"",
        "q/c/0/0": os.urandom(70_000),
        "ünïcode/zarr.json": b"{}",  # a UTF-8 name (flag bit 11, longer than its characters)
    }
    _write_files(Path(url), files)
    size, data = _size_and_bytes(local_store, url)
    assert size == len(data)
    write_small_bundle(url)
    size, data = _size_and_bytes(local_store, url)
    assert size == len(data)


@pytest.mark.parametrize(
    ("sizes", "count_limit"),
    [
        ([10, 960, 1001, 5], 1 << 16),  # ZIP64 in the local header only (size x 1.05 > limit), then sizes
        ([400, 400, 400, 20], 1 << 16),  # header offsets and the central directory offset past the limit
        ([3] * 12, 5),  # more entries than the count limit: ZIP64 end records
        ([0] * 40, 1 << 16),  # many empty entries: the central directory past the limit too
    ],
)
def test_zip_size_matches_with_zip64_records(
    local_store: ObjectStore, monkeypatch: pytest.MonkeyPatch, sizes: list[int], count_limit: int
) -> None:
    """Every ZIP64 case of the stream, reached cheaply by lowering zipfile's limits (the size
    function reads the same module attributes as ``zipfile`` itself)."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", count_limit)
    url = local_store.bundle_url("job-zip64")
    files = {"zarr.json": b"{}", **{f"a/c/{i}": os.urandom(n) for i, n in enumerate(sizes)}}
    _write_files(Path(url), files)

    size, data = _size_and_bytes(local_store, url, piece_bytes=256)

    assert size == len(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        assert {info.filename: zf.read(info) for info in zf.infolist()} == files


def test_missing_zarr_json_raises_at_call_time(local_store: ObjectStore) -> None:
    url = local_store.bundle_url("job-empty")
    with pytest.raises(BundleNotReady, match=r"zarr\.json is missing"):
        iter_bundle_zip(local_store, url)  # no next(): checked eagerly
    _write_files(Path(url), {"c/0": b"x"})
    with pytest.raises(BundleNotReady):
        iter_bundle_zip(local_store, url)


def test_write_bundle_zip_matches_stream_and_opens_with_xarray(
    local_store: ObjectStore, tmp_path: Path
) -> None:
    url = local_store.bundle_url("job-w")
    data = write_small_bundle(url)
    dest = tmp_path / "out" / "job-w.zarr.zip"

    written = write_bundle_zip(local_store, url, dest)

    assert written == dest
    assert dest.read_bytes() == b"".join(iter_bundle_zip(local_store, url))
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary file left
    store = zarr.storage.ZipStore(dest, mode="r")
    try:
        ds = xr.open_zarr(store, zarr_format=3, consolidated=False)
        np.testing.assert_array_equal(ds["attention"].values, data["attention"])
    finally:
        store.close()


def test_write_bundle_zip_leaves_nothing_when_not_ready(local_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(BundleNotReady):
        write_bundle_zip(local_store, local_store.bundle_url("nothing"), tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_zip_of_s3_bundle_matches_local(s3_server: S3Server, s3_store_url: str, tmp_path: Path) -> None:
    s3 = ObjectStore(s3_store_url, storage_options=s3_server.storage_options())
    s3_url = s3.bundle_url("job-s3")
    data = write_small_bundle(s3_url, storage_options=s3_server.storage_options())
    local = ObjectStore(str(tmp_path / "local"))
    local_url = local.bundle_url("job-s3")
    write_small_bundle(local_url)

    from_s3 = b"".join(iter_bundle_zip(s3, s3_url, piece_bytes=4096))

    assert from_s3 == b"".join(iter_bundle_zip(local, local_url))  # same bytes whatever the backend
    dest = tmp_path / "s3.zip"
    dest.write_bytes(from_s3)
    zstore = zarr.storage.ZipStore(dest, mode="r")
    try:
        ds = xr.open_zarr(zstore, zarr_format=3, consolidated=False)
        np.testing.assert_array_equal(ds["attention"].values, data["attention"])
    finally:
        zstore.close()
