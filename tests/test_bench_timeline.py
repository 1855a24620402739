"""bench.timeline: the GPU-clock totals of a run's marks (written by hand), and what recording
wraps and puts back (marks taken on the host: no CUDA here)."""

from __future__ import annotations

import inspect

import pytest
import torch

from bench.timeline import (
    FORWARD_END,
    FORWARD_START,
    METRICS_END,
    METRICS_START,
    Timeline,
    timeline_totals,
)
from worker.capture.metrics import HeadMetricsAccumulator


def test_totals_split_forwards_gaps_and_metrics() -> None:
    marks = [
        (FORWARD_START, 0.0),
        (METRICS_START, 10.0),
        (METRICS_END, 14.0),
        (METRICS_START, 20.0),
        (METRICS_END, 21.0),
        (FORWARD_END, 30.0),
        (FORWARD_START, 45.0),  # 15 ms between the forwards
        (FORWARD_END, 60.0),
    ]
    totals = timeline_totals(marks)
    assert totals.forwards == 2
    assert totals.in_forwards_s == pytest.approx(0.045)
    assert totals.between_forwards_s == pytest.approx(0.015)
    assert totals.metrics_s == pytest.approx(0.005)
    assert totals.model_s == pytest.approx(0.040)
    with pytest.raises(ValueError, match="unknown mark"):
        timeline_totals([("forward begin", 0.0)])


class _Model(torch.nn.Module):
    def forward(self, x: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        return x + logits_to_keep


def test_recording_marks_each_call_and_puts_the_originals_back(monkeypatch: pytest.MonkeyPatch) -> None:
    timeline = Timeline(torch.device("cuda"))  # a device name only: the marks are faked below
    kinds: list[str] = []
    monkeypatch.setattr(timeline, "_mark", kinds.append)
    model, observe_qk = _Model(), HeadMetricsAccumulator.observe_qk
    with timeline.recording(model):
        assert "logits_to_keep" in inspect.signature(model.forward).parameters  # as the exporter reads it
        assert model(torch.ones(1), logits_to_keep=2).item() == 3
        assert HeadMetricsAccumulator.observe_qk is not observe_qk
    assert kinds == [FORWARD_START, FORWARD_END]
    assert "forward" not in model.__dict__ and HeadMetricsAccumulator.observe_qk is observe_qk


def test_off_cuda_nothing_is_recorded() -> None:
    timeline, model = Timeline(torch.device("cpu")), _Model()
    with timeline.recording(model):
        assert "forward" not in model.__dict__
    assert timeline.totals() is None
