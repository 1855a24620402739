"""Device-to-host staging: the pinned buffer pool reuses, bounds and hands back buffers; on CUDA
the asynchronous copy delivers the tensor's values once ``ready()`` returns."""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.bundle import sharedarena
from storage.bundle.records import ChunkRecord
from worker.capture.hostcopy import HostStager, PinnedRing, device_ints, to_device

MIB = 1 << 20


def _plain(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def test_ring_hands_out_disjoint_spans_and_reuses_released_space() -> None:
    ring = PinnedRing(4 * MIB, allocate=_plain)
    a = ring.acquire(1 * MIB)
    b = ring.acquire(2 * MIB)
    assert a is not None and b is not None
    (buf_a, span_a), (buf_b, span_b) = a, b
    assert span_a.end <= span_b.start and buf_a.numel() == MIB
    buf_a.fill_(1)
    buf_b.fill_(2)
    assert int(buf_a.sum()) == MIB  # no overlap
    ring.release(span_a)
    ring.release(span_b)
    c = ring.acquire(4 * MIB)
    assert c is not None and c[1].start == 0 and ring.in_use_bytes == 4 * MIB


def test_ring_blocks_when_full_until_the_oldest_span_is_released() -> None:
    ring = PinnedRing(4 * MIB, allocate=_plain)
    first, second = ring.acquire(2 * MIB), ring.acquire(2 * MIB)
    assert first is not None and second is not None
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire(2 * MIB)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got, "a third span would overwrite data still queued"
    ring.release(second[1])  # the newest: the tail cannot pass the oldest, still in use
    waiter.join(0.3)
    assert waiter.is_alive()
    ring.release(first[1])
    waiter.join(5)
    assert got and got[0] is not None and ring.waits >= 1
    assert ring.wait_s >= 0.5  # the two 0.3 s waits above, counted


def test_ring_wraps_around_behind_the_oldest_span() -> None:
    ring = PinnedRing(4 * MIB, allocate=_plain)
    spans = [ring.acquire(MIB) for _ in range(3)]  # [0,1) [1,2) [2,3) MiB
    ring.release(spans[0][1])  # type: ignore[index]
    end = ring.acquire(MIB)  # [3,4)
    wrapped = ring.acquire(MIB)  # nothing left at the end: wraps to [0,1), freed above
    assert end is not None and end[1].start == 3 * MIB
    assert wrapped is not None and wrapped[1].start == 0
    in_use = sorted((s[1].start, s[1].end) for s in [*spans[1:], end, wrapped] if s is not None)
    assert all(e0 <= s1 for (_, e0), (s1, _) in itertools.pairwise(in_use)), "no overlap"


def test_a_request_larger_than_the_ring_is_refused() -> None:
    ring = PinnedRing(1 * MIB, allocate=_plain)
    assert ring.acquire(3 * MIB) is None


def test_cpu_tensors_are_handed_over_without_a_copy() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    block = HostStager(torch.device("cpu")).to_host(tensor)
    assert block.ready is None and block.release is None
    assert np.shares_memory(block.array, tensor.numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_is_asynchronous_into_a_reused_pinned_buffer() -> None:
    stager = HostStager(torch.device("cuda"), max_pinned_bytes=64 * MIB)
    expected = []
    blocks = []
    for i in range(6):
        tensor = torch.full((8, 256, 512), float(i), dtype=torch.float16, device="cuda")  # 2 MiB
        blocks.append(stager.to_host(tensor))
        expected.append(float(i))
        del tensor  # the allocator may reuse it: record_stream keeps the copy safe
    for block, value in zip(blocks, expected, strict=True):
        assert block.ready is not None and block.release is not None
        block.ready()
        assert (block.array == value).all()
        block.release()
    assert stager.ring is not None and stager.ring.in_use_bytes == 0
    small = stager.to_host(torch.ones(4, device="cuda"))  # below the threshold: copied at once
    assert small.ready is None and small.array.tolist() == [1, 1, 1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not sharedarena.available(), reason="shared arenas need Linux")
def test_cuda_copies_land_in_shared_page_locked_memory_the_encoder_processes_read(tmp_path: Path) -> None:
    """The ring is a shared arena registered with CUDA: a block copied into it is page-locked
    (the copy is asynchronous), lies in the arena, and a chunk pipeline's encoder processes store
    exactly its values."""
    import zarr
    from zarr.codecs import BloscCodec

    from storage.bundle.chunkstore import ChunkStore
    from storage.bundle.pipeline import ChunkEncoder, ChunkPipeline

    stager = HostStager(torch.device("cuda"), max_pinned_bytes=32 * MIB)
    tensor = torch.randn(4, 128, 64, device="cuda").to(torch.float16)
    block = stager.to_host(tensor)
    assert stager.ring is not None and stager.ring._arena is not None and stager.ring._arena.is_pinned()
    assert block.ready is not None and block.release is not None
    assert sharedarena.locate(block.array) is not None
    records: list[ChunkRecord] = []
    store = ChunkStore(str(tmp_path / "b.zarr"), on_stored=records.append)
    group = zarr.open_group(store.zarr(), mode="w", zarr_format=3)
    blosc = [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")]
    array = group.create_array(
        "q", shape=(4, 128, 64), chunks=(1, 128, 64), dtype="float16", fill_value=0, compressors=blosc
    )
    pipeline = ChunkPipeline(store.put, threads=2, sink=store, processes=True)
    regions: list[tuple[tuple[int, ...], Callable[[], np.ndarray]]] = [
        ((h, 0, 0), functools.partial(block.array.__getitem__, h)) for h in range(4)
    ]
    pipeline.submit(
        ChunkEncoder.for_array(array),
        regions,
        nbytes=block.array.nbytes,
        ready=block.ready,
        release=block.release,
    )
    pipeline.wait()
    assert sorted(r.key for r in records) == [f"q/c/{h}/0/0" for h in range(4)]
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "b.zarr" / "q"), mode="r")[:], tensor.cpu().numpy()
    )
    assert stager.ring.in_use_bytes == 0


