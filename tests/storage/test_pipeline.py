"""The chunk write pipeline stores exactly the bytes zarr would, records every chunk once, bounds
its queue, and surfaces write errors."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec
from zarr.core.metadata import ArrayV3Metadata

from storage.bundle.format import COMPRESSIONS
from storage.bundle.layout import BundleLayout
from storage.bundle.pipeline import BlockWrite, ChunkEncoder, ChunkPipeline, checksum
from storage.bundle.records import ChunkRecord
from storage.bundle.writer import BundleWriter

ROWS = 4  # chunk rows: small, so one test covers interior, edge and partial chunks


def _layout(positions: int = 10, compression: str = "lz4") -> BundleLayout:
    return BundleLayout(
        batch=2,
        positions=positions,
        layers=(0, 3),
        heads=(0, 1, 2),
        kv_heads=(0,),
        head_dim=5,
        attention=True,
        qkv=True,
        attention_dtype="float16",
        qkv_dtype="float32",
        chunk_rows=ROWS,
        compression=compression,
        hidden_states=True,
        hidden_size=6,
        sinks=True,
    )


def _causal_block(rng: np.random.Generator, heads: int, row0: int, rows: int) -> np.ndarray:
    """Attention-like rows: row i has values in columns 0..row0+i, zero right of it."""
    width = row0 + rows
    data = rng.random((heads, rows, width)).astype(np.float16)
    for i in range(rows):
        data[:, i, row0 + i + 1 :] = 0
    return data


def _chunk_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "/c/" in str(p.relative_to(root))
    }


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_row_blocks_store_the_bytes_zarr_stores(tmp_path: Path, compression: str) -> None:
    """Every chunk file equals what zarr's own ``array[...] = data`` writes for the same data, with
    each of the chunk codecs a job can choose."""
    layout = _layout(compression=compression)
    blosc = COMPRESSIONS[compression]
    rng = np.random.default_rng(0)
    records: list[ChunkRecord] = []
    writer = BundleWriter(str(tmp_path / "ours.zarr"), on_chunk=records.append, write_threads=3)
    writer.create(layout, {})
    reference = zarr.open_group(str(tmp_path / "zarr.zarr"), mode="w", zarr_format=3)
    expected: dict[str, np.ndarray] = {}
    handles: dict[str, zarr.Array] = {}  # reopening by name would drop write_empty_chunks
    for name in ("attention", "attention_sink", "q", "k", "v", "hidden_states"):
        expected[name] = np.zeros(layout.shape(name), dtype=layout.dtype(name))
        handles[name] = reference.create_array(
            name,
            shape=layout.shape(name),
            chunks=layout.chunks(name),
            dtype=layout.dtype(name),
            fill_value=0,
            dimension_names=layout.dims(name),
            compressors=None
            if blosc is None
            else BloscCodec(
                cname=blosc[0], clevel=1, shuffle=blosc[1], typesize=np.dtype(layout.dtype(name)).itemsize
            ),
            config={"write_empty_chunks": True},
        )
    for lp in range(2):
        for b in range(2):
            for block in range(3):  # rows 0-3, 4-7, 8-9 (the last block is short: 10 positions)
                row0 = block * ROWS
                rows = min(ROWS, layout.positions - row0)
                att = _causal_block(rng, 3, row0, rows)
                writer.write_row_block("attention", lp, b, block, att)
                expected["attention"][lp, b, :, row0 : row0 + rows, : att.shape[2]] = att
                sink = rng.random((3, rows, 1)).astype(np.float32)
                writer.write_row_block("attention_sink", lp, b, block, sink)
                expected["attention_sink"][lp, b, :, row0 : row0 + rows] = sink[:, :, 0]
                for name, heads in (("q", 3), ("k", 1), ("v", 1)):
                    data = rng.standard_normal((heads, rows, 5)).astype(np.float32)
                    writer.write_row_block(name, lp, b, block, data)
                    expected[name][lp, b, :, row0 : row0 + rows] = data
                hidden = rng.standard_normal((1, rows, 6)).astype(np.float32)
                writer.write_row_block("hidden_states", lp, b, block, hidden)
                expected["hidden_states"][lp, b, row0 : row0 + rows] = hidden[0]
    writer.finalize({})
    for name, data in expected.items():
        handles[name][...] = data
    ours = {k: v for k, v in _chunk_files(tmp_path / "ours.zarr").items() if k.split("/")[0] in handles}
    theirs = _chunk_files(tmp_path / "zarr.zarr")
    # our writer never writes attention chunks right of the diagonal; zarr writes them (all zero)
    skipped = set(theirs) - set(ours)
    assert all(k.startswith("attention/") for k in skipped) and skipped
    for key in skipped:
        coords = [int(c) for c in key.split("/c/")[1].split("/")]
        assert coords[4] > coords[3], f"{key} is on or left of the diagonal but was not written"
    assert {k: theirs[k] for k in ours} == ours
    # one record per stored chunk, with the checksum of the stored bytes
    by_key = {r.key: r for r in records if r.array in handles}
    assert len(by_key) == len([r for r in records if r.array in handles])
    for key, stored in ours.items():
        assert by_key[key].checksum == checksum(stored) and by_key[key].nbytes == len(stored)
    for name, data in expected.items():
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr" / name))[...], data)
    # every array carries the job's codec in its metadata; the pipeline's account matches the files
    for name in handles:
        metadata = zarr.open_array(str(tmp_path / "ours.zarr" / name)).metadata
        assert isinstance(metadata, ArrayV3Metadata)
        if blosc is None:  # the bytes as they are: a chunk is its elements, nothing more
            assert len(metadata.codecs) == 1
            size = int(np.prod(layout.chunks(name))) * np.dtype(layout.dtype(name)).itemsize
            assert all(len(v) == size for k, v in ours.items() if k.startswith(f"{name}/"))
            continue
        codec = metadata.codecs[1]
        assert isinstance(codec, BloscCodec)
        assert (codec.cname.value, codec.shuffle.value, codec.clevel) == (*blosc, 1)
    stats = writer.pipeline_stats
    assert stats.chunks == len(ours) and stats.stored_bytes == sum(len(v) for v in ours.values())
    chunk_nbytes = {name: int(np.prod(h.chunks)) * h.dtype.itemsize for name, h in handles.items()}
    assert stats.input_bytes == sum(chunk_nbytes[k.split("/")[0]] for k in ours)
    assert stats.encode_s > 0 and stats.store_s > 0 and stats.checksum_s > 0


def test_encoder_pads_edge_chunks_with_the_fill_value(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    array = group.create_array(
        "x",
        shape=(5, 7),
        chunks=(4, 4),
        dtype="float32",
        fill_value=-1.0,
        compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4),
    )
    encoder = ChunkEncoder.encoder_for(array)
    assert encoder is not None
    edge = np.arange(3, dtype=np.float32).reshape(1, 3)  # chunk (1, 1): rows 4, cols 4..6
    (tmp_path / "g.zarr" / "x" / "c" / "1").mkdir(parents=True)
    (tmp_path / "g.zarr" / "x" / "c" / "1" / "1").write_bytes(encoder.encode(edge))
    assert encoder.key((1, 1)) == "x/c/1/1"
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "g.zarr" / "x"))[4, 4:], [0, 1, 2])


def test_encoder_only_for_bytes_then_blosc_or_bytes_alone(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    zstd = group.create_array(
        "z", shape=(4,), chunks=(4,), dtype="int32", compressors=zarr.codecs.ZstdCodec()
    )
    assert ChunkEncoder.encoder_for(zstd) is None
    big = zarr.codecs.BytesCodec(endian="big")
    raw = group.create_array("b", shape=(5,), chunks=(4,), dtype="int32", serializer=big, compressors=None)
    assert ChunkEncoder.encoder_for(raw) is None  # big endian: not the bytes zarr would store
    raw = group.create_array("r", shape=(5,), chunks=(4,), dtype="int32", fill_value=7, compressors=None)
    encoder = ChunkEncoder.encoder_for(raw)
    assert encoder is not None
    assert encoder.encode(np.arange(1, dtype=np.int32)) == np.array([0, 7, 7, 7], "<i4").tobytes()


class _SlowStore:
    """A ``put`` that blocks until released, counting how many bytes were queued meanwhile."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.stored: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, digest: str | None) -> None:
        self.gate.wait(10)
        self.stored[key] = data


