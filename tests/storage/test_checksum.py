"""Chunk checksums (storage/bundle/checksum.py): both algorithms against their standard check
values, records verified by the algorithm they name, and a resume across algorithms."""

from __future__ import annotations

import pytest

from storage.bundle.checksum import algorithm_of, checksum, matches


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
