"""Where the chunk writer's time goes, per thread count: Blosc alone, sha256 alone, and the whole
:class:`~storage.bundle.pipeline.ChunkPipeline` (encode + checksum + store) into a local store.

    python -m bench.writer_probe --threads 1,4,8,16 --mib 2048 [--store DIR] [--cname zstd]
        [--shuffle shuffle]

Data: fp16 rows shaped like attention chunks (``heads x 256 x 256``), softmax-like values with a
causal zero triangle on every 8th chunk (the diagonal), so the codec sees realistic input. Prints
GB/s of input (uncompressed) bytes for each part and thread count, then the CPU time (all threads)
a chunk of the store alone and of the whole pipeline: with small chunks (``--heads 1``) it is mostly
the Python and the system calls each chunk costs, the share of the writer threads' time that holds
the GIL beside a forward pass.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from storage.bundle.chunkstore import ChunkStore
from storage.bundle.pipeline import ChunkEncoder, ChunkPipeline


def _chunks(total_bytes: int, heads: int, rng: np.random.Generator) -> list[np.ndarray]:
    one = heads * 256 * 256 * 2
    out = []
    for i in range(max(1, total_bytes // one)):
        logits = rng.standard_normal((heads, 256, 256)).astype(np.float32) * 2
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) / 8
        if i % 8 == 0:
            probs *= np.tril(np.ones((256, 256), dtype=np.float32))
        out.append(probs.astype(np.float16))
    return out


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:7.2f} GB/s"


def _per_chunk(seconds: float, chunks: int) -> str:
    return f"{seconds / chunks * 1e6:8.0f} µs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.writer_probe", description=__doc__)
    parser.add_argument("--threads", default="1,4,16")
    parser.add_argument("--mib", type=int, default=1024, help="input MiB per measurement")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--cname", default="zstd", help="Blosc compressor (zstd, lz4, ...)")
    parser.add_argument("--shuffle", default="shuffle", choices=("shuffle", "bitshuffle", "noshuffle"))
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args(argv)
    chunks = _chunks(args.mib << 20, args.heads, np.random.default_rng(0))
    nbytes = sum(c.nbytes for c in chunks)
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    blosc = Blosc(cname=args.cname, clevel=1, shuffle=shuffle[args.shuffle], typesize=2)
    sample = chunks[:16]
    ratio = sum(c.nbytes for c in sample) / sum(len(blosc.encode(c)) for c in sample)
    codec = f"Blosc {args.cname}-1 {args.shuffle}"
    print(f"{len(chunks)} chunks, {nbytes / 1e9:.2f} GB fp16 input, {codec} ratio {ratio:.2f}")
    heads = ("blosc", "sha256", "files", "pipe, no put", "pipeline", "files CPU", "pipeline CPU")
    print(f"{'threads':>7}  " + "  ".join(f"{h:>12}" for h in heads))
    with tempfile.TemporaryDirectory(dir=args.store) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        array = group.create_array(
            "attention",
            shape=(len(chunks), args.heads, 256, 256),
            chunks=(1, args.heads, 256, 256),
            dtype="float16",
            compressors=BloscCodec(cname=args.cname, clevel=1, shuffle=args.shuffle, typesize=2),
        )
        encoder = ChunkEncoder.encoder_for(array)
        assert encoder is not None
        for threads in [int(t) for t in args.threads.split(",")]:
            with ThreadPoolExecutor(threads) as pool:
                t0 = time.perf_counter()
                encoded = list(pool.map(lambda c: bytes(blosc.encode(c)), chunks))
                blosc_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                list(pool.map(lambda e: hashlib.sha256(e).digest(), encoded))
                sha_s = time.perf_counter() - t0
                files = ChunkStore(tmp)
                keys = [f"files/{i}/0" for i in range(len(encoded))]
                t0, cpu0 = time.perf_counter(), time.process_time()
                list(pool.map(files.put, keys, encoded))
                files_s, files_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
            rates = [_rate(nbytes, blosc_s), _rate(nbytes, sha_s), _rate(nbytes, files_s)]
            for put in (lambda key, data, digest: None, ChunkStore(tmp).put):
                pipeline = ChunkPipeline(put, threads=threads)
                t0, cpu0 = time.perf_counter(), time.process_time()
                for i, chunk in enumerate(chunks):
                    region: Callable[[], np.ndarray] = partial(np.asarray, chunk)
                    pipeline.submit(encoder, [((i, 0, 0, 0), region)], nbytes=chunk.nbytes)
                pipeline.wait()
                rates.append(_rate(nbytes, time.perf_counter() - t0))
                pipeline_cpu_s = time.process_time() - cpu0
                pipeline.close()
            rates += [_per_chunk(files_cpu_s, len(chunks)), _per_chunk(pipeline_cpu_s, len(chunks))]
            print(f"{threads:>7}  " + "  ".join(rates))


if __name__ == "__main__":
    main()
