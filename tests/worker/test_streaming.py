"""Streaming is real: exporting 4× more layers does not raise peak memory by a layer's attention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
PROMPT_TOKENS = 2048
HEADS = 4


def _peak(folder: Path, bundle: Path, layers: int) -> dict[str, int]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.worker.memory_probe",
            str(folder),
            str(bundle),
            str(layers),
            str(PROMPT_TOKENS),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_layers(tmp_path: Path) -> None:
    folder = build_tiny_model(
        "llama",
        tmp_path / "model",
        overrides={
            "num_hidden_layers": 8,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        },
    )
    two = _peak(folder, tmp_path / "two.zarr", 2)
    eight = _peak(folder, tmp_path / "eight.zarr", 8)
    assert two["length"] == eight["length"] == PROMPT_TOKENS
    assert eight["chunks"] > 3.5 * two["chunks"]  # 4x the layers really were written
    one_layer_fp32_bytes = HEADS * PROMPT_TOKENS * PROMPT_TOKENS * 4  # 64 MiB: one layer's full attention
    growth = eight["peak_bytes"] - two["peak_bytes"]
    # Holding all layers would add 6 layers' worth (384 MiB in fp32, 192 MiB in fp16).
    assert growth < one_layer_fp32_bytes, f"peak grew {growth / 2**20:.1f} MiB from 2 to 8 layers"
