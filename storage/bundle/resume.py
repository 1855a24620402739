"""Resume a bundle by chunk: a retried job skips chunks an earlier attempt already stored.

An attempt that died (killed, out of memory, lost its store) leaves chunks in the object store and
their records (key, size, checksum of the stored bytes: storage/bundle/checksum.py) in the SQL
index. Exports are deterministic, so the next attempt recomputes the same bytes.
:class:`ResumeSet` holds the recorded chunks and counts what the resume check did; the check itself
is :meth:`storage.bundle.chunkstore.ChunkStore.put` (the one path every write of a bundle takes):

- ``skipped``: the new bytes have the recorded checksum AND the stored object still has it (read
  back and checked with the algorithm the record names): not written again;
- ``rewritten``: the recorded object is missing or its bytes do not match (torn or corrupted);
- ``changed``: the recomputed bytes differ from the record (the export was not deterministic);
  written, and recorded with the new checksum;
- a chunk that was never recorded is written as on a first attempt.

While resuming, array creation keeps recorded chunks and deletes only the other keys (metadata,
unrecorded leftovers). Metadata documents are always rewritten, as on a first attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from storage.bundle.records import ChunkRecord


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

    def count(self, outcome: str, nbytes: int = 0) -> None:
        with self._lock:
            if outcome == "skipped":
                self.stats.skipped += 1
                self.stats.skipped_bytes += nbytes
            elif outcome == "rewritten":
                self.stats.rewritten += 1
            else:
                self.stats.changed += 1
