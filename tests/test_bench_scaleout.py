"""Smoke test of ``python -m bench.scaleout``: two real worker processes share one job cut by layers
(the micro-batch cut runs on real workers in tests/worker/test_shards_processes.py); the table's
rows are checked, not the speed."""

from __future__ import annotations

import json

import pytest

from bench.scaleout import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_scaleout_bench_runs_a_layer_cut_job_on_two_workers(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--workers",
        "2",
        "--cut",
        "layers",
        "--prompt-tokens",
        "96",
        "--shard-layers",
        "2",
        "--no-baseline",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    [row] = json.loads(out[: out.index("\n]") + 2])
    assert row["workers"] == 2 and row["cut"] == "layers" and row["shards"] == 2
    assert sum(row["shards_per_worker"]) == 2 and row["seconds"] > 0 and row["tokens_per_s"] > 0
    assert "speed-up" in out  # the table after the JSON
