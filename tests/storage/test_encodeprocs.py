"""Chunk encoder processes (storage/bundle/encodeprocs.py, encodeworker.py, sharedarena.py).

Chunks whose data lie in a shared arena (a CUDA worker's device-to-host ring) are encoded,
checksummed and written by processes of their own: the bytes on disk and the chunk records must be
exactly those the encoder threads produce; a chunk a resumed attempt recorded is still checked in
the writing process; a killed encoder process fails the write (nothing recorded for its chunks)
and the next write gets a new one; a full disk is the same StoreNotWritable as a thread's write.
Real processes, real files (a tmpfs this module mounts for the full disk).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from storage.bundle.checksum import checksum
from storage.bundle.chunkstore import ChunkStore
from storage.bundle.encodeprocs import EncoderProcesses, encoder_processes
from storage.bundle.encodeworker import ChunkJob, EncodeTask, TaskResult
from storage.bundle.pipeline import ChunkEncoder, ChunkPipeline
from storage.bundle.records import ChunkRecord
from storage.bundle.resume import ResumeSet
from storage.bundle.sharedarena import ArenaSlice, SharedArena, available, locate
from storage.errors import EncoderProcessDied, StoreNotWritable
from tests.faults import Tmpfs

pytestmark = pytest.mark.skipif(not available(), reason="shared arenas need Linux (memfd_create, /proc)")

HEADS, ROWS, DIM, CHUNK_ROWS = 3, 100, 32, 64  # the last row chunk is an edge chunk (36 of 64 rows)


@pytest.fixture(scope="module")
def arena() -> Iterator[SharedArena]:
    made = SharedArena(4 << 20)
    yield made
    made.close()


class CountingStore(ChunkStore):
    """A ChunkStore that tells the keys written through ``put`` (this process) from the keys
    another process wrote (``stored_elsewhere``)."""

    def __init__(self, url: str, **options: object) -> None:
        self.records: list[ChunkRecord] = []
        self.put_keys: list[str] = []
        self.elsewhere: list[str] = []
        self._lock = threading.Lock()
        super().__init__(url, on_stored=self._record_it, **options)  # type: ignore[arg-type]

    def _record_it(self, record: ChunkRecord) -> None:
        with self._lock:
            self.records.append(record)

    def put(self, key: str, data: bytes, digest: str | None = None) -> None:
        with self._lock:
            self.put_keys.append(key)
        super().put(key, data, digest)

    def stored_elsewhere(self, key: str, nbytes: int, digest: str) -> None:
        with self._lock:
            self.elsewhere.append(key)
        super().stored_elsewhere(key, nbytes, digest)


class NotLocal(CountingStore):
    """As an S3 bundle: no directory another process writes into (the bytes come back)."""

    def local_root(self) -> str | None:
        return None


def _array(store: ChunkStore, compression: str) -> ChunkEncoder:
    group = zarr.open_group(store.zarr(), mode="w", zarr_format=3)
    compressors = (
        []
        if compression == "none"
        else [BloscCodec(cname=cast(Any, compression), clevel=1, shuffle="bitshuffle")]
    )
    array = group.create_array(
        "q",
        shape=(HEADS, 128, DIM),
        chunks=(1, CHUNK_ROWS, DIM),
        dtype="float16",
        fill_value=0,
        compressors=compressors,
    )
    return ChunkEncoder.for_array(array)


def _q(arena: SharedArena, store: ChunkStore, compression: str = "lz4") -> tuple[np.ndarray, ChunkEncoder]:
    """A q block in the arena (:func:`_block`) and the encoder of its array in ``store``."""
    return _block(arena), _array(store, compression)


def _block(arena: SharedArena) -> np.ndarray:
    """[rows, heads, dim] in the arena, as a layer's q comes off the device (the chunks are
    strided views of it)."""
    data = arena.array[: ROWS * HEADS * DIM * 2].view(np.float16).reshape(ROWS, HEADS, DIM)
    data[:] = np.random.default_rng(3).standard_normal(data.shape).astype(np.float16)
    return data


def _write(store: ChunkStore, encoder: ChunkEncoder, data: np.ndarray) -> None:
    """``data``'s chunks through a pipeline with encoder processes (which take the chunks whose
    data lie in an arena)."""
    pipeline = ChunkPipeline(store.put, threads=2, sink=store, processes=True)
    regions: list[tuple[tuple[int, ...], Callable[[], np.ndarray]]] = [
        ((h, r // CHUNK_ROWS, 0), _rows(data, h, r)) for h in range(HEADS) for r in range(0, ROWS, CHUNK_ROWS)
    ]
    pipeline.submit(encoder, regions, nbytes=data.nbytes)
    pipeline.wait()


def _rows(data: np.ndarray, head: int, row: int) -> Callable[[], np.ndarray]:
    """Chunk (``head``, rows from ``row``) of ``data`` ([rows, heads, dim]): a strided view."""
    return lambda: data[row : row + CHUNK_ROWS, head]


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("c/*/*/*")) if p.is_file()
    }


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_processes_store_the_bytes_and_records_the_threads_store(
    arena: SharedArena, tmp_path: Path, compression: str
) -> None:
    data = _block(arena)
    assert locate(data[:, 1]) is not None and locate(data.copy()) is None
    by_threads = CountingStore(str(tmp_path / "threads.zarr"))
    _write(by_threads, _array(by_threads, compression), data.copy())
    by_processes = CountingStore(str(tmp_path / "processes.zarr"))
    _write(by_processes, _array(by_processes, compression), data)

    assert by_threads.elsewhere == [] and len(by_threads.put_keys) >= HEADS * 2  # private memory: threads
    assert sorted(by_processes.elsewhere) == sorted(f"q/c/{h}/{r}/0" for h in range(HEADS) for r in range(2))
    assert not [k for k in by_processes.put_keys if "/c/" in k]  # no chunk went through this process
    threads_files, processes_files = _files(tmp_path / "threads.zarr"), _files(tmp_path / "processes.zarr")
    assert len(processes_files) == HEADS * 2 and processes_files == threads_files
    assert sorted(by_processes.records, key=str) == sorted(by_threads.records, key=str)
    assert not list((tmp_path / "processes.zarr").rglob("*.partial"))
    read = zarr.open_array(str(tmp_path / "processes.zarr" / "q"), mode="r")
    np.testing.assert_array_equal(read[:, :ROWS], data.transpose(1, 0, 2))
    assert not np.asarray(read[:, ROWS:]).any()  # the edge chunk's padding is the fill value


def test_where_the_bundle_is_not_local_the_bytes_come_back_to_be_stored_here(
    arena: SharedArena, tmp_path: Path
) -> None:
    store = NotLocal(str(tmp_path / "remote.zarr"))
    data, encoder = _q(arena, store)
    _write(store, encoder, data)
    chunk_keys = sorted(k for k in store.put_keys if "/c/" in k)
    assert store.elsewhere == [] and len(chunk_keys) == HEADS * 2
    for record in store.records:
        stored = (tmp_path / "remote.zarr" / record.key).read_bytes()
        assert record.checksum == checksum(stored) and record.nbytes == len(stored)


def test_a_chunk_an_earlier_attempt_recorded_is_checked_where_it_is_written(
    arena: SharedArena, tmp_path: Path
) -> None:
    """Resuming: the recorded chunk goes through ``put`` (its resume check: here unchanged, so
    skipped); the others are written by the encoder processes."""
    data = _block(arena)
    url = str(tmp_path / "resumed.zarr")
    first = CountingStore(url)
    encoder = _array(first, "lz4")
    _write(first, encoder, data)
    recorded = next(r for r in first.records if r.key == "q/c/1/0/0")
    resume = ResumeSet.from_records([recorded])
    second = CountingStore(url, resume=resume)
    _write(second, encoder, data)
    assert [k for k in second.put_keys if "/c/" in k] == ["q/c/1/0/0"]
    assert "q/c/1/0/0" not in second.elsewhere and len(second.elsewhere) == HEADS * 2 - 1
    assert (resume.stats.skipped, resume.stats.rewritten, resume.stats.changed) == (1, 0, 0)


def _stopped_children(pool: EncoderProcesses) -> list[int]:
    pool.start()
    pids = pool.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def test_a_killed_encoder_process_fails_its_tasks_and_the_next_task_gets_a_new_one(
    arena: SharedArena, tmp_path: Path
) -> None:
    store = CountingStore(str(tmp_path / "killed.zarr"))
    data, encoder = _q(arena, store)
    pool = EncoderProcesses(1)
    try:
        [pid] = _stopped_children(pool)  # it holds the task for sure: stopped before it reads it
        answers: list[TaskResult | BaseException] = []
        place = locate(data[0:64, 0])
        assert place is not None
        task = EncodeTask(pool.task_id(), None, "crc32c", [ChunkJob("q/c/0/0/0", encoder.spec, place)])
        pool.submit(task, answers.append)
        os.kill(pid, signal.SIGKILL)
        _until(lambda: bool(answers))
        assert isinstance(answers[0], EncoderProcessDied)
        assert f"(pid {pid})" in str(answers[0]) and "exit status -9" in str(answers[0])
        pool.submit(EncodeTask(pool.task_id(), None, "crc32c", task.chunks), answers.append)
        _until(lambda: len(answers) == 2)
        result = answers[1]
        assert isinstance(result, TaskResult) and pool.pids() != [pid]
        [chunk] = result.chunks
        assert chunk.error is None and chunk.data is not None and chunk.digest == checksum(chunk.data)
        assert chunk.data == encoder.encode(data[0:64, 0])
    finally:
        pool.close()


def test_a_pipeline_whose_encoder_process_dies_raises_and_records_none_of_its_chunks(
    arena: SharedArena, tmp_path: Path
) -> None:
    store = CountingStore(str(tmp_path / "died.zarr"))
    data, encoder = _q(arena, store)
    pool = encoder_processes(3)  # the pool of a 3-thread pipeline
    assert pool.reads(arena.ref)  # asked before its processes stop (the probe is a task too)
    pids = _stopped_children(pool)
    try:
        pipeline = ChunkPipeline(store.put, threads=3, sink=store, processes=True)
        pipeline.submit(encoder, [((0, 0, 0), lambda: data[0:64, 0])], nbytes=data.nbytes)
        _until(lambda: pool.held_chunks() == 1)  # sent to a stopped process
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(EncoderProcessDied, match="their chunks were not stored"):
            pipeline.wait()
        assert store.records == [] and not list((tmp_path / "died.zarr").rglob("c/*/*/*"))
    finally:
        for pid in pids:
            _kill(pid)
    pipeline = ChunkPipeline(store.put, threads=3, sink=store, processes=True)  # new processes
    pipeline.submit(encoder, [((0, 0, 0), lambda: data[0:64, 0])], nbytes=data.nbytes)
    pipeline.wait()
    assert [r.key for r in store.records] == ["q/c/0/0/0"] and store.elsewhere == ["q/c/0/0/0"]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tmpfs]:
    with Tmpfs.mounted_or_skip(tmp_path_factory, 4 << 20) as disk:
        yield disk


def test_a_full_disk_under_an_encoder_process_is_store_not_writable(
    arena: SharedArena, mounted: Tmpfs
) -> None:
    url = str(mounted.path / "full.zarr")
    store = CountingStore(url)
    data, encoder = _q(arena, store, "none")  # incompressible: every chunk needs its 4 KiB
    mounted.fill(leave_bytes=0)
    try:
        with pytest.raises(StoreNotWritable) as raised:
            _write(store, encoder, data)
        assert raised.value.detail["errno"] == "ENOSPC" and raised.value.detail["operation"].startswith(
            "write q/c/"
        )
        assert store.records == [] and not list(Path(url).rglob("*.partial"))
    finally:
        mounted.free()


def test_an_arena_slice_is_where_the_view_lies(arena: SharedArena) -> None:
    whole = arena.array[:4096].view(np.float32).reshape(32, 32)
    assert locate(whole) is not None and locate(np.zeros(4)) is None
    for view in (whole[3:9, ::2], whole[::-1, 5], whole.T, whole[7]):
        place = arena.slice_of(view)
        assert place is not None
        rebuilt = np.ndarray(place.shape, np.dtype(place.dtype), arena.array, place.offset, place.strides)
        np.testing.assert_array_equal(rebuilt, view)
    tail = arena.array[-8:]
    outside = np.lib.stride_tricks.as_strided(tail, shape=(16,), strides=(1,))  # runs past the end
    assert arena.slice_of(outside) is None


def test_another_process_reads_an_arena_slice(arena: SharedArena) -> None:
    import pickle

    values = arena.array[8192 : 8192 + 64].view(np.int32)
    values[:] = np.arange(16, dtype=np.int32) * 7
    place = locate(values[::3])
    assert place is not None
    script = (
        "import pickle, sys; from storage.bundle.sharedarena import open_slice; "
        "print(open_slice(pickle.loads(sys.stdin.buffer.read())).tolist())"
    )
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", script], input=pickle.dumps(place), capture_output=True, check=True, cwd=root
    )
    assert out.stdout.decode().strip() == str((np.arange(16) * 7)[::3].tolist())


def test_an_encoder_process_writes_into_an_array_directory_removed_since_its_last_write(
    arena: SharedArena, tmp_path: Path
) -> None:
    """An encoder process keeps a root's directories known between tasks; a bundle written anew at
    the same place (an array created again, a benchmark's warm-up bundle) removed them."""
    import shutil

    data = _block(arena)
    url = str(tmp_path / "again.zarr")
    for attempt in range(2):
        store = CountingStore(url)
        encoder = _array(store, "lz4")
        shutil.rmtree(Path(url) / "q" / "c", ignore_errors=True)
        _write(store, encoder, data)
        assert len(store.elsewhere) == HEADS * 2, attempt
        assert len(_files(Path(url))) == HEADS * 2


def test_where_the_processes_cannot_read_the_arena_the_threads_encode_with_a_warning(
    arena: SharedArena, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An arena the encoder processes cannot open (here: a descriptor the process never had, as a
    hardened /proc would refuse a real one) is asked about once; its chunks are then encoded by
    the threads, and stored and recorded as ever."""
    import dataclasses

    import storage.bundle.pipeline as pipeline_module

    data = _block(arena)
    unreadable = dataclasses.replace(arena.ref, fd=10**6, token="unreadable-" + arena.ref.token)

    def elsewhere(view: np.ndarray) -> ArenaSlice | None:
        place = locate(view)
        return None if place is None else dataclasses.replace(place, arena=unreadable)

    monkeypatch.setattr(pipeline_module, "locate", elsewhere)
    store = CountingStore(str(tmp_path / "fallback.zarr"))
    encoder = _array(store, "lz4")
    with caplog.at_level("WARNING", logger="storage.bundle.encodeprocs"):
        _write(store, encoder, data)
    assert store.elsewhere == [] and len([k for k in store.put_keys if "/c/" in k]) == HEADS * 2
    assert len(store.records) == HEADS * 2
    warnings = [
        r.getMessage() for r in caplog.records if "cannot read the shared host buffer" in r.getMessage()
    ]
    assert len(warnings) == 1 and "FileNotFoundError" in warnings[0]
    assert encoder_processes(2).reads(unreadable) is False  # remembered: not asked again


def test_an_encoder_process_loads_neither_the_bundle_readers_nor_pandas() -> None:
    """Each process holds only what encoding needs (numpy, numcodecs, zarr): storage.bundle names
    its readers lazily, so xarray and pandas stay out (≈ 50 MB resident instead of ≈ 130 MB)."""
    code = "import sys, storage.bundle.encodeworker; print(sorted({'xarray', 'pandas'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_the_bundle_readers_are_named_by_storage_bundle_when_first_used() -> None:
    import storage.bundle as bundle
    from storage.bundle.attention import Bundle
    from storage.bundle.reader import open_bundle, open_summary

    assert (bundle.Bundle, bundle.open_bundle, bundle.open_summary) == (Bundle, open_bundle, open_summary)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = bundle.nothing