def _encoder(tmp_path: Path) -> ChunkEncoder:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    array = group.create_array(
        "a",
        shape=(64, 1024),
        chunks=(1, 1024),
        dtype="float32",
        compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4),
    )
    encoder = ChunkEncoder.encoder_for(array)
    assert encoder is not None
    return encoder


def test_submit_blocks_when_the_byte_budget_is_queued(tmp_path: Path) -> None:
    encoder = _encoder(tmp_path)
    store = _SlowStore()
    block = np.ones((1, 1024), dtype=np.float32)  # 4 KiB
    pipeline = ChunkPipeline(store.put, threads=2, max_pending_bytes=3 * block.nbytes)
    released: list[int] = []
    submitted: list[int] = []

    def producer() -> None:
        for i in range(6):
            pipeline.submit(
                encoder,
                [((i, 0), lambda: block)],
                nbytes=block.nbytes,
                release=functools.partial(released.append, i),
            )
            submitted.append(i)

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and len(submitted) == 3, "the fourth block must wait for the budget"
    store.gate.set()
    thread.join(10)
    pipeline.wait()
    assert sorted(released) == list(range(6))
    assert len(store.stored) == 6
    assert pipeline.stats.submit_wait_s >= 0.4  # the producer's wait behind the gated store, counted
    pipeline.close()


