"""Smoke test of ``python -m bench.interference``: plain inference of a tiny random Llama on the CPU
alone and beside each host load (no assertion on speed: each load must run, be measured and stop)."""

from __future__ import annotations

import json
import multiprocessing
import re
import threading
from pathlib import Path

import pytest

from bench.interference import LOADS, main


def test_plain_inference_is_timed_alone_and_beside_every_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, out = tmp_path / "store", tmp_path / "interference.json"
    store.mkdir()
    argv = ["--device", "cpu", "--model", "tiny", "--prompts", "4", "--max-tokens", "48", "--threads", "1"]
    assert main([*argv, "--store", str(store), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    row = r"^\| ([a-z-]+) \| (\d+) \| (\d+\.\d+) \| (\d+\.\d+)× \| — \| (.+) \|$"
    rows = re.findall(row, printed, re.MULTILINE)
    assert [r[0] for r in rows] == list(LOADS)
    assert rows[0][1:2] == ("0",) and rows[0][3:] == ("1.00", "—")  # the baseline: no load
    runs = {r["load"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == list(LOADS)
    for name, run in runs.items():
        assert run["seconds"] > 0 and run["gpu_busy_percent"] is None  # no GPU here
        if name == "none":
            assert run["rate"] is None and run["threads"] == 0
        else:  # the load ran beside the timed run, and was measured
            assert run["rate"] > 0 and run["threads"] == 1, name
    assert runs["gil"]["unit"] == "hand-overs/s" and runs["pipeline"]["unit"] == "GB/s"
    assert not [t.name for t in threading.enumerate() if t.name.startswith("load-")]  # loads stopped
    assert not [p.name for p in multiprocessing.active_children() if p.name.startswith("load-proc-")]
    assert list(store.iterdir()) == []  # the pipeline load's chunks removed


def test_an_unknown_load_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cpu", "--model", "tiny", "--loads", "none,disk"]) == 2
    assert "--loads: unknown ['disk']" in capsys.readouterr().err
