"""Name, version and chunk codecs of the bundle format (see docs/bundle-format.md); the arrays are
declared in :mod:`storage.bundle.arrays`."""

from __future__ import annotations

from typing import Literal

FORMAT_NAME = "qkvault.bundle"
FORMAT_VERSION = "1.5"
# A bulk job's bundle (2.0): a root with the sequence table (group ``sequences``) and one group per
# micro-batch (``batches/<k>``), each a bundle of format FORMAT_VERSION of its sequences (1.5: with
# their job-wide ``sequence`` indices and ``source_row``s).
BULK_FORMAT_VERSION = "2.0"
BULK_MAJOR = 2
BULK_BATCHES = "batches"
BULK_SEQUENCES = "sequences"
SUPPORTED_MAJOR = 1

SUMMARY_GROUP = "summary"

# Chunk codecs of numeric arrays, chosen per job by ``storage.compression``: name -> (Blosc
# compressor, shuffle) at level 1, or None for each chunk's bytes as they are. "lz4" (default since
# 1.3): 2.5-3x faster to encode and to decode than "zstd", 3% larger on trained attention, 5-10% on
# q/k/v, 1% smaller on near-uniform attention (docs/benchmarks.md, "Chunk codec"); bit shuffle packs
# away the zero mantissa bits of bf16 values stored as fp16 (23% smaller than unshuffled lz4 on an
# 8B model's q/k). "zstd" is the codec of formats 1.0-1.2. "none": no compressor, for readers
# without Blosc; a chunk's padding (rows past a sequence's end, attention's zeros right of the
# diagonal) is stored as it is, so it writes more and is slower (derived q/k: 2.2x the bytes).
Compression = Literal["lz4", "zstd", "none"]
COMPRESSIONS: dict[str, tuple[Literal["lz4", "zstd"], Literal["bitshuffle", "shuffle"]] | None] = {
    "lz4": ("lz4", "bitshuffle"),
    "zstd": ("zstd", "shuffle"),
    "none": None,
}
DEFAULT_COMPRESSION: Compression = "lz4"
DEFAULT_CHUNK_ROWS = 512
