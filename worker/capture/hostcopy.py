"""Device-to-host copies that do not stall the forward pass.

On CUDA a block is copied into a reusable pinned host buffer on a side stream
(``non_blocking``); the caller gets the numpy view at once, plus ``ready`` (waits for the copy's
event) and ``release`` (gives the buffer back) for the writer thread that encodes it.
The buffers are spans of one page-locked ring per process (``max_pinned_bytes``, allocated once,
in shared memory where it can be: the chunk writer's encoder processes read the copies there):
when the ring is full of blocks queued for writing, the next copy waits — backpressure from
storage to the GPU, with host memory bounded by the ring, not by the sequence length. Small
blocks (decode steps) are copied synchronously. On the CPU the tensor's own memory is handed over
(no copy at all).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from storage.bundle import sharedarena

DEFAULT_MAX_PINNED_BYTES = 1 << 30
# decode steps' blocks (one row: a few KiB) are copied synchronously, not worth a pinned span; a
# prefill's blocks, however short the sequence, asynchronously (a synchronous copy waits for the
# whole device queue: one per short sequence and layer held a bulk job's forward thread)
SYNC_COPY_BELOW_BYTES = 64 << 10
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


@dataclass
class HostWaits:
    """A process's device-to-host copies that the capturing thread waited for, on one device: a
    small block copied synchronously (which waits for the device's queue) and a block's transfer
    awaited where its rows are copied into a partial row block."""

    copies: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, seconds: float) -> None:
        with self._lock:
            self.copies += 1
            self.seconds += seconds


@dataclass
class HostBlock:
    """``array``: host data, valid once ``ready()`` returned; ``release()`` when done with it;
    ``waits``: where a wait for ``ready()`` in :meth:`materialize` is counted."""

    array: np.ndarray
    ready: Callable[[], None] | None = None
    release: Callable[[], None] | None = None
    waits: HostWaits | None = None

    def materialize(self) -> np.ndarray:
        """A plain numpy copy (waits for the transfer, gives the pinned buffer back)."""
        if self.ready is None and self.release is None:
            return self.array
        if self.ready is not None:
            t0 = time.perf_counter()
            self.ready()
            if self.waits is not None:
                self.waits.add(time.perf_counter() - t0)
        out = np.array(self.array, copy=True)
        if self.release is not None:
            self.release()
        return out


def sleeping_event() -> torch.cuda.Event:
    """A CUDA event whose ``synchronize()`` puts the waiting thread to sleep until the event
    completes (``cudaEventBlockingSync``). A plain event's waiter spins its core at full load (CUDA's
    default scheduling, with fewer contexts than cores), and the writer's encoder threads (each
    waiting for its block's copy) and a bulk job's drain thread (waiting for a micro-batch's passes)
    wait on events for many thread-seconds of a job: cores the forward thread needs."""
    return torch.cuda.Event(blocking=True)


def shared_release(release: Callable[[], None] | None, users: int) -> Callable[[], None] | None:
    """``release`` called once, after ``users`` calls of the returned function."""
    if release is None:
        return None
    left = [users]
    lock = threading.Lock()

    def release_one() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            release()

    return release_one


def shared_views(host: HostBlock, views: Sequence[np.ndarray]) -> list[HostBlock]:
    """``views`` of ``host.array`` as blocks of their own, each valid once ``host`` is and each to
    be released once: ``host``'s buffer goes back after the last of them (one transfer, many
    owners: a layer call's rows copied at once, handed over sequence by sequence)."""
    release = shared_release(host.release, len(views))
    return [HostBlock(view, host.ready, release, host.waits) for view in views]


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Small host data (indices, masks, positions) on ``device``, queued behind the work already
    there instead of waiting for it: on CUDA through page-locked memory (a copy from pageable
    memory waits for the stream, so one per layer call holds the forward thread behind the GPU
    and its host work is no longer overlapped; the allocator keeps the page-locked block until
    the copy ran). Data already off the host, or going to it: a plain ``to``."""
    if host.device.type != "cpu" or device.type == "cpu":
        return host.to(device)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def device_ints(values: Sequence[Any], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` (integers, or equal-length lists of them) as a ``dtype`` tensor on ``device``
    without waiting for the device (:func:`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def read_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host, once the work queued on this thread's current stream made it. A
    plain ``.cpu()`` from CUDA copies into pageable memory, which also waits for the work queued on
    the device's other streams (a drain would wait for the next micro-batch's kernels:
    worker/capture/sidestream.py); here, a copy into page-locked memory and an event."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = sleeping_event()
    copied.record(torch.cuda.current_stream(tensor.device))
    copied.synchronize()
    return host


def _pinned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory: shared memory registered with CUDA where the
    system makes it (storage/bundle/sharedarena.py: the writer's encoder processes read the
    copies there without a copy of their own), else CUDA's own page-locked allocation."""
    if sharedarena.available():
        try:
            arena = sharedarena.SharedArena(nbytes)
        except OSError:
            arena = None
        if arena is not None:
            tensor = torch.frombuffer(arena.array, dtype=torch.uint8)
            if (
                int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, _HOST_REGISTER_PORTABLE))
                == 0
            ):
                return tensor  # the arena stays open (registered) for the process's life
            arena.close()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


@dataclass
class _Span:
    start: int
    end: int
    done: bool = False


