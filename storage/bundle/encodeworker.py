"""A chunk encoder process: ``python -m storage.bundle.encodeworker`` (numpy + numcodecs + zarr).

Started by :class:`storage.bundle.encodeprocs.EncoderProcesses`; reads :class:`EncodeTask` frames
on its standard input and answers each with a :class:`TaskResult` frame on its standard output
(:func:`send_frame`: an 8-byte little-endian length, then a pickle). For every chunk of a task it
reads the chunk's region from the parent's shared arena (storage/bundle/sharedarena.py), encodes it
as zarr would (:func:`storage.bundle.pipeline.encode_chunk`), checksums it and, for a local bundle,
writes its file (:class:`storage.bundle.chunkstore.LocalFiles`: a temporary file renamed into
place); for any other store it returns the bytes for the parent to store. A chunk that fails is
answered with its error; the others of the task go on. It exits when its input closes (the parent
ended, however it ended).

Why a process: the Blosc calls and checksums release the GIL, but each takes it back when its C
work ends, and 16 threads doing so hold up the model's forward thread, which gives the GIL up
around every PyTorch operation (docs/benchmarks.md, "Bulk jobs / GPU", sessions 23-24).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from storage.bundle.checksum import ChecksumAlgorithm, checksum
from storage.bundle.chunkstore import LocalFiles
from storage.bundle.pipeline import ArrayEncoder, ChunkSpec, encode_chunk
from storage.bundle.sharedarena import ArenaSlice, open_slice

__all__ = ["ChunkJob", "ChunkResult", "EncodeTask", "TaskResult", "read_frame", "send_frame"]

_LENGTH_BYTES = 8


@dataclass(frozen=True)
class ChunkJob:
    """One chunk: its store ``key``, its array's ``spec`` and its region (``source``: where it lies
    in the parent's shared arena, or the data itself)."""

    key: str
    spec: ChunkSpec
    source: ArenaSlice | np.ndarray


@dataclass(frozen=True)
class EncodeTask:
    """Chunks to encode and checksum (``algorithm``), then write under ``root`` (a local bundle
    directory) or, with ``root`` None, return."""

    task_id: int
    root: str | None
    algorithm: ChecksumAlgorithm
    chunks: list[ChunkJob]


@dataclass(frozen=True)
class ChunkResult:
    """A chunk done: its stored size, checksum and, where the process did not store it, its
    bytes; or the ``error`` that stopped it."""

    key: str
    nbytes: int = 0
    digest: str = ""
    data: bytes | None = None
    error: BaseException | None = None


@dataclass
class TaskResult:
    """The answer to one :class:`EncodeTask`: a result a chunk, in the task's order, and the
    process's seconds spent reading, encoding, checksumming and storing."""

    task_id: int
    chunks: list[ChunkResult] = field(default_factory=list)
    encode_s: float = 0.0
    checksum_s: float = 0.0
    store_s: float = 0.0


def send_frame(stream: IO[bytes], message: Any) -> None:
    """``message`` pickled, after its length (the caller serialises writers)."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(payload).to_bytes(_LENGTH_BYTES, "little") + payload)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any | None:
    """The next message, or None at the end of the stream (also mid-frame: the writer died)."""
    header = _read_exactly(stream, _LENGTH_BYTES)
    if header is None:
        return None
    payload = _read_exactly(stream, int.from_bytes(header, "little"))
    return None if payload is None else pickle.loads(payload)


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    parts = []
    while n > 0:
        part = stream.read(n)
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


class _Encoders:
    """A process's codecs (one per configuration) and local bundle directories (one per root)."""

    def __init__(self) -> None:
        self._codecs: dict[tuple[tuple[str, Any], ...] | None, ArrayEncoder] = {}
        self._roots: dict[str, LocalFiles] = {}

    def codec(self, spec: ChunkSpec) -> ArrayEncoder:
        config = None if spec.blosc is None else tuple(sorted(spec.blosc.items()))
        codec = self._codecs.get(config)
        if codec is None:
            codec = self._codecs[config] = spec.encoder()
        return codec

    def files(self, root: str) -> LocalFiles:
        files = self._roots.get(root)
        if files is None:
            if len(self._roots) > 64:  # a bulk job's micro-batch groups: one root each
                self._roots.clear()
            files = self._roots[root] = LocalFiles(Path(root))
        return files

    def run(self, task: EncodeTask) -> TaskResult:
        result = TaskResult(task.task_id)
        for job in task.chunks:
            try:
                t0 = time.perf_counter()
                values = job.source if isinstance(job.source, np.ndarray) else open_slice(job.source)
                data = encode_chunk(job.spec, self.codec(job.spec), values)
                t1 = time.perf_counter()
                digest = checksum(data, task.algorithm)
                t2 = time.perf_counter()
                if task.root is not None:
                    self.files(task.root).write(job.key, data)
                t3 = time.perf_counter()
            except Exception as exc:  # answered, not raised: the task's other chunks go on
                error = exc if isinstance(exc, OSError) else RuntimeError(f"{type(exc).__name__}: {exc}")
                result.chunks.append(ChunkResult(job.key, error=error))
                continue
            result.encode_s += t1 - t0
            result.checksum_s += t2 - t1
            result.store_s += t3 - t2
            kept = data if task.root is None else None
            result.chunks.append(ChunkResult(job.key, len(data), digest, kept))
        return result


def main() -> int:
    """Serve tasks until the input closes. Standard output carries frames only: anything else
    printed goes to standard error."""
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False  # one core a process: the parent runs one process a core
    frames_out: IO[bytes] = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    frames_in = sys.stdin.buffer
    encoders = _Encoders()
    while True:
        task = read_frame(frames_in)
        if task is None:
            return 0
        send_frame(frames_out, encoders.run(task))


if __name__ == "__main__":
    # run under the module's own name: the classes of the frames it sends are then
    # ``storage.bundle.encodeworker``'s, which the parent unpickles (not ``__main__``'s)
    from storage.bundle.encodeworker import main as serve

    sys.exit(serve())
