"""Where a GPU's time went in a timed run, on the GPU's own clock and without a profiler
(``python -m bench.bulk --timeline``).

Under :class:`Timeline`, timing events are recorded on the current CUDA stream just before and just
after every forward call of the model (one per micro-batch's prefill, one per decoding step) and
every fused-metrics call (:meth:`worker.capture.metrics.HeadMetricsAccumulator.observe_qk`, inside
a forward). After the run, the intervals between them (:func:`timeline_totals`) say:

- **in forwards**: from the point each forward's work starts on the stream to the point it ends:
  its kernels and any time the GPU waited inside it for the host's launches;
- **between forwards**: from one forward's end to the next one's start: the host's work between
  micro-batches (or decoding steps) that the GPU waited for, plus the few kernels queued there;
- **metrics**: inside the fused-metrics calls: the summary's kernels and any wait for their
  launches; **model** is in forwards minus metrics.

Run on the same micro-batches, plain's and a mode's figures compare directly: a mode's model time
above plain's is idle inside the layers (the capture's host work made the GPU wait), its time
between forwards above plain's is work between micro-batches. Recording an event costs a few
microseconds of host time (two per forward call and two per fused-metrics call, i.e. per layer
call in a summary): the run is timed as usual. Off CUDA nothing is
recorded and the totals are None.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

FORWARD_START, FORWARD_END = "forward start", "forward end"
METRICS_START, METRICS_END = "metrics start", "metrics end"


@dataclass(frozen=True)
class TimelineTotals:
    """Seconds on the GPU's clock (module docstring) over ``forwards`` forward calls."""

    forwards: int
    in_forwards_s: float
    between_forwards_s: float
    metrics_s: float

    @property
    def model_s(self) -> float:
        return self.in_forwards_s - self.metrics_s


def timeline_totals(marks: Sequence[tuple[str, float]]) -> TimelineTotals:
    """The totals of ``marks``: ``(kind, milliseconds)`` in the order recorded, each kind one of
    the module's four; a forward's start follows the previous forward's end, metrics marks pair up
    inside a forward."""
    forwards = 0
    in_forwards = between = metrics = 0.0
    started: dict[str, float] = {}
    last_end: float | None = None
    for kind, ms in marks:
        if kind == FORWARD_START:
            forwards += 1
            started[FORWARD_START] = ms
            if last_end is not None:
                between += ms - last_end
        elif kind == FORWARD_END:
            in_forwards += ms - started.pop(FORWARD_START)
            last_end = ms
        elif kind == METRICS_START:
            started[METRICS_START] = ms
        elif kind == METRICS_END:
            metrics += ms - started.pop(METRICS_START)
        else:
            raise ValueError(f"unknown mark {kind!r}")
    return TimelineTotals(forwards, in_forwards / 1e3, between / 1e3, metrics / 1e3)


class Timeline:
    """Records the marks of one timed run on ``device`` (module docstring): ``with
    timeline.recording(model): ...`` then :meth:`totals`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: list[tuple[str, Any]] = []

    def _mark(self, kind: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self._events.append((kind, event))

    def _wrap(self, call: Callable[..., Any], start: str, end: str) -> Callable[..., Any]:
        @functools.wraps(call)  # the signature stays readable (the exporter inspects the model's)
        def marked(*args: Any, **kwargs: Any) -> Any:
            self._mark(start)
            try:
                return call(*args, **kwargs)
            finally:
                self._mark(end)

        return marked

    @contextmanager
    def recording(self, model: Any) -> Iterator[None]:
        """Mark ``model``'s forward calls and the fused-metrics calls while the block runs (on CUDA;
        elsewhere the block runs as it is)."""
        if self.device.type != "cuda":
            yield
            return
        from worker.capture.metrics import HeadMetricsAccumulator

        observe_qk = HeadMetricsAccumulator.observe_qk
        own = model.__dict__.get("forward")  # an instance's own forward (a placement hook's), if any
        model.forward = self._wrap(model.forward, FORWARD_START, FORWARD_END)
        HeadMetricsAccumulator.observe_qk = self._wrap(  # type: ignore[method-assign]
            observe_qk, METRICS_START, METRICS_END
        )
        try:
            yield
        finally:
            if own is None:
                del model.forward  # the class's forward again
            else:
                model.forward = own
            HeadMetricsAccumulator.observe_qk = observe_qk  # type: ignore[method-assign]

    def totals(self) -> TimelineTotals | None:
        """The run's totals once its work ran (waits for the device); None off CUDA."""
        if self.device.type != "cuda" or not self._events:
            return None
        torch.cuda.synchronize(self.device)
        first = self._events[0][1]
        return timeline_totals([(kind, first.elapsed_time(event)) for kind, event in self._events])
