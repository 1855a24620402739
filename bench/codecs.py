"""Chunk codecs compared on a real bundle: every stored chunk of the row arrays (attention, q, k, v,
hidden states) decoded, then encoded and decoded again with each codec a job can choose
(``storage.compression``) and with lz4's other shuffles, one thread, same bytes for all. Prints
the compression ratio and encode/decode GB/s of uncompressed input per array and codec.

    python -m bench.codecs path/to/bundle.zarr [--arrays attention,q] [--max-chunks 400]

Make a bundle to compare with ``python -m bench ... --keep --store DIR`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc

from storage.bundle.arrays import ROW_ARRAYS
from storage.bundle.format import COMPRESSIONS

SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


@dataclass
class CodecFigures:
    input_bytes: int = 0
    stored_bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0

    def row(self) -> str:
        ratio = self.input_bytes / max(self.stored_bytes, 1)
        enc = self.input_bytes / max(self.encode_s, 1e-9) / 1e9
        dec = self.input_bytes / max(self.decode_s, 1e-9) / 1e9
        return f"ratio {ratio:5.3f}  encode {enc:5.2f} GB/s  decode {dec:5.2f} GB/s"


def stored_chunks(array: zarr.Array, root: Path, limit: int) -> list[np.ndarray]:
    """The chunks of ``array`` that exist in the store (full chunk shape, as zarr encodes them)."""
    folder = root / array.path / "c"
    out: list[np.ndarray] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file())[:limit]:
        coords = [int(c) for c in path.relative_to(folder).parts]
        region = tuple(
            slice(c * size, min((c + 1) * size, n))
            for c, size, n in zip(coords, array.chunks, array.shape, strict=True)
        )
        data = np.asarray(array[region])
        full = np.zeros(array.chunks, dtype=array.dtype)
        full[tuple(slice(0, n) for n in data.shape)] = data
        out.append(full)
    return out


def candidates() -> dict[str, tuple[str, str]]:
    """Each Blosc codec a job can choose ("none" stores the chunks as they are: ratio 1), then lz4
    with each shuffle the default does not use (unshuffled lz4 encodes fp16 q/k 2.7x faster, but
    stores bf16-sourced values 23% larger: docs/benchmarks.md, "Chunk codec")."""
    out: dict[str, tuple[str, str]] = {
        name: blosc for name, blosc in COMPRESSIONS.items() if blosc is not None
    }
    for shuffle in SHUFFLE:
        if ("lz4", shuffle) not in out.values():
            out[f"lz4 {shuffle}"] = ("lz4", shuffle)
    return out


def compare(chunks: list[np.ndarray], codecs: dict[str, tuple[str, str]]) -> dict[str, CodecFigures]:
    """Each of ``codecs`` (name -> Blosc compressor and shuffle, level 1, one thread) over the same
    chunks."""
    Blosc.use_threads = False
    figures: dict[str, CodecFigures] = {}
    for name, (cname, shuffle) in codecs.items():
        codec = Blosc(cname=cname, clevel=1, shuffle=SHUFFLE[shuffle], typesize=chunks[0].dtype.itemsize)
        fig = figures[name] = CodecFigures()
        for chunk in chunks:
            t0 = time.perf_counter()
            encoded = codec.encode(chunk)
            t1 = time.perf_counter()
            codec.decode(encoded)
            fig.decode_s += time.perf_counter() - t1
            fig.encode_s += t1 - t0
            fig.input_bytes += chunk.nbytes
            fig.stored_bytes += len(encoded)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codecs", description=__doc__)
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--arrays", default=",".join(ROW_ARRAYS), help="row arrays to compare")
    parser.add_argument("--max-chunks", type=int, default=400, help="chunks per array at most")
    args = parser.parse_args(argv)
    for bundle in args.bundles:
        group = zarr.open_group(str(bundle), mode="r")
        for name in args.arrays.split(","):
            if name not in group:
                continue
            array = group[name]
            assert isinstance(array, zarr.Array)
            chunks = stored_chunks(array, bundle, args.max_chunks)
            if not chunks:
                continue
            total = sum(c.nbytes for c in chunks)
            print(f"{bundle} {name} ({array.dtype}): {len(chunks)} chunks, {total / 1e6:.0f} MB")
            codecs = candidates()
            for codec, fig in compare(chunks, codecs).items():
                print(f"  {codec:14s} {'+'.join(codecs[codec]):15s}: {fig.row()}")


if __name__ == "__main__":
    main()
