"""Render the per-head pattern labels of a bundle as a layer × head grid (PNG/SVG via matplotlib)."""

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


def render_label_grid(
    summary: Any, path: str | Path, *, title: str | None = None, batch: int | None = None
) -> Path:
    """Write a grid of ``summary.pooled_label`` (or ``label`` of one sequence) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    labels = np.asarray(summary["pooled_label"] if batch is None else summary["label"][:, batch])  # [L, H]
    layers, heads = summary["layer"].values, summary["head"].values
    labels = np.array(labels.tolist(), dtype=str)  # zarr variable-length strings → plain numpy str
    codes = np.vectorize(LABELS.index)(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(heads), 1.2 + 0.28 * len(layers)))
    ax.imshow(
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
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
