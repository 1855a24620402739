"""Per-head pattern labels of SmolLM2-135M-Instruct on a long prompt, through the real service.

    .venv/bin/python scripts/label_grid.py -o docs/images/smollm2-labels.png

Starts the embedded stack (Redis, SQLite, local store, API, one worker), submits a ``detail=summary``
job whose prompt is ``scripts/data/long-prompt.txt`` (a frozen copy of the start of this repository's
README.md followed by docs/bundle-format.md, so the figures in docs/research-capture.md do not
drift when the docs change), downloads the bundle, draws the layer × head grid of pooled labels and
prints the label counts and the context-length range the metrics came from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkvault.bundlefile import DEFAULT_DOWNLOAD_DIR
from qkvault.embedded import EmbeddedStack
from qkvault.labelgrid import render_label_grid
from storage.bundle import open_bundle, open_summary
from storage.models.spec import SMOLLM2_GGUF

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/images/smollm2-labels.png")
    args = parser.parse_args()
    prompt = (REPO / "scripts" / "data" / "long-prompt.txt").read_text(encoding="utf-8")
    spec = {
        "model": {"id": SMOLLM2_GGUF},
        "prompts": [prompt],
        "generation": {"max_new_tokens": 16},
        "capture": {"detail": "summary"},
        "label": "label grid for the docs",
    }
    with EmbeddedStack() as stack, stack.client() as client:
        job = client.wait(client.submit(spec).id, poll_s=1.0)
        downloads = REPO / DEFAULT_DOWNLOAD_DIR
        downloads.mkdir(parents=True, exist_ok=True)  # a directory: the zip goes in as <id>.zarr.zip
        zip_path = client.download(job.id, downloads)
    bundle, summary = open_bundle(zip_path), open_summary(zip_path)
    low, high = job.result["summary"]["context_length_range"] if job.result else (None, None)
    title = (
        f"SmolLM2-135M-Instruct pooled head labels, {int(bundle['length'][0])} tokens "
        f"(metrics from rows with {low}..{high} visible keys)"
    )
    out = render_label_grid(summary, args.output, title=title)
    counts = job.result["summary"]["pooled_label_counts"] if job.result else {}
    print(f"job {job.id}: {counts}; context length range {low}..{high}; wrote {out}")


if __name__ == "__main__":
    main()
