"""The per-head pattern labels of a bundle as a layer × head grid: drawn on a matplotlib Axes
(:func:`draw_label_grid`, used by :func:`qkvault.plot.head_grid`) or written as PNG/SVG
(:func:`render_label_grid`, `qkvault labels`)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from storage.bundle.labels import LABELS

COLOURS = {
    "uniform": "#bdbdbd",
    "previous_token": "#e6550d",
    "sink": "#3182bd",
    "local": "#31a354",
    "streaming": "#756bb1",
    "retrieval_candidate": "#d62728",
    "scattered": "#fdae6b",
    "mixed": "#9ecae1",
    "undetermined": "#ffffff",
}


def label_matrix(summary: Any, batch: int | None = None) -> np.ndarray:
    """``[layer, head]`` label strings: the pooled labels (``pooled_label``; a bulk job's
    ``BulkBundle.summary()`` calls them ``label``), or sequence ``batch``'s ``label``."""
    if batch is not None:
        labels = summary["label"][:, batch]
    elif "pooled_label" in summary:
        labels = summary["pooled_label"]
    elif "label" in summary and summary["label"].ndim == 2:
        labels = summary["label"]
    else:
        raise KeyError("this summary has no pooled labels: pass batch= to draw one sequence's labels")
    return np.array(np.asarray(labels).tolist(), dtype=str)  # zarr variable-length strings → numpy str


def figure_size_in(summary: Any) -> tuple[float, float]:
    """(width, height) in inches that fits the grid of ``summary``'s layers × heads."""
    return (1.0 + 0.55 * summary.sizes["head"], 1.2 + 0.28 * summary.sizes["layer"])


def draw_label_grid(ax: Any, summary: Any, *, title: str | None = None, batch: int | None = None) -> Any:
    """Draw the layer × head grid of labels (:func:`label_matrix`) on the matplotlib ``ax``;
    returns its image (``AxesImage``: its array holds each cell's index in ``LABELS``)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    labels = label_matrix(summary, batch)
    layers, heads = summary["layer"].values, summary["head"].values
    codes = np.vectorize(LABELS.index, otypes=[np.int64])(labels)
    image = ax.imshow(
        codes,
        cmap=ListedColormap([COLOURS[n] for n in LABELS]),
        vmin=0,
        vmax=len(LABELS) - 1,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(range(len(heads)), [str(h) for h in heads])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(-0.5, len(heads)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(layers)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    present = [n for n in LABELS if (labels == n).any()]
    ax.legend(
        handles=[Patch(color=COLOURS[n], label=n.replace("_", " ")) for n in present],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    if title:
        ax.set_title(textwrap.fill(title, 48), fontsize=10)
    return image


def render_label_grid(
    summary: Any, path: str | Path, *, title: str | None = None, batch: int | None = None
) -> Path:
    """Write a grid of ``summary.pooled_label`` (or ``label`` of one sequence) to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing left open

    fig = Figure(figsize=figure_size_in(summary))
    draw_label_grid(fig.subplots(), summary, title=title, batch=batch)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
