"""The record of one stored chunk of a bundle, as the writer hands it to the SQL index."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChunkRecord", "parse_chunk_key"]


@dataclass(frozen=True)
class ChunkRecord:
    """One durably written chunk of a bundle."""

    array: str  # e.g. "attention", "q", "tokens"
    coords: tuple[int, ...]  # chunk grid coordinates
    key: str  # store key relative to the bundle root, e.g. "attention/c/0/1/0/2/0"
    nbytes: int  # stored (encoded) size
    checksum: str  # "crc32c:<hex>" or "sha256:<hex>" of the stored bytes (storage/bundle/checksum.py)


def parse_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """``"attention/c/0/1/0/2/0"`` → ``("attention", (0, 1, 0, 2, 0))``; metadata keys → ``None``."""
    array, sep, coords = key.partition("/c/")
    if not sep:
        return None
    try:
        return array, tuple(int(c) for c in coords.split("/"))
    except ValueError:
        return None
