"""Host memory that chunk encoder processes read without a copy (numpy only; Linux).

A :class:`SharedArena` is an anonymous shared-memory file (``memfd_create``) mapped into this
process. The worker's page-locked ring of device-to-host copies lives in one
(worker/capture/hostcopy.py registers its pages with CUDA), so a row block copied from the GPU is
already where an encoder process (storage/bundle/encodeprocs.py) can read it: the chunk pipeline
hands over an :class:`ArenaSlice` (where the chunk's region lies) instead of its bytes.

An encoder process opens the same file through ``/proc/<pid>/fd/<fd>`` of the process that made it
(:func:`open_slice`): nothing is named in ``/dev/shm``, so a killed worker leaves nothing behind.
Arenas register themselves while open, so :func:`locate` finds the arena of any numpy view.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
from dataclasses import dataclass

import numpy as np

__all__ = ["ArenaRef", "ArenaSlice", "SharedArena", "any_open", "available", "locate", "open_slice"]


@dataclass(frozen=True)
class ArenaRef:
    """How another process opens an arena: ``/proc/<pid>/fd/<fd>``, ``nbytes`` long; ``token``
    tells a reopened descriptor number from the arena that had it before."""

    pid: int
    fd: int
    nbytes: int
    token: str


@dataclass(frozen=True)
class ArenaSlice:
    """A numpy view's place in an arena: ``offset`` bytes from its start, ``shape``, ``strides``
    (bytes) and ``dtype`` (a numpy dtype string, byte order included)."""

    arena: ArenaRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str


def available() -> bool:
    """Whether this system can make arenas another process opens (Linux: ``memfd_create`` and
    ``/proc/<pid>/fd``)."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


class SharedArena:
    """``nbytes`` of shared memory, mapped read-write here; :attr:`array` is all of it as bytes.

    Raises OSError where shared memory cannot be made (:func:`available` false, or the system's
    limits); callers fall back to private memory.
    """

    def __init__(self, nbytes: int) -> None:
        if not available():
            raise OSError("shared arenas need Linux (memfd_create and /proc/<pid>/fd)")
        self.nbytes = nbytes
        self._fd = os.memfd_create("qkvault-arena", 0)  # inherited by no one: opened by path
        try:
            os.ftruncate(self._fd, nbytes)
            self._map = mmap.mmap(self._fd, nbytes)
        except BaseException:
            os.close(self._fd)
            raise
        self.ref = ArenaRef(os.getpid(), self._fd, nbytes, uuid.uuid4().hex)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.address = int(self.array.ctypes.data)
        with _OPEN_LOCK:
            _OPEN.append(self)

    def slice_of(self, view: np.ndarray) -> ArenaSlice | None:
        """Where ``view`` lies in this arena, or None when any of its bytes lie outside it."""
        if view.size == 0:
            return None
        start = int(view.__array_interface__["data"][0])
        low = start + sum(s * (n - 1) for s, n in zip(view.strides, view.shape, strict=True) if s < 0)
        high = start + sum(s * (n - 1) for s, n in zip(view.strides, view.shape, strict=True) if s > 0)
        if low < self.address or high + view.itemsize > self.address + self.nbytes:
            return None
        return ArenaSlice(self.ref, start - self.address, view.shape, view.strides, view.dtype.str)

    def close(self) -> None:
        """Forget the arena (views of it keep the mapping alive until they go)."""
        with _OPEN_LOCK:
            if self in _OPEN:
                _OPEN.remove(self)
        os.close(self._fd)


_OPEN: list[SharedArena] = []
_OPEN_LOCK = threading.Lock()


def any_open() -> bool:
    """Whether this process has an open arena (else :func:`locate` finds nothing)."""
    with _OPEN_LOCK:
        return bool(_OPEN)


def locate(view: np.ndarray) -> ArenaSlice | None:
    """Where ``view`` lies in one of this process's open arenas (None: private memory)."""
    with _OPEN_LOCK:
        arenas = list(_OPEN)
    for arena in arenas:
        found = arena.slice_of(view)
        if found is not None:
            return found
    return None


_MAPPED: dict[str, mmap.mmap] = {}


def open_slice(place: ArenaSlice) -> np.ndarray:
    """``place`` as a read-only numpy view, in a process other than the arena's (an encoder): the
    arena is mapped on first use and kept for the next slices."""
    ref = place.arena
    mapped = _MAPPED.get(ref.token)
    if mapped is None:
        fd = os.open(f"/proc/{ref.pid}/fd/{ref.fd}", os.O_RDONLY)
        try:
            mapped = mmap.mmap(fd, ref.nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        _MAPPED[ref.token] = mapped
    return np.ndarray(place.shape, np.dtype(place.dtype), mapped, place.offset, place.strides)
