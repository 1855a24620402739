"""A host load in processes of their own, for :mod:`bench.interference`: Blosc compressing fp16
chunks as the chunk writer's encoders do, but holding no GIL the forward thread could wait for.

numpy, numcodecs and zarr only (no torch): a spawned process imports this module, not the
benchmark's.
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

import numpy as np
from zarr.codecs import BloscCodec

from storage.bundle.format import COMPRESSIONS, DEFAULT_COMPRESSION
from storage.bundle.pipeline import blosc_encoder

CHUNK_SHAPE = (20, 512, 128)  # fp16, 2.5 MiB: an 8B model's q chunk of 512 rows is 32 x 512 x 128
READY_TIMEOUT_S = 120.0


def bundle_codec() -> BloscCodec:
    """The codec of a bundle's row-block arrays by default (:data:`DEFAULT_COMPRESSION`, level 1)."""
    blosc = COMPRESSIONS[DEFAULT_COMPRESSION]
    assert blosc is not None, "the default codec compresses"
    cname, shuffle = blosc
    return BloscCodec(cname=cname, clevel=1, shuffle=shuffle, typesize=2)


def chunk_data(shape: tuple[int, ...] = CHUNK_SHAPE, seed: int = 0) -> np.ndarray:
    """fp16 values shaped and spread like post-RoPE q or k rows (a codec sees realistic input)."""
    return (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(np.float16)


def compress_until(stop: Event, ready: Synchronized[int], done: Synchronized[int]) -> None:
    """A process's loop: count itself ready, then compress one chunk after another until ``stop``,
    adding the input bytes of each to ``done``."""
    data = chunk_data()
    codec = blosc_encoder(bundle_codec())
    with ready.get_lock():
        ready.value += 1
    while not stop.is_set():
        codec.encode(data)
        with done.get_lock():
            done.value += data.nbytes


class BloscProcesses:
    """``processes`` spawned processes running :func:`compress_until`; :meth:`start` returns once
    every one compresses, :meth:`stop` returns their input GB/s since then."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        context = multiprocessing.get_context("spawn")  # the parent may hold a CUDA context
        self._stop = context.Event()
        self._ready: Synchronized[int] = context.Value("q", 0)
        self._done: Synchronized[int] = context.Value("q", 0)
        args = (self._stop, self._ready, self._done)
        self._workers = [
            context.Process(target=compress_until, args=args, name=f"load-proc-{i}", daemon=True)
            for i in range(processes)
        ]
        self._started = 0.0
        self._done_at_start = 0

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self._ready.value < self.processes:
            if time.monotonic() > deadline or any(w.exitcode is not None for w in self._workers):
                self.stop()
                raise RuntimeError(f"{self.processes} load processes did not all start")
            time.sleep(0.01)
        self._started = time.perf_counter()
        self._done_at_start = self._done.value

    def stop(self) -> float:
        self._stop.set()
        for worker in self._workers:
            if worker.pid is not None:
                worker.join(30)
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        seconds = max(time.perf_counter() - self._started, 1e-9)
        return (self._done.value - self._done_at_start) / seconds / 1e9
