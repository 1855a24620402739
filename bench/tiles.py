"""``python -m bench.tiles``: the tile pyramid of one long attention matrix, timed (docs/benchmarks.md,
"Tiles").

Writes a bundle of one ``--tokens``-token sequence (one layer, ``--heads`` heads of random causal
attention rows normalised per row, float16, through the real ``BundleWriter``), then times, for
head 0: the pyramid info and the coarsest (overview) tile before the pyramid exists (that request
builds it), the same overview once built (a fresh reader: nothing cached in the process), and
``--samples`` random tiles of every level and both pools. Prints a table and a JSON line.

    python -m bench.tiles                              # 32,768 tokens in a temporary directory
    python -m bench.tiles --tokens 4096 --dir /data    # smaller, kept in /data
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.synthetic import SyntheticBundle, write_bundle
from storage.bundle.matrix import AttentionMatrix
from storage.bundle.pooling import POOLS, tiles_per_side
from storage.bundle.slices import BundleView
from storage.bundle.tiles import TilePyramid, tiles_url


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def _pyramid(url: str, seq: int = 0) -> TilePyramid:
    """What one API request does: open the bundle, find the matrix, open its pyramid."""
    view = BundleView(url)
    return TilePyramid(AttentionMatrix(view, 0, 0, seq), tiles_url(url, 0, 0, seq))


def run(tokens: int, heads: int, samples: int, root: Path, seed: int = 0) -> dict[str, Any]:
    url = str(root / "jobs" / "bench-tiles.zarr")
    write_s, _ = _timed(
        lambda: write_bundle(url, SyntheticBundle(lengths=[tokens], heads=tuple(range(heads))))
    )
    stored = sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())
    open_s, pyramid = _timed(lambda: _pyramid(url))
    info_s, info = _timed(pyramid.info)
    top = info.levels - 1
    first_s, _ = _timed(lambda: pyramid.tile(top, 0, 0, "max"))  # builds levels >= 1
    cold_s, _ = _timed(lambda: _pyramid(url).tile(top, 0, 0, "max"))  # a fresh reader, pyramid built

    def overview() -> None:  # what a viewer does first: a fresh request for the info, then the top tile
        fresh = _pyramid(url)
        fresh.info()
        fresh.tile(top, 0, 0, "max")

    overview_s, _ = _timed(overview)
    rng = random.Random(seed)
    per_level: dict[int, list[float]] = {}
    for level in range(info.levels):
        side = tiles_per_side(info.level_sizes[level])
        for _ in range(samples):
            row, col = rng.randrange(side), rng.randrange(side)
            pool = rng.choice(POOLS)
            started = time.perf_counter()
            _pyramid(url).tile(level, row, col, pool)  # a fresh reader: what one API request does
            spent = time.perf_counter() - started
            per_level.setdefault(level, []).append(spent)
    cache = Path(f"{url}.tiles")
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return {
        "tokens": tokens,
        "heads": heads,
        "levels": info.levels,
        "write_bundle_s": round(write_s, 2),
        "bundle_mb": round(stored / 2**20, 1),
        "open_s": round(open_s, 4),
        "info_s": round(info_s, 4),
        "build_s": round(first_s, 2),
        "overview_cold_s": round(cold_s, 4),
        "overview_with_info_s": round(overview_s, 4),
        "pyramid_mb": round(cache_bytes / 2**20, 1),
        "tile_ms": {
            level: {
                "median": round(1000 * statistics.median(t), 1),
                "max": round(1000 * max(t), 1),
                "n": len(t),
            }
            for level, t in per_level.items()
        },
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"tiles: {result['tokens']:,} tokens, {result['heads']} head(s), {result['levels']} levels",
        f"  write the bundle          {result['write_bundle_s']:8.2f} s   ({result['bundle_mb']} MiB stored)",
        f"  build the pyramid         {result['build_s']:8.2f} s   ({result['pyramid_mb']} MiB cached)",
        f"  overview, pyramid built   {result['overview_with_info_s'] * 1000:8.1f} ms  "
        "(open + info + coarsest tile)",
        "  random tiles (fresh reader each: open + tile)",
    ]
    for level, t in result["tile_ms"].items():
        lines.append(
            f"    level {level}: median {t['median']:6.1f} ms, max {t['max']:6.1f} ms ({t['n']} tiles)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiles", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--tokens", type=int, default=32_768, help="tokens of the sequence (default 32,768)")
    parser.add_argument("--heads", type=int, default=1, help="exported heads (default 1)")
    parser.add_argument("--samples", type=int, default=8, help="random tiles timed per level (default 8)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="keep the bundle here (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="qkvault-bench-tiles-"))
    try:
        result = run(args.tokens, args.heads, args.samples, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
