"""Smoke test of ``python -m bench.scale``: a few hundred sequences from an uploaded JSONL through
the worker's BulkExporter, the table and the reads checked (no assertion on speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scale import main


@pytest.mark.parametrize("capture", ["summary", "hidden_states"])
def test_scale_bench_runs_one_job_and_reads_it_back(tmp_path: Path, capture: str) -> None:
    out = tmp_path / "scale.json"
    argv = ["--sequences", "300", "--capture", capture, "--max-tokens", "12", "--reads", "3"]
    assert main([*argv, "--store", str(tmp_path), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["sequences"] == 300 and figures["micro_batches"] >= 2
    assert 0 <= figures["padding_fraction"] <= 0.05
    assert figures["tokens"] >= 300 * 4 and figures["bundle_bytes"] > 0 and figures["chunks_recorded"] > 0
    assert figures["peak_rss_after_job_bytes"] >= figures["peak_rss_before_job_bytes"] > 0
    assert (figures["summary_over_dataset_s"] is None) == (capture != "summary")
    assert list(tmp_path.iterdir()) == [out]  # the store and the bundle are removed
