"""examples/look_at_a_bundle.ipynb executed in a real Jupyter kernel (nbclient + ipykernel) on a
bundle exported here (tiny Llama, in-process): every cell runs, the trimmed sequence it prints is
that sequence's tokens, and each plotting cell leaves one PNG figure."""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

from tests.worker.export_helpers import export
from tests.worker.tiny_models import build_tiny_model

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "look_at_a_bundle.ipynb"


def _png_size(output: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of a display_data output's PNG."""
    data = base64.b64decode(output["data"]["image/png"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_the_example_notebook_draws_a_fresh_bundle(tmp_path: Path) -> None:
    model = build_tiny_model("llama", tmp_path / "llama")
    spec = {
        "model": {"id": str(model)},
        "prompts": ["The cat sat on the mat, and the cat sat.", "Hi there!"],
        "generation": {"max_new_tokens": 3},
        "capture": {"attention": True, "summary": True},
    }
    ds, _, _ = export(spec, tmp_path / "bundle.zarr")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    env = {
        **os.environ,
        "QKVAULT_EXAMPLE_BUNDLE": str(tmp_path / "bundle.zarr"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    client.execute(env=env)  # raises CellExecutionError naming the cell if one fails

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    printed = "".join(o.get("text", "") for o in code[1].outputs if o.output_type == "stream")
    last = [str(s) for s in ds.attrs["token_strings"][-1]]
    assert printed.splitlines()[-1] == repr(last)  # sequence_view kept exactly the last sequence's tokens
    figures = [
        [o for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        for cell in code[2:]
    ]
    assert [len(f) for f in figures] == [1, 1, 1, 1], "heatmap, log heatmap, bar chart, head grid"
    for (output,) in figures:
        width, height = _png_size(output)
        assert width > 200 and height > 150
    texts = "".join(o.get("text", "") for cell in code for o in cell.outputs if o.output_type == "stream")
    assert "no head labels" not in texts
