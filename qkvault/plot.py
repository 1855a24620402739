"""Pictures of a bundle for notebooks: an attention heatmap, the head-label grid, one token's bar chart.

    import qkvault.plot as qkplot
    from qkvault import open_bundle, open_summary

    ds = open_bundle("<id>.zarr.zip")
    qkplot.heatmap(ds, layer=15, head=3, seq=0)            # token labels on both axes
    qkplot.heatmap(ds, layer=15, head=3, log=True)         # log colour scale (zeros left blank)
    qkplot.attention_to_token(ds, layer=15, head=3)        # what the last token attended to
    qkplot.head_grid(open_summary("<id>.zarr.zip"))        # per-head pattern labels

Each function takes a bundle's Dataset (``open_bundle``, ``open_bulk(...).sequence(i)``, or a
:func:`storage.bundle.trim.sequence_view`), an ``xarray.DataArray`` ``(query, key)`` or a numpy
``[query, key]`` array (labels from ``tokens=``), draws on ``ax`` (a new pyplot figure when
omitted) and returns the matplotlib ``Axes``. A Dataset is trimmed to the sequence's own tokens
first, and only the selected (layer, head, sequence) block is read, or computed for a
derived-attention bundle. matplotlib is imported on first use (``pip install 'qkvault[plot]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.bundle.tokencoords import KEY_TOKEN, QUERY_TOKEN

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["attention_to_token", "head_grid", "heatmap", "thinned_ticks", "token_label"]

MAX_LABELS = 40  # tick labels per axis before thinning to every n-th token


@dataclass(frozen=True)
class Matrix:
    """Attention ``values [rows, keys]`` (float32) with each row's and key's token label and
    position (``None``: positions unknown, a plain array's rows), and where it came from."""

    values: np.ndarray
    row_labels: list[str]
    key_labels: list[str]
    row_positions: np.ndarray | None
    what: str


def token_label(token: str) -> str:
    """A token string as a tick label: control characters escaped (``"\\n"`` → ``\\n``), ``$``
    escaped (matplotlib would parse ``$...$`` as math)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(token))
    return text.replace("$", r"\$")


def thinned_ticks(count: int, max_labels: int = MAX_LABELS) -> np.ndarray:
    """Tick positions ``0, n, 2n, ...`` with ``n`` the smallest step that keeps ≤ ``max_labels``."""
    step = max(1, math.ceil(count / max(1, max_labels)))
    return np.arange(0, count, step)


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - the plot extra is part of dev
        raise ImportError("qkvault.plot needs matplotlib: pip install 'qkvault[plot]'") from exc
    return plt


def _new_axes(ax: Axes | None, size_in: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    _, new = _pyplot().subplots(figsize=size_in, layout="constrained")
    return new


def _coordinate_position(values: list[int], value: int | None, name: str) -> int:
    """Where the model's ``name`` index ``value`` lies along the bundle's ``name`` axis."""
    if value is None:
        if len(values) == 1:
            return 0
        raise ValueError(f"{name}= is required: this bundle exports {name}s {values}")
    if value not in values:
        raise ValueError(f"{name} {value} was not exported: exported {name}s are {values}")
    return values.index(int(value))


def _select(data: Any, layer: int | None, head: int | None, seq: int) -> tuple[Any, str]:
    """The ``(query, key)`` DataArray of one layer, head and sequence of a bundle's Dataset."""
    from storage.bundle.trim import sequence_view

    if "attention" not in data.variables and "sequence" in data.dims:
        raise ValueError(
            "this is a bulk job's sequence table: plot one sequence, open_bulk(path).sequence(i)"
        )
    if "attention" not in data.variables:
        raise ValueError(
            "this bundle has no attention: export with capture.attention=true, or 'derived' "
            "(q and k stored, attention computed on read)"
        )
    view = sequence_view(data, seq)
    att = view["attention"]
    lp = _coordinate_position([int(v) for v in view["layer"].values], layer, "layer")
    att = att.isel(layer=lp)
    real_layer = int(view["layer"].values[lp])
    if "top_head" in att.dims:  # capture.detail="top_heads": the heads kept differ by layer
        kept = [int(v) for v in np.asarray(view["top_head_index"].values)[lp]]
        kp = _coordinate_position(kept, head, f"head (kept for layer {real_layer})")
        att = att.isel(top_head=kp)
        real_head = kept[kp]
    else:
        hp = _coordinate_position([int(v) for v in view["head"].values], head, "head")
        att = att.isel(head=hp)
        real_head = int(view["head"].values[hp])
    return att, f"layer {real_layer}, head {real_head}, sequence {view.attrs.get('sequence', seq)}"


def _labels(array: Any, dim: str, name: str) -> list[str]:
    if name in array.coords:
        return [str(t) for t in np.asarray(array[name].values).reshape(-1)]
    if dim in array.coords:
        return [str(v) for v in np.asarray(array[dim].values).reshape(-1)]
    return [str(i) for i in range(array.sizes[dim])]


def _matrix(
    data: Any,
    *,
    layer: int | None,
    head: int | None,
    seq: int,
    query: slice | int | None,
    key: slice | None,
    tokens: list[str] | None,
) -> Matrix:
    import xarray as xr

    what = ""
    if isinstance(data, xr.Dataset):
        data, what = _select(data, layer, head, seq)
    if isinstance(data, xr.DataArray):
        for dim, value in (("layer", layer), ("head", head)):
            if dim in data.dims and value is not None:
                data = data.sel({dim: value})
        if "batch" in data.dims:
            data = data.isel(batch=seq)
        if data.dims != ("query", "key"):
            raise ValueError(f"expected an attention matrix with dims (query, key), got {data.dims}")
        rows = data.isel(query=_as_slice(query), key=key or slice(None))  # lazy until .values
        positions = np.asarray(rows["query"].values, dtype=np.int64) if "query" in rows.coords else None
        return Matrix(
            values=np.atleast_2d(np.asarray(rows.values, dtype=np.float32)),
            row_labels=_labels(rows, "query", QUERY_TOKEN),
            key_labels=_labels(rows, "key", KEY_TOKEN),
            row_positions=None if positions is None else np.atleast_1d(positions),
            what=what,
        )
    values = np.asarray(data, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D [query, key] array, got shape {values.shape}")
    labels = [str(t) for t in tokens] if tokens is not None else [str(i) for i in range(max(values.shape))]
    if len(labels) < max(values.shape):
        raise ValueError(f"tokens= has {len(labels)} labels for a {values.shape[0]}×{values.shape[1]} matrix")
    row_slice, key_slice = _as_slice(query), key or slice(None)
    row_index, key_index = np.arange(values.shape[0])[row_slice], np.arange(values.shape[1])[key_slice]
    return Matrix(
        values=np.atleast_2d(values[row_slice][:, key_slice]),
        row_labels=[labels[i] for i in np.atleast_1d(row_index)],
        key_labels=[labels[i] for i in key_index],
        row_positions=None,
        what=what,
    )


def _as_slice(query: slice | int | None) -> slice:
    if query is None:
        return slice(None)
    if isinstance(query, slice):
        return query
    return slice(query, query + 1 if query != -1 else None)


def _set_token_ticks(ax: Axes, axis: str, labels: list[str], max_labels: int) -> None:
    ticks = thinned_ticks(len(labels), max_labels)
    texts = [token_label(labels[i]) for i in ticks]
    size = 8 if len(ticks) <= 20 else 6
    if axis == "x":
        ax.set_xticks(ticks, texts, rotation=90, fontsize=size)
    else:
        ax.set_yticks(ticks, texts, fontsize=size)


def heatmap(
    data: Any,
    *,
    layer: int | None = None,
    head: int | None = None,
    seq: int = 0,
    query: slice | None = None,
    key: slice | None = None,
    tokens: list[str] | None = None,
    log: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    max_labels: int = MAX_LABELS,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Attention of one (layer, head, sequence) as an image: rows = queries (top to bottom), columns
    = keys, token strings as tick labels on both axes (every n-th when more than ``max_labels``).

    ``layer``/``head``: the model's real indices (the ``layer``/``head`` coordinates; optional when
    only one was exported); ``seq``: the sequence (``batch`` index); ``query``/``key``: a slice
    along the trimmed axes (zoom into a long context: only that block is read or computed);
    ``log``: logarithmic colours from the smallest positive value (exact zeros — keys above the
    diagonal, outside a window — are left blank); ``vmin``/``vmax``: colour range. The image's
    array (``ax.images[0].get_array()``) is the matrix drawn.
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    matrix = _matrix(data, layer=layer, head=head, seq=seq, query=query, key=key, tokens=tokens)
    values = matrix.values
    rows, keys = values.shape
    side = min(12.0, 3.0 + 0.16 * max(min(rows, max_labels), min(keys, max_labels)))
    ax = _new_axes(ax, (side + 1.2, side))
    colours = colormaps[cmap].with_extremes(bad="white")
    if log:
        positive = values[values > 0]
        low = vmin if vmin is not None else (float(positive.min()) if positive.size else 1e-6)
        high = vmax if vmax is not None else (float(positive.max()) if positive.size else 1.0)
        norm: Normalize = LogNorm(vmin=low, vmax=max(high, low * 10))
    else:
        norm = Normalize(vmin=0.0 if vmin is None else vmin, vmax=vmax)
    image = ax.imshow(
        values, cmap=colours, norm=norm, interpolation="nearest", aspect="equal" if rows == keys else "auto"
    )
    _set_token_ticks(ax, "x", matrix.key_labels, max_labels)
    _set_token_ticks(ax, "y", matrix.row_labels, max_labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.figure.colorbar(image, ax=ax, label="attention probability" + (" (log)" if log else ""))
    if title or matrix.what:
        ax.set_title(title or matrix.what, fontsize=10)
    return ax


def attention_to_token(
    data: Any,
    *,
    layer: int | None = None,
    head: int | None = None,
    seq: int = 0,
    query: int = -1,
    top: int | None = None,
    tokens: list[str] | None = None,
    max_labels: int = MAX_LABELS,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """A bar chart of the attention one query row pays to each key token (bar ``i`` = key ``i``,
    labelled with its token string).

    ``query``: the row, an index along the trimmed ``query`` axis (default -1: the last token's
    row; with row selection, the last stored row); keys after the row's own position are exactly 0
    (causal) and not drawn. ``top``: draw only the ``top`` largest keys (in key order). The other
    arguments as :func:`heatmap`. The bar heights (``[p.get_height() for p in ax.patches]``) are
    the row's probabilities.
    """
    matrix = _matrix(data, layer=layer, head=head, seq=seq, query=query, key=None, tokens=tokens)
    row = matrix.values[0]
    label = matrix.row_labels[0]
    keys = np.arange(row.size)
    if matrix.row_positions is not None:  # causal: nothing right of the row's own token
        position = int(matrix.row_positions[0])
        keys = keys[: position + 1]
        where = f"token {position} {token_label(label)!r}"
    else:
        where = f"row {query}"
    if top is not None:
        keys = np.sort(keys[np.argsort(-row[keys], kind="stable")[:top]])
    heights = row[keys]
    width = min(14.0, 2.5 + 0.22 * min(keys.size, max_labels * 2))
    ax = _new_axes(ax, (width, 3.6))
    ax.bar(np.arange(keys.size), heights, color="#3b528b")
    ax.set_xlim(-0.6, keys.size - 0.4)
    _set_token_ticks(ax, "x", [matrix.key_labels[k] for k in keys], max_labels)
    ax.set_xlabel("key token" + (f" (top {top})" if top is not None else ""))
    ax.set_ylabel("attention probability")
    default = f"attention of {where}" + (f" — {matrix.what}" if matrix.what else "")
    ax.set_title(title or default, fontsize=10)
    return ax


def head_grid(
    summary: Any, *, seq: int | None = None, title: str | None = None, ax: Axes | None = None
) -> Axes:
    """The per-head pattern labels as a layer × head grid, one colour per label with a legend
    (:func:`qkvault.labelgrid.draw_label_grid`, as ``qkvault labels`` writes it).

    ``summary``: ``open_summary(path)`` (pooled labels, or ``seq``'s own with ``seq=``) or a bulk
    job's ``open_bulk(path).summary()``. The image's array holds each cell's index in
    :data:`storage.bundle.labels.LABELS`.
    """
    from qkvault.labelgrid import draw_label_grid, figure_size_in

    width, height = figure_size_in(summary)
    ax = _new_axes(ax, (width + 1.8, height))  # room for the legend
    draw_label_grid(ax, summary, title=title, batch=seq)
    return ax
