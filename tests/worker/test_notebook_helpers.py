"""What a notebook user reads from real exports (tiny Llama, in-process): token strings as
coordinates (plain, row-selection, derived-attention and bulk bundles), one sequence with its
padding trimmed (storage/bundle/trim.py), and the pictures of qkvault.plot, checked against the
arrays they draw."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

import qkvault
import qkvault.plot as qkplot
from qkvault.show import describe_bundle
from storage.bundle import Bundle, open_bundle, open_summary
from storage.bundle.attention import derived_source
from storage.bundle.bulk import open_bulk
from storage.bundle.labels import LABELS
from storage.bundle.tokencoords import KEY_TOKEN, POSITION_TOKEN, QUERY_TOKEN
from storage.bundle.trim import sequence_view
from storage.jobs.spec import JobSpec
from worker.bulk import BulkExporter

from .conftest import CollectingHooks
from .export_helpers import export, loaded

# a long first prompt (more tokens than qkplot.MAX_LABELS: labels are thinned), a short second one
PROMPTS = ["The quick brown fox jumps over the lazy dog; the dog sleeps on.", "Hi $x$!"]
NEW_TOKENS = 3


@pytest.fixture(autouse=True)
def _figures_closed() -> Iterator[None]:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


@pytest.fixture(scope="module")
def bundles(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One export per kind of bundle, all of the same two prompts (the bulk job: five prompts)."""
    model, root = tiny_model_dir("llama"), tmp_path_factory.mktemp("notebook-helpers")
    base: dict[str, Any] = {
        "model": {"id": str(model)},
        "prompts": PROMPTS,
        "generation": {"max_new_tokens": NEW_TOKENS},
        "storage": {"attention_dtype": "float32", "chunk_rows": 16},
    }
    captures: dict[str, dict[str, Any]] = {
        "plain": {"attention": True, "summary": True},
        "rows": {"attention": True, "query_rows": [[3, 6], [40, 44]], "generation_steps": [1]},
        "derived": {"attention": "derived"},
    }
    paths = {}
    for kind, capture in captures.items():
        paths[kind] = root / f"{kind}.zarr"
        export({**base, "capture": capture}, paths[kind])
    spec = JobSpec.model_validate(
        {
            **{k: v for k, v in base.items() if k != "prompts"},
            "source": {"kind": "prompts", "prompts": [*PROMPTS, "a b", "c d e f", "g"], "token_budget": 64},
            "capture": {"attention": True},
        }
    )
    paths["bulk"] = root / "bulk.zarr"
    BulkExporter(spec, loaded(spec), CollectingHooks(), bundle_url=str(paths["bulk"])).run("bulk")
    return paths


def _image(ax: Axes) -> np.ndarray:
    """The array the Axes' image draws."""
    array = ax.images[0].get_array()
    assert array is not None
    return np.asarray(np.ma.getdata(array))


def _heights(ax: Axes) -> list[float]:
    """The heights of the Axes' bars, left to right."""
    return [float(p.get_height()) for p in ax.patches if isinstance(p, Rectangle)]


def _strings(ds: xr.Dataset, b: int) -> list[str]:
    return [str(s) for s in ds.attrs["token_strings"][b]]


def test_token_coordinates_of_a_padded_batch(bundles: dict[str, Path]) -> None:
    ds = open_bundle(bundles["plain"])
    lengths = [int(n) for n in ds["length"].values]
    assert lengths[0] > qkplot.MAX_LABELS > lengths[1]  # the batch is padded to the first
    for name, dim in ((QUERY_TOKEN, "query"), (KEY_TOKEN, "key"), (POSITION_TOKEN, "position")):
        assert ds[name].dims == ("batch", dim) and name not in ds.data_vars
        for b, n in enumerate(lengths):
            values = [str(s) for s in ds[name].values[b]]
            assert values[:n] == _strings(ds, b)
            assert set(values[n:]) <= {""} and len(values) == ds.sizes[dim]
    assert "token_strings" in ds.attrs  # kept for the code that reads it
    listed = describe_bundle(ds).split("meaning:")[0]  # `qkvault show` lists stored arrays only
    assert " tokens " in listed and QUERY_TOKEN not in listed and POSITION_TOKEN not in listed
    one = ds["attention"].isel(layer=0, head=1, batch=1)
    assert one[QUERY_TOKEN].dims == ("query",) and one[KEY_TOKEN].values[1] == _strings(ds, 1)[1]