class PinnedRing:
    """One page-locked host arena of ``nbytes``, handed out as a ring of contiguous spans.

    Allocated once (on first use) and reused by every job of the process: page-locking memory is
    slow, reusing it is free. Spans are taken at the head and given back in any order; the tail
    advances over the oldest spans once they are released, so a span is reused only after every
    older one was stored. :meth:`acquire` waits while the ring is full (backpressure) and returns
    None for a request larger than the whole ring (the caller copies synchronously instead).
    ``allocate(nbytes)``: page-locked by default; tests pass a plain allocator.
    """

    ALIGN = 4096

    def __init__(self, nbytes: int, allocate: Callable[[int], torch.Tensor] = _pinned) -> None:
        self.nbytes = nbytes
        self._allocate = allocate
        self._arena: torch.Tensor | None = None
        self._spans: deque[_Span] = deque()
        self._head = 0
        self._cond = threading.Condition()
        self.in_use_bytes = 0
        self.waits = 0
        self.wait_s = 0.0  # the copying thread's time waiting for room (the writer behind)

    def _take(self, size: int) -> int | None:
        """Start of a free span of ``size`` bytes, or None while the ring is too full."""
        if not self._spans:
            return 0
        tail = self._spans[0].start  # the oldest span still in use
        if self._head > tail:  # free: [head, end) and, wrapping around, [0, tail)
            if self.nbytes - self._head >= size:
                return self._head
            return 0 if tail >= size else None
        if self._head < tail and tail - self._head >= size:  # free: [head, tail)
            return self._head
        return None  # head == tail: full

    def allocate_now(self) -> None:
        """Page-lock the arena now (a worker does it when it loads a model, not in a job)."""
        with self._cond:
            if self._arena is None:
                self._arena = self._allocate(self.nbytes)

    def acquire(self, nbytes: int) -> tuple[torch.Tensor, _Span] | None:
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        if size > self.nbytes:
            return None
        with self._cond:
            if self._arena is None:
                self._arena = self._allocate(self.nbytes)
            start = self._take(size)
            if start is None:
                t0 = time.perf_counter()
                while start is None:
                    self.waits += 1
                    self._cond.wait()
                    start = self._take(size)
                self.wait_s += time.perf_counter() - t0
            span = _Span(start, start + size)
            self._spans.append(span)
            self._head = span.end
            self.in_use_bytes += size
            return self._arena[start : start + nbytes], span

    def release(self, span: _Span) -> None:
        with self._cond:
            span.done = True
            self.in_use_bytes -= span.end - span.start
            while self._spans and self._spans[0].done:
                self._spans.popleft()
            if not self._spans:
                self._head = 0
            self._cond.notify_all()


_RINGS: dict[tuple[str, int], PinnedRing] = {}
_RINGS_LOCK = threading.Lock()


def pinned_ring(device: torch.device, nbytes: int = DEFAULT_MAX_PINNED_BYTES) -> PinnedRing:
    """The process's ring for ``device`` (created on first use, allocated on first acquire)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), nbytes)
    with _RINGS_LOCK:
        ring = _RINGS.get(key)
        if ring is None:
            ring = _RINGS[key] = PinnedRing(nbytes)
        return ring


_WAITS: dict[str, HostWaits] = {}


def host_waits(device: torch.device) -> HostWaits:
    """The process's :class:`HostWaits` of copies from ``device`` (created on first use)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _RINGS_LOCK:
        return _WAITS.setdefault(str(device), HostWaits())


def pinned_wait_s(device: torch.device) -> float:
    """Seconds copies to ``device``'s host ring waited for room so far (0 off CUDA): the forward
    pass held back by the writer behind it."""
    if device.type != "cuda":
        return 0.0
    return pinned_ring(device).wait_s


class HostStager:
    """Copies blocks to the host for the writer: async into pinned buffers on CUDA, free on CPU."""

    def __init__(self, device: torch.device, max_pinned_bytes: int = DEFAULT_MAX_PINNED_BYTES) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.ring = pinned_ring(device, max_pinned_bytes) if self.cuda else None
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self.waits = host_waits(device) if self.cuda else None

    def to_host(self, tensor: torch.Tensor) -> HostBlock:
        """``tensor`` (any device) as host data; do not modify ``tensor`` afterwards."""
        if tensor.device.type == "cpu":
            return HostBlock(tensor.contiguous().numpy())
        nbytes = tensor.numel() * tensor.element_size()
        taken = None
        if self.ring is not None and self._stream is not None and nbytes >= SYNC_COPY_BELOW_BYTES:
            taken = self.ring.acquire(nbytes)
        if taken is None:  # waits for the device's queue
            t0 = time.perf_counter()
            array = tensor.cpu().numpy()
            if self.waits is not None:
                self.waits.add(time.perf_counter() - t0)
            return HostBlock(array)
        assert self.ring is not None and self._stream is not None
        tensor = tensor.contiguous()
        buffer, span = taken
        host = buffer.view(tensor.dtype).view(tensor.shape)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
            done = sleeping_event()  # waited for by an encoder thread
            done.record(self._stream)
        tensor.record_stream(self._stream)  # the allocator must not reuse it before the copy ends
        ring = self.ring
        return HostBlock(host.numpy(), done.synchronize, lambda: ring.release(span), self.waits)
