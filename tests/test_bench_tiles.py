"""``python -m bench.tiles`` on a small matrix: it writes the bundle, builds the pyramid, times tiles
of every level, and prints its table and a JSON line (docs/benchmarks.md, "Tiles")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.tiles import main


def test_bench_tiles_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tokens", "600", "--samples", "2", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiles: 600 tokens, 1 head(s), 3 levels")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["levels"] == 3 and set(result["tile_ms"]) == {"0", "1", "2"}
    assert all(v["n"] == 2 for v in result["tile_ms"].values())
    assert result["build_s"] > 0 and result["pyramid_mb"] > 0
    assert (
        tmp_path / "jobs" / "bench-tiles.zarr.tiles" / "seq-0" / "layer-0" / "head-0" / "ready.json"
    ).is_file()
