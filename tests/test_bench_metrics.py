"""Smoke tests of ``python -m bench.metrics`` and of ``python -m bench.bulk --modes`` with the summary
mode's window options (docs/benchmarks.md, "Summary metrics"; no assertion on speed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import bulk, metrics


def test_metrics_bench_times_each_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "metrics.json"
    assert (
        metrics.main(["--device", "cpu", "--shapes", "2x4x16,3x1x300", "--repeat", "2", "--json", str(out)])
        == 0
    )
    rows = re.findall(r"^\| (\d+) × (\d+) × (\d+) \| [\d.]+ \|", capsys.readouterr().out, re.MULTILINE)
    assert rows == [("2", "4", "16"), ("3", "1", "300")]
    shapes = json.loads(out.read_text())["shapes"]
    assert [(s["heads"], s["rows"], s["keys"]) for s in shapes] == [(2, 4, 16), (3, 1, 300)]
    assert all(s["ms_per_call"] > 0 for s in shapes)


def test_metrics_bench_rejects_a_bad_shape(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        metrics.main(["--shapes", "2x40x16"])  # more rows than keys: not causal
    assert "rows (40) cannot exceed keys (16)" in capsys.readouterr().err


def test_bulk_bench_runs_the_chosen_modes(tmp_path: Path) -> None:
    out = tmp_path / "bulk.json"
    argv = ["--device", "cpu", "--model", "tiny", "--prompts", "3", "--min-tokens", "8", "--max-tokens", "24"]
    argv += [
        "--modes",
        "summary",
        "--sink-tokens",
        "1",
        "--local-window",
        "2",
        "--store",
        str(tmp_path / "s"),
    ]
    assert bulk.main([*argv, "--json", str(out)]) == 0
    modes = json.loads(out.read_text())["modes"]
    assert list(modes) == [bulk.PLAIN, "summary"]
    assert modes["summary"]["capture"]["summary_params"] == {"sink_tokens": 1, "local_window": 2}
    assert bulk.main([*argv[:-2], "--modes", "summary,nonsense"]) == 2
