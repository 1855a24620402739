"""The fused summary kernels (worker/capture/fused_metrics.py): the cases of
tests/worker/fused_cases.py in a process of their own, on the CPU through Triton's interpreter and,
with a GPU, on CUDA. Triton decides at import whether its library functions are interpreted, so the
interpreter cannot share a process with compiled kernels (or with tests that imported Triton)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("fused_cases.py")
ROOT = Path(__file__).resolve().parents[2]


def _run_cases(extra_env: dict[str, str], timeout_s: int) -> None:
    env = {**os.environ, **extra_env}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(CASES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_fused_kernels_in_the_interpreter() -> None:
    """Every case on the CPU through Triton's interpreter (the CI's check of the kernels' logic)."""
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("CI") == "true":  # the dev install has it: CI never skips these
            pytest.fail("Triton is not installed: the dev install (pyproject's dev extra) should have it")
        pytest.skip("Triton is not installed")
    _run_cases({"TRITON_INTERPRET": "1", "QKVAULT_TEST_FUSED_DEVICE": "cpu"}, timeout_s=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_kernels_on_cuda() -> None:
    """Every case compiled for the GPU."""
    env = {"QKVAULT_TEST_FUSED_DEVICE": "cuda"}
    _run_cases(env, timeout_s=600)