def test_row_selection_labels_each_stored_row_with_its_token(bundles: dict[str, Path]) -> None:
    ds = open_bundle(bundles["rows"])
    where = ds["query_position"].values
    for b in range(2):
        strings = _strings(ds, b)
        expected = [strings[p] if p >= 0 else "" for p in where[b]]
        assert [str(s) for s in ds[QUERY_TOKEN].values[b]] == expected
        view = sequence_view(ds, b)
        stored = [int(p) for p in where[b] if p >= 0]
        assert view["query"].values.tolist() == stored  # positions, not row numbers
        assert view.sizes["key"] == int(ds["length"].values[b])
        assert [str(s) for s in view[QUERY_TOKEN].values] == [strings[p] for p in stored]
        position = stored[-1]
        np.testing.assert_array_equal(
            view["attention"].sel(layer=1, head=2, query=position).values,
            Bundle(bundles["rows"]).attention(1, 2, query=position, batch=b)[: view.sizes["key"]],
        )
    assert len(stored) < ds.sizes["query"]  # the short sequence had padding rows: trimmed


def test_sequence_view_trims_padding(bundles: dict[str, Path]) -> None:
    ds = open_bundle(bundles["plain"])
    n = int(ds["length"].values[1])
    view = sequence_view(ds, 1)
    assert view.sizes["query"] == view.sizes["key"] == view.sizes["position"] == n < ds.sizes["position"]
    assert "batch" not in view.dims and view.attrs["sequence"] == 1
    np.testing.assert_array_equal(view["tokens"].values, ds["tokens"].values[1, :n])
    assert (ds["tokens"].values[1, n:] == -1).all()  # what was cut is padding
    np.testing.assert_array_equal(
        view["attention"].sel(layer=0, head=3).values, ds["attention"].values[0, 1, 3, :n, :n]
    )
    for name in (QUERY_TOKEN, KEY_TOKEN, POSITION_TOKEN):
        assert [str(s) for s in view[name].values] == _strings(ds, 1)
    assert qkvault.sequence_view is sequence_view  # re-exported for notebook users
    with pytest.raises(IndexError, match=r"sequence 2 out of range: this bundle holds 2 \(0..1\)"):
        sequence_view(ds, 2)


def test_derived_attention_gets_coordinates_and_computes_only_the_real_rows(bundles: dict[str, Path]) -> None:
    derived, plain = open_bundle(bundles["derived"]), open_bundle(bundles["plain"])
    assert derived[QUERY_TOKEN].dims == ("batch", "query") and derived[KEY_TOKEN].dims == ("batch", "key")
    for b in range(2):
        assert [str(s) for s in derived[KEY_TOKEN].values[b]] == [str(s) for s in plain[KEY_TOKEN].values[b]]
    source = derived_source(derived)
    assert source is not None
    view = sequence_view(derived, 1)
    n = view.sizes["query"]
    computed = view["attention"].sel(layer=1, head=0).values
    assert source.stats["rows"] == n  # the padding rows were never computed
    np.testing.assert_allclose(computed, plain["attention"].values[1, 1, 0, :n, :n], atol=1e-5)


def test_bulk_sequences_carry_their_own_token_coordinates(bundles: dict[str, Path]) -> None:
    bulk, plain = open_bulk(bundles["bulk"]), open_bundle(bundles["plain"])
    for i in range(2):  # the job's first two prompts are the plain export's two sequences
        one = bulk.sequence(i)
        for name in (QUERY_TOKEN, KEY_TOKEN, POSITION_TOKEN):
            assert [str(s) for s in one[name].values] == _strings(plain, i), (i, name)
        view = sequence_view(one, i)  # a bulk sequence is trimmed already: the view changes nothing
        assert view.sizes == one.sizes and view[KEY_TOKEN].values.tolist() == one[KEY_TOKEN].values.tolist()
    with pytest.raises(IndexError, match="one sequence only"):
        sequence_view(bulk.sequence(1), 3)
    with pytest.raises(ValueError, match=r"bulk job's sequence table: plot one sequence"):
        qkplot.heatmap(open_bundle(bundles["bulk"]), layer=0, head=0)
    ax = qkplot.heatmap(bulk.sequence(1), layer=0, head=0, seq=1)
    n = int(plain["length"].values[1])
    np.testing.assert_array_equal(_image(ax), bulk.sequence(1)["attention"].values[0, 0, :n, :n])


def test_heatmap_draws_the_trimmed_matrix_with_token_labels(bundles: dict[str, Path]) -> None:
    ds = open_bundle(bundles["plain"])
    ax = qkplot.heatmap(ds, layer=1, head=2, seq=1)
    n = int(ds["length"].values[1])
    np.testing.assert_array_equal(_image(ax), ds["attention"].values[1, 1, 2, :n, :n])
    labels = [qkplot.token_label(s) for s in _strings(ds, 1)]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert "$" in _strings(ds, 1) and r"\$" in labels and "\t" in _strings(ds, 1) and r"\t" in labels
    assert ax.get_title() == "layer 1, head 2, sequence 1"


