"""The README's picture: an induction head of SmolLM2-135M-Instruct, drawn by ``qkvault.plot``.

    .venv/bin/python scripts/readme_picture.py -o docs/images/smollm2-induction-head.png

Starts the embedded stack (Redis, SQLite, local store, API, one worker) in a temporary home,
exports the attention of every layer for a sentence said twice, downloads the bundle, finds the
head with the highest induction score (the mean attention a repeated token pays to the token that
followed its previous occurrence) and draws it with :func:`qkvault.plot.heatmap` next to
:func:`qkvault.plot.attention_to_token` of a token of the second sentence. Prints the job, the head and its
score. On 2 CPU cores it takes about a minute, most of it starting the stack.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from qkvault.embedded import EmbeddedStack
from storage.bundle import open_bundle
from storage.bundle.trim import sequence_view
from storage.models.spec import SMOLLM2_GGUF

PROMPT = (
    "Mr Dursley was the director of a firm called Grunnings, which made drills. "
    "Mr Dursley was the director of a firm called Grunnings, which made drills."
)


def induction_pairs(view: xr.Dataset) -> list[tuple[int, int]]:
    """(query row, key) pairs: a token seen before, and the token that followed its previous
    occurrence (one sequence without padding, as :func:`sequence_view` gives)."""
    tokens = [int(t) for t in view["tokens"].values]
    pairs = []
    for i, token in enumerate(tokens):
        earlier = [j for j in range(i - 1) if tokens[j] == token]
        if earlier:
            pairs.append((i, earlier[-1] + 1))
    return pairs


def induction_scores(view: xr.Dataset) -> np.ndarray:
    """``[layer, head]``: the mean attention of the :func:`induction_pairs`."""
    rows, keys = np.asarray(induction_pairs(view)).T
    attention = np.asarray(view["attention"].values, dtype=np.float32)  # [layer, head, query, key]
    return attention[:, :, rows, keys].mean(axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/images/smollm2-induction-head.png")
    parser.add_argument("--bundle", help="draw from this bundle (a zip or .zarr) instead of exporting one")
    parser.add_argument("--keep", help="copy the exported bundle's zip here")
    args = parser.parse_args()
    if args.bundle:
        ds = open_bundle(args.bundle)
        draw(ds, Path(args.output), str(ds.attrs["job_id"]))
        return
    spec = {
        "model": {"id": SMOLLM2_GGUF},
        "prompts": [PROMPT],
        "generation": {"max_new_tokens": 4},
        "capture": {"attention": True},
        "label": "README picture",
    }
    with tempfile.TemporaryDirectory(prefix="qkvault-picture-") as home:
        with EmbeddedStack(Path(home)) as stack, stack.client(timeout_s=120.0) as client:
            job = client.wait(client.submit(spec).id, poll_s=1.0)
            zip_path = client.download(job.id, Path(home) / f"{job.id}.zarr.zip")
        if args.keep:
            shutil.copyfile(zip_path, args.keep)
        draw(open_bundle(zip_path), Path(args.output), job.id)


def draw(ds: xr.Dataset, out: Path, job_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import qkvault.plot as qkplot

    view = sequence_view(ds, 0)
    scores = induction_scores(view)
    lp, hp = np.unravel_index(int(np.argmax(scores)), scores.shape)
    layer, head = int(view["layer"].values[lp]), int(view["head"].values[hp])
    query, _ = induction_pairs(view)[len(induction_pairs(view)) // 2]  # a token of the second sentence
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 7.2), width_ratios=[1.25, 1], layout="constrained")
    qkplot.heatmap(
        view,
        layer=layer,
        head=head,
        max_labels=64,
        title=f"SmolLM2-135M-Instruct, layer {layer} head {head}: an induction head "
        f"(score {scores[lp, hp]:.2f})",
        ax=left,
    )
    qkplot.attention_to_token(view, layer=layer, head=head, query=query, top=12, ax=right)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"job {job_id}: layer {layer} head {head}, induction score {scores[lp, hp]:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
