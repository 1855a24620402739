"""Slices of bundle arrays (storage/bundle/slices.py): selectors, slices equal to numpy indexing of
the whole array, derived attention equal to the reconstructed one, bulk bundles by job-wide
sequence, and the errors that name what is wrong. Bundles are written by the real writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.synthetic import SyntheticBundle, write_bulk_bundle, write_bundle
from storage.bundle.bulk import open_bulk
from storage.bundle.reader import open_bundle
from storage.bundle.selectors import ArrayNotFound, Selector, SliceError, parse_selector, resolve
from storage.bundle.slices import BundleView

SPEC = SyntheticBundle(
    lengths=[40, 23], layers=(0, 3), heads=(0, 2, 3), num_heads=4, num_kv_heads=2, chunk_rows=16, summary=True
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    url = str(tmp_path_factory.mktemp("slices") / "jobs" / "j.zarr")
    return url, write_bundle(url, SPEC)


def _sel(**texts: str) -> dict[str, Selector]:
    return {dim: parse_selector(dim, text) for dim, text in texts.items()}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", Selector(index=3)),
        ("0:16", Selector(start=0, stop=16)),
        (":16", Selector(stop=16)),
        ("16:", Selector(start=16)),
        (":", Selector()),
        (" 2 : 5 ", Selector(start=2, stop=5)),
    ],
)
def test_selectors_parse(text: str, expected: Selector) -> None:
    assert parse_selector("query", text) == expected


@pytest.mark.parametrize(
    ("text", "message"), [("-1", "not a selector"), ("a", "not a selector"), ("5:2", "ends before")]
)
def test_bad_selectors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(SliceError, match=message) as caught:
        parse_selector("query", text)
    assert "query" in str(caught.value)


def test_resolve_positions_and_coordinates() -> None:
    assert resolve("query", Selector(index=4), 10).key() == 4
    assert resolve("query", Selector(start=2), 10).key() == slice(2, 10)
    with pytest.raises(SliceError, match=r"query=10 is out of range: query has 10 entries \(0..9\)"):
        resolve("query", Selector(index=10), 10)
    with pytest.raises(SliceError, match="out of range"):
        resolve("query", Selector(start=0, stop=11), 10)
    layers = np.asarray([0, 15, 29])
    assert resolve("layer", Selector(index=15), 3, layers).key() == 1
    assert resolve("layer", Selector(start=1, stop=29), 3, layers).key() == slice(1, 2)
    with pytest.raises(SliceError, match="layer 14 was not exported; exported layers: 0, 15, 29"):
        resolve("layer", Selector(index=14), 3, layers)


def test_arrays_list_dims_shapes_and_groups(bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    view = BundleView(bundle[0])
    arrays = {a.name: a for a in view.arrays()}
    assert not view.bulk and view.sequences == 2 and view.format_version.startswith("1.")
    att = arrays["attention"]
    assert att.dims == ("layer", "batch", "head", "query", "key") and att.shape == (2, 2, 3, 40, 40)
    assert att.dtype == "float16" and att.chunks == (1, 1, 3, 16, 16) and not att.derived
    assert arrays["summary/label"].group == "summary" and arrays["summary/label"].dtype == "str"
    assert arrays["tokens"].group == "" and arrays["tokens"].dims == ("batch", "position")


@pytest.mark.parametrize(
    ("selectors", "seq", "index"),
    [
        ({}, None, np.s_[:, :, :, :, :]),
        ({"layer": "3", "head": "2"}, 1, np.s_[1, 1, 1, :, :]),
        ({"query": "5:21", "key": ":7"}, 0, np.s_[:, 0, :, 5:21, :7]),
        ({"layer": "0:4", "head": "3", "query": "39"}, None, np.s_[:, :, 2, 39, :]),
        ({"head": "1:3", "key": "30:"}, 1, np.s_[:, 1, 1:2, :, 30:]),
    ],
)
def test_slices_equal_numpy_indexing(
    bundle: tuple[str, dict[str, np.ndarray]],
    selectors: dict[str, str],
    seq: int | None,
    index: tuple[Any, ...],
) -> None:
    url, written = bundle
    plan = BundleView(url).plan("attention", _sel(**selectors), seq)
    got = plan.read()
    expected = written["attention"][index]
    assert got.dtype == np.float16 and got.shape == expected.shape == plan.shape
    np.testing.assert_array_equal(got, expected)
    assert len(plan.dims) == got.ndim


def test_slices_of_small_and_group_arrays(bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    url, written = bundle
    view = BundleView(url)
    np.testing.assert_array_equal(
        view.plan("tokens", _sel(position="2:9"), 1).read(), written["tokens"][1, 2:9]
    )
    assert view.plan("layer", {}).read().tolist() == [0, 3]
    entropy = view.plan("summary/entropy", _sel(layer="3"), 0).read()
    np.testing.assert_array_equal(entropy, written["summary/entropy"][1, 0])
    labels = view.plan("summary/label", {}, 0).read()
    assert labels.dtype.kind == "U" and labels.shape == (2, 3)


def test_slices_read_only_the_chunks_they_touch(bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    url, _ = bundle
    view = BundleView(url)
    plan = view.plan("attention", _sel(layer="3", query="0:16", key="0:16"), 0)
    gets: list[str] = []
    original = view.store.get

    async def counting_get(key: str, *args: object, **kwargs: object) -> object:
        gets.append(key)
        return await original(key, *args, **kwargs)

    view.store.get = counting_get
    plan.read()
    chunks = [k for k in gets if k.startswith("attention/c/")]
    assert chunks == ["attention/c/1/0/0/0/0"], gets


@pytest.mark.parametrize(
    ("name", "selectors", "seq", "error", "message"),
    [
        ("nope", {}, None, ArrayNotFound, "this bundle has no array 'nope'; it has: attention"),
        ("attention", {"position": "0"}, None, SliceError, "attention has no dimension 'position'"),
        ("attention", {"query": "40"}, None, SliceError, r"query=40 is out of range: query has 40 entries"),
        ("attention", {"head": "1"}, None, SliceError, "head 1 was not exported; exported heads: 0, 2, 3"),
        ("attention", {}, 2, SliceError, r"seq=2 is out of range: the bundle holds 2 sequences \(0..1\)"),
        ("layer", {}, 0, SliceError, "layer has no sequence axis"),
    ],
)
def test_errors_name_the_problem(
    bundle: tuple[str, dict[str, np.ndarray]],
    name: str,
    selectors: dict[str, str],
    seq: int | None,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        BundleView(bundle[0]).plan(name, _sel(**selectors), seq)


def test_derived_attention_slices_equal_the_reconstruction(tmp_path: Path) -> None:
    url = str(tmp_path / "d.zarr")
    spec = SyntheticBundle(
        lengths=[33, 20],
        layers=(0, 3),
        heads=(0, 1, 2, 3),
        num_heads=4,
        num_kv_heads=2,
        chunk_rows=16,
        derived=True,
    )
    write_bundle(url, spec)
    view = BundleView(url)
    info = {a.name: a for a in view.arrays()}["attention"]
    assert info.derived and info.dtype == "float32" and info.shape == (2, 2, 4, 33, 33)
    reconstructed = open_bundle(url)["attention"]
    plan = view.plan("attention", _sel(layer="3", head="1:3", query="4:30", key=":12"), 1)
    expected = reconstructed.isel(
        layer=1, batch=1, head=slice(1, 3), query=slice(4, 30), key=slice(0, 12)
    ).values
    got = plan.read()
    assert plan.dims == ("head", "query", "key") and got.shape == expected.shape == (2, 26, 12)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.count_nonzero(got) > 0  # rows past length 20 are zero, the rest are not


def test_bulk_slices_by_job_wide_sequence(tmp_path: Path) -> None:
    url = str(tmp_path / "bulk.zarr")
    spec = SyntheticBundle(
        lengths=[30, 12, 50, 7, 20], layers=(1,), heads=(0, 1), chunk_rows=16, summary=True
    )
    write_bulk_bundle(url, spec, [[0, 2], [1, 3, 4]])
    view = BundleView(url)
    assert view.bulk and view.sequences == 5 and view.format_version.startswith("2.")
    listed = {a.name: a for a in view.arrays(3)}
    assert listed["attention"].dims == ("layer", "head", "query", "key")
    assert listed["attention"].shape == (1, 2, 7, 7)  # sequence 3 alone, cut to its 7 tokens
    bulk = open_bulk(url)
    for seq in range(5):
        got = view.plan("attention", _sel(head="1"), seq).read()
        np.testing.assert_array_equal(got, bulk.sequence(seq)["attention"].isel(head=1).values)
        assert got.shape == (1, spec.lengths[seq], spec.lengths[seq])
    with pytest.raises(SliceError, match=r"add seq=<index> \(0..4\)"):
        view.plan("attention", {}, None)
    with pytest.raises(SliceError, match="attention has no dimension 'batch'"):
        view.plan("attention", _sel(batch="0"), 0)
    with pytest.raises(SliceError, match=r"this bulk job's bundle holds sequences 0..4"):
        view.locate(5)
    with pytest.raises(SliceError, match="out of range"):
        view.plan("attention", _sel(query="8"), 3)
