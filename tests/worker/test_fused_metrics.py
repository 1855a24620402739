"""The fused summary kernels (worker/capture/fused_metrics.py): the cases of
tests/worker/fused_cases.py in a process of their own, on the CPU through Triton's interpreter and,
with a GPU, on CUDA. Triton decides at import whether its library functions are interpreted, so the
interpreter cannot share a process with compiled kernels (or with tests that imported Triton)."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

CASES = Path(__file__).with_name("fused_cases.py")
ROOT = Path(__file__).resolve().parents[2]


def _run_cases(
    extra_env: dict[str, str], timeout_s: int, skipped: int = 0, select: str | None = None
) -> None:
    """The cases (those ``select`` names: a ``-k`` expression) in a process of their own; exactly
    ``skipped`` of them skip (those for a GPU only)."""
    env = {**os.environ, **extra_env}
    chosen = ["-k", select] if select else []
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *chosen, str(CASES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and (f"{skipped} skipped" in summary) == bool(skipped), summary
    assert skipped or "skipped" not in summary, summary


# the interpreter takes minutes: the cases in two processes of about the same length, so the suite's
# two workers share them (the compile-count case, CUDA's, skips: the interpreter compiles nothing);
# the self-check goes with the summary export, whose capture made the same check in that process
_LONGEST = "long_rows or summary_export or self_check"


@pytest.mark.parametrize(
    ("select", "skipped"), [(_LONGEST, 0), (f"not ({_LONGEST})", 1)], ids=["longest", "rest"]
)
def test_fused_kernels_in_the_interpreter(select: str, skipped: int) -> None:
    """Every case on the CPU through Triton's interpreter (the CI's check of the kernels' logic)."""
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("CI") == "true":  # the dev install has it: CI never skips these
            pytest.fail("Triton is not installed: the dev install (pyproject's dev extra) should have it")
        pytest.skip("Triton is not installed")
    env = {"TRITON_INTERPRET": "1", "QKVAULT_TEST_FUSED_DEVICE": "cpu"}
    _run_cases(env, timeout_s=600, skipped=skipped, select=select)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_kernels_on_cuda() -> None:
    """Every case compiled for the GPU."""
    env = {"QKVAULT_TEST_FUSED_DEVICE": "cuda"}
    _run_cases(env, timeout_s=600)


@pytest.fixture
def fresh_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """worker.capture.fused_metrics with the device taken as able (no Triton needed) and the
    self-check's cache empty before and after."""
    from worker.capture import fused_metrics

    monkeypatch.setattr(fused_metrics, "fused_available", lambda _device: True)
    fused_metrics.fused_verified.cache_clear()
    yield fused_metrics
    fused_metrics.fused_verified.cache_clear()


def test_a_kernel_that_fails_to_compile_leaves_the_probability_path(
    fresh_check: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Triton that cannot build the kernels costs speed, not the job: no fused path, a warning
    that says why, and the check is not repeated."""
    attempts: list[int] = []

    def broken(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        attempts.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(fresh_check, "fused_row_metrics", broken)
    with caplog.at_level(logging.WARNING, logger=fresh_check.__name__):
        assert not fresh_check.fused_verified(torch.device("cpu"), torch.float32)
        assert not fresh_check.fused_verified(torch.device("cpu"), torch.float32)
    assert attempts == [1]
    assert "not used on cpu for torch.float32: RuntimeError: PassManager::run failed" in caplog.text


def _row_metrics_as_fused(off_metric: str | None) -> Any:
    """A stand-in for fused_row_metrics on the self-check's one-sequence case, from row_metrics of
    the probabilities; ``off_metric`` (if set) 0.5 off."""
    from worker.capture.attention_math import attention_probs, causal_allowed
    from worker.capture.metrics import ROW_METRICS, row_metrics

    def fused(query: torch.Tensor, key: torch.Tensor, pads: torch.Tensor, *_: Any, **kw: Any) -> torch.Tensor:
        pad, rows = int(pads[0]), query.shape[2]
        positions = torch.arange(kw["query_offset"], kw["query_offset"] + rows) - pad
        keys = key[:, :, pad - kw["key_offset"] :].float()
        allowed = causal_allowed(positions, torch.arange(keys.shape[2]))
        probs = attention_probs(query.float(), keys, scaling=kw["scaling"], allowed=allowed)[0]
        metrics = row_metrics(
            probs, positions, sink_tokens=kw["sink_tokens"], local_window=kw["local_window"]
        )
        out = torch.stack([metrics[name].float() for name in ROW_METRICS])
        if off_metric is not None:
            out[ROW_METRICS.index(off_metric)] += 0.5
        return out[:, None]

    return fused


def test_kernels_that_compute_wrong_values_leave_the_probability_path(
    fresh_check: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Kernels that give row_metrics' values pass; the same with one metric off fail the check,
    which names the metric, and the path stays off."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(fresh_check, "fused_row_metrics", _row_metrics_as_fused(None))
    assert fresh_check.fused_verified(cpu, torch.float32)
    fresh_check.fused_verified.cache_clear()
    monkeypatch.setattr(fresh_check, "fused_row_metrics", _row_metrics_as_fused("entropy"))
    with caplog.at_level(logging.WARNING, logger=fresh_check.__name__):
        assert not fresh_check.fused_verified(cpu, torch.float32)
    assert "entropy differs from row_metrics by 0.5" in caplog.text


@pytest.mark.parametrize(
    ("n_rows", "first_keys", "max_width", "want"),
    [
        (1, 700, 1024, [(0, 1, 1024)]),  # a decoding step: one row, its own width
        (5, 1, 1024, [(0, 5, 16)]),  # short rows: the narrowest program
        (40, 1, 64, [(0, 16, 16), (16, 32, 32), (32, 40, 64)]),
        (300, 100, 256, [(0, 29, 128), (29, 300, 256)]),  # rows past the call's width stay at it
        (10, -5, 1024, [(0, 10, 16)]),  # rows of a padded sequence before its first token
    ],
)
def test_row_runs_fit_each_row_in_the_smallest_power_of_two(
    n_rows: int, first_keys: int, max_width: int, want: list[tuple[int, int, int]]
) -> None:
    """Consecutive runs cover every row once; each run's last row fits its width, and the rows of
    the run before would not (no run wider than its rows need)."""
    from worker.capture.fused_metrics import row_runs

    runs = row_runs(n_rows, first_keys, max_width)
    assert runs == want
    assert runs[0][0] == 0 and runs[-1][1] == n_rows
    for (_, end, width), (start, _, _) in itertools.pairwise(runs):
        assert end == start and first_keys + end - 1 <= width
