"""Chunk checksums: ``<algorithm>:<hex>`` of a chunk's stored (encoded) bytes, kept in the SQL index.

Two algorithms, chosen per worker (``QKVAULT_CHUNK_CHECKSUM``):

- ``crc32c`` (default): CRC-32C, the integrity check object stores use themselves (Google Cloud
  Storage's, one of S3's); hardware-accelerated (SSE 4.2 / ARMv8 CRC), ~6 GB/s on one core. Every
  reader has it: ``google-crc32c`` is a dependency of zarr. Detects any error burst up to 32 bits
  and other corruption with probability 1 - 2^-32.
- ``sha256``: cryptographic, for content addressing; 0.4-1.3 GB/s on one core (with or without the
  SHA extensions), which made it a third of the chunk writer's CPU time (docs/benchmarks.md).

A record carries its algorithm, so :func:`matches` verifies records of either kind: a job whose
earlier attempt recorded sha256 resumes on a worker that writes crc32c.
"""

from __future__ import annotations

import hashlib
from typing import Literal, get_args

import google_crc32c

ChecksumAlgorithm = Literal["crc32c", "sha256"]
ALGORITHMS: tuple[str, ...] = get_args(ChecksumAlgorithm)
DEFAULT_CHECKSUM: ChecksumAlgorithm = "crc32c"


def checksum(data: bytes, algorithm: ChecksumAlgorithm = DEFAULT_CHECKSUM) -> str:
    """``"crc32c:<8 hex digits>"`` or ``"sha256:<64 hex digits>"`` of ``data``."""
    if algorithm == "crc32c":
        return f"crc32c:{google_crc32c.value(data):08x}"
    if algorithm == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")


def algorithm_of(recorded: str) -> ChecksumAlgorithm | None:
    """The algorithm named by a recorded checksum (None for an unknown one)."""
    name = recorded.partition(":")[0]
    for algorithm in get_args(ChecksumAlgorithm):
        if name == algorithm:
            return algorithm
    return None


def matches(data: bytes, recorded: str) -> bool:
    """Whether ``data`` has the checksum ``recorded`` (computed with the algorithm it names)."""
    algorithm = algorithm_of(recorded)
    return algorithm is not None and checksum(data, algorithm) == recorded