def test_write_errors_surface_and_unwritten_chunks_are_not_recorded(tmp_path: Path) -> None:
    encoder = _encoder(tmp_path)
    stored: list[str] = []
    submitted = threading.Event()

    def put(key: str, data: bytes, digest: str | None) -> None:
        if key.endswith("/3/0"):
            submitted.wait(10)  # not before every block is queued (submit raises a known error)
            raise OSError("disk full")
        stored.append(key)

    pipeline = ChunkPipeline(put, threads=2)
    block = np.zeros((1, 1024), dtype=np.float32)
    for i in range(6):
        pipeline.submit(encoder, [((i, 0), lambda: block)], nbytes=block.nbytes)
    submitted.set()
    with pytest.raises(OSError, match="disk full"):
        pipeline.wait()
    assert sorted(int(k.split("/")[2]) for k in stored) == [0, 1, 2, 4, 5]
    with pytest.raises(OSError, match="disk full"):
        pipeline.submit(encoder, [((9, 0), lambda: block)], nbytes=block.nbytes)
    pipeline.close()


def test_blocks_submitted_together_share_a_few_tasks_and_fail_alone(tmp_path: Path) -> None:
    """A layer call's blocks: one room taken, their chunks encoded by at most ``threads`` tasks,
    each chunk still on its own (one that cannot be read fails alone; the others are stored and
    every block released)."""
    encoder = _encoder(tmp_path)
    stored: dict[str, bytes] = {}
    pipeline = ChunkPipeline(lambda key, data, digest: stored.__setitem__(key, data), threads=3)
    encoders: list[str] = []
    released: list[int] = []

    def region(i: int) -> np.ndarray:
        encoders.append(threading.current_thread().name)
        if i == 4:
            raise ValueError("chunk 4 cannot be read")
        return np.full((1, 1024), i, dtype=np.float32)

    writes = [
        BlockWrite(
            encoder,
            [
                ((2 * i, 0), functools.partial(region, 2 * i)),
                ((2 * i + 1, 0), functools.partial(region, 2 * i + 1)),
            ],
            8 * 1024,
            release=functools.partial(released.append, i),
        )
        for i in range(5)
    ]
    submitted = []
    encode_chunks = pipeline._encode_chunks

    def task(chunks: list[Any]) -> None:
        submitted.append(len(chunks))
        encode_chunks(chunks)

    pipeline._encode_chunks = task  # type: ignore[method-assign]
    pipeline.submit_blocks(writes)
    with pytest.raises(ValueError, match="chunk 4"):
        pipeline.wait()
    assert sorted(submitted) == [3, 3, 4] and len(encoders) == 10  # 10 chunks in 3 tasks, all tried
    assert sorted(released) == list(range(5))
    assert sorted(stored) == sorted(f"a/c/{i}/0" for i in range(10) if i != 4)
    assert stored["a/c/7/0"] == encoder.encode(np.full((1, 1024), 7, dtype=np.float32))
    assert pipeline._pending_bytes == 0
    pipeline.close()


def test_ready_runs_before_the_data_is_read(tmp_path: Path) -> None:
    encoder = _encoder(tmp_path)
    stored: dict[str, bytes] = {}
    pipeline = ChunkPipeline(lambda key, data, digest: stored.__setitem__(key, data), threads=2)
    buffer = np.zeros((1, 1024), dtype=np.float32)
    done = threading.Event()

    def ready() -> None:  # like a device-to-host copy completing
        buffer[...] = 7
        done.set()

    pipeline.submit(encoder, [((0, 0), lambda: buffer)], nbytes=buffer.nbytes, ready=ready)
    pipeline.wait()
    assert done.is_set()
    assert stored["a/c/0/0"] == encoder.encode(np.full((1, 1024), 7, dtype=np.float32))
    pipeline.close()


def test_writer_records_each_chunk_once_after_it_is_stored(tmp_path: Path) -> None:
    """``on_chunk`` gets one record per stored chunk (pipeline and zarr writes alike), with the
    checksum of the bytes on disk, from the storing thread, never before the file exists."""
    seen: list[tuple[ChunkRecord, bool, str]] = []
    root = tmp_path / "b.zarr"

    def on_chunk(record: ChunkRecord) -> None:
        seen.append((record, (root / record.key).is_file(), threading.current_thread().name))

    writer = BundleWriter(str(root), on_chunk=on_chunk)
    writer.create(_layout(), {})
    for block in range(3):
        for lp in range(2):
            writer.write_row_block("q", lp, 0, block, np.ones((3, 2, 5), dtype=np.float32))
    writer.finalize({})
    q = [(r, on_disk, thread) for r, on_disk, thread in seen if r.array == "q"]
    assert sorted(r.coords for r, _, _ in q) == sorted((lp, 0, 0, b, 0) for lp in range(2) for b in range(3))
    assert all(on_disk and thread.startswith("qkvault-store") for _, on_disk, thread in q)
    assert {r.array for r, _, _ in seen} >= {"q", "layer", "head", "kv_head"}  # zarr's writes too
    assert all(checksum((root / r.key).read_bytes()) == r.checksum for r, _, _ in seen)
    assert len({r.key for r, _, _ in seen}) == len(seen)
