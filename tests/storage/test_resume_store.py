"""storage.bundle.resume on a real local store (numpy + zarr only, no torch): what a retried
attempt keeps, skips and rewrites, and that array creation does not wipe recorded chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from storage.bundle.checksum import checksum
from storage.bundle.resume import ResumeSet
from storage.bundle.writer import RecordingStore
from storage.objectstore import zarr_store


def _create(store: object) -> zarr.Array:
    group = zarr.open_group(store, mode="a", zarr_format=3)
    return group.create_array(
        "x",
        shape=(4, 4),
        chunks=(2, 4),
        dtype="int32",
        fill_value=0,
        overwrite=True,
        config={"write_empty_chunks": True},
    )


def _first_attempt(path: Path) -> tuple[ResumeSet, np.ndarray]:
    """Write the array, then keep the records of its two chunks (what the index holds)."""
    recording = RecordingStore(zarr_store(str(path)))
    data = np.arange(16, dtype=np.int32).reshape(4, 4)
    _create(recording)[...] = data
    records = recording.drain()
    assert sorted(r.key for r in records) == ["x/c/0/0", "x/c/1/0"]
    return ResumeSet.from_records(records), data


def test_array_creation_deletes_chunks_unless_resuming(tmp_path: Path) -> None:
    resume, _ = _first_attempt(tmp_path / "a")
    (tmp_path / "a" / "x" / "c" / "9").mkdir(parents=True)
    (tmp_path / "a" / "x" / "c" / "9" / "0").write_bytes(b"unrecorded leftover")
    _create(resume.wrap(zarr_store(str(tmp_path / "a"))))  # overwrite=True while resuming
    kept = sorted(
        str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a" / "x" / "c").rglob("*") if p.is_file()
    )
    assert kept == ["x/c/0/0", "x/c/1/0"]  # recorded chunks kept, the leftover deleted
    _create(zarr_store(str(tmp_path / "a")))  # not resuming: zarr's overwrite deletes every chunk
    assert not (tmp_path / "a" / "x" / "c").exists()


def test_resumed_writes_skip_verified_and_rewrite_damaged_chunks(tmp_path: Path) -> None:
    path = tmp_path / "b"
    resume, data = _first_attempt(path)
    before = {k: (path / k).read_bytes() for k in ("x/c/0/0", "x/c/1/0")}
    (path / "x/c/1/0").write_bytes(before["x/c/1/0"][:-3])  # torn object
    recording = RecordingStore(resume.wrap(zarr_store(str(path))))
    _create(recording)[...] = data
    stats = resume.stats.as_dict()
    assert (stats["chunks_skipped"], stats["chunks_rewritten"], stats["chunks_changed"]) == (1, 1, 0)
    assert stats["bytes_skipped"] == len(before["x/c/0/0"])
    assert {k: (path / k).read_bytes() for k in before} == before  # repaired, byte for byte
    # every chunk set is still recorded (an upsert of the same row for skipped ones)
    records = {r.key: r.checksum for r in recording.drain()}
    assert records == {k: checksum(v) for k, v in before.items()}


def test_recomputed_bytes_that_differ_are_written_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "c"
    resume, data = _first_attempt(path)
    _create(resume.wrap(zarr_store(str(path))))[...] = data + 1  # a non-deterministic export
    assert resume.stats.changed == 2 and resume.stats.skipped == 0
    assert np.array_equal(zarr.open_array(zarr_store(str(path)), path="x")[...], data + 1)
