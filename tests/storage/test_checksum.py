"""Chunk checksums (storage/bundle/checksum.py): both algorithms against their standard check
values, records verified by the algorithm they name, and a resume across algorithms."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.bundle.checksum import algorithm_of, checksum, matches
from storage.bundle.resume import ResumeSet, local_resume_check
from storage.index.records import ChunkRecord


def test_check_values() -> None:
    # CRC-32C (Castagnoli) of "123456789" is 0xE3069283 (RFC 3720, appendix B.4)
    assert checksum(b"123456789") == "crc32c:e3069283"
    assert checksum(b"123456789", "crc32c") == checksum(b"123456789")
    assert checksum(b"abc", "sha256") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert checksum(b"") == "crc32c:00000000"
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'"):
        checksum(b"x", "md5")  # type: ignore[arg-type]


def test_records_are_verified_by_the_algorithm_they_name() -> None:
    data = b"chunk bytes"
    for algorithm in ("crc32c", "sha256"):
        recorded = checksum(data, algorithm)
        assert algorithm_of(recorded) == algorithm
        assert matches(data, recorded) and not matches(data + b"!", recorded)
    assert not matches(data, "md5:0cc175b9c0f1b6a831c399e269772661") and algorithm_of("nonsense") is None


def test_local_resume_accepts_records_of_another_algorithm(tmp_path: Path) -> None:
    """An earlier attempt recorded sha256; this worker writes crc32c: a verified chunk is skipped,
    a torn one rewritten, different bytes written (``changed``)."""
    good, torn = b"a" * 1000, b"b" * 1000
    (tmp_path / "x" / "c").mkdir(parents=True)
    (tmp_path / "x/c/0").write_bytes(good)
    (tmp_path / "x/c/1").write_bytes(torn[:-10])
    records = [
        ChunkRecord("x", (0,), "x/c/0", len(good), checksum(good, "sha256")),
        ChunkRecord("x", (1,), "x/c/1", len(torn), checksum(torn, "sha256")),
        ChunkRecord("x", (2,), "x/c/2", 3, checksum(b"old", "sha256")),
    ]
    resume = ResumeSet.from_records(records)
    should_write = local_resume_check(resume, tmp_path)
    assert should_write("x/c/0", good, checksum(good)) is False
    assert should_write("x/c/1", torn, checksum(torn)) is True
    assert should_write("x/c/2", b"new", checksum(b"new")) is True
    assert should_write("x/c/3", b"never recorded", checksum(b"never recorded")) is True
    stats = resume.stats.as_dict()
    assert (stats["chunks_skipped"], stats["chunks_rewritten"], stats["chunks_changed"]) == (1, 1, 1)