def test_small_host_data_goes_to_the_host_device_as_it_is() -> None:
    values = torch.tensor([3, 1, 2])
    assert to_device(values, torch.device("cpu")) is values
    assert device_ints([[1, 2], [3, 4]], torch.device("cpu")).tolist() == [[1, 2], [3, 4]]
    assert device_ints([1, 2], torch.device("cpu")).dtype == torch.long


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_small_host_data_reaches_cuda_without_waiting_for_the_queue() -> None:
    """Behind a long kernel, the copy is queued (page-locked source): nothing waits for the stream
    (PyTorch's sync debug mode raises on a wait), and the values arrive in order after it."""
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            busy = busy @ busy / 64.0  # keeps the stream busy for a while
        indices = device_ints(list(range(1000)), device)
        kept = to_device(torch.arange(1000) % 3 == 0, device)
        total = busy.sum()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert indices.device.type == "cuda" and indices.tolist() == list(range(1000))
    assert int(kept.sum()) == 334 and torch.isfinite(total)


def test_waits_for_a_transfer_are_counted_where_rows_are_copied() -> None:
    """A partial row block copies its rows, waiting for their transfer: counted in the block's
    HostWaits (the job result's ``copy_wait``), passed on by the row buffer with the rest."""
    import time

    from worker.capture.hostcopy import HostBlock, HostWaits
    from worker.capture.rows import RowBlockBuffer

    waits = HostWaits()
    released: list[bool] = []
    data = np.arange(2 * 6 * 3, dtype=np.float16).reshape(2, 6, 3)
    block = HostBlock(data, lambda: time.sleep(0.05), lambda: released.append(True), waits)
    buffer = RowBlockBuffer(2, 4, np.dtype(np.float16), width=3)
    done = buffer.add(0, block)  # one whole block passed through, two rows copied (a wait)
    assert [b for b, _ in done] == [0] and waits.copies == 1 and waits.seconds >= 0.04
    release = done[0][1].release
    assert release is not None
    release()  # the writer, once it stored the block
    assert released == [True]
    flushed = buffer.flush()
    assert flushed is not None and np.array_equal(flushed[1].array, data[:, 4:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_thread_waiting_for_a_copy_sleeps_instead_of_spinning() -> None:
    """An encoder thread waits for its block's copy (``ready()``) without spinning a core: with the
    copy queued behind ≈ 0.5 s of GPU work, the waiting thread's CPU time stays a small part of its
    wait (a plain CUDA event's waiter spins the whole time)."""
    stager = HostStager(torch.device("cuda"), max_pinned_bytes=64 * MIB)
    tensor = torch.ones((8, 256, 512), dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ≈ 0.5 s of device work; the copy queued after it
    block = stager.to_host(tensor)
    assert block.ready is not None and block.release is not None
    waited: dict[str, float] = {}

    def wait() -> None:
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        block.ready()  # type: ignore[misc]
        waited.update(cpu=time.thread_time() - cpu0, wall=time.perf_counter() - wall0)

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(30)
    assert waited["wall"] > 0.1, "the copy did not wait for the queued work"
    assert waited["cpu"] < 0.25 * waited["wall"], waited
    assert (block.array == 1).all()
    block.release()
