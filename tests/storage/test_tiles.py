"""Tile pyramids (storage/bundle/pooling.py, storage/bundle/tiles.py): every level's tiles equal a
numpy reference (max and mean of each 2**L × 2**L block, odd sizes, NaN outside the matrix), the
pyramid lives next to the bundle and not in it, concurrent builders agree, derived bundles tile the
reconstructed attention, and what is out of range is named."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic import SyntheticBundle, write_bulk_bundle, write_bundle
from storage.bundle.matrix import AttentionMatrix
from storage.bundle.pooling import TILE, level_sizes, pool_2x2
from storage.bundle.reader import open_bundle
from storage.bundle.selectors import NotInBundle, SliceError
from storage.bundle.slices import BundleView
from storage.bundle.tiles import TilePyramid, tiles_url

TOKENS = 700  # levels 700, 350, 175: odd sizes at level 2, three tiles per side at level 0


def reference_level(matrix: np.ndarray, level: int, pool: str) -> np.ndarray:
    """Max or mean of each 2**level × 2**level block of ``matrix`` (cut at its edge), in float64:
    the matrix padded with NaN to whole blocks, then nanmax/nanmean over each block."""
    step = 1 << level
    rows, cols = (-(-n // step) for n in matrix.shape)
    padded = np.full((rows * step, cols * step), np.nan)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    blocks = padded.reshape(rows, step, cols, step)
    return np.nanmax(blocks, axis=(1, 3)) if pool == "max" else np.nanmean(blocks, axis=(1, 3))


def assemble(pyramid: TilePyramid, level: int, pool: str) -> np.ndarray:
    """Every tile of a level side by side (a multiple of TILE per side)."""
    side = -(-pyramid.sizes[level] // TILE)
    whole = np.empty((side * TILE, side * TILE), dtype=np.float32)
    for row in range(side):
        for col in range(side):
            whole[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE] = pyramid.tile(
                level, row, col, pool
            )
    return whole


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    url = str(tmp_path_factory.mktemp("tiles") / "jobs" / "t.zarr")
    written = write_bundle(
        url, SyntheticBundle(lengths=[TOKENS, 300], layers=(2,), heads=(1, 5), chunk_rows=64)
    )
    return url, written["attention"]


def test_level_sizes() -> None:
    assert level_sizes(1) == [1]
    assert level_sizes(256) == [256]
    assert level_sizes(257) == [257, 129]
    assert level_sizes(700) == [700, 350, 175]
    assert level_sizes(32_768) == [32_768 >> level for level in range(8)]


def test_pool_2x2_against_numpy_with_odd_edges() -> None:
    rng = np.random.default_rng(1)
    values = rng.random((5, 7))
    maxes, sums, width = pool_2x2(values, values, 7, 7, last_rows=True)
    assert width == 4 and maxes.shape == sums.shape == (3, 4)
    np.testing.assert_allclose(maxes, reference_level(values, 1, "max"))
    counts = np.outer([2, 2, 1], [2, 2, 2, 1])
    np.testing.assert_allclose(sums / counts, reference_level(values, 1, "mean"))
    with pytest.raises(ValueError, match="even number of rows"):
        pool_2x2(values, values, 7, 7, last_rows=False)
    # columns past `width` are zeros inside the matrix: a max of negatives meets them
    negative = -np.ones((2, 3))
    maxes, _, _ = pool_2x2(negative, negative, 3, 8, last_rows=False)
    assert maxes.tolist() == [[-1.0, 0.0]]


@pytest.mark.parametrize("band_rows", [64, 100, 512])
def test_every_tile_equals_the_reference(
    tmp_path: Path, bundle: tuple[str, np.ndarray], band_rows: int
) -> None:
    url, attention = bundle
    matrix = attention[0, 0, 1, :TOKENS, :TOKENS].astype(np.float32)  # layer 2, head 5, sequence 0
    pyramid = TilePyramid(
        AttentionMatrix(BundleView(url), 2, 5, 0), str(tmp_path / "cache"), band_rows=band_rows
    )
    assert pyramid.sizes == [700, 350, 175] and not pyramid.ready
    assert pyramid.build() and pyramid.ready and not pyramid.build()
    for level in range(3):
        for pool in ("max", "mean"):
            whole = assemble(pyramid, level, pool)
            size = pyramid.sizes[level]
            np.testing.assert_allclose(
                whole[:size, :size], reference_level(matrix, level, pool), rtol=1e-5, atol=1e-8
            )
            assert np.isnan(whole[size:]).all() and np.isnan(whole[:, size:]).all()


def test_pyramid_is_cached_next_to_the_bundle_and_reused(bundle: tuple[str, np.ndarray]) -> None:
    url, _ = bundle
    before = sorted(p.relative_to(url).as_posix() for p in Path(url).rglob("*"))
    first = TilePyramid(AttentionMatrix(BundleView(url), 2, 1, 1), tiles_url(url, 2, 1, 1))
    assert first.sizes == [300, 150] and not first.ready
    first.tile(1, 0, 0)  # a level >= 1 builds it
    cache = Path(f"{url}.tiles/seq-1/layer-2/head-1")
    assert (cache / "ready.json").is_file()
    assert sorted(p.relative_to(url).as_posix() for p in Path(url).rglob("*")) == before  # bundle untouched
    again = TilePyramid(AttentionMatrix(BundleView(url), 2, 1, 1), tiles_url(url, 2, 1, 1))
    assert again.ready and not again.build()  # a new reader (another request, process) reuses it
    np.testing.assert_array_equal(again.tile(1, 0, 0, "mean"), first.tile(1, 0, 0, "mean"))


def test_concurrent_builders_leave_one_complete_pyramid(
    tmp_path: Path, bundle: tuple[str, np.ndarray]
) -> None:
    url, attention = bundle
    cache = str(tmp_path / "shared")
    builders = [TilePyramid(AttentionMatrix(BundleView(url), 2, 5, 0), cache, band_rows=64) for _ in range(3)]
    start = threading.Barrier(len(builders))
    errors: list[BaseException] = []

    def build(pyramid: TilePyramid) -> None:
        try:
            start.wait()
            pyramid.build()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(b,)) for b in builders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    expected = reference_level(attention[0, 0, 1, :TOKENS, :TOKENS].astype(np.float32), 2, "max")
    for builder in builders:
        assert builder.ready
        np.testing.assert_allclose(builder.tile(2, 0, 0)[:175, :175], expected, rtol=1e-6)
    builds = [p.name for p in Path(cache).iterdir() if p.is_dir()]
    assert len(builds) >= 1 and not list(Path(cache).glob("*.tmp"))


def test_out_of_range_is_named(tmp_path: Path, bundle: tuple[str, np.ndarray]) -> None:
    url, _ = bundle
    pyramid = TilePyramid(AttentionMatrix(BundleView(url), 2, 5, 0), str(tmp_path / "c"))
    with pytest.raises(NotInBundle, match=r"tile \(3, 0\) is out of range at level 0: rows and columns 0..2"):
        pyramid.tile(0, 3, 0)
    with pytest.raises(NotInBundle, match=r"level 3 is out of range: this pyramid has levels 0..2"):
        pyramid.tile(3, 0, 0)
    with pytest.raises(SliceError, match="pool='median': choose one of max, mean"):
        pyramid.tile(1, 0, 0, "median")
    view = BundleView(url)
    with pytest.raises(NotInBundle, match="layer 0 was not exported; exported layers: 2"):
        AttentionMatrix(view, 0, 5, 0)
    with pytest.raises(NotInBundle, match="head 2 was not exported; exported heads: 1, 5"):
        AttentionMatrix(view, 2, 2, 0)
    with pytest.raises(NotInBundle, match=r"sequence 2 is not in this bundle: it holds sequences 0..1"):
        AttentionMatrix(view, 2, 5, 2)


def test_info_names_tokens_and_levels(tmp_path: Path, bundle: tuple[str, np.ndarray]) -> None:
    url, _ = bundle
    info = TilePyramid(AttentionMatrix(BundleView(url), 2, 5, 1), str(tmp_path / "c")).info()
    assert (info.tokens, info.levels, info.level_sizes, info.ready) == (300, 2, [300, 150], False)
    assert info.token_strings[:2] == ["t1.0", "t1.1"] and len(info.token_strings) == 300


def test_derived_bundle_tiles_the_reconstructed_attention(tmp_path: Path) -> None:
    url = str(tmp_path / "d.zarr")
    spec = SyntheticBundle(
        lengths=[300], layers=(0,), heads=(0, 1), num_kv_heads=1, chunk_rows=64, derived=True
    )
    write_bundle(url, spec)
    matrix = open_bundle(url)["attention"].isel(layer=0, batch=0, head=1).values
    pyramid = TilePyramid(AttentionMatrix(BundleView(url), 0, 1, 0), tiles_url(url, 0, 1, 0), band_rows=128)
    np.testing.assert_allclose(pyramid.tile(0, 1, 0)[: 300 - TILE, :TILE], matrix[TILE:300, :TILE], rtol=1e-6)
    np.testing.assert_allclose(
        pyramid.tile(1, 0, 0, "mean")[:150, :150], reference_level(matrix, 1, "mean"), rtol=1e-5
    )


def test_bulk_sequence_tiles(tmp_path: Path) -> None:
    url = str(tmp_path / "bulk.zarr")
    spec = SyntheticBundle(lengths=[40, 270, 9], layers=(1,), heads=(0,), chunk_rows=64)
    written = write_bulk_bundle(url, spec, [[0, 2], [1]])
    pyramid = TilePyramid(AttentionMatrix(BundleView(url), 1, 0, 1), tiles_url(url, 1, 0, 1))
    assert pyramid.sizes == [270, 135]
    matrix = written[1]["attention"][0, 0, 0].astype(np.float32)  # micro-batch 1, slot 0
    np.testing.assert_allclose(pyramid.tile(1, 0, 0)[:135, :135], reference_level(matrix, 1, "max"))
