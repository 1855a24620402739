"""Derived attention on the reader side (numpy + zarr + xarray): the reconstruction math against a
direct float64 formula and against torch's SDPA output, grouped-query heads, sliding windows,
rows past a sequence's length, key slices, bounded blocks, and the lazy xarray ``attention``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import storage.bundle.derived as derived
from storage.bundle import Bundle, open_bundle
from storage.bundle.attention import derived_source
from storage.bundle.derived import attention_block, materialised_bytes, probabilities
from storage.errors import BundleNotReady

RNG = np.random.default_rng(0)


def reference(
    q: np.ndarray,
    k: np.ndarray,
    scaling: float,
    window: int | None,
    softcap: float | None = None,
    sink: float | None = None,
) -> np.ndarray:
    """Row by row in float64, straight from the formula: ``q [T, D]``, ``k [T, D]`` → ``[T, T]``.
    With a ``sink`` logit: p_ij = exp(s_ij) / (Σ_visible exp(s_ij) + exp(sink))."""
    length = q.shape[0]
    out = np.zeros((length, length))
    for i in range(length):
        visible = [j for j in range(i + 1) if window is None or i - j < window]
        scores = np.array(
            [scaling * float(q[i].astype(np.float64) @ k[j].astype(np.float64)) for j in visible]
        )
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        top = scores.max() if sink is None else max(scores.max(), sink)
        weights = np.exp(scores - top)
        total = weights.sum() + (0.0 if sink is None else np.exp(sink - top))
        out[i, visible] = weights / total
    return out


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, None), (None, 3.0), (7, 2.0)])
def test_block_equals_the_formula(backend: Any, window: int | None, softcap: float | None) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    length, dim = 40, 8
    q = RNG.normal(size=(length, dim)).astype(np.float32) * 2
    k = RNG.normal(size=(length, dim)).astype(np.float32) * 2
    ref = reference(q, k, 0.3, window, softcap)
    full = probabilities(
        q, k, np.arange(length), 0, scaling=0.3, window=window, softcap=softcap, backend=backend
    )
    np.testing.assert_allclose(full, ref, atol=2e-6)
    # any row set, any key set, in any order with repeats; small blocks; rows past the length are 0
    rows = np.array([39, 0, 17, 17, 45, 3, 38])
    keys = np.array([0, 1, 16, 17, 30, 39, 2, 50])
    got = attention_block(
        q[np.minimum(rows, length - 1)],
        k,
        rows,
        keys,
        length=length,
        scaling=0.3,
        window=window,
        softcap=softcap,
        block_rows=2,
        backend=backend,
    )
    expected = np.zeros((rows.size, keys.size))
    for r, row in enumerate(rows):
        if row < length:
            expected[r] = [ref[row, key] if key < length else 0.0 for key in keys]
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert not got[rows == 45].any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("window", "softcap", "sink"),
    [(None, None, 1.5), (5, None, -3.0), (None, 3.0, 8.0), (7, 2.0, 0.0), (None, None, 40.0)],
)
def test_block_with_a_sink_equals_the_formula(
    backend: Any, window: int | None, softcap: float | None, sink: float
) -> None:
    """gpt-oss sinks: the sink logit joins every row's denominator; rows sum to 1 - sink mass."""
    if backend == "torch":
        pytest.importorskip("torch")
    length, dim = 40, 8
    rng = np.random.default_rng(7)
    q = rng.normal(size=(length, dim)).astype(np.float32) * 2
    k = rng.normal(size=(length, dim)).astype(np.float32) * 2
    ref = reference(q, k, 0.3, window, softcap, sink)
    full = probabilities(
        q, k, np.arange(length), 0, scaling=0.3, window=window, softcap=softcap, sink=sink, backend=backend
    )
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, ref, atol=2e-6)
    # the sink's mass, computed on its own: 1 - row sum = exp(σ) / (Σ_visible exp(s) + exp(σ))
    mass = np.empty(length)
    for i in range(length):
        visible = [j for j in range(i + 1) if window is None or i - j < window]
        scores = 0.3 * (q[i].astype(np.float64) @ k[visible].astype(np.float64).T)
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        mass[i] = 1.0 / (1.0 + np.exp(scores - sink).sum())
    assert mass.max() > 1e-3  # the sink changes the rows
    np.testing.assert_allclose(full.sum(-1), 1.0 - mass, atol=2e-6)
    rows = np.array([39, 0, 17, 17, 45, 3, 38])
    keys = np.array([0, 1, 16, 17, 30, 39, 2, 50])
    got = attention_block(
        q[np.minimum(rows, length - 1)],
        k,
        rows,
        keys,
        length=length,
        scaling=0.3,
        window=window,
        softcap=softcap,
        sink=sink,
        block_rows=2,
        backend=backend,
    )
    expected = np.zeros((rows.size, keys.size))
    for r, row in enumerate(rows):
        if row < length:
            expected[r] = [ref[row, key] if key < length else 0.0 for key in keys]
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert not got[rows == 45].any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sink_row_without_visible_key_is_zero(backend: Any) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    q = RNG.normal(size=(3, 4)).astype(np.float32)
    k = RNG.normal(size=(4, 4)).astype(np.float32)
    # keys start at position 2: the row at position 1 sees none of them, the row at 3 sees two
    got = probabilities(q, k, np.array([1, 3, 5]), 2, scaling=1.0, window=None, sink=0.5, backend=backend)
    assert np.isfinite(got).all() and not got[0].any()
    expected = np.zeros((3, 4))
    for r, position in enumerate([1, 3, 5]):
        visible = [c for c in range(4) if c + 2 <= position]
        scores = q[r].astype(np.float64) @ k[visible].astype(np.float64).T
        expected[r, visible] = np.exp(scores) / (np.exp(scores).sum() + np.exp(0.5))
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_output_matches_torch_sdpa_with_gqa_and_window() -> None:
    """Independent check: the reconstructed probabilities times V equal SDPA's output (torch's own
    kernel, grouped-query heads expanded by torch, the window as a boolean mask)."""
    torch = pytest.importorskip("torch")
    heads, kv_heads, length, dim, window = 4, 2, 33, 8, 6
    q = torch.randn(1, heads, length, dim)
    k = torch.randn(1, kv_heads, length, dim)
    v = torch.randn(1, kv_heads, length, dim)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    mask = (j <= i) & (i - j < window)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True
    )[0].numpy()
    for h in range(heads):
        kv = h // (heads // kv_heads)
        probs = attention_block(
            q[0, h].numpy(),
            k[0, kv].numpy(),
            np.arange(length),
            np.arange(length),
            length=length,
            scaling=0.25,
            window=window,
            backend="numpy",
        )
        np.testing.assert_allclose(probs @ v[0, kv].numpy(), out[h], atol=1e-5)