def test_heatmap_thins_labels_and_has_a_log_scale(bundles: dict[str, Path]) -> None:
    ds = open_bundle(bundles["plain"])
    n = int(ds["length"].values[0])
    ax = qkplot.heatmap(ds, layer=0, head=1, log=True, max_labels=20)
    att = ds["attention"].values[0, 0, 1, :n, :n]
    np.testing.assert_array_equal(_image(ax), att)
    ticks = [int(t) for t in ax.get_xticks()]
    step = -(-n // 20)
    assert ticks == list(range(0, n, step)) and len(ticks) <= 20
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        qkplot.token_label(_strings(ds, 0)[i]) for i in ticks
    ]
    norm = ax.images[0].norm
    assert isinstance(norm, matplotlib.colors.LogNorm)
    assert norm.vmin == pytest.approx(att[att > 0].min()) and norm.vmax == pytest.approx(att.max())
    with pytest.raises(ValueError, match=r"layer= is required: this bundle exports layers \[0, 1\]"):
        qkplot.heatmap(ds, head=1)
    with pytest.raises(ValueError, match=r"head 9 was not exported: exported heads are \[0, 1, 2, 3\]"):
        qkplot.heatmap(ds, layer=0, head=9)


def test_heatmap_of_a_derived_block_and_of_plain_arrays(bundles: dict[str, Path]) -> None:
    ds = open_bundle(bundles["derived"])
    ax = qkplot.heatmap(ds, layer=0, head=3, query=slice(10, 20), key=slice(0, 20))
    expected = Bundle(bundles["derived"]).attention(0, 3, query=slice(10, 20), key=slice(0, 20))
    np.testing.assert_allclose(_image(ax), expected, atol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        qkplot.token_label(s) for s in _strings(ds, 0)[10:20]
    ]
    matrix = np.tril(np.random.default_rng(0).random((5, 5)))
    ax = qkplot.heatmap(matrix, tokens=["a", "$_$", "c\n", "d", "e"])
    np.testing.assert_array_equal(_image(ax), matrix.astype(np.float32))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", r"\$_\$", r"c\n", "d", "e"]
    ax.figure.canvas.draw()  # renders: "$_$" unescaped is a mathtext parse error


def test_attention_to_token_bars_are_the_row(bundles: dict[str, Path]) -> None:
    ds = open_bundle(bundles["plain"])
    ax = qkplot.attention_to_token(ds, layer=1, head=0, seq=0, query=7)
    row = ds["attention"].values[1, 0, 0, 7, :8]  # causal: keys 0..7
    np.testing.assert_allclose(_heights(ax), row)
    strings = _strings(ds, 0)
    assert [t.get_text() for t in ax.get_xticklabels()] == [qkplot.token_label(s) for s in strings[:8]]
    assert ax.get_title() == f"attention of token 7 {strings[7]!r} — layer 1, head 0, sequence 0"
    last = qkplot.attention_to_token(ds, layer=1, head=0, seq=1, top=3)  # default: the last token
    n = int(ds["length"].values[1])
    full = ds["attention"].values[1, 1, 0, n - 1, :n]
    keys = sorted(np.argsort(-full, kind="stable")[:3].tolist())
    np.testing.assert_allclose(_heights(last), full[keys])
    assert [t.get_text() for t in last.get_xticklabels()] == [
        qkplot.token_label(_strings(ds, 1)[k]) for k in keys
    ]


def test_head_grid_draws_the_summary_labels(bundles: dict[str, Path]) -> None:
    summary = open_summary(bundles["plain"])
    ax = qkplot.head_grid(summary)
    labels = np.array(summary["pooled_label"].values.tolist(), dtype=str)
    np.testing.assert_array_equal(_image(ax), np.vectorize(LABELS.index)(labels))
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(h) for h in summary["head"].values]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(la) for la in summary["layer"].values]
    one = qkplot.head_grid(summary, seq=1)
    per_sequence = np.array(summary["label"].values[:, 1].tolist(), dtype=str)
    np.testing.assert_array_equal(_image(one), np.vectorize(LABELS.index)(per_sequence))


def test_qkvault_labels_writes_the_same_grid(bundles: dict[str, Path], tmp_path: Path) -> None:
    from matplotlib.image import imread

    from qkvault.cli import main

    out = tmp_path / "labels.png"
    assert main(["labels", str(bundles["plain"]), "-o", str(out)]) == 0
    height, width = imread(out).shape[:2]  # figure_size_in(summary) at 110 dpi: 4 heads, 2 layers
    assert (width, height) == (int((1.0 + 0.55 * 4) * 110), int((1.2 + 0.28 * 2) * 110))
