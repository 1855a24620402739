"""QKVAULT_METRICS_SIDE_STREAM reaches every exporter's metrics: the worker's settings → its
ModelCache → each LoadedModel → the summary's HeadMetricsAccumulator (worker/capture/sidestream.py
SideWork). On the CPU the side stream is the current stream: a summary job gives the same bundle
either way. The CUDA behaviour is tested in tests/worker/test_sidestream.py and
tests/worker/fused_cases.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage.bundle import open_summary
from storage.bundle.writer import BundleWriter
from storage.jobs.spec import JobSpec
from worker.export import Exporter
from worker.settings import WorkerSettings
from worker.tasks import WorkerState

from .conftest import CollectingHooks, model_cache_dir


def test_the_setting_is_read_from_the_environment_and_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().metrics_side_stream is False
    monkeypatch.setenv("QKVAULT_METRICS_SIDE_STREAM", "true")
    assert WorkerSettings().metrics_side_stream is True


def test_each_micro_batch_s_metrics_take_the_worker_s_choice(tiny_model_dir: Any, tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "model": {"id": str(tiny_model_dir("llama"))},
            "prompts": ["the quick brown fox jumps over the lazy dog " * 2, "a second prompt, shorter"],
            "generation": {"max_new_tokens": 3},
            "capture": {"detail": "summary"},
        }
    )
    summaries = []
    for on_side in (False, True):
        settings = WorkerSettings(
            database_url=f"sqlite:///{tmp_path}/index-{on_side}.db",
            store_url=str(tmp_path / "store"),
            model_cache_dir=model_cache_dir(),
            model_roots=[Path(spec.model.id).parent],
            device="cpu",
            metrics_side_stream=on_side,
        )
        _, _, models = WorkerState(settings).resources()  # as the worker's pool child builds them
        lm = models.get(spec.model)
        assert lm.metrics_side_stream is on_side
        out = tmp_path / f"side-{on_side}.zarr"
        exporter = Exporter(spec, lm, BundleWriter(str(out)), CollectingHooks())
        assert exporter.metrics._side.enabled is on_side
        exporter.run("metrics-stream")
        summaries.append(open_summary(str(out)))
    current, side = summaries
    for name in current.data_vars:
        np.testing.assert_array_equal(side[name].values, current[name].values, err_msg=str(name))