def test_blocks_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, int]] = []
    original = derived.probabilities

    def spy(q_rows: np.ndarray, keys: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        shapes.append((q_rows.shape[0], keys.shape[0]))
        return original(q_rows, keys, *args, **kwargs)

    monkeypatch.setattr(derived, "probabilities", spy)
    monkeypatch.setattr(derived, "BLOCK_ELEMENTS", 4096)
    length, dim = 600, 4
    q = RNG.normal(size=(length, dim)).astype(np.float32)
    k = RNG.normal(size=(length, dim)).astype(np.float32)
    stats: dict[str, int] = {}
    rows = np.arange(length)
    got = attention_block(q, k, rows, np.arange(length), length=length, scaling=0.5, window=None, stats=stats)
    assert max(n * keys for n, keys in shapes) <= 4096 or all(n == 1 for n, _ in shapes)
    assert all(n <= 256 for n, _ in shapes) and stats["rows"] == length and stats["blocks"] == len(shapes)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    # a sliding window reads only the keys each block can see
    shapes.clear()
    attention_block(q, k, rows, np.arange(length), length=length, scaling=0.5, window=16, block_rows=32)
    assert max(keys for _, keys in shapes) <= 32 + 15


def test_materialised_bytes_counts_the_lower_triangle() -> None:
    assert materialised_bytes(2, 3, [4, 1]) == 2 * 3 * (10 + 1) * 2


# -- bundles written with zarr directly (no worker, no torch) ------------------------------------
NUM_HEADS, NUM_KV_HEADS, DIM = 4, 2, 8


def _array(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...]) -> None:
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, dimension_names=dims, fill_value=0)
    array[...] = data


