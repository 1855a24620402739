"""Chunk write pipeline: encode, checksum and store whole chunks in a thread pool (numpy + zarr).

zarr's ``array[...] = block`` encodes and stores one chunk after another through its event loop
and holds the caller until the last one is stored. For row blocks, :class:`ChunkPipeline` does
the same work in ``threads`` worker threads instead, so the next layer's forward pass (and its
device-to-host copies) overlap compression and I/O of the previous one:

- the bytes are exactly zarr's: the array's own codec chain (``bytes`` little endian, then
  Blosc with the array's parameters, or nothing more for ``storage.compression: "none"``) applied
  to the chunk padded to the full chunk shape with the fill value, as zarr pads edge chunks;
  ``tests/storage/test_pipeline.py`` compares them;
- Blosc (numcodecs, contextual mode off the main thread) and the checksums release the GIL; they run
  in one pool (a thread per core), the stores in a smaller one (files written by many threads at
  once go slower, not faster). Each call takes the GIL back when its C work ends, and every thread
  that does so delays the model's forward thread, which gives the GIL up around each PyTorch
  operation (docs/benchmarks.md, "Bulk jobs / GPU", session 23);
- backpressure: :meth:`ChunkPipeline.submit` blocks while more than ``max_pending_bytes`` of
  row-block data are waiting, so memory is bounded by the budget, not by the sequence length;
- each encoded chunk goes to ``put(key, data, checksum)``: the bundle's
  :class:`~storage.bundle.chunkstore.ChunkStore`, which checks resume, stores and records it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec

from storage.bundle.checksum import DEFAULT_CHECKSUM, ChecksumAlgorithm, checksum
from storage.bundle.sharedarena import any_open, locate

if TYPE_CHECKING:
    from storage.bundle.encodeprocs import EncoderProcesses
    from storage.bundle.encodeworker import ChunkJob, TaskResult

__all__ = [
    "BlockWrite",
    "ChunkEncoder",
    "ChunkPipeline",
    "ChunkSink",
    "ChunkSpec",
    "PipelineStats",
    "blosc_encoder",
    "chain_encoder",
    "checksum",
    "encode_chunk",
]

DEFAULT_MAX_PENDING_BYTES = 1 << 30
DEFAULT_IO_THREADS = 4


def default_threads() -> int:
    """One thread per CPU core, at most 16 (Blosc level 1 saturates a disk well before that)."""
    return max(1, min(16, os.cpu_count() or 1))


@cache
def _thread_pool(pid: int, role: str, threads: int) -> ThreadPoolExecutor:
    """The ``role`` threads (``encode``, ``store``) of every pipeline: one pool of ``threads`` a
    process (``pid``: a forked child makes its own; its parent's threads do not exist there). A
    bulk job writes each micro-batch with a writer of its own; pools a pipeline would start their
    threads anew for every micro-batch, each start holding the forward thread until the new thread
    ran (≈ 1-3 ms, longer while the encoders hold the GIL). Tasks run in the order queued: a
    micro-batch's stores never wait behind the next one's."""
    return ThreadPoolExecutor(threads, thread_name_prefix=f"qkvault-{role}")


def blosc_encoder(blosc: BloscCodec) -> Blosc:
    """numcodecs' Blosc with the configuration of zarr's codec: the same bytes zarr stores."""
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc.shuffle.value]
    return Blosc.from_config(
        {
            "cname": blosc.cname.value,
            "clevel": blosc.clevel,
            "shuffle": shuffle,
            "blocksize": blosc.blocksize,
            "typesize": blosc.typesize,
        }
    )


class RawEncoder:
    """The bytes of a codec chain of ``bytes`` (little endian) alone: the array's bytes as they are."""

    def encode(self, data: np.ndarray) -> bytes:
        """``data``: C-contiguous, little endian (a chunk as :class:`ChunkEncoder` prepares it)."""
        return data.tobytes()


class ArrayEncoder(Protocol):
    """A chunk's stored bytes from its C-contiguous little-endian data: numcodecs' ``Blosc``, or
    :class:`RawEncoder`."""

    def encode(self, data: np.ndarray) -> Any: ...


def chain_encoder(codecs: Sequence[Any]) -> ArrayEncoder | None:
    """What turns a C-contiguous little-endian chunk into the bytes zarr stores for an array with
    the codec chain ``codecs``: ``bytes`` (little endian, or none for one-byte types) then Blosc,
    or ``bytes`` alone; None for any other chain."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != "little":
        return None
    if len(codecs) == 1:
        return RawEncoder()
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        return blosc_encoder(codecs[1])
    return None


@dataclass(frozen=True)
class ChunkSpec:
    """What encoding one chunk of an array takes, in a form another process receives: the
    chunk's ``shape``, its little-endian ``dtype`` (a numpy dtype string), the ``fill_value`` of
    its edges and ``blosc`` (numcodecs' Blosc configuration; None: the bytes as they are)."""

    shape: tuple[int, ...]
    dtype: str
    fill_value: Any
    blosc: dict[str, Any] | None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def encoder(self) -> ArrayEncoder:
        return RawEncoder() if self.blosc is None else Blosc.from_config(dict(self.blosc))


def encode_chunk(spec: ChunkSpec, encoder: ArrayEncoder, data: np.ndarray) -> bytes:
    """The bytes zarr stores for one chunk: ``data`` is the chunk's region, the chunk's trailing
    dimensions (leading ones of size 1 may be left out); smaller than the chunk at the array's
    edges (padded with the fill value)."""
    dtype = np.dtype(spec.dtype)
    missing = len(spec.shape) - data.ndim
    region = data.reshape((1,) * missing + data.shape) if missing > 0 else data
    if region.shape == spec.shape and region.dtype == dtype:
        full = np.ascontiguousarray(region)
    else:
        full = np.full(spec.shape, spec.fill_value, dtype=dtype)
        full[tuple(slice(0, n) for n in region.shape)] = region
    return bytes(encoder.encode(full))


class ChunkEncoder:
    """The bytes zarr would store for one chunk of ``array`` (its codec chain: ``bytes`` then Blosc,
    or ``bytes`` alone; :func:`chain_encoder`).

    ``encoder_for`` returns None for any other codec chain (``for_array`` raises).
    """

    def __init__(self, array: zarr.Array, encoder: ArrayEncoder) -> None:
        self.key_prefix = array.path
        self.metadata = array.metadata
        blosc = None
        if isinstance(encoder, Blosc):  # its configuration, less the codec's id
            blosc = {k: v for k, v in encoder.get_config().items() if k != "id"}
        self.spec = ChunkSpec(
            tuple(array.chunks), np.dtype(array.dtype).newbyteorder("<").str, array.fill_value, blosc
        )
        self.chunk_nbytes = self.spec.nbytes
        self._encoder = encoder

    @classmethod
    def for_array(cls, array: zarr.Array) -> ChunkEncoder:
        """The encoder of a streamed array (numeric, every row-block array of a bundle)."""
        encoder = cls.encoder_for(array)
        if encoder is None:
            raise ValueError(f"{array.path}: the chunk pipeline encodes only bytes (+ Blosc) codec chains")
        return encoder

    @classmethod
    def encoder_for(cls, array: zarr.Array) -> ChunkEncoder | None:
        if array.metadata.zarr_format != 3:
            return None
        encoder = chain_encoder(array.metadata.codecs)
        return None if encoder is None else cls(array, encoder)

    def key(self, coords: tuple[int, ...]) -> str:
        return f"{self.key_prefix}/{self.metadata.encode_chunk_key(coords)}"

    def encode(self, data: np.ndarray) -> bytes:
        """:func:`encode_chunk` with this array's spec and codec."""
        return encode_chunk(self.spec, self._encoder, data)


@dataclass
class PipelineStats:
    """What the writer threads did, summed over threads (seconds are thread-seconds): compare
    ``encode_s`` / ``threads`` and ``store_s`` / ``io_threads`` with the job's wall time to see
    which pool limits it. ``ready_wait_s``: time encoder threads waited for their input (e.g. the
    device-to-host copy); ``submit_wait_s``: time the submitting thread (the forward pass) waited
    for room (``max_pending_bytes``: the pools behind); ``input_bytes`` / ``stored_bytes``: chunk
    bytes before / after encoding."""

    chunks: int = 0
    input_bytes: int = 0
    stored_bytes: int = 0
    ready_wait_s: float = 0.0
    encode_s: float = 0.0
    checksum_s: float = 0.0
    store_s: float = 0.0
    submit_wait_s: float = 0.0

    def add(self, other: PipelineStats) -> None:
        """Add ``other``'s counts (e.g. the writers of a bulk job's micro-batches)."""
        for name, value in other.__dict__.items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class BlockWrite:
    """One row block for :meth:`ChunkPipeline.submit_blocks`: ``regions`` = (chunk coords,
    function returning the chunk's data) of ``encoder``'s array, evaluated in a worker thread
    after ``ready()``; ``release()`` runs once all are encoded; ``nbytes`` count as pending until
    all are stored."""

    encoder: ChunkEncoder
    regions: list[tuple[tuple[int, ...], Callable[[], np.ndarray]]]
    nbytes: int
    ready: Callable[[], None] | None = None
    release: Callable[[], None] | None = None


@dataclass
class _Block:
    """One submitted row block: its chunks share ``ready`` (e.g. a CUDA event) and ``release``
    (called once every chunk is encoded), and its ``nbytes`` count as pending until all are stored."""

    ready: Callable[[], None] | None
    release: Callable[[], None] | None
    nbytes: int
    to_encode: int
    to_store: int
    lock: threading.Lock


@dataclass(frozen=True)
class _Chunk:
    """One chunk of a submitted block, for an encoder task."""

    encoder: ChunkEncoder
    coords: tuple[int, ...]
    region: Callable[[], np.ndarray]
    block: _Block


class ChunkSink(Protocol):
    """Where chunks encoded in other processes go (:class:`storage.bundle.chunkstore.ChunkStore`):
    the directory they write a local bundle's files into, or None (the pipeline stores their
    bytes); whether a chunk must instead go through ``put`` (resuming: one an earlier attempt
    recorded is checked there); the record of a chunk written; a write's error as ``put`` raises it."""

    def local_root(self) -> str | None: ...

    def keeps(self, key: str) -> bool: ...

    def stored_elsewhere(self, key: str, nbytes: int, digest: str) -> None: ...

    def write_error(self, key: str, error: BaseException) -> BaseException: ...


class ChunkPipeline:
    """Encode + checksum chunks in ``threads`` threads and store them in ``io_threads`` threads,
    with ``max_pending_bytes`` of row-block input at most queued.

    Encoding scales with cores; writing many files at once does not (measured with
    ``python -m bench.writer_probe``: a local file system stores less with 16 writers than with 4),
    so the two are separate pools. ``put(key, data, checksum)`` stores (or, resuming, verifies) and
    records the encoded bytes: :meth:`storage.bundle.chunkstore.ChunkStore.put`. Errors of the worker
    threads are raised by the next :meth:`submit` or :meth:`wait`.

    ``processes`` (with ``sink``): chunks whose data lie in a shared arena (a CUDA worker's
    device-to-host ring) are encoded, checksummed and, for a local bundle, written by ``threads``
    encoder processes (storage/bundle/encodeprocs.py), with the same bytes; the encoder threads
    then only wait for each block's copy and hand its chunks over. Other chunks (data in private
    memory, chunks a resumed attempt recorded) are encoded by the threads as before.
    """

    def __init__(
        self,
        put: Callable[[str, bytes, str | None], Any],
        *,
        threads: int | None = None,
        io_threads: int = DEFAULT_IO_THREADS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        checksum_algorithm: ChecksumAlgorithm = DEFAULT_CHECKSUM,
        sink: ChunkSink | None = None,
        processes: bool = False,
    ) -> None:
        self.checksum_algorithm: ChecksumAlgorithm = checksum_algorithm
        self.threads = threads or default_threads()
        self.io_threads = max(1, io_threads)
        self.max_pending_bytes = max_pending_bytes
        self._put = put
        self._pool = _thread_pool(os.getpid(), "encode", self.threads)  # shared: _thread_pool
        self._io = _thread_pool(os.getpid(), "store", self.io_threads)
        self._cond = threading.Condition()
        self._pending_bytes = 0
        self._futures: set[Future[None]] = set()
        self._error: BaseException | None = None
        self.stats = PipelineStats()
        self._stats_lock = threading.Lock()
        self._sink = sink if processes else None
        self._root = None if self._sink is None else self._sink.local_root()
        self._procs: EncoderProcesses | None = None
        if self._sink is not None:
            from storage.bundle.encodeprocs import encoder_processes  # started on first use

            self._procs = encoder_processes(self.threads)

    def submit(
        self,
        encoder: ChunkEncoder,
        regions: list[tuple[tuple[int, ...], Callable[[], np.ndarray]]],
        *,
        nbytes: int,
        ready: Callable[[], None] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Queue one row block: ``regions`` = (chunk coords, function returning the chunk's data)
        evaluated in a worker thread after ``ready()``; ``release()`` runs once all are encoded."""
        self.submit_blocks([BlockWrite(encoder, regions, nbytes, ready, release)])

    def submit_blocks(self, blocks: Sequence[BlockWrite]) -> None:
        """Queue several row blocks at once (a layer call's: every sequence's q and k). Their
        room is taken once, for their bytes together, and their chunks are shared out among at
        most ``threads`` tasks, each encoding its share one chunk after another: a task per chunk
        costs the submitting thread (the forward pass) a future, a queue entry and a thread's
        wake-up per chunk. Each chunk is still encoded and stored on its own: a failed one does
        not keep the others from being stored (the first error is raised later)."""
        self._raise_error()
        chunks: list[_Chunk] = []
        nbytes = 0
        for write in blocks:
            if not write.regions:
                if write.release is not None:
                    write.release()
                continue
            n = len(write.regions)
            block = _Block(write.ready, write.release, write.nbytes, n, n, threading.Lock())
            chunks.extend(_Chunk(write.encoder, coords, region, block) for coords, region in write.regions)
            nbytes += write.nbytes
        if not chunks:
            return
        self._take_room(nbytes)
        self._raise_error()
        tasks = min(self.threads, len(chunks))
        for t in range(tasks):  # contiguous shares: a block's chunks mostly in one task
            share = chunks[t * len(chunks) // tasks : (t + 1) * len(chunks) // tasks]
            self._track(self._pool.submit(self._encode_chunks, share))

    def _take_room(self, nbytes: int) -> None:
        """Wait (the submitting thread) until ``nbytes`` more fit in ``max_pending_bytes`` (or
        nothing is pending: a submission larger than the budget goes alone), then count them."""
        with self._cond:
            if self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                t0 = time.perf_counter()
                while self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                    self._cond.wait()
                    if self._error is not None:
                        break
                with self._stats_lock:
                    self.stats.submit_wait_s += time.perf_counter() - t0
            self._pending_bytes += nbytes

    def store_objects(self, objects: Sequence[tuple[str, bytes]]) -> None:
        """Store ``(key, bytes)`` objects already encoded (new arrays' metadata documents and
        one-chunk data) in the store threads, behind the chunks queued before: they are stored by
        :meth:`wait`, and a failed one raises there or at the next :meth:`submit`."""
        self._raise_error()
        for key, data in objects:
            self._track(self._io.submit(self._store_object, key, data))

    def _store_object(self, key: str, data: bytes) -> None:
        t0 = time.perf_counter()
        self._put(key, data, None)
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            self.stats.store_s += elapsed

    def _track(self, future: Future[None]) -> None:
        with self._cond:
            self._futures.add(future)
        future.add_done_callback(self._done)

    def _encode_chunks(self, chunks: list[_Chunk]) -> None:
        """Encode (and queue the store of) each of ``chunks``; the first error is raised after
        every other chunk was tried. With encoder processes, those whose data they can read are
        sent to one of them first (:meth:`_send_to_process`)."""
        if self._procs is not None and any_open():  # no arena: every chunk stays here
            chunks = self._send_to_process(chunks)
        error: BaseException | None = None
        for chunk in chunks:
            try:
                self._encode_chunk(chunk)
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def _encode_chunk(self, chunk: _Chunk) -> None:
        encoder, coords, region, block = chunk.encoder, chunk.coords, chunk.region, chunk.block
        stored = False
        try:
            t0 = time.perf_counter()
            if block.ready is not None:
                block.ready()
            values = region()
            t1 = time.perf_counter()
            data = encoder.encode(values)
            t2 = time.perf_counter()
            digest = checksum(data, self.checksum_algorithm)
            t3 = time.perf_counter()
            with self._stats_lock:
                stats = self.stats
                stats.chunks += 1
                stats.input_bytes += encoder.chunk_nbytes
                stats.stored_bytes += len(data)
                stats.ready_wait_s += t1 - t0
                stats.encode_s += t2 - t1
                stats.checksum_s += t3 - t2
            # submitted before this task ends, so wait() never sees an empty set in between
            self._track(self._io.submit(self._store_chunk, encoder.key(coords), data, digest, block))
            stored = True
        finally:
            self._encoded(block)
            if not stored:
                self._stored(block)

    def _encoded(self, block: _Block) -> None:
        """One of ``block``'s chunks is encoded (or failed): its data is released after the last."""
        with block.lock:
            block.to_encode -= 1
            encoded = block.to_encode == 0
        if encoded and block.release is not None:
            block.release()

    def _send_to_process(self, chunks: list[_Chunk]) -> list[_Chunk]:
        """Send the chunks of ``chunks`` whose data lie in a shared arena to an encoder process,
        as one task, once their blocks are ready; the others are returned (for this thread)."""
        from storage.bundle.encodeworker import ChunkJob, EncodeTask

        assert self._procs is not None and self._sink is not None
        jobs: list[ChunkJob] = []
        sent: list[_Chunk] = []
        rest: list[_Chunk] = []
        waited = 0.0
        for chunk in chunks:
            key = chunk.encoder.key(chunk.coords)
            try:
                t0 = time.perf_counter()
                if chunk.block.ready is not None:
                    chunk.block.ready()
                values = chunk.region()
                waited += time.perf_counter() - t0
            except BaseException:  # raised again, and handled, where this thread encodes it
                rest.append(chunk)
                continue
            place = locate(values)
            if place is None or self._sink.keeps(key) or not self._procs.reads(place.arena):
                rest.append(chunk)
                continue
            jobs.append(ChunkJob(key, chunk.encoder.spec, place))
            sent.append(chunk)
        with self._stats_lock:
            self.stats.ready_wait_s += waited
        if jobs:
            answered: Future[None] = Future()
            self._track(answered)  # before this task ends: wait() never sees an empty set between
            task = EncodeTask(self._procs.task_id(), self._root, self.checksum_algorithm, jobs)
            self._procs.submit(task, partial(self._processed, sent, answered))
        return rest

    def _processed(
        self, sent: list[_Chunk], answered: Future[None], result: TaskResult | BaseException
    ) -> None:
        """An encoder process's answer to the chunks ``sent`` (or the error that lost them): record
        each one written, queue the store of each one returned, count, release; then ``answered``
        ends with the first error."""
        sink = self._sink
        assert sink is not None
        error: BaseException | None = result if isinstance(result, BaseException) else None
        done = [] if isinstance(result, BaseException) else result.chunks
        if not isinstance(result, BaseException):
            with self._stats_lock:
                stats = self.stats
                stats.encode_s += result.encode_s
                stats.checksum_s += result.checksum_s
                stats.store_s += result.store_s
        for i, chunk in enumerate(sent):
            queued = False
            try:
                if i >= len(done):
                    continue  # lost with the process: ``error`` says so
                outcome = done[i]
                if outcome.error is not None:
                    raise sink.write_error(outcome.key, outcome.error)
                with self._stats_lock:
                    self.stats.chunks += 1
                    self.stats.input_bytes += chunk.encoder.chunk_nbytes
                    self.stats.stored_bytes += outcome.nbytes
                if outcome.data is not None:  # not a local bundle: stored by this process
                    store = self._io.submit(
                        self._store_chunk, outcome.key, outcome.data, outcome.digest, chunk.block
                    )
                    self._track(store)
                    queued = True
                else:
                    sink.stored_elsewhere(outcome.key, outcome.nbytes, outcome.digest)
            except BaseException as exc:
                error = error or exc
            finally:
                self._encoded(chunk.block)
                if not queued:
                    self._stored(chunk.block)
        if error is None:
            answered.set_result(None)
        else:
            answered.set_exception(error)

    def _store_chunk(self, key: str, data: bytes, digest: str, block: _Block) -> None:
        try:
            t0 = time.perf_counter()
            self._put(key, data, digest)
            elapsed = time.perf_counter() - t0
            with self._stats_lock:
                self.stats.store_s += elapsed
        finally:
            self._stored(block)

    def _stored(self, block: _Block) -> None:
        with block.lock:
            block.to_store -= 1
            last = block.to_store == 0
        if last:
            with self._cond:
                self._pending_bytes -= block.nbytes
                self._cond.notify_all()

    def _done(self, future: Future[None]) -> None:
        with self._cond:
            self._futures.discard(future)
            exc = future.exception()
            if exc is not None and self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _raise_error(self) -> None:
        with self._cond:
            error = self._error
        if error is not None:
            raise error

    def wait(self, *, raise_errors: bool = True) -> None:
        """Block until every queued chunk is stored (or failed)."""
        with self._cond:
            while self._futures:
                self._cond.wait()
        if raise_errors:
            self._raise_error()

    def close(self) -> None:
        """Wait for every queued chunk (errors are not raised); the threads are the process's
        (:func:`_thread_pool`) and stay."""
        self.wait(raise_errors=False)
