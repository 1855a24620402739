"""``bench.gpubusy.GpuBusy``: the mean of nvidia-smi's utilization samples over a block, nothing off
CUDA. The GPU case runs a stand-in ``nvidia-smi`` (this machine has no GPU): what is checked is the
command GpuBusy runs and how it reads and ends it, not a GPU's figures."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpubusy import GpuBusy


def test_nothing_runs_off_cuda() -> None:
    with GpuBusy(torch.device("cpu")) as busy:
        pass
    assert busy.percent is None and busy.samples == 0


def test_nothing_runs_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvidia-smi
    with GpuBusy(torch.device("cuda", 0), gpu_id="0") as busy:
        pass
    assert busy.percent is None and busy.samples == 0


def test_mean_of_the_samples_while_the_block_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    argv_file = tmp_path / "argv"
    program = tmp_path / "nvidia-smi"
    program.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        f"open({str(argv_file)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        "for value in ('37', '[N/A]', '63'):\n"
        "    print(value, flush=True)\n"
        "time.sleep(60)\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    with GpuBusy(torch.device("cuda", 0), gpu_id="GPU-1234") as busy:
        while not argv_file.exists() and time.monotonic() - started < 20:
            time.sleep(0.05)
        time.sleep(0.3)  # its samples printed
    assert time.monotonic() - started < 30  # ended at the block's end, not the program's
    assert argv_file.read_text().split() == [
        "--id=GPU-1234",
        "--query-gpu=utilization.gpu",
        "--format=csv,noheader,nounits",
        "-lms=100",
    ]
    assert busy.samples == 2 and busy.percent == pytest.approx(50.0)