def write_bundle(
    path: Path,
    lengths: list[int],
    *,
    heads: list[int],
    windows: list[int],
    materialised: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """A derived bundle of two layers (real indices 1 and 3), and the reference attention of each
    (layer, sequence, exported head) computed with :func:`reference`."""
    positions = max(lengths)
    kv_heads = sorted({h // (NUM_HEADS // NUM_KV_HEADS) for h in heads})
    rng = np.random.default_rng(seed)
    q_all = rng.normal(size=(2, len(lengths), NUM_HEADS, positions, DIM)).astype(np.float32)
    k_all = rng.normal(size=(2, len(lengths), NUM_KV_HEADS, positions, DIM)).astype(np.float32)
    for b, n in enumerate(lengths):
        q_all[:, b, :, n:] = 0
        k_all[:, b, :, n:] = 0
    scaling = [0.35, 0.2]
    ref = np.zeros((2, len(lengths), len(heads), positions, positions))
    for lp in range(2):
        for b, n in enumerate(lengths):
            for hp, h in enumerate(heads):
                kv = h // (NUM_HEADS // NUM_KV_HEADS)
                window = windows[lp] if windows[lp] > 0 else None
                ref[lp, b, hp, :n, :n] = reference(
                    q_all[lp, b, h, :n], k_all[lp, b, kv, :n], scaling[lp], window
                )
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    capture = {"derived_attention": not materialised, "attention": materialised}
    group.attrs.update(
        {
            "qkvault_format": "qkvault.bundle",
            "format_version": "1.2",
            "complete": True,
            "capture": capture,
            "model": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "attn_logit_softcapping": None},
        }
    )
    _array(group, "layer", np.array([1, 3], dtype=np.int32), ("layer",))
    _array(group, "head", np.array(heads, dtype=np.int32), ("head",))
    _array(group, "kv_head", np.array(kv_heads, dtype=np.int32), ("kv_head",))
    _array(group, "length", np.array(lengths, dtype=np.int32), ("batch",))
    if materialised:
        _array(group, "attention", ref.astype(np.float32), ("layer", "batch", "head", "query", "key"))
    else:
        _array(group, "q", q_all[:, :, heads], ("layer", "batch", "head", "position", "head_dim"))
        _array(group, "k", k_all[:, :, kv_heads], ("layer", "batch", "kv_head", "position", "head_dim"))
        _array(group, "attention_scaling", np.array(scaling), ("layer",))
        _array(group, "attention_window", np.array(windows, dtype=np.int32), ("layer",))
    _array(group, "tokens", np.zeros((len(lengths), positions), dtype=np.int32), ("batch", "position"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)
    return {"reference": ref, "heads": heads}


def test_lazy_attention_computes_only_the_selection(tmp_path: Path) -> None:
    made = write_bundle(tmp_path / "d.zarr", [30, 21], heads=[1, 2, 3], windows=[0, 5])
    ds = open_bundle(tmp_path / "d.zarr", backend="numpy")
    att = ds["attention"]
    assert att.dims == ("layer", "batch", "head", "query", "key")
    assert att.shape == (2, 2, 3, 30, 30) and att.dtype == np.float32
    source = derived_source(ds)
    assert source is not None and source.stats["rows"] == 0  # opening computes nothing
    block = att.isel(layer=1, batch=0, head=2, query=slice(10, 20), key=slice(0, 12)).values
    assert block.shape == (10, 12)
    np.testing.assert_allclose(block, made["reference"][1, 0, 2, 10:20, :12], atol=2e-6)
    assert source.stats["rows"] == 10 and source.stats["calls"] == 1
    # coordinates select real indices; sequence 1 is shorter: rows and keys past its length are 0
    row = ds["attention"].sel(layer=3, head=1).isel(batch=1, query=25).values
    assert row.shape == (30,) and not row.any()
    np.testing.assert_allclose(att[:, 1].values, made["reference"][:, 1], atol=2e-6)
    np.testing.assert_allclose(att.values, made["reference"], atol=2e-6)


def test_bundle_attention_api(tmp_path: Path) -> None:
    made = write_bundle(tmp_path / "d.zarr", [26, 9], heads=[0, 3], windows=[4, 0])
    write_bundle(tmp_path / "m.zarr", [26, 9], heads=[0, 3], windows=[4, 0], materialised=True)
    bundle = Bundle(tmp_path / "d.zarr", backend="numpy")
    assert bundle.derived
    got = bundle.attention(3, 3, query=slice(5, 26), key=slice(0, 26))
    np.testing.assert_allclose(got, made["reference"][1, 0, 1, 5:26], atol=2e-6)
    assert bundle.attention(1, 0, query=7).shape == (26,)
    assert bundle.attention(1, 0, query=7, key=3).shape == ()
    np.testing.assert_allclose(bundle.attention(1, 0, batch=1), made["reference"][0, 1, 0], atol=2e-6)
    with pytest.raises(KeyError, match="head 1 was not exported"):
        bundle.attention(1, 1)
    with pytest.raises(KeyError, match="layer 0 was not exported"):
        bundle.attention(0, 0)
    materialised = Bundle(tmp_path / "m.zarr")
    assert not materialised.derived
    np.testing.assert_allclose(
        materialised.attention(1, 3, query=[2, 9], key=slice(0, 10)),
        made["reference"][0, 0, 1, [2, 9], :10],
        atol=1e-6,
    )


def test_unrecorded_layer_facts_are_refused(tmp_path: Path) -> None:
    write_bundle(tmp_path / "d.zarr", [8], heads=[0], windows=[-1, 0])
    bundle = Bundle(tmp_path / "d.zarr", backend="numpy")
    assert bundle.attention(3, 0).shape == (8, 8)
    with pytest.raises(BundleNotReady, match="not recorded"):
        bundle.attention(1, 0)
