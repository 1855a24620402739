"""Resume a bundle by chunk: a retried job skips chunks an earlier attempt already stored.

An attempt that died (killed, out of memory, lost its store) leaves chunks in the object store and
their records (key, size, checksum of the stored bytes: storage/bundle/checksum.py) in the SQL
index. Exports are deterministic, so the next attempt recomputes the same bytes.
:class:`ResumeSet` holds the recorded chunks; :meth:`ResumeSet.wrap` puts a :class:`ResumingStore`
under the bundle writer, which, for every chunk the new attempt sets:

- skips the write when the new bytes have the recorded checksum AND the stored object still has
  it (read back and checked with the algorithm the record names): ``skipped``;
- writes it when the recorded object is missing or its bytes do not match (a torn or corrupted
  object): ``rewritten``;
- writes it when the recomputed bytes differ from the record (the export was not deterministic):
  ``changed`` (the writer records the new checksum);
- writes every chunk that was never recorded, as on a first attempt.

Array creation with ``overwrite=True`` deletes an array's keys (``delete_dir``); while resuming,
recorded chunks are kept and only the other keys (metadata, unrecorded leftovers) are deleted.
Metadata documents are always rewritten, as on a first attempt (root attributes and the
consolidated metadata last).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.storage import WrapperStore

from storage.bundle.checksum import matches
from storage.index.records import ChunkRecord


@dataclass
class ResumeStats:
    """What resuming did, per chunk the new attempt set (see the module docstring)."""

    recorded: int = 0
    skipped: int = 0
    skipped_bytes: int = 0
    rewritten: int = 0
    changed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "chunks_recorded": self.recorded,
            "chunks_skipped": self.skipped,
            "bytes_skipped": self.skipped_bytes,
            "chunks_rewritten": self.rewritten,
            "chunks_changed": self.changed,
        }


@dataclass
class ResumeSet:
    """Chunks recorded by earlier attempts of one job: store key -> ``<algorithm>:<hex>``."""

    checksums: dict[str, str] = field(default_factory=dict)
    stats: ResumeStats = field(default_factory=ResumeStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_records(cls, records: Iterable[ChunkRecord]) -> ResumeSet:
        checksums = {r.key: r.checksum for r in records}
        return cls(checksums=checksums, stats=ResumeStats(recorded=len(checksums)))

    def __len__(self) -> int:
        return len(self.checksums)

    def __contains__(self, key: object) -> bool:
        return key in self.checksums

    def wrap(self, store: Store) -> ResumingStore:
        """``store`` with resume applied (put it under the recording wrapper of the writer)."""
        return ResumingStore(store, self)

    def count(self, outcome: str, nbytes: int = 0) -> None:
        with self._lock:
            if outcome == "skipped":
                self.stats.skipped += 1
                self.stats.skipped_bytes += nbytes
            elif outcome == "rewritten":
                self.stats.rewritten += 1
            else:
                self.stats.changed += 1


class ResumingStore(WrapperStore[Store]):
    """Skips setting recorded, verified chunks; never deletes recorded chunks (see module docstring)."""

    def __init__(self, store: Store, resume: ResumeSet) -> None:
        super().__init__(store)
        self.resume = resume

    def _with_store(self, store: Store) -> ResumingStore:
        return type(self)(store, self.resume)

    async def set(self, key: str, value: Buffer) -> None:
        recorded = self.resume.checksums.get(key)
        if recorded is None:
            await self._store.set(key, value)
            return
        data = value.to_bytes()
        if not matches(data, recorded):
            self.resume.count("changed")
        else:
            stored = await self._store.get(key, prototype=default_buffer_prototype())
            if stored is not None and matches(stored.to_bytes(), recorded):
                self.resume.count("skipped", len(data))
                return
            self.resume.count("rewritten")
        await self._store.set(key, value)

    async def delete(self, key: str) -> None:
        if key not in self.resume:
            await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        keys = [key async for key in self._store.list_prefix(prefix)]
        for key in keys:
            if key not in self.resume:
                await self._store.delete(key)


def local_resume_check(resume: ResumeSet, root: Path) -> Callable[[str, bytes, str], bool]:
    """For writes straight to the files under ``root`` (the chunk pipeline's local stores):
    ``should_write(key, data, checksum)`` with :class:`ResumingStore`'s rules: skip a recorded
    chunk whose new and stored bytes both have the recorded checksum (the record names its
    algorithm: an earlier attempt may have used another one)."""

    def should_write(key: str, data: bytes, digest: str) -> bool:
        recorded = resume.checksums.get(key)
        if recorded is None:
            return True
        if digest != recorded and not matches(data, recorded):
            resume.count("changed")
            return True
        try:
            stored = (root / key).read_bytes()
        except FileNotFoundError:
            resume.count("rewritten")
            return True
        if len(stored) != len(data) or not matches(stored, recorded):
            resume.count("rewritten")
            return True
        resume.count("skipped", len(stored))
        return False

    return should_write
