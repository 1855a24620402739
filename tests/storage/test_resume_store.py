"""The resume check of storage.bundle.chunkstore on a real local store and a real S3-protocol server
(numpy + zarr only, no torch): what a retried attempt keeps, skips and rewrites, that array creation
does not wipe recorded chunks, and that zarr's writes and the pipeline's take the same path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from storage.bundle.checksum import checksum
from storage.bundle.chunkstore import ChunkStore
from storage.bundle.records import ChunkRecord
from storage.bundle.resume import ResumeSet
from storage.stores.objectstore import zarr_store
from tests.services import S3Server


@pytest.fixture(params=["local", "s3"])
def bundle(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(bundle URL, storage options) of an empty bundle on a local disk or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "b.zarr"), {}
    server: S3Server = request.getfixturevalue("s3_server")
    return f"{server.new_store_url()}/b.zarr", server.storage_options()


class Bundle:
    """One attempt's view of the bundle: a ChunkStore and the records it handed out."""

    def __init__(self, url: str, options: dict[str, Any], resume: ResumeSet | None = None) -> None:
        self.records: list[ChunkRecord] = []
        self.chunks = ChunkStore(url, storage_options=options, resume=resume, on_stored=self.records.append)
        self.url, self.options = url, options

    def create(self) -> zarr.Array:
        group = zarr.open_group(self.chunks.zarr(), mode="a", zarr_format=3)
        return group.create_array(
            "x",
            shape=(4, 4),
            chunks=(2, 4),
            dtype="int32",
            fill_value=0,
            overwrite=True,
            config={"write_empty_chunks": True},
        )

    def read(self, key: str) -> bytes | None:
        store = zarr_store(self.url, storage_options=self.options, read_only=True)
        found = zarr.core.sync.sync(store.get(key, zarr.core.buffer.default_buffer_prototype()))
        return None if found is None else found.to_bytes()

    def keys(self) -> list[str]:
        store = zarr_store(self.url, storage_options=self.options, read_only=True)

        async def collect() -> list[str]:
            return sorted([k async for k in store.list_prefix("x/c/")])

        return zarr.core.sync.sync(collect())


def _first_attempt(url: str, options: dict[str, Any]) -> tuple[ResumeSet, np.ndarray]:
    """Write the array, then keep the records of its two chunks (what the index holds)."""
    first = Bundle(url, options)
    data = np.arange(16, dtype=np.int32).reshape(4, 4)
    first.create()[...] = data
    assert sorted(r.key for r in first.records) == ["x/c/0/0", "x/c/1/0"]
    return ResumeSet.from_records(first.records), data


def test_array_creation_deletes_chunks_unless_resuming(bundle: tuple[str, dict[str, Any]]) -> None:
    url, options = bundle
    resume, _ = _first_attempt(url, options)
    leftover = Bundle(url, options)
    leftover.chunks.put("x/c/9/0", b"unrecorded leftover")
    Bundle(url, options, resume).create()  # overwrite=True while resuming
    assert leftover.keys() == ["x/c/0/0", "x/c/1/0"]  # recorded chunks kept, the leftover deleted
    Bundle(url, options).create()  # not resuming: zarr's overwrite deletes every chunk
    assert leftover.keys() == []


def test_resumed_writes_skip_verified_and_rewrite_damaged_chunks(bundle: tuple[str, dict[str, Any]]) -> None:
    url, options = bundle
    resume, data = _first_attempt(url, options)
    probe = Bundle(url, options)
    before = {k: probe.read(k) for k in ("x/c/0/0", "x/c/1/0")}
    assert before["x/c/1/0"] is not None
    probe.chunks.put("x/c/1/0", before["x/c/1/0"][:-3])  # a torn object
    second = Bundle(url, options, resume)
    second.create()[...] = data
    stats = resume.stats.as_dict()
    assert (stats["chunks_skipped"], stats["chunks_rewritten"], stats["chunks_changed"]) == (1, 1, 0)
    assert stats["bytes_skipped"] == len(before["x/c/0/0"] or b"")
    assert {k: probe.read(k) for k in before} == before  # repaired, byte for byte
    # every chunk set is still recorded (an upsert of the same row for skipped ones)
    assert {r.key: r.checksum for r in second.records} == {k: checksum(v or b"") for k, v in before.items()}


def test_recomputed_bytes_that_differ_are_written_and_counted(bundle: tuple[str, dict[str, Any]]) -> None:
    url, options = bundle
    resume, data = _first_attempt(url, options)
    Bundle(url, options, resume).create()[...] = data + 1  # a non-deterministic export
    assert resume.stats.changed == 2 and resume.stats.skipped == 0
    store = zarr_store(url, storage_options=options, read_only=True)
    assert np.array_equal(zarr.open_array(store, path="x")[...], data + 1)


def test_resume_accepts_records_of_another_algorithm(tmp_path: Path) -> None:
    """An earlier attempt recorded sha256; this worker writes crc32c: a verified chunk is skipped,
    a torn one rewritten, different bytes written (``changed``); all four recorded in crc32c."""
    good, torn = b"a" * 1000, b"b" * 1000
    (tmp_path / "x" / "c").mkdir(parents=True)
    (tmp_path / "x/c/0").write_bytes(good)
    (tmp_path / "x/c/1").write_bytes(torn[:-10])
    earlier = [
        ChunkRecord("x", (0,), "x/c/0", len(good), checksum(good, "sha256")),
        ChunkRecord("x", (1,), "x/c/1", len(torn), checksum(torn, "sha256")),
        ChunkRecord("x", (2,), "x/c/2", 3, checksum(b"old", "sha256")),
    ]
    resume = ResumeSet.from_records(earlier)
    records: list[ChunkRecord] = []
    chunks = ChunkStore(str(tmp_path), resume=resume, on_stored=records.append)
    for key, data in (("x/c/0", good), ("x/c/1", torn), ("x/c/2", b"new"), ("x/c/3", b"never recorded")):
        chunks.put(key, data)
    stats = resume.stats.as_dict()
    assert (stats["chunks_skipped"], stats["chunks_rewritten"], stats["chunks_changed"]) == (1, 1, 1)
    assert (tmp_path / "x/c/1").read_bytes() == torn and (tmp_path / "x/c/2").read_bytes() == b"new"
    assert [r.checksum.split(":")[0] for r in records] == ["crc32c"] * 4
